"""Reading a CT given as a folder of one DICOM series (one file per slice), with pydicom.

The volume is built from the DICOM geometry, not from file names or InstanceNumber: slices are
ordered by their position along the slice normal (so a series stored in reverse order gives the
same volume), each slice's RescaleSlope and RescaleIntercept are applied, and the affine maps
(column, row, slice) indices to the patient's LPS coordinates, then to the store's RAS. A series
that cannot be one regular grid (gantry tilt, a missing or duplicated slice, mixed series or
orientations) is refused: resampling it silently would change every crop.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from bench.errors import BenchError

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
SPACING_TOLERANCE = 0.01  # relative deviation of a slice gap from the median gap
TILT_TOLERANCE = 1e-3
REQUIRED = ("SeriesInstanceUID", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows",
            "Columns", "PixelData")  # sine of the angle between the slice normal and the slice-to-slice step


def is_dicom_file(path: Path) -> bool:
    """The DICOM Part 10 preamble: 128 bytes, then 'DICM'."""
    try:
        with open(path, "rb") as handle:
            return handle.read(132)[128:] == b"DICM"
    except OSError:
        return False


def is_dicom_series(path: str | Path) -> bool:
    """A folder whose files include DICOM files (a CT given as one series)."""
    path = Path(path)
    return path.is_dir() and any(is_dicom_file(p) for p in path.iterdir() if p.is_file())


def _floats(ds, keyword: str, where: Path, n: int) -> np.ndarray:
    value = getattr(ds, keyword, None)
    try:
        array = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        array = np.empty(0)
    if array.shape != (n,) or not np.isfinite(array).all():
        raise BenchError(f"DICOM file '{where}': missing or invalid {keyword} (expected {n} numbers); "
                         f"a CT series needs the image plane module")
    return array


def load_dicom_series(folder: str | Path, what: str = "CT") -> tuple[np.ndarray, np.ndarray]:
    """(array, affine) of the series in `folder`: array indexed (column, row, slice), HU as int16
    when every slope and intercept keep the values whole, else float32; affine in RAS mm."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    folder = Path(folder)
    named = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in (".dcm", ".ima")]
    impostor = next((p for p in sorted(named) if not is_dicom_file(p)), None)
    if impostor is not None:  # skipped, it would leave a gap read as a missing slice
        raise BenchError(f"{what} '{impostor}': named as a DICOM file but is not one (no DICM preamble); remove it "
                         f"or replace it with the slice it stands for")
    files = sorted(p for p in folder.iterdir() if p.is_file() and is_dicom_file(p))
    if not files:
        raise BenchError(f"{what} '{folder}': no DICOM files in the folder; expected one series, one file per slice")
    slices = []
    for path in files:
        try:
            ds = pydicom.dcmread(path)
        except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
            raise BenchError(f"{what} '{path}': not a readable DICOM file ({type(exc).__name__}: {exc})") from None
        missing = [k for k in REQUIRED if k not in ds]
        if missing:
            raise BenchError(f"{what} '{path}': lacks {', '.join(missing)}; expected a complete CT image "
                             f"(truncated file?)")
        if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1:
            raise BenchError(f"{what} '{path}': a multi-frame DICOM object; expected one file per slice")
        slices.append((path, ds))
    series = {str(getattr(ds, "SeriesInstanceUID", "")) for _, ds in slices}
    if len(series) > 1:
        raise BenchError(f"{what} '{folder}': {len(series)} series in one folder (SeriesInstanceUID "
                         f"{', '.join(sorted(series)[:3])}); expected one series per folder")
    orientation = _floats(slices[0][1], "ImageOrientationPatient", slices[0][0], 6)
    for path, ds in slices:
        if not np.allclose(_floats(ds, "ImageOrientationPatient", path, 6), orientation, atol=1e-4):
            raise BenchError(f"{what} '{path}': ImageOrientationPatient differs from the series' first slice; "
                             f"expected one orientation per series")
    along_row, along_column = orientation[:3], orientation[3:]
    normal = np.cross(along_row, along_column)
    positions = np.stack([_floats(ds, "ImagePositionPatient", path, 3) for path, ds in slices])
    order = np.argsort(positions @ normal, kind="stable")
    slices = [slices[i] for i in order]
    positions = positions[order]
    step = _regular_step(positions, normal, folder, what)
    rows, columns = int(slices[0][1].Rows), int(slices[0][1].Columns)
    row_gap, column_gap = _floats(slices[0][1], "PixelSpacing", slices[0][0], 2)
    volume, whole = np.empty((columns, rows, len(slices)), np.float32), True  # filled slice by slice
    for k, (path, ds) in enumerate(slices):
        if (int(ds.Rows), int(ds.Columns)) != (rows, columns):
            raise BenchError(f"{what} '{path}': {ds.Rows}x{ds.Columns} pixels; the series' first slice has "
                             f"{rows}x{columns}")
        if not np.allclose(_floats(ds, "PixelSpacing", path, 2), (row_gap, column_gap), rtol=1e-4):
            raise BenchError(f"{what} '{path}': PixelSpacing differs from the series' first slice")
        try:
            pixels = ds.pixel_array
        except Exception as exc:  # pydicom raises many types for absent or undecodable pixel data
            raise BenchError(f"{what} '{path}': pixel data not readable ({type(exc).__name__}: {exc})") from None
        slope, intercept = float(getattr(ds, "RescaleSlope", 1) or 1), float(getattr(ds, "RescaleIntercept", 0) or 0)
        whole &= slope.is_integer() and intercept.is_integer()
        volume[:, :, k] = pixels.T * np.float32(slope) + np.float32(intercept)  # (row, column) -> (column, row)
    array = volume
    if whole and volume.min() >= -32768 and volume.max() <= 32767:
        array = volume.astype(np.int16)
    affine = np.eye(4)
    affine[:3, 0] = along_row * column_gap
    affine[:3, 1] = along_column * row_gap
    affine[:3, 2] = step
    affine[:3, 3] = positions[0]
    return array, LPS_TO_RAS @ affine


def _regular_step(positions: np.ndarray, normal: np.ndarray, folder: Path, what: str) -> np.ndarray:
    """The one slice-to-slice step of a regular grid along the normal, or one line saying why not."""
    if len(positions) < 2:
        raise BenchError(f"{what} '{folder}': a single slice; expected a 3D series")
    steps = np.diff(positions, axis=0)
    gaps = steps @ normal
    median = float(np.median(gaps))
    if min(gaps) < 1e-3 * max(median, 1e-3):
        raise BenchError(f"{what} '{folder}': two slices at the same position; expected one file per slice")
    off_normal = np.linalg.norm(steps - np.outer(gaps, normal), axis=1) / gaps
    if off_normal.max() > TILT_TOLERANCE:
        angle = np.degrees(np.arctan(off_normal.max()))
        raise BenchError(f"{what} '{folder}': slices are offset sideways along the slice normal by {angle:.2f} "
                         f"degrees (gantry tilt); resample the series to a regular grid first")
    deviation = np.abs(gaps - median) / median
    if deviation.max() > SPACING_TOLERANCE:
        worst = int(np.argmax(deviation))
        raise BenchError(f"{what} '{folder}': non-uniform slice spacing ({gaps[worst]:.3g} mm between slices "
                         f"{worst} and {worst + 1} against a median of {median:.3g} mm; a missing slice?)")
    return normal * float(gaps.mean())
