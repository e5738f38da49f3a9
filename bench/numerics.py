"""Numerics guards for CPU bf16 autocast: the convolutions whose bf16 kernel is known to be wrong run
in fp32, every other op stays in bf16.

On CPUs with native bf16 (AVX512-BF16), oneDNN 3.12's `jit_bf16:avx512_core_bf16` backward-weights
convolution (PyTorch 2.14's 3D bf16 path) returns a wrong weight gradient, orders of magnitude off and
sometimes NaN, whenever a stride-1 3D convolution (or transposed convolution) sees an input whose depth
is above 1 but below the kernel's depth: a ResNet's last stage (2^3 voxels under a 3^3 kernel), a video
CNN's temporal kernel over two frames. The forward pass and the input gradient are right, and the
result varies from call to call on the same tensors. One such weight step is enough to turn the next
losses into NaN, which is how the conv nets diverged at the default preset on that CPU kind.
tests/test_numerics.py holds the faulty and the sound shapes; the default-preset guard
(tests/test_default_preset_guard.py) replays every weight op of every method in bf16 against fp32, so
that a kernel fault of this kind shows on any CPU, whether it overflows or not.

The guarded convolutions see a few voxels, so running them in fp32 costs next to nothing.
"""
from __future__ import annotations

import torch
from torch import nn


def _wrong_in_bf16(conv: nn.Module, x: torch.Tensor) -> bool:
    """Whether this call hits the faulty bf16 kernel: CPU autocast in bf16, depth stride 1, and an
    input depth strictly between 1 and the kernel's depth."""
    if x.device.type != "cpu" or x.dim() != 5:
        return False
    if not (torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16):
        return False
    return conv.stride[0] == 1 and 1 < x.shape[2] < conv.kernel_size[0]


class _Guarded:
    """Mixed into a 3D (transposed) convolution class: the call runs in fp32 where the CPU bf16 kernel
    is wrong (the module's own fp32 parameters, autocast off), as the class itself elsewhere."""

    def forward(self, x: torch.Tensor, *args: object) -> torch.Tensor:
        if _wrong_in_bf16(self, x):
            with torch.autocast("cpu", enabled=False):
                return super().forward(x.float(), *args)
        return super().forward(x, *args)


_BASES = (nn.Conv3d, nn.ConvTranspose3d)
_guarded_classes: dict[type, type] = {}


def guarded_class(cls: type) -> type:
    """The guarded subclass of a convolution class (one per class, so modules of a class share it)."""
    if cls not in _guarded_classes:
        _guarded_classes[cls] = type(f"Guarded{cls.__name__}", (_Guarded, cls), {"__module__": __name__})
    return _guarded_classes[cls]


GuardedConv3d = guarded_class(nn.Conv3d)
GuardedConvTranspose3d = guarded_class(nn.ConvTranspose3d)


def guard_bf16_convolutions(model: nn.Module) -> int:
    """Guard every 3D (transposed) convolution of `model` in place: its class becomes the guarded
    subclass of its class (parameters, buffers and state-dict keys do not change). Subclasses that keep
    torch's forward are guarded too (torchvision's video ResNets subclass nn.Conv3d); one with a forward
    of its own is left as it is. Returns how many modules are guarded."""
    count = 0
    for module in model.modules():
        cls = type(module)
        if issubclass(cls, _Guarded):
            count += 1
        elif isinstance(module, _BASES) and any(cls.forward is base.forward for base in _BASES):
            module.__class__ = guarded_class(cls)
            count += 1
    return count
