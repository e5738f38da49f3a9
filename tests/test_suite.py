"""Suites on Ray Tune: a shared local Ray session, resume after kill -9, and two Ray nodes."""
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from bench.cli import main

MINI = """description: a test suite
seeds: 2
runs:
  - {method: resnet18, regimes: [scratch]}
  - {method: vit_b, regimes: [scratch]}
"""


@pytest.fixture(scope="module")
def ray_session():
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def suite_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("suite") / "mini.yaml"
    path.write_text(MINI)
    return path


def _metrics(root: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text())["test"] for p in sorted(root.glob("mini/*/metrics.json"))}


def test_suite_runs_on_ray_and_reports(ray_session, suite_file, tmp_path, capsys):
    out = tmp_path / "runs"
    assert main(["run", f"suite={suite_file}", "preset=tiny", "epochs=1", f"out={out}"]) == 0
    assert sorted(_metrics(out)) == ["resnet18-scratch-s0", "resnet18-scratch-s1",
                                     "vit_b-scratch-s0", "vit_b-scratch-s1"]
    printed = capsys.readouterr()
    assert printed.err.count(": AUC ") == 4  # one line per finished run
    assert (tmp_path / "reports" / "mini" / "index.html").exists()
    summary = json.loads((out / "mini" / "suite.json").read_text())
    assert summary["machine"]["float32"] > 0
    finetuning = [r for r in summary["compute"] if r["stage"] == "finetuning"]
    assert finetuning and finetuning[0]["tflop"] > 0 and 0 < finetuning[0]["efficiency"] < 1.5
    assert "Where the compute went" in (tmp_path / "reports" / "mini" / "index.html").read_text()
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("mini/*/metrics.json")}
    assert main(["run", f"suite={suite_file}", "preset=tiny", "epochs=1", f"out={out}", "resume=true",
                 "explain=true", "explain.n=1"]) == 0
    assert {p: p.stat().st_mtime_ns for p in out.glob("mini/*/metrics.json")} == stamps
    explained = [json.loads(p.read_text()) for p in out.glob("mini/*/explain/explain.json")]
    assert len(explained) == 4  # explain=true: every finetuning run
    # explain.n=1: at most one TP, one FN and one FP each
    assert all(e["n_per_kind"] == 1 and len(e["vertebrae"]) <= 3 for e in explained)
    assert "Where the models look" in (tmp_path / "reports" / "mini" / "index.html").read_text()


def test_tune_searches_the_methods_space_with_asha_on_validation_only(ray_session, tmp_path, capsys):
    assert main(["tune", "method=resnet18", "regime=scratch", "preset=tiny", "epochs=4", "samples=4",
                 "ray.max_concurrent=2", f"out={tmp_path}"]) == 0
    record = json.loads((tmp_path / "tune" / "resnet18-scratch" / "tune.json").read_text())
    assert len(record["trials"]) == 4 and record["metric"] == "val_auc"
    values = [t["values"] for t in record["trials"]]
    assert all(1e-5 <= v["lr"] <= 3e-3 and 1e-4 <= v["weight_decay"] <= 0.3 for v in values)
    assert len({v["lr"] for v in values}) == 4  # sampled, not fixed
    assert all(1 <= t["epochs"] <= 4 for t in record["trials"])
    assert record["best"]["val_auc"] == max(t["val_auc"] for t in record["trials"] if t.get("val_auc") is not None)
    assert record["command"].startswith("bench run method=resnet18 regime=scratch") and "lr=" in record["command"]
    assert not list(tmp_path.rglob("predictions.parquet"))  # the test split is never evaluated
    assert "stopped early by ASHA" in capsys.readouterr().err


def test_tune_rejects_a_searched_key_on_the_command_line(capsys):
    assert main(["tune", "method=resnet18", "regime=scratch", "preset=tiny", "lr=0.1"]) == 2
    assert "'lr' is searched by bench tune" in capsys.readouterr().err
    assert main(["tune", "method=resnet18", "preset=tiny"]) == 2
    assert "bench tune needs method=NAME and regime=NAME" in capsys.readouterr().err


def test_bad_suite_is_one_line(capsys):
    assert main(["run", "suite=table5"]) == 2
    assert "unknown suite 'table5'; valid:" in capsys.readouterr().err


