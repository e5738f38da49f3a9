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
        _check_size(img, path, what)
        data = np.asanyarray(img.dataobj)
    except (EOFError, gzip.BadGzipFile, zlib.error, OSError, ValueError, nib.filebasedimages.ImageFileError) as exc:
        reason = " ".join(str(exc).split())  # nibabel's messages can span lines
        raise BenchError(f"{what} '{path}': not a readable NIfTI file ({type(exc).__name__}: {reason})") from None
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


MAX_VOLUME_BYTES = 8 * 2**30  # far above any CT (a 512 x 512 x 2000 int16 scan is 1 GiB)
DEFLATE_MAX_RATIO = 1032  # deflate cannot compress by more than this


def _check_size(img, path: Path, what: str) -> None:
    """Refuse a header whose volume the file cannot hold, before anything is allocated: an
    uncompressed file must be at least as large as the data it declares; a gzip file records its
    uncompressed size (modulo 4 GiB) in its last four bytes, and cannot hold more than deflate's
    largest ratio times its own size."""
    shape = img.header.get_data_shape()
    declared = int(np.prod(shape, dtype=np.float64)) * img.header.get_data_dtype().itemsize
    if declared > MAX_VOLUME_BYTES:
        raise BenchError(f"{what} '{path}': the header declares {tuple(shape)} voxels ({declared / 2**30:.0f} GiB); "
                         f"expected a CT volume")
    offset = int(getattr(img.header, "get_data_offset", lambda: 0)() or 0)
    if str(path).endswith(".gz"):
        with open(path, "rb") as handle:
            handle.seek(-4, 2)
            stored = int.from_bytes(handle.read(4), "little")
        size = path.stat().st_size
        if (declared + offset < 2**32 and stored < declared + offset) or declared > DEFLATE_MAX_RATIO * size:
            raise BenchError(f"{what} '{path}': the header declares {tuple(shape)} voxels ({declared} bytes) but the "
                             f"{size}-byte file cannot hold them; truncated or not a valid NIfTI")
    elif path.stat().st_size < declared + offset:
        raise BenchError(f"{what} '{path}': the header declares {tuple(shape)} voxels ({declared} bytes) but the "
                         f"file holds {max(path.stat().st_size - offset, 0)}; truncated or not a valid NIfTI")


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
