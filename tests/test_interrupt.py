"""Ctrl-C on every long-running command: exit status 130, one line, nothing half-written.

Python turns SIGINT into KeyboardInterrupt wherever the main thread is; each case raises it at a
point inside the command (mid-training, mid-ingestion, while a run folder is being put in place,
while a report is being computed) and checks what is left on disk.
"""
import pytest

from bench.cli import main
from bench.datasets.cropstore import is_store
from tests_helpers import SHARED_DATA

TP_CT = SHARED_DATA / "tptbox_sub-ct_label-22_ct.nii.gz"
TP_MASK = SHARED_DATA / "tptbox_sub-ct_seg-vert_label-22_msk.nii.gz"


def _ctrl_c(*args, **kwargs):
    raise KeyboardInterrupt


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("interrupt") / "store"
    assert main(["data", "synth", "preset=tiny", f"out={path}"]) == 0
    return path


def _run(store, out, cache, seed=0):
    return ["run", "method=_test_tiny_cnn", "preset=tiny", "epochs=1", f"seed={seed}", f"data={store}",
            f"out={out}", f"cache_dir={cache}"]


def _one_line(capsys) -> None:
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["bench: interrupted"], err


@pytest.mark.parametrize("where", ["bench.loop.TrainingLoop._train_epoch", "bench.store.replace_folder"])
def test_a_run_interrupted_leaves_no_run_folder(where, store, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(where, _ctrl_c)
    assert main(_run(store, tmp_path / "runs", tmp_path / "cache")) == 130
    _one_line(capsys)
    left = [p for p in (tmp_path / "runs").rglob("*") if p.is_file() or ".staging-" in p.name]
    assert left == []  # no metrics, no predictions, no staging folder


def test_an_interrupted_rerun_keeps_the_finished_result(store, tmp_path, monkeypatch, capsys):
    assert main(_run(store, tmp_path / "runs", tmp_path / "cache")) == 0
    (folder,) = (tmp_path / "runs" / "single").iterdir()
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    monkeypatch.setattr("bench.store.replace_folder", _ctrl_c)
    assert main(_run(store, tmp_path / "runs", tmp_path / "cache")) == 130  # the same run again
    _one_line(capsys)
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before


def test_an_interrupted_ingestion_leaves_no_store(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("bench.datasets.ingest.sample_crop", _ctrl_c)
    out = tmp_path / "crops"
    assert main(["data", "ingest", f"ct={TP_CT}", f"mask={TP_MASK}", "label_map=verse", f"out={out}",
                 "progress=false", "workers=1"]) == 130
    _one_line(capsys)
    assert not is_store(out)


def test_an_interrupted_report_leaves_the_previous_one(store, tmp_path, monkeypatch, capsys):
    runs, report = tmp_path / "runs", tmp_path / "report"
    assert main(_run(store, runs, tmp_path / "cache")) == 0
    assert main(["report", str(runs), f"out={report}", "bootstrap=10"]) == 0
    before = {p.name: p.read_bytes() for p in report.iterdir()}
    monkeypatch.setattr("bench.reports.build.cells", _ctrl_c)
    assert main(["report", str(runs), f"out={report}", "bootstrap=10"]) == 130
    _one_line(capsys)
    assert {p.name: p.read_bytes() for p in report.iterdir()} == before
