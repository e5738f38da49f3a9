"""Helpers shared by several test modules (not fixtures)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`bench ARGS` in a fresh process, as a user would run it."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "bench.cli", *args], capture_output=True, text=True, env=full_env,
        cwd=cwd, timeout=600,
    )


def python_in(cwd: Path, code: str, env: dict[str, str] | None = None) -> str:
    """Run `python -c code` in `cwd` (outside the repository) and return its stdout."""
    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True,
                         env={**os.environ, **(env or {})}, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


def encoder_init(method, cfg, model):
    """The run chain's pretraining and encoder-initialisation steps for an already built classifier."""
    from bench.pretrain import run_plan
    from bench.transfer import initialise_encoder

    return initialise_encoder(method, cfg, model, run_plan(method, cfg))


def write_dicom_series(volume, affine_ras, folder: Path, slice_axis: int = 2, reverse: bool = False,
                       tilt_mm: float = 0.0, series_uid: str | None = None, slope: float = 1.0,
                       intercept: float = -1024.0, drop: tuple[int, ...] = ()) -> Path:
    """`volume` (HU, on the NIfTI grid `affine_ras`) as a CT series of single-slice DICOM files, one
    slice per index of `slice_axis`. `reverse` writes the slices (file names and InstanceNumber) in
    reverse order; `tilt_mm` shifts each slice sideways by that much per slice (gantry tilt); `drop`
    leaves slices out. Stored values are (HU - intercept) / slope as int16."""
    import numpy as np
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(affine_ras, dtype=np.float64)
    in_plane = [a for a in range(3) if a != slice_axis]  # (column axis, row axis) of each slice
    col_axis, row_axis = in_plane
    along_row = lps[:3, col_axis] / np.linalg.norm(lps[:3, col_axis])
    along_column = lps[:3, row_axis] / np.linalg.norm(lps[:3, row_axis])
    spacing = [float(np.linalg.norm(lps[:3, row_axis])), float(np.linalg.norm(lps[:3, col_axis]))]
    series_uid = series_uid or generate_uid()
    study_uid = generate_uid()
    indices = [k for k in range(volume.shape[slice_axis]) if k not in drop]
    for number, k in enumerate(reversed(indices) if reverse else indices, start=1):
        plane = np.take(volume, k, axis=slice_axis)  # (column axis, row axis)
        stored = np.rint((plane.T.astype(np.float64) - intercept) / slope)
        index = np.zeros(4)
        index[slice_axis], index[3] = k, 1.0
        position = lps @ index
        position[:3] += tilt_mm * k * along_column
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.PatientID = "CT", "fixture"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.InstanceNumber = number
        ds.ImagePositionPatient = [f"{v:.6f}" for v in position[:3]]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*along_row, *along_column)]
        ds.PixelSpacing = [f"{v:.6f}" for v in spacing]
        ds.SliceThickness = f"{float(np.linalg.norm(lps[:3, slice_axis])):.6f}"
        ds.RescaleSlope, ds.RescaleIntercept = f"{slope:g}", f"{intercept:g}"
        ds.Rows, ds.Columns = stored.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelData = np.clip(stored, -32768, 32767).astype("<i2").tobytes()
        ds.save_as(folder / f"IM{number:04d}.dcm", enforce_file_format=True)
    return folder
