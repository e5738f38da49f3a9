"""A guard on the default preset's settings, which the tiny end-to-end tests do not exercise: every
registered method, with its `small` architecture and AMP setting, trains an epoch on a handful of
crops through the real finetuning protocol without a non-finite loss, and its loss on a fixed batch
under autocast agrees with the fp32 loss (so a numerics problem is caught on any CPU kind, not only
where it happens to overflow into NaN)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

from bench.datasets.base import VertebraSet
from bench.datasets.loading import load_data
from bench.engine import finetune
from bench.evaluation import forward_views, make_dataset
from bench.loop import Execution
from bench.registry import create_method, list_methods
from bench.run import resolve_runs

METHODS = [m for m in list_methods() if not m.startswith("_")]


@pytest.fixture(scope="module")
def handful() -> VertebraSet:
    """24 crops of the tiny synthetic set, both classes in every split."""
    tiny = resolve_runs({"method": "resnet18", "regime": "scratch", "preset": "tiny"})[0]
    data = load_data(tiny)
    table = data.table.copy()
    pos, neg = table[table.label == 1], table[table.label == 0]
    rows = []
    for split, n_pos, n_neg in (("train", 6, 10), ("val", 2, 2), ("test", 2, 2)):
        take_pos, take_neg = pos.iloc[:n_pos], neg.iloc[:n_neg]
        pos, neg = pos.iloc[n_pos:], neg.iloc[n_neg:]
        rows.append(pd.concat([take_pos, take_neg]).assign(split=split))
    return VertebraSet(data.images, pd.concat(rows), "handful")


def _small(method: str, **extra: str):
    cfg = resolve_runs({"method": method, "regime": "scratch", "preset": "small", "epochs": "1", "batch_size": "8",
                        "eval_batch_size": "8", "progress": "false", **extra})[0]
    return cfg, create_method(method, cfg)


@pytest.mark.parametrize("name", METHODS)
def test_default_preset_trains_an_epoch_and_autocast_agrees_with_fp32(name, handful):
    cfg, method = _small(name)
    result = finetune(method, handful, cfg)
    assert np.isfinite(result.epochs[0]["train_loss"]), result.epochs
    if not cfg.amp:
        return
    # the autocast dtype the preset asks for, forced even where `amp_dtype=auto` would run fp32 here
    execution = Execution.of(cfg, method)
    execution = Execution(execution.device, torch.bfloat16, execution.memory_format, False)
    torch.manual_seed(0)
    model = method.build_model().to(memory_format=execution.memory_format)
    x, y = next(iter(DataLoader(make_dataset(method, cfg, handful.subset("train")), batch_size=4)))
    x = execution.to(x)
    with torch.no_grad():
        model.eval()
        reference = torch.nn.functional.cross_entropy(forward_views(model, x).float(), y)
        with execution.autocast():
            mixed = torch.nn.functional.cross_entropy(forward_views(model, x).float(), y)
    assert torch.isfinite(mixed) and abs(float(mixed) - float(reference)) < 0.05 * max(1.0, float(reference)), (
        f"{name}: loss {float(mixed):.4f} under bf16 vs {float(reference):.4f} in fp32")
    model.train()
    with execution.autocast():
        loss = torch.nn.functional.cross_entropy(model(x).float(), y)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None), name
