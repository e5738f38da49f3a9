import json
import math

import pandas as pd
import pytest
from omegaconf import OmegaConf

from bench import store


def _write(target, value):
    cfg = OmegaConf.create({"a": value})
    preds = pd.DataFrame({"patient_id": ["p"], "label": [1], "score": [0.5]})
    return store.write_run(target, cfg, {"test": {"auc": math.nan, "f1": value}}, preds, {"x": 1})


def test_files_and_nan_as_null(tmp_path):
    folder = _write(tmp_path / "run", 0.5)
    assert sorted(p.name for p in folder.iterdir()) == sorted(store.FILES)
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["test"]["auc"] is None and metrics["test"]["f1"] == 0.5


def test_failed_rewrite_keeps_the_old_result(tmp_path, monkeypatch):
    folder = _write(tmp_path / "run", 0.5)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(pd.DataFrame, "to_parquet", broken)
    with pytest.raises(OSError):
        _write(tmp_path / "run", 0.9)
    assert json.loads((folder / "metrics.json").read_text())["test"]["f1"] == 0.5
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # no staging folder left behind


def test_rewrite_replaces(tmp_path):
    _write(tmp_path / "run", 0.5)
    folder = _write(tmp_path / "run", 0.9)
    assert json.loads((folder / "metrics.json").read_text())["test"]["f1"] == 0.9
    assert [p.name for p in tmp_path.iterdir()] == ["run"]
