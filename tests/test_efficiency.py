"""The report's compute accounting: artifacts count once however many runs share them, cached
features count nowhere, and each stage's rate is compared with the machine's matmul rate."""
import json

import pytest
import torch

from bench.flops import counted, matmul_rate
from bench.reports.efficiency import efficiency_rows, stage_compute


def _artifact(path, flops, seconds, parent=None):
    path.mkdir(parents=True)
    spec = {"dtype": "float32", "parent": {"artifact": str(parent)} if parent else {}}
    (path / "pretrain.json").write_text(json.dumps({"spec": spec, "flops": flops, "train_s": seconds, "threads": 1}))
    return path


def _run(path, cost, artifact=None):
    path.mkdir(parents=True)
    (path / "metrics.json").write_text(json.dumps({"cost": cost, "pretraining": {"artifact": str(artifact)}
                                                   if artifact else {}}))
    return str(path)


def test_shared_artifacts_count_once_and_cached_features_nowhere(tmp_path):
    public = _artifact(tmp_path / "a" / "public", 4e12, 40.0)
    vertebrae = _artifact(tmp_path / "a" / "vertebrae", 2e12, 10.0, parent=public)
    runs = [_run(tmp_path / "r1", {"extract_flops": 1e12, "extract_s": 5.0, "threads": 1}, vertebrae),
            _run(tmp_path / "r2", {"extract_flops": 0.0, "extract_s": 0.0, "threads": 1}, vertebrae),  # cached
            _run(tmp_path / "r3", {"train_flops": 3e12, "train_s": 30.0, "amp_dtype": None, "threads": 1})]
    compute = stage_compute(runs)
    assert compute["pretraining (float32)"]["flops"] == pytest.approx(6e12)
    assert compute["pretraining (float32)"]["seconds"] == pytest.approx(50.0)
    assert compute["feature extraction (float32)"]["flops"] == pytest.approx(1e12)
    rows = efficiency_rows(compute, {"threads": 1, "float32": 200e9, "bfloat16": None})
    assert [r["stage"] for r in rows] == ["pretraining", "feature extraction", "finetuning"]
    assert rows[0]["gflop_s"] == pytest.approx(120.0) and rows[0]["efficiency"] == pytest.approx(0.6)
    assert efficiency_rows(compute, None)[0]["efficiency"] is None


def test_the_counter_counts_a_matmul_and_the_rate_is_positive():
    a, b = torch.randn(64, 32), torch.randn(32, 16)
    _, flops = counted(lambda: a @ b)
    assert flops == 2 * 64 * 32 * 16
    assert matmul_rate(size=128, seconds=0.05) > 0
