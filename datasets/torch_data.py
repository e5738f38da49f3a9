"""Crops as tensors: HU clipped to [-1000, 1000] and scaled to [0, 1] at load time."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Sampler

from bench.datasets import views

HU_MIN, HU_MAX = -1000.0, 1000.0


def scale_hu(x: np.ndarray) -> np.ndarray:
    return (np.clip(x.astype(np.float32), HU_MIN, HU_MAX) - HU_MIN) / (HU_MAX - HU_MIN)


def resize_cube(x: np.ndarray, size: int) -> np.ndarray:
    """Resample a cubic crop to `size`^3 over the same field of view (area average when shrinking)."""
    if x.shape[-1] == size:
        return x
    t = torch.from_numpy(np.ascontiguousarray(x))[None, None]
    mode = "area" if size < x.shape[-1] else "trilinear"
    kwargs = {} if mode == "area" else {"align_corners": False}
    return F.interpolate(t, size=(size,) * 3, mode=mode, **kwargs)[0, 0].numpy()


def load_crop(images: np.ndarray, row: int, size: int | None) -> np.ndarray:
    """One crop of a store in [0, 1], resampled to `size`^3 (None: as stored)."""
    x = scale_hu(images[row])
    return x if size is None else resize_cube(x, size)


class CropDataset(Dataset):
    """(1, S, S, S) float tensors in [0, 1] and integer labels; random left-right flips when `augment`.

    `rows` index into `images` (usually a memory map), so only the crops of a batch are read. The
    flip is drawn from a generator seeded per (seed, epoch, index), so an epoch's augmentation is
    reproducible whatever the DataLoader's worker layout.
    """

    def __init__(self, images: np.ndarray, rows: np.ndarray, labels: np.ndarray, size: int | None = None,
                 augment: bool = False, seed: int = 0):
        self.images = images
        self.rows = np.asarray(rows)
        self.labels = labels.astype(np.int64)
        self.size = size
        self.augment = augment
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x = load_crop(self.images, self.rows[index], self.size)
        if self.augment:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            if rng.random() < 0.5:
                x = x[::-1]  # axis 0 is left-right in RAS order
        return torch.from_numpy(np.ascontiguousarray(x)[None]), int(self.labels[index])


class SliceViewDataset(CropDataset):
    """Video-format samples: (C, T, H, W) clips of `frames` slices along `axis`.

    Training (`augment`): one random common shift per sample and epoch (plus the left-right flip).
    Evaluation with `multi_view`: every shift, stacked as (V, C, T, H, W); otherwise the centre view.
    Only the sampled slices are read from the (memory-mapped) crop and scaled: a view touches
    16 of 96 slices, not the whole cube.
    """

    def __init__(self, images, rows, labels, size=None, augment=False, seed=0, axis="sagittal",
                 frames=16, frame_size=0, channels=3, multi_view=True):
        super().__init__(images, rows, labels, size, augment, seed)
        self.axis, self.frames, self.frame_size = axis, frames, frame_size
        self.channels, self.multi_view = channels, multi_view

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        crop = self.images[self.rows[index]]  # a view of the memory map: nothing read yet
        if self.size is not None and crop.shape[-1] != self.size:
            crop = resize_cube(np.asarray(crop, dtype=np.float32), self.size)
        a = views.AXES[self.axis]
        depth = crop.shape[a]
        flip = False
        if self.augment:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            flip = rng.random() < 0.5  # the same draw as CropDataset's flip
            options = views.shifts(depth, self.frames)
            chosen = [options[int(rng.integers(len(options)))]]
        elif self.multi_view:
            chosen = views.shifts(depth, self.frames)
        else:
            chosen = [0]
        clips = []
        for shift in chosen:
            pos = views.slice_positions(depth, self.frames) + shift
            if flip and a == 0:  # mirroring left-right = taking the mirrored sagittal slices
                pos = depth - 1 - pos
            frames = scale_hu(np.moveaxis(np.take(crop, pos, axis=a), a, 0))
            if flip and a != 0:
                frames = frames[:, ::-1]  # axis 1 of a coronal or axial frame is left-right
            clips.append(views.to_clip(frames, self.frame_size, self.channels))
        out = np.stack(clips) if (not self.augment and self.multi_view) else clips[0]
        return torch.from_numpy(out), int(self.labels[index])


class BalancedBatchSampler(Sampler[list[int]]):
    """Batches with the same number of rows of every class (Wei et al.: 3 per Genant grade).

    Each class is walked in a fresh seeded permutation per epoch and reshuffled when used up, so
    rare classes repeat within an epoch while common ones are not all seen; an epoch has as many
    batches as shuffled batches of `batch_size` would. Set `epoch` before iterating. `balanced`
    tells the engine to use an unweighted loss: the batches already carry every class equally.
    """

    balanced = True

    def __init__(self, labels: np.ndarray, batch_size: int, seed: int) -> None:
        labels = np.asarray(labels, dtype=int)
        self.by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
        self.per_class = max(1, batch_size // len(self.by_class))
        self.n_batches = max(1, len(labels) // (self.per_class * len(self.by_class)))
        self.seed, self.epoch = seed, 0

    def __len__(self) -> int:
        return self.n_batches

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch, 17])
        queues = [list(rng.permutation(rows)) for rows in self.by_class]
        for _ in range(self.n_batches):
            batch = []
            for c, rows in enumerate(self.by_class):
                for _ in range(self.per_class):
                    if not queues[c]:
                        queues[c] = list(rng.permutation(rows))
                    batch.append(int(queues[c].pop()))
            yield [batch[i] for i in rng.permutation(len(batch))]
