"""Reading NIfTI volumes with one clear error per kind of bad input."""
from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from bench.errors import BenchError


def load_volume(path: str | Path, what: str, finite: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(array, affine) of a 3D NIfTI, in its stored dtype (no float64 copy of a big CT).

    A trailing singleton 4th axis is dropped; anything else that is not 3D is refused.
    """
    path = Path(path)
    if not path.is_file():
        raise BenchError(f"{what} '{path}': no such file")
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except (EOFError, gzip.BadGzipFile, zlib.error, OSError, ValueError, nib.filebasedimages.ImageFileError) as exc:
        raise BenchError(f"{what} '{path}': not a readable NIfTI file ({type(exc).__name__}: {exc})") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise BenchError(f"{what} '{path}': expected a 3D volume, got shape {tuple(data.shape)}")
    if finite and np.issubdtype(data.dtype, np.floating) and not np.isfinite(data).all():
        bad = int((~np.isfinite(data)).sum())
        raise BenchError(f"{what} '{path}': {bad} NaN or infinite voxel(s); expected finite HU values")
    affine = img.affine
    if affine is None or not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise BenchError(f"{what} '{path}': invalid affine (voxel-to-world) matrix")
    return data, np.asarray(affine, dtype=np.float64)


def same_grid(shape_a, affine_a, shape_b, affine_b, tol_mm: float = 1e-3) -> bool:
    return tuple(shape_a) == tuple(shape_b) and np.allclose(affine_a, affine_b, atol=tol_mm)
