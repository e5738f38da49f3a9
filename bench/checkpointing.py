"""Activation checkpointing (`model.grad_checkpointing=true`): fewer saved activations for more compute.

A network's repeated blocks (matched by name: transformer `blocks.N`, ResNet `layerK.N`, CT-FM's
`layers.N`, DenseNet's `denselayerN`, the Genesis U-Net's `down_trN`) keep only their inputs in the
forward pass and recompute their insides in the backward pass (`torch.utils.checkpoint`,
non-reentrant, random state preserved, so dropout and drop-path draw the same masks). The block's
class is swapped for a checkpointing subclass rather than wrapped, so state-dict keys, copies (an
EMA teacher) and hooks see the same modules. BatchNorm running statistics are left untouched by the
recomputation (it would otherwise count every batch twice). Methods whose network has its own switch
(MONAI's Swin `use_checkpoint`) set `Method.checkpoint_pattern = None` and read the key themselves.
"""
from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

BLOCKS = r"(^|\.)(blocks\.\d+|layer[1-4]\.\d+|layers\.\d+|denselayer\d+|down_tr\d+)$"


@contextlib.contextmanager
def statistics_frozen(module: nn.Module) -> Iterator[None]:
    """BatchNorm layers of `module` normalise as in training but leave their running statistics and
    batch count as they were (momentum 0 while the block is recomputed)."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, count) in zip(norms, saved):
            m.momentum = momentum
            m.num_batches_tracked.copy_(count)


class _Checkpointed:
    """Mixed in front of a block's own class: its forward under `torch.utils.checkpoint` while training."""

    def forward(self, *args, **kwargs):
        inner = super().forward
        if not (self.training and torch.is_grad_enabled()):
            return inner(*args, **kwargs)
        contexts = (lambda: (contextlib.nullcontext(), statistics_frozen(self)))  # noqa: E731
        return checkpoint(inner, *args, use_reentrant=False, context_fn=contexts, **kwargs)


_CLASSES: dict[type, type] = {}


def _checkpointing_class(cls: type) -> type:
    if issubclass(cls, _Checkpointed):
        return cls
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"Checkpointed{cls.__name__}", (_Checkpointed, cls), {"__module__": cls.__module__})
    return _CLASSES[cls]


def enable(model: nn.Module, pattern: str = BLOCKS) -> list[str]:
    """Checkpoint the outermost modules of `model` whose names match `pattern`; their names."""
    regex, chosen = re.compile(pattern), []
    for name, module in model.named_modules():
        if isinstance(module, (nn.ModuleList, nn.ModuleDict)):  # containers are indexed, never called
            continue
        if name and regex.search(name) and not any(name.startswith(f"{outer}.") for outer in chosen):
            module.__class__ = _checkpointing_class(type(module))
            chosen.append(name)
    return chosen


def saved_activation_bytes(forward) -> tuple[int, object]:
    """Bytes of the tensors autograd keeps for backward while `forward()` runs (a checkpointed block
    keeps only what it needs to recompute), and forward's result (a loss to call backward on)."""
    total = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = forward()
    return total, result
