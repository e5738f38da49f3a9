"""How much arithmetic a stage did, against what this machine's cores can do.

A stage counts the floating point operations of one training step (or one inference batch) with
torch's FLOP counter (`torch.utils.flop_counter`: matmuls and convolutions, forward and backward)
and multiplies by the steps (samples) it ran; the suite divides each stage's FLOPs by its time and
compares that rate with the machine's measured dense matmul rate at the same thread count, in fp32
and, where the CPU has native bf16 kernels, in bf16. What the rate misses (data loading, Python,
elementwise ops, waiting on a lock for a shared artifact) is the rest of the stage's time.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch


def _cpu_fused_attention(query, key, value, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query, key, value)


def _cpu_fused_attention_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return sdpa_backward_flop_count(grad_out, query, key, value)


def counted(fn: Callable[[], Any]) -> tuple[Any, float]:
    """`fn()`'s result and the FLOPs it ran (forward, and backward when fn calls it). torch's counter
    knows the GPU kernels of fused attention but not the CPU one, which timm's ViTs (and MONAI's
    Swin without gradients) run on a CPU: its products are counted here as the GPU kernels' are."""
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    cpu_attention = {aten._scaled_dot_product_flash_attention_for_cpu: _cpu_fused_attention,
                     aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_fused_attention_backward}
    with FlopCounterMode(display=False, custom_mapping=cpu_attention) as counter:
        result = fn()
    return result, float(counter.get_total_flops())


def matmul_rate(dtype: torch.dtype = torch.float32, size: int = 1024, seconds: float = 0.5) -> float:
    """Dense square matmul FLOP/s at torch's current thread count (the best of repeated products)."""
    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    torch.mm(a, b)
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * size**3 / (time.perf_counter() - t0))
    return best
