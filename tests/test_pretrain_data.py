"""`pretrain.data=STORE[,STORE]`: the vertebrae stage pretrains on separate unlabelled stores, which
must hold neither a patient nor a crop of the labelled data."""
import json
import shutil

import pandas as pd
import pytest

from bench.cli import main
from tests_helpers import make_verse_tree


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("stores")
    labelled = root / "labelled"
    assert main(["data", "synth", "preset=tiny", f"out={labelled}"]) == 0
    unlabelled = root / "verse"
    assert main(["data", "ingest", f"verse={make_verse_tree(root / 'release')}", f"out={unlabelled}",
                 "progress=false", "workers=1"]) == 0
    return labelled, unlabelled


def test_the_vertebrae_stage_pretrains_on_the_other_store(stores, tmp_path, monkeypatch):
    labelled, unlabelled = stores
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "cache"))
    assert main(["run", "method=mae3d", "regime=vertebrae", "preset=tiny", "epochs=1", "pretrain.epochs=1",
                 f"data={labelled}", f"pretrain.data={unlabelled},{unlabelled}", f"out={tmp_path / 'runs'}",
                 "progress=false"]) == 0
    records = [json.loads(p.read_text()) for p in (tmp_path / "cache").rglob("pretrain.json")]
    assert len(records) == 1
    assert records[0]["n_items"] == 2 * 16  # both listed stores, stacked; none of the synthetic unlabelled set
    assert records[0]["spec"]["data"]["name"] == "pretrain.data:verse,verse"


def test_a_shared_patient_is_refused_naming_both(stores, tmp_path, capsys):
    labelled, _ = stores
    assert main(["run", "method=mae3d", "regime=vertebrae", "preset=tiny", f"data={labelled}",
                 f"pretrain.data={labelled}", f"out={tmp_path}", f"cache_dir={tmp_path / 'cache'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "patient leakage" in err[0] and f"data '{labelled}'" in err[0]
    assert f"pretrain.data '{labelled}'" in err[0]


def test_the_same_crop_under_another_patient_id_is_refused(stores, tmp_path, capsys):
    labelled, _ = stores
    renamed = tmp_path / "renamed"
    shutil.copytree(labelled, renamed)
    manifest = pd.read_parquet(renamed / "manifest.parquet")
    manifest["patient_id"] = "other-" + manifest["patient_id"].astype(str)
    manifest.to_parquet(renamed / "manifest.parquet", index=False)
    assert main(["run", "method=mae3d", "regime=vertebrae", "preset=tiny", f"data={labelled}",
                 f"pretrain.data={renamed}", f"out={tmp_path}", f"cache_dir={tmp_path / 'cache'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "have the content of crops in data" in err[0] and str(renamed) in err[0]


def test_the_old_key_name_still_works_with_one_line_naming_the_new(stores, tmp_path, capsys, monkeypatch):
    """`pretrain_data=` (the name before it moved under `pretrain.`) gives the same run and says so once."""
    import bench.config

    labelled, unlabelled = stores
    monkeypatch.setattr(bench.config, "_said_renamed", set())
    cfg = bench.config.compose({"method": "mae3d", "regime": "vertebrae", "preset": "tiny",
                                "pretrain_data": str(unlabelled)})
    assert cfg.pretrain.data == str(unlabelled) and "pretrain_data" not in cfg
    bench.config.compose({"method": "mae3d", "preset": "tiny", "pretrain_data": str(unlabelled)})
    assert capsys.readouterr().err.strip().splitlines() == ["bench: 'pretrain_data' is deprecated; use 'pretrain.data'"]
    assert main(["run", "method=mae3d", "regime=vertebrae", "preset=tiny", f"data={labelled}",
                 f"pretrain_data={unlabelled}", f"pretrain.data={unlabelled}", f"out={tmp_path}"]) == 2
    assert capsys.readouterr().err.strip() == ("bench: error: command line: 'pretrain_data' and 'pretrain.data' both "
                                               "given; 'pretrain_data' is the old name of 'pretrain.data'")
