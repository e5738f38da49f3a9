"""`devices=2`: the training stages run data-parallel on two Ray Train workers (gloo on CPU) with the
same global batch, and the run is the one-device run: same validation curve and test metrics for a
network without BatchNorm, every test vertebra predicted exactly once, the run folder the same. A
suite runs such runs (`ray.gpus_per_run`) and continues one after `kill -9` from its last epoch.

One Ray for the module, with a logical CPU for each trial's driver beside its two workers."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest

from bench.cli import main
from tests_helpers import run_cli


@pytest.fixture(scope="module", autouse=True)
def ray_with_room_for_workers():
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def _run(tmp_path, *args: str) -> tuple[dict, pd.DataFrame, dict]:
    out = tmp_path / "runs"
    done = run_cli("run", *args, "progress=false", f"out={out}", env={"RAY_AUTH_MODE": "disabled"})
    assert done.returncode == 0, done.stderr[-3000:]
    folder = next(out.rglob("metrics.json")).parent
    config = (folder / "config.yaml").read_text()
    return json.loads((folder / "metrics.json").read_text()), pd.read_parquet(folder / "predictions.parquet"), config


@pytest.mark.e2e
def test_two_workers_finetune_as_one_device_does(tmp_path):
    base = ("method=vit_b", "regime=scratch", "preset=tiny", "epochs=2")  # LayerNorm only: no per-shard statistics
    one, one_pred, _ = _run(tmp_path / "one", *base)
    two, two_pred, config = _run(tmp_path / "two", *base, "devices=2")
    assert "\ndevices: 2\n" in config and "\nbatch_size: 8\n" in config  # the global batch, as on one device
    for a, b in zip(one["epochs"], two["epochs"]):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-5)
    keys = ["patient_id", "vertebra"]
    assert not two_pred.duplicated(keys).any() and len(two_pred) == two["test"]["n"]  # each test vertebra once
    merged = one_pred.merge(two_pred, on=keys, suffixes=("_1", "_2"))
    drift = (merged.score_1 - merged.score_2).abs().max()
    assert len(merged) == len(one_pred) and drift < 1e-5
    # The two runs sum the same gradients in another order, so scores agree to float rounding (drift);
    # a ranking metric can then differ only by the (fractured, intact) pairs scored closer than that.
    pos, neg = merged.score_1[merged.label_1 == 1].to_numpy(), merged.score_1[merged.label_1 == 0].to_numpy()
    close = (np.abs(pos[:, None] - neg[None, :]) <= 2 * drift).sum() / (len(pos) * len(neg))
    assert abs(two["test"]["auc"] - one["test"]["auc"]) <= close + 1e-12
    at_threshold = ((merged.score_1 - 0.5).abs() <= drift).sum()
    assert at_threshold == 0 or (merged.prediction_1 != merged.prediction_2).sum() <= at_threshold
    if at_threshold == 0:
        for key in ("f1", "acc"):
            assert two["test"][key] == pytest.approx(one["test"][key], abs=1e-12)


@pytest.mark.e2e
def test_two_workers_pretrain_then_probe(tmp_path):
    """The pretraining stage (its epoch checkpoint written by rank 0 inside the worker) on two workers."""
    metrics, predictions, _ = _run(tmp_path, "method=mae3d", "regime=vertebrae", "preset=tiny", "protocol=linear",
                                   "pretrain.epochs=2", "devices=2")
    curve = metrics["pretraining"]["pretrain_curve"]
    assert len(curve) == 2 and all(0 < e["loss"] < 10 for e in curve)
    assert len(predictions) == metrics["test"]["n"] and not predictions.duplicated(["patient_id", "vertebra"]).any()


SUITE = "runs:\n  - {method: vit_b, regimes: [scratch]}\n"


@pytest.mark.e2e
def test_a_suite_of_data_parallel_runs_resumes_after_kill_9_from_the_last_epoch(ray_with_room_for_workers, tmp_path,
                                                                                   capsys):
    """`ray.gpus_per_run=2 device=cpu`: each run on two gloo workers inside its trial. The suite's
    process is killed once rank 0 has written an epoch's state; `resume=true` continues the run from
    that epoch, and the run ends on the one-device run's curve."""
    suite = tmp_path / "dp.yaml"
    suite.write_text(SUITE)
    args = ["run", f"suite={suite}", "preset=tiny", "epochs=3", "ray.gpus_per_run=2", "device=cpu"]
    killed = tmp_path / "killed"
    joined = f"ray.address={ray_with_room_for_workers}"  # the cluster outlives the killed command
    proc = subprocess.Popen([sys.executable, "-m", "bench.cli", *args, f"out={killed}", joined],
                            env={**os.environ, "RAY_AUTH_MODE": "disabled"}, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = killed / "dp" / "_state" / "vit_b-scratch-s0.pt"
    deadline = time.time() + 300
    while time.time() < deadline and not state.exists() and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert state.exists() and not (killed / "dp" / "vit_b-scratch-s0").exists(), "killed after an epoch, mid-run"
    capsys.readouterr()
    assert main([*args, f"out={killed}", "resume=true"]) == 0
    resumed = json.loads((killed / "dp" / "vit_b-scratch-s0" / "metrics.json").read_text())
    assert resumed["cost"]["resumed_at_epoch"] >= 1 and not state.exists()
    config = (killed / "dp" / "vit_b-scratch-s0" / "config.yaml").read_text()
    assert "\ndevices: 2\n" in config and "\ndevice: cpu\n" in config
    one, _, _ = _run(tmp_path / "one", "method=vit_b", "regime=scratch", "preset=tiny", "epochs=3")
    assert len(resumed["epochs"]) == 3
    for a, b in zip(one["epochs"], resumed["epochs"]):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-5)


def test_workers_train_on_gpus_the_driver_may_not_hold():
    """device=cuda with devices=2 in a process without a GPU (a suite trial whose workers hold them):
    the process evaluates on its CPU, the workers train on CUDA, and the pretraining artifact is named
    by the workers' autocast dtype (fp16 on CUDA); device=cpu keeps everything on CPUs."""
    import torch

    from bench.loop import Execution
    from bench.registry import create_method
    from bench.run import resolve_runs

    if torch.cuda.is_available():
        pytest.skip("checks the placement of a process without a GPU")
    cfg = resolve_runs({"method": "vit_b", "regime": "scratch", "preset": "tiny", "devices": "2", "device": "cuda",
                        "amp": "true"})[0]
    execution = Execution.of(cfg, create_method("vit_b", cfg))
    assert execution.device.type == "cpu" and execution.workers == "cuda"
    assert execution.training_dtype_name == "float16"
    cfg.device = "cpu"
    execution = Execution.of(cfg, create_method("vit_b", cfg))
    assert execution.workers == "cpu" and execution.training_dtype_name == execution.dtype_name
