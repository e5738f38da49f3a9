"""Reading volumes (a NIfTI file, or a folder of one DICOM series) with one clear error per kind
of bad input."""
from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from bench.errors import BenchError


def load_volume(path: str | Path, what: str, finite: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(array, affine) of a 3D NIfTI, in its stored dtype (no float64 copy of a big CT), or of the
    DICOM series in a folder (bench.datasets.dicom).

    A trailing singleton 4th axis is dropped; anything else that is not 3D is refused.
    """
    path = Path(path)
    if path.is_dir():
        from bench.datasets.dicom import load_dicom_series

        return load_dicom_series(path, what)
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
    """The same voxel centres in world space, whatever the order of the voxel axes (a DICOM series
    stored sagittally and its mask stored axially cover one grid)."""
    (shape_a, affine_a), (shape_b, affine_b) = canonical_grid(shape_a, affine_a), canonical_grid(shape_b, affine_b)
    return shape_a == shape_b and np.allclose(affine_a, affine_b, atol=tol_mm)


def canonical_grid(shape, affine: np.ndarray) -> tuple[tuple[int, ...], np.ndarray]:
    """Shape and affine of the grid with its voxel axes permuted and flipped to RAS (no resampling)."""
    from nibabel.orientations import inv_ornt_aff, io_orientation

    ornt = io_orientation(affine)
    canonical = affine @ inv_ornt_aff(ornt, shape)
    return tuple(int(shape[int(i)]) for i in np.argsort(ornt[:, 0])), canonical