# One trial at a time: the kill lands as the first run's folder appears, while the next run is still
# being built, so the suite is interrupted after some but not all runs however fast the machine is.
SEQUENTIAL = """seeds: 2
runs:
  - {method: resnet18, regimes: [scratch]}
  - {method: vit_b, regimes: [scratch], overrides: [epochs=2]}
"""


def test_kill_9_then_resume_equals_an_uninterrupted_suite(ray_session, tmp_path, capsys):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    suite_file = tmp_path / "mini.yaml"
    suite_file.write_text(SEQUENTIAL)
    args = [sys.executable, "-m", "bench.cli", "run", f"suite={suite_file}", "preset=tiny", "epochs=1",
            "ray.max_concurrent=1"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([*args, f"out={killed}"], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    def finished_runs():  # a run folder appears by a rename: a `.name.staging-*` folder is not a finished run
        return [p for p in killed.glob("mini/*/metrics.json") if not p.parent.name.startswith(".")]

    while time.time() < deadline and not finished_runs():
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = {p: p.stat().st_mtime_ns for p in finished_runs()}
    assert 1 <= len(finished) < 4, "the suite must be interrupted after some but not all runs"
    marker = tmp_path / "executed"  # Ray's own state files are pickles: resume must never load them
    pickles = [p for p in (killed / "mini" / "_ray").rglob("*") if p.is_file() and p.suffix in (".pkl", ".json")]
    assert pickles
    for path in pickles:
        path.write_bytes(pickle.dumps(_Exploit(str(marker))))
    capsys.readouterr()
    assert main([*args[3:], f"out={killed}", "resume=true"]) == 0  # the next command, in this test's Ray
    resumed = capsys.readouterr()
    assert {p: p.stat().st_mtime_ns for p in finished} == finished  # finished runs were not redone
    assert not marker.exists() and not list((killed / "mini" / "_state").glob("*.pt"))  # states cleared
    assert "resnet18 scratch finetune seed 0: AUC" in resumed.err
    assert main([*args[3:], f"out={tmp_path / 'whole'}"]) == 0
    assert _metrics(killed) == _metrics(tmp_path / "whole")
    for name in _metrics(killed):
        pd.testing.assert_frame_equal(pd.read_parquet(killed / "mini" / name / "predictions.parquet"),
                                      pd.read_parquet(tmp_path / "whole" / "mini" / name / "predictions.parquet"))


def test_two_ray_nodes_share_the_trials(suite_file, tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    try:
        out = tmp_path / "runs"
        assert main(["run", f"suite={suite_file}", "preset=tiny", "epochs=1", f"out={out}",
                     f"ray.address={cluster.address}"]) == 0
        summary = json.loads((out / "mini" / "suite.json").read_text())
        assert len(summary["runs"]) == 4 and len({r["node_id"] for r in summary["runs"]}) == 2
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()


def test_schedule_starts_artifact_builders_first_and_keeps_sharers_apart():
    from bench.orchestrate import schedule
    from bench.suites import expand

    suite = {"name": "t", "runs": [{"method": "vit_unetr"}, {"method": "resnet18"}]}
    order = [(r["method"], r["regime"], r["seed"]) for r in schedule(expand(suite, seeds=2))]
    assert order == [("vit_unetr", "public", "0"), ("vit_unetr", "public_to_vertebrae", "0"),
                     ("vit_unetr", "scratch", "0"), ("resnet18", "scratch", "0"),
                     ("vit_unetr", "public", "1"), ("vit_unetr", "public_to_vertebrae", "1"),
                     ("vit_unetr", "scratch", "1"), ("resnet18", "scratch", "1")]
    # the kNN runs reuse the linear runs' features: they start after every other run of the seed
    suite["protocols"] = ["finetune", "linear", "knn"]
    order = [(r["method"], r["regime"], r["protocol"]) for r in schedule(expand(suite, seeds=1))]
    assert sorted(o[2] for o in order[:8]) == ["finetune"] * 4 + ["linear"] * 4
    assert [o[:2] for o in order[-4:]] == [o[:2] for o in order[:8] if o[2] == "linear"]


def test_an_epoch_state_is_used_only_for_its_own_config_and_by_its_command_or_resume(tmp_path):
    from bench.orchestrate import EpochStates

    run = tmp_path / "suite" / "resnet18-scratch-seed0"
    writer = EpochStates(run, "lr: 0.1\n", "first", resume=False)
    writer.keep({"epoch": 3}, lambda: {"epoch": 3, "weights": torch.ones(2)})
    assert writer.path == tmp_path / "suite" / "_state" / "resnet18-scratch-seed0.pt"
    assert writer.last()["epoch"] == 3  # Ray retrying the trial within the same command
    assert EpochStates(run, "lr: 0.1\n", "second", resume=False).last() is None  # a fresh suite command
    assert EpochStates(run, "lr: 0.1\n", "second", resume=True).last()["epoch"] == 3
    assert EpochStates(run, "lr: 0.2\n", "second", resume=True).last() is None  # another config
    writer.path.write_bytes(b"not a torch file")
    assert EpochStates(run, "lr: 0.1\n", "first", resume=True).last() is None
    writer.clear()
    assert not writer.path.exists()


class _Exploit:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_the_readme_suites_cover_every_method_and_regime():
    """`first_look` (the README's main command) is every method x regime under the frozen-feature
    protocols; `quick` is the same cells with finetuning too."""
    from bench.registry import get_method, list_methods
    from bench.suites import expand, load_suite

    cells = {(m, r) for m in list_methods() if not m.startswith("_") for r in get_method(m).regimes
             if get_method(m).runs_without_a_file(r)}
    for name, protocols in (("first_look", {"linear", "knn"}), ("quick", {"finetune", "linear", "knn"})):
        suite = load_suite(name)
        runs = expand(suite, seeds=int(suite["seeds"]))
        assert {(r["method"], r["regime"], r.get("protocol", "finetune")) for r in runs} == \
            {(m, r, p) for m, r in cells for p in protocols}, name
        assert {r["seed"] for r in runs} == {"0"}


def test_a_run_that_cannot_be_explained_is_one_line_and_the_others_still_are(tmp_path, monkeypatch, capsys):
    import bench.explain
    from bench.orchestrate import _explain_finished

    folders = []
    for name in ("broken-scratch-s0", "fine-scratch-s0"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"")
        folders.append(str(tmp_path / name))
    explained = []

    def explain_run(path, n):
        if path.name.startswith("broken"):
            raise RuntimeError("Output 0 of BackwardHookFunction is a view\nand more")
        explained.append((path.name, n))

    monkeypatch.setattr(bench.explain, "explain_run", explain_run)
    failed = _explain_finished(folders, 2)
    assert failed == ["explain broken-scratch-s0: RuntimeError: Output 0 of BackwardHookFunction is a view"]
    assert explained == [("fine-scratch-s0", 2)]
    assert capsys.readouterr().err.strip() == failed[0]


PRETRAINED = """description: seeds that vary pretraining
seeds: 2
protocols: [linear]
runs:
  - {method: mae3d, regimes: [vertebrae]}
"""


def test_seeds_vary_pretraining_unless_pretrain_seed_pins_it(ray_session, tmp_path):
    suite = tmp_path / "pretrained.yaml"
    suite.write_text(PRETRAINED)
    cells = {}
    for name, extra in (("varied", []), ("pinned", ["pretrain.seed=0"])):
        out = tmp_path / name
        assert main(["run", f"suite={suite}", "preset=tiny", f"out={out}", *extra]) == 0
        runs = [json.loads(p.read_text()) for p in sorted(out.glob("pretrained/*/metrics.json"))]
        artifacts = {r["pretraining"]["artifact"] for r in runs}
        assert len(runs) == 2 and len(artifacts) == (2 if name == "varied" else 1)
        assert [r["pretraining"]["pretrain_seed"] for r in runs] == ([0, 1] if name == "varied" else [0, 0])
        cells[name] = pd.read_csv(out / "reports" / "pretrained" / "cells.csv").iloc[0]
        html = (out / "reports" / "pretrained" / "index.html").read_text()
        if name == "varied":
            assert "sd: pretraining, random encoder" not in html and "sd: pretraining" in html
        else:
            assert "not pretraining (pretrain.seed=0 pinned: 1 artifact for 2 seeds)" in html
    assert cells["varied"]["auc_sd"] > 0  # a frozen-feature cell of a pretrained encoder: its seeds differ
    assert cells["pinned"]["auc_sd"] == 0  # one artifact, a deterministic probe: the seeds are one model
