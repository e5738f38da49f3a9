"""Helpers shared by several test modules (not fixtures)."""
from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`bench ARGS` through the console script's own entry point (`bench.cli.main`), in this process.

    The argument parsing, error lines and exit codes are the ones a user meets; what a fresh process
    adds (entry-point discovery of newly installed plugins, a kill -9) is tested with `run_cli_fresh`.
    In-process saves the ten-odd seconds of importing torch and MONAI per command.
    """
    from bench.cli import main

    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    out, err = io.StringIO(), io.StringIO()
    try:
        os.environ.update(env or {})
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as exc:  # argparse's usage errors
                code = exc.code if isinstance(exc.code, int) else 1
            except Exception:  # what a fresh process would print before exiting 1
                traceback.print_exc()
                code = 1
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
    return subprocess.CompletedProcess(["bench", *args], code, out.getvalue(), err.getvalue())


def run_cli_fresh(*args: str, env: dict[str, str] | None = None,
                  cwd: Path | None = None) -> subprocess.CompletedProcess:
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
        plane = np.moveaxis(volume, slice_axis, 0)[k]  # a view: np.take passes over the volume per slice
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


TOTALSEG_V2_TO_VERSE = {27: 24, 28: 23, 29: 22, 30: 21, 31: 20, 32: 19, 33: 18}  # L5..L1, T12, T11; S1 dropped


def make_verse_tree(root: Path) -> Path:
    """A VerSe-layout release built from the real fixtures: sub-verse004 (its real mask and centroid
    JSON, a CT made on the mask's grid), sub-verse501 (the TotalSegmentator pair, relabelled to VerSe
    ids) and sub-verse502, scanned in two series (`split-`) that both see L3 (the TPTBox pair, and
    the same CT with 6 mm cut off on the left: L3 is in both, more of it in the first)."""
    import shutil

    import nibabel as nib
    import numpy as np

    def put(kind: str, subject: str, name: str) -> Path:
        folder = root / kind / subject
        folder.mkdir(parents=True, exist_ok=True)
        return folder / name

    mask = nib.load(str(SHARED_DATA / "sub-verse004_seg-vert_msk.nii.gz"))
    labels = np.asanyarray(mask.dataobj)
    ct = np.where(labels > 0, 300, -1000).astype(np.int16)
    nib.save(nib.Nifti1Image(ct, mask.affine), str(put("rawdata", "sub-verse004", "sub-verse004_ct.nii.gz")))
    shutil.copy(SHARED_DATA / "sub-verse004_seg-vert_msk.nii.gz",
                put("derivatives", "sub-verse004", "sub-verse004_seg-vert_msk.nii.gz"))
    shutil.copy(SHARED_DATA / "sub-verse004_seg-subreg_ctd.json",
                put("derivatives", "sub-verse004", "sub-verse004_seg-subreg_ctd.json"))

    shutil.copy(SHARED_DATA / "totalseg_example_ct.nii.gz",
                put("rawdata", "sub-verse501", "sub-verse501_dir-ax_ct.nii.gz"))
    seg = nib.load(str(SHARED_DATA / "totalseg_example_ct_vertebrae_seg.nii.gz"))
    ids = np.asanyarray(seg.dataobj)
    verse_ids = np.zeros_like(ids)
    for total_id, verse_id in TOTALSEG_V2_TO_VERSE.items():
        verse_ids[ids == total_id] = verse_id
    nib.save(nib.Nifti1Image(verse_ids, seg.affine),
             str(put("derivatives", "sub-verse501", "sub-verse501_dir-ax_seg-vert_msk.nii.gz")))

    tp_ct, tp_mask = (nib.load(str(SHARED_DATA / f)) for f in ("tptbox_sub-ct_label-22_ct.nii.gz",
                                                               "tptbox_sub-ct_seg-vert_label-22_msk.nii.gz"))
    for series, cut in (("split-verse601", slice(None)), ("split-verse602", slice(4, None))):
        for image, kind, suffix in ((tp_ct, "rawdata", "ct.nii.gz"), (tp_mask, "derivatives", "seg-vert_msk.nii.gz")):
            part = image.slicer[:, :, cut]  # P,I,R: index 0 of the third axis is the far left
            nib.save(part, str(put(kind, "sub-verse502", f"sub-verse502_{series}_{suffix}")))
    return root


VERSE_GRADES = [  # verse_ID, N_Fx, then T9 ... L6 (blank: not assessed)
    (4, 2, [0, 0, 1, 0, 2, 0, 0, None, None, None]),
    (501, 1, [None, None, 0, 0, 3, 0, 0, 0, 0, None]),
    (502, 0, [None, None, None, None, None, 0, 0, 0, None, None]),
]
GRADED_LEVELS = ["T9", "T10", "T11", "T12", "L1", "L2", "L3", "L4", "L5", "L6"]


def write_verse_grades(path: Path) -> Path:
    """The grades spreadsheet in the layout community parsers read: verse_ID, N_Fx, <level>_fx-g."""
    import pandas as pd

    rows = [{"verse_ID": vid, "N_Fx": n, **{f"{lv}_fx-g": g for lv, g in zip(GRADED_LEVELS, grades)}}
            for vid, n, grades in VERSE_GRADES]
    table = pd.DataFrame(rows)
    table.to_excel(path, index=False) if path.suffix == ".xlsx" else table.to_csv(path, index=False)
    return path


def setup_public(name: str, path, preset: str = "tiny", **extra):
    """(method, cfg, model) of a `public` run of `name` whose weights.public is the file at `path`."""
    from bench.config import compose
    from bench.registry import create_method, get_method

    overrides = {"preset": preset, "method": name, "regime": "public", "weights.public": str(path), **extra}
    cfg = compose(overrides, get_method(name))
    method = create_method(name, cfg)
    return method, cfg, method.build_model()


def assert_encoder_loaded(method, model, known) -> None:
    """The finetuning encoder holds exactly the tensors `known`, value for value."""
    import torch

    loaded = method.finetune_encoder(model).state_dict()
    assert set(known) == set(loaded), sorted(set(known) ^ set(loaded))[:5]
    for key, value in known.items():
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=0)


def randomised(state):
    """The same keys and shapes with seeded random values (integer buffers kept), so a load can be
    checked tensor by tensor."""
    import torch

    g = torch.Generator().manual_seed(0)
    return {k: (torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()) for k, v in state.items()}
