"""What a report may conclude, on stores written by hand with known predictions: protocols as a
dimension, "did not learn" cells out of every ranking, the smoke-test banner, the detectable
difference, "Does pretraining help?", single-fraction runs, and failed runs."""
from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from bench.cli import main
from bench.store import write_run


def _predictions(n_patients: int, strength: float, seed: int, single_class: bool = False) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        for v in range(4):
            label = int(rng.random() < 0.25)
            rows.append({"patient_id": f"p{p:03d}", "vertebra": f"L{v + 1}", "label": label})
    table = pd.DataFrame(rows)
    noise = np.random.default_rng(seed + 1).normal(0, 1, len(table))
    table["score"] = 1 / (1 + np.exp(-(strength * (table["label"] - 0.5) * 4 + noise)))
    table["prediction"] = 1 if single_class else (table["score"] >= 0.5).astype(int)
    return table


def _run(out, method, regime, preds, protocol="finetune", fraction=1.0, val_auc=0.9):
    from bench.metrics import binary_metrics

    test = binary_metrics(preds["label"], preds["score"])
    cfg = OmegaConf.create({"method": method, "regime": regime, "seed": 0, "preset": "tiny", "task": "fracture",
                            "train_fraction": fraction, "protocol": protocol, "suite": "hand", "model": {}})
    name = f"{method}-{regime}-{protocol}-frac{fraction:g}-s0"
    metrics = {"test": test, "val": {"auc": val_auc, "n": 400, "n_positive": 100}, "epochs": [],
               "cost": {"s_per_epoch": 1.0, "train_s": 1.0, "n_params": 10}, "pretraining": {},
               "data": {"name": "hand", "fingerprint": "f" * 64}}
    write_run(out / "hand" / name, cfg, metrics, preds, {"started": "2026-01-01T00:00:00"})


def _text(html: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", re.sub(r"<img[^>]*>", "", html)))


def test_report_states_what_it_can_conclude(tmp_path):
    out = tmp_path / "runs"
    _run(out, "models_genesis", "scratch", _predictions(150, 0.3, 0))
    _run(out, "models_genesis", "public", _predictions(150, 1.5, 0))
    _run(out, "models_genesis", "public_to_vertebrae", _predictions(150, 3.0, 0, single_class=True))
    _run(out, "models_genesis", "scratch", _predictions(150, 0.5, 0), protocol="linear")
    _run(out, "models_genesis", "public", _predictions(150, 0.6, 0), protocol="linear", val_auc=0.52)
    (out / "hand" / "suite.json").write_text(json.dumps({"runs": [
        {"run": {"method": "resnet18", "regime": "scratch", "protocol": "finetune", "seed": "0"},
         "error": "training diverged at epoch 0 (loss nan); lower lr=0.001"}]}))
    assert main(["report", str(out / "hand"), f"out={tmp_path / 'rep'}", "bootstrap=100"]) == 0
    html = (tmp_path / "rep" / "index.html").read_text()
    text = _text(html)

    assert "Table 3: pretraining regimes (protocol: finetune)" in text
    assert "Table 3: pretraining regimes (protocol: linear)" in text
    assert "Smoke test" not in text  # 150 patients: well over 30 fractured test vertebrae
    size = re.search(r"Test split: (\d+) vertebrae, (\d+) fractured\. Smallest AUC difference it can detect: "
                     r"(0\.\d+)", text)
    assert size and int(size.group(2)) >= 30 and 0.02 < float(size.group(3)) < 0.3

    finetune = html[html.index("(protocol: finetune)"):html.index("Table 4")]
    # the single-class cell has the highest AUC, yet it is marked and not bold; public is the best
    row = finetune[finetune.index("public_to_vertebrae"):]
    assert "did not learn" in row[:row.index("</tr>")] and "best" not in row[:row.index("</tr>")]
    public = finetune[finetune.index(">public<"):]
    assert 'class="best"' in public[:public.index("</tr>")]
    linear = html[html.index("(protocol: linear)"):]
    public_linear = linear[linear.index(">public<"):]
    assert "did not learn" in public_linear[:public_linear.index("</tr>")]  # validation AUC 0.52 +- 0.07

    effect = text[text.index("Does pretraining help?"):]
    assert re.search(r"models_genesis finetune public \d+\.\d \d+\.\d \+\d+\.\d \[\+\d+\.\d, \+\d+\.\d\] "
                     r"(\d\.\d+e-\d+|0\.0\d+)", effect)
    assert "resnet18" in text and "failed: training diverged at epoch 0" in text


def test_smoke_banner_and_single_fraction_runs(tmp_path):
    out = tmp_path / "runs"
    _run(out, "resnet18", "scratch", _predictions(8, 1.0, 1), fraction=0.3)
    assert main(["report", str(out / "hand"), f"out={tmp_path / 'rep'}", "bootstrap=20"]) == 0
    text = _text((tmp_path / "rep" / "index.html").read_text())
    assert "Smoke test, not a comparison" in text
    assert "(protocol: finetune, training fraction 0.3)" in text and "resnet18 scratch 1" in text
