"""A 512 x 512 x 400 int16 CT with 17 vertebrae (T6-L5 in TotalSegmentator v2 ids), as .nii.gz."""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

SHAPE = (512, 512, 400)
SPACING = (0.78, 0.78, 1.0)  # a typical abdominal CT
TS_V2_IDS = list(range(27, 32)) + list(range(32, 44))  # L5..L1, T12..T1: the first 17 are used


def make_big_ct(folder: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    affine = np.diag([*SPACING, 1.0])
    affine[:3, 3] = -np.array(SHAPE) * SPACING / 2
    x, y = np.ogrid[: SHAPE[0], : SHAPE[1]]
    body = ((x - 256) / 230.0) ** 2 + ((y - 256) / 180.0) ** 2 < 1
    ct = np.full(SHAPE, -1000, np.int16)
    ct[body] = 40
    ct += rng.integers(-20, 20, size=SHAPE[:2], dtype=np.int16)[..., None]
    mask = np.zeros(SHAPE, np.uint8)
    bodyx = (x - 256) ** 2 / 30.0**2 + (y - 300) ** 2 / 25.0**2 < 1  # vertebral body cross-section
    for i, label in enumerate(TS_V2_IDS[:17]):
        z0 = 10 + i * 22
        mask[..., z0 : z0 + 18][bodyx] = label
        ct[..., z0 : z0 + 18][bodyx] = 250
    ct_path, mask_path = folder / "big_ct.nii.gz", folder / "big_mask.nii.gz"
    for data, path in ((ct, ct_path), (mask, mask_path)):
        img = nib.Nifti1Image(data, affine)
        img.header.set_data_dtype(data.dtype)
        nib.save(img, str(path))
    return ct_path, mask_path
