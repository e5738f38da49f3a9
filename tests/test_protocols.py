"""The evaluation protocols: finetune's checkpoint selection, and the frozen-feature probes (linear,
knn), which must see neither augmentation, nor training mode, nor test labels."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from torch import nn

from bench import register_method
from bench.datasets.base import VertebraSet
from bench.finetune import selection_key
from bench.methods.base import Method
from bench.probes import extract, knn_probs, probe
from bench.run import prepare, resolve_runs
from tests_helpers import run_cli


def _cfg(method, **extra):
    return resolve_runs({"method": method, "regime": "scratch", "preset": "tiny", **extra})[0]


def test_select_key_orders_checkpoints_as_configured():
    m = {"f1": 0.5, "auc": 0.9, "macro_f1": 0.4, "qwk": 0.1}
    assert selection_key(_cfg("resnet18"), m, 0.3) == (0.5, 0.9)
    assert selection_key(_cfg("resnet18", select="val_auc"), m, 0.3) == (0.9, 0.5)
    assert selection_key(_cfg("resnet18", select="val_loss"), m, 0.3) == (-0.3,)
    assert selection_key(_cfg("resnet18", select="val_loss"), m, 0.2) > selection_key(
        _cfg("resnet18", select="val_loss"), m, 0.3)


def test_knn_is_the_weighted_cosine_vote():
    bank = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1]], np.float32)
    probs = knn_probs(bank, np.array([0, 1, 1]), np.array([[1.0, 0.0]], np.float32), 2, k=2, temperature=0.5)
    sims = np.array([1.0, 1 / np.sqrt(1.01)])  # the two nearest: rows 0 (class 0) and 2 (class 1)
    weights = np.exp(sims / 0.5)
    np.testing.assert_allclose(probs[0], weights / weights.sum())


class _ModeSensitive(nn.Module):
    """Features that change in training mode (dropout p=0.5) and record the mode they ran in."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 4, 4, stride=4)
        self.drop = nn.Dropout(0.5)
        self.modes: list[bool] = []

    def forward(self, x):
        self.modes.append(self.training)
        return self.drop(self.conv(x).mean(dim=(2, 3, 4)))


@register_method("_test_mode_sensitive")
class ModeSensitive(Method):
    description = "test-only"

    def build_encoder(self):
        return _ModeSensitive(), 4


def test_features_come_from_eval_mode_without_augmentation(bench_cache):
    cfg = _cfg("_test_mode_sensitive")
    method, data, model, _ = prepare(cfg)
    model.train()  # as a caller might leave it
    from bench.loop import Execution

    train = data.subset("train")
    feats = extract(method, cfg, model.encoder, train, Execution.of(cfg, method))
    assert model.encoder.modes and not any(model.encoder.modes)
    crops = torch.stack([torch.from_numpy(np.clip(train.images[i].astype(np.float32), -1000, 1000)[None] / 2000 + 0.5)
                         for i in train.crop_indices])  # un-flipped, un-augmented crops
    with torch.no_grad():
        model.encoder.eval()
        expected = model.encoder(crops).numpy()
    np.testing.assert_allclose(feats, expected, rtol=1e-5, atol=1e-6)


def test_features_are_fp32_under_autocast(bench_cache):
    """bf16 rounding can be larger than the differences between crops' features, so the probes'
    features are extracted in fp32 even when the run asks for bf16 autocast."""
    from bench.probes import features

    cfg = _cfg("_test_mode_sensitive", amp="true", amp_dtype="bf16")
    method, data, model, _ = prepare(cfg)
    train = data.subset("train")
    feats, _, _, _ = features(method, cfg, model, data, {"train": train})
    crops = torch.stack([torch.from_numpy(np.clip(train.images[i].astype(np.float32), -1000, 1000)[None] / 2000 + 0.5)
                         for i in train.crop_indices])
    with torch.no_grad():
        model.encoder.eval()
        expected = model.encoder(crops).numpy()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            rounded = model.encoder(crops).float().numpy()
    assert not np.allclose(rounded, expected, rtol=1e-5, atol=1e-6)  # bf16 would be visible at this tolerance
    np.testing.assert_allclose(feats["train"], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("protocol", ["linear", "knn"])
def test_probes_never_see_test_labels(protocol, bench_cache):
    cfg = _cfg("resnet18", protocol=protocol)
    method, data, model, _ = prepare(cfg)
    first = probe(protocol, method, data, cfg, model)
    table = data.table.copy()
    test = table["split"] == "test"
    table.loc[test, "label"] = 1 - table.loc[test, "label"]  # every test label flipped
    table.loc[test, "grade"] = np.where(table.loc[test, "label"] == 1, 1, 0)
    flipped = probe(protocol, method, VertebraSet(data.images, table, data.name), cfg, model)
    np.testing.assert_array_equal(first.predictions["score"], flipped.predictions["score"])
    assert first.val_metrics == flipped.val_metrics


@pytest.mark.e2e
def test_linear_and_knn_run_through_the_cli_and_leave_the_four_files(tmp_path, bench_cache):
    for method, protocol in (("resnet18", "linear"), ("video_ct_mae", "knn")):
        done = run_cli("run", f"method={method}", "regime=scratch", "preset=tiny", f"protocol={protocol}",
                       f"out={tmp_path}")
        assert done.returncode == 0, done.stderr
        folder = tmp_path / "single" / f"{method}-scratch-{protocol}-s0"
        assert {p.name for p in folder.iterdir()} == {"config.yaml", "metrics.json", "predictions.parquet", "env.json"}
        assert yaml.safe_load((folder / "config.yaml").read_text())["protocol"] == protocol
        metrics = json.loads((folder / "metrics.json").read_text())
        predictions = pd.read_parquet(folder / "predictions.parquet")
        assert metrics["protocol"] == protocol and metrics["test"]["n"] == len(predictions)
    linear = json.loads((tmp_path / "single" / "resnet18-scratch-linear-s0" / "metrics.json").read_text())
    assert linear["probe"]["C"] in (0.001, 0.01, 0.1, 1.0, 10.0)
    grade = run_cli("run", "method=resnet18", "regime=scratch", "preset=tiny", "protocol=linear", "task=grade",
                    f"out={tmp_path}")
    assert grade.returncode == 0, grade.stderr
    preds = pd.read_parquet(tmp_path / "single" / "resnet18-scratch-linear-grade-s0" / "predictions.parquet")
    assert {"p_grade0", "p_grade3", "predicted_grade"} <= set(preds.columns)
