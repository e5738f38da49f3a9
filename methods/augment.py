"""Two-view augmentation for contrastive objectives, MONAI transforms.

A view is a random resized crop of the three spatial (or time + space) axes, each kept between
`min_scale` and all of its extent, resized to `out_size`, a random flip of the last axis, and a
random intensity scale and shift. Two independent draws of the same sample are the positive pair.

Two ways to draw them:
- per sample in the data loader, from the generator the harness seeds per (seed, epoch, index):
  `random_view` and `two_views`, the helpers a plugin's `PretextTask.sample_views` uses;
- per batch on the device (`TwoViews`, the built-in pretexts): each batch reseeds the transforms
  from torch's global generator, so the views follow the run's seed and a run resumed from a
  checkpoint (which restores that generator) draws the same views.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch
from monai.transforms import Compose, RandFlip, RandScaleIntensity, RandShiftIntensity, RandSpatialCrop, Resize
from monai.utils import convert_to_tensor


def view_transform(in_size: Sequence[int], out_size: Sequence[int], min_scale: float) -> Compose:
    """One random view of a (C, D, H, W) tensor of spatial size `in_size`, resized to `out_size`."""
    smallest = [max(1, int(round(s * min_scale))) for s in in_size]
    transform = Compose([
        RandSpatialCrop(roi_size=smallest, max_roi_size=list(in_size), random_center=True, random_size=True),
        Resize(spatial_size=list(out_size), mode="trilinear", align_corners=False),
        RandFlip(prob=0.5, spatial_axis=2),
        RandScaleIntensity(factors=0.2, prob=1.0),
        RandShiftIntensity(offsets=0.1, prob=1.0),
    ])
    return transform


@functools.lru_cache(maxsize=16)
def _cached_transform(size: tuple[int, ...], min_scale: float) -> Compose:
    return view_transform(size, size, min_scale)


def random_view(x: torch.Tensor, rng: np.random.Generator, min_scale: float = 0.6) -> torch.Tensor:
    """One random view of a sample (C, D, H, W) in [0, 1], at its own size, drawn from `rng`: a crop
    of `min_scale` to all of each axis resized back, a flip of the last axis with probability 0.5,
    an intensity scale (x [0.8, 1.2]) and shift (+ [-0.1, 0.1]), clamped to [0, 1]."""
    transform = _cached_transform(tuple(x.shape[1:]), float(min_scale))
    transform.set_random_state(seed=int(rng.integers(0, 2**31 - 1)))
    return convert_to_tensor(transform(x.float()), track_meta=False).clamp_(0, 1).to(x.dtype)


def two_views(x: torch.Tensor, rng: np.random.Generator, min_scale: float = 0.6) -> tuple[torch.Tensor, torch.Tensor]:
    """Two independent `random_view`s of one sample: the positive pair of a contrastive pretext."""
    return random_view(x, rng, min_scale), random_view(x, rng, min_scale)


class TwoViews:
    """Draws two views of every sample of a batch; `out_size` None keeps the input size."""

    def __init__(self, min_scale: float, out_size: Sequence[int] | None = None) -> None:
        self.min_scale, self.out_size = min_scale, out_size
        self._transforms: dict[tuple[int, ...], Compose] = {}

    def _transform(self, in_size: tuple[int, ...]) -> Compose:
        if in_size not in self._transforms:
            out = tuple(self.out_size) if self.out_size else in_size
            self._transforms[in_size] = view_transform(in_size, out, self.min_scale)
        return self._transforms[in_size]

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        transform = self._transform(tuple(x.shape[2:]))
        transform.set_random_state(seed=int(torch.randint(0, 2**31 - 1, (1,))))
        # plain tensors: MONAI returns MetaTensors, which torch.compile'd graphs cannot take
        views = [torch.stack([convert_to_tensor(transform(sample.float()), track_meta=False) for sample in x])
                 for _ in range(2)]
        return views[0].to(x.dtype), views[1].to(x.dtype)
