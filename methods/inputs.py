"""Input conventions of public checkpoints, applied inside an encoder so that every protocol and
every view of the harness feeds the network what its pretraining fed it.

The harness's crops are HU clipped to [HU_MIN, HU_MAX] and scaled to [0, 1], in RAS axis order.
A checkpoint trained on another intensity window sees that window (values outside the harness's
range stay clipped), and one trained in another orientation sees its axes permuted and flipped.
"""
from __future__ import annotations

import nibabel as nib
import numpy as np
import torch
from torch import nn

from bench.datasets.torch_data import HU_MAX, HU_MIN
from bench.errors import BenchError


class HUWindow(nn.Module):
    """[0, 1]-scaled crops -> HU -> clipped to [low, high] -> [0, 1]."""

    def __init__(self, low: float, high: float) -> None:
        super().__init__()
        if not high > low:
            raise BenchError(f"HU window [{low}, {high}]: expected low < high")
        self.low, self.high = float(low), float(high)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hu = x * (HU_MAX - HU_MIN) + HU_MIN
        return (hu.clamp(self.low, self.high) - self.low) / (self.high - self.low)

    def extra_repr(self) -> str:
        return f"low={self.low}, high={self.high}"


class Reorient(nn.Module):
    """(B, C, X, Y, Z) from RAS to the axis codes a checkpoint was trained in (e.g. "SPL"), by
    permuting and flipping axes with nibabel's orientation algebra (no resampling)."""

    def __init__(self, axcodes: str) -> None:
        super().__init__()
        try:
            transform = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"),
                                                        nib.orientations.axcodes2ornt(tuple(axcodes)))
        except Exception:
            raise BenchError(f"orientation '{axcodes}': expected three axis codes such as RAS or SPL") from None
        # transform[i] = (axis of the output that input axis i goes to, +1/-1)
        self.order = tuple(int(np.argsort(transform[:, 0])[k]) + 2 for k in range(3))
        self.flips = tuple(int(out) + 2 for out, sign in transform if sign < 0)
        self.axcodes = axcodes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 1, *self.order)
        return x.flip(self.flips) if self.flips else x

    def undo(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, *spatial) back from the checkpoint's axis codes to RAS: the inverse of forward."""
        x = x.flip(self.flips) if self.flips else x
        return x.permute(0, 1, *(int(i) + 2 for i in np.argsort([o - 2 for o in self.order])))

    def extra_repr(self) -> str:
        return f"RAS -> {self.axcodes}"


def hu_window(values: list[float], key: str = "model.hu_window") -> HUWindow:
    """The HUWindow of a config value [low, high], or one line naming the key."""
    if len(values) != 2:
        raise BenchError(f"bad value for '{key}': {list(values)}; expected [low, high] in HU")
    return HUWindow(float(values[0]), float(values[1]))
