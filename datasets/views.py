"""Slice views of a cubic crop, the input format of the video methods (Video-CT MAE, Section 3).

A view is `n` equidistant slices along one axis, stacked as video frames: positions
round(linspace(0, depth - 1, n + 2))[1:-1] (the public code's rule: the outermost slices are
dropped), all moved by one common shift. Training draws one shift from [-sd//2, sd//2), sd being
the slice spacing; evaluation takes every shift in that range (5-6 views for a 96 crop) and the
engine averages the logits (multi-view testing).

Axes are those of the RAS crop: sagittal slices cut axis 0 (left-right), coronal axis 1, axial
axis 2. The paper says sagittal; its public code takes what is the axial axis in standard terms,
hence the key.
"""
from __future__ import annotations

import numpy as np

AXES = {"sagittal": 0, "coronal": 1, "axial": 2}


def slice_positions(depth: int, n: int = 16) -> np.ndarray:
    if n + 2 > depth:
        raise ValueError(f"cannot take {n} interior slices from a depth of {depth}")
    return np.round(np.linspace(0, depth - 1, n + 2)).astype(int)[1:-1]


def shifts(depth: int, n: int = 16) -> list[int]:
    """Every common shift that keeps all positions inside the crop."""
    pos = slice_positions(depth, n)
    spacing = int(pos[1] - pos[0])
    candidates = range(-spacing // 2, spacing // 2) if spacing > 1 else range(0, 1)
    return [s for s in candidates if pos[0] + s >= 0 and pos[-1] + s <= depth - 1]


def take_view(volume: np.ndarray, axis: str, n: int, shift: int = 0) -> np.ndarray:
    """(n, H, W) slices of a (X, Y, Z) crop along `axis`, moved by `shift` voxels."""
    a = AXES[axis]
    pos = slice_positions(volume.shape[a], n) + shift
    return np.moveaxis(np.take(volume, pos, axis=a), a, 0)


def to_clip(frames: np.ndarray, frame_size: int = 0, channels: int = 3) -> np.ndarray:
    """(C, T, H, W) float32 clip: channels replicated, frames zero-padded (centred) to `frame_size`."""
    t, h, w = frames.shape
    size = max(frame_size, h, w)
    clip = np.zeros((channels, t, size, size), np.float32)
    top, left = (size - h) // 2, (size - w) // 2
    clip[:, :, top:top + h, left:left + w] = frames[None]
    return clip
