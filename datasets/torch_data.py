"""Crops as tensors: HU clipped to [-1000, 1000] and scaled to [0, 1] at load time."""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

HU_MIN, HU_MAX = -1000.0, 1000.0


def scale_hu(x: np.ndarray) -> np.ndarray:
    return (np.clip(x.astype(np.float32), HU_MIN, HU_MAX) - HU_MIN) / (HU_MAX - HU_MIN)


class CropDataset(Dataset):
    """(1, X, Y, Z) float tensors and integer labels; random left-right flips when `augment`.

    The flip is drawn from a generator seeded per (epoch seed, index), so an epoch's augmentation
    is reproducible whatever the DataLoader's worker layout.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, augment: bool = False, seed: int = 0):
        self.images = images
        self.labels = labels.astype(np.int64)
        self.augment = augment
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x = scale_hu(self.images[index])
        if self.augment:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            if rng.random() < 0.5:
                x = x[::-1]  # axis 0 is left-right in RAS order
        return torch.from_numpy(np.ascontiguousarray(x)[None]), int(self.labels[index])
