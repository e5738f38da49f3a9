"""`devices=2`: the training stages run data-parallel on two Ray Train workers (gloo on CPU) with the
same global batch, and the run is the one-device run: same validation curve and test metrics for a
network without BatchNorm, every test vertebra predicted exactly once, the run folder the same."""
import json

import numpy as np
import pandas as pd
import pytest

from tests_helpers import run_cli


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
