"""A guard on the default preset's settings, which the tiny end-to-end tests do not exercise: every
registered method, with its `small` architecture and AMP setting, trains an epoch on a handful of
crops through the real finetuning protocol without a non-finite loss, and its loss on a fixed batch
under autocast agrees with the fp32 loss, and so does each convolution's and linear layer's weight
gradient replayed on the same inputs (so a numerics problem is caught on any CPU kind, not only where
it happens to overflow into NaN: see bench.numerics)."""
from __future__ import annotations

import contextlib

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

from bench.datasets.base import VertebraSet
from bench.datasets.loading import load_data
from bench.evaluation import forward_views, make_dataset
from bench.finetune import finetune
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
    # the gradients too, op by op: each convolution's and linear layer's bf16 weight gradient, replayed on
    # the very input and output gradient it saw in a bf16 training step, against the same replay in
    # fp32. A kernel that returns a wrong gradient (finite or not) fails here on any CPU kind, apart
    # from the rounding noise bf16 adds upstream (which a whole-model comparison cannot tell from it).
    model, _ = execution.place(model)
    model.train()
    calls = _weight_op_calls(model, x, y, execution)
    assert calls, name
    for label, module, inputs, grad_out in calls:
        mixed = _weight_gradient(module, inputs, grad_out, execution.autocast())
        reference = _weight_gradient(module, inputs.float(), grad_out.float(), contextlib.nullcontext())
        assert torch.isfinite(mixed).all(), f"{name}: non-finite bf16 weight gradient in {label}"
        error = float((mixed - reference).norm() / reference.norm().clamp_min(1e-30))
        assert error < OP_TOLERANCE, f"{name}: {label} bf16 weight gradient differs from fp32 by {error:.3g}"


OP_TOLERANCE = 0.05  # relative L2 error of one op's weight gradient, bf16 autocast vs fp32, same inputs
WEIGHT_OPS = (torch.nn.Conv3d, torch.nn.ConvTranspose3d, torch.nn.Conv2d, torch.nn.Linear)


def _weight_op_calls(model, x, y, execution) -> list[tuple[str, torch.nn.Module, torch.Tensor, torch.Tensor]]:
    """(name, module, input, output gradient) of every weight op call in one bf16 training step."""
    calls: list[tuple[str, torch.nn.Module, torch.Tensor, torch.Tensor]] = []

    def record(label: str):
        def hook(module, inputs, output):
            if isinstance(output, torch.Tensor) and output.requires_grad:
                kept = inputs[0].detach()
                output.register_hook(lambda g: calls.append((label, module, kept, g.detach())))
        return hook

    handles = [m.register_forward_hook(record(n)) for n, m in model.named_modules() if isinstance(m, WEIGHT_OPS)]
    try:
        with execution.autocast():
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
    finally:
        for handle in handles:
            handle.remove()
    model.zero_grad(set_to_none=True)
    return calls


def _weight_gradient(module, inputs, grad_out, context) -> torch.Tensor:
    with context:
        output = module(inputs)
    (grad,) = torch.autograd.grad(output, module.weight, grad_out.to(output.dtype))
    return grad.float()


def test_non_finite_validation_predictions_are_one_line(handful, monkeypatch):
    """A model whose training loss stays finite but whose validation predictions do not is a diverged
    run (one line naming the stage and epoch), not a scikit-learn traceback."""
    import bench.finetune
    from bench.errors import BenchError

    cfg, method = _small("resnet18")

    def nan_predictions(model, loader, execution, loss_fn=None):
        return np.full((len(loader.dataset), 2), np.nan), float("nan")

    monkeypatch.setattr(bench.finetune, "predict", nan_predictions)
    with pytest.raises(BenchError, match="resnet18 diverged at epoch 0 \\(non-finite validation predictions\\)"):
        finetune(method, handful, cfg)
