"""A CT given as a folder of one DICOM series ingests to the crops of the same volume as NIfTI."""
import shutil

import nibabel as nib
import numpy as np
import pytest

from bench.cli import main
from bench.datasets.cropstore import open_store
from bench.datasets.dicom import load_dicom_series
from bench.datasets.ingest import Case, IngestOptions, ingest_case
from tests_helpers import SHARED_DATA, write_dicom_series

TS_CT = SHARED_DATA / "totalseg_example_ct.nii.gz"
TS_VERT = SHARED_DATA / "totalseg_example_ct_vertebrae_seg.nii.gz"
TP_CT = SHARED_DATA / "tptbox_sub-ct_label-22_ct.nii.gz"
TP_MASK = SHARED_DATA / "tptbox_sub-ct_seg-vert_label-22_msk.nii.gz"


def _volume(path):
    image = nib.load(str(path))
    return np.asanyarray(image.dataobj), image.affine


@pytest.fixture(scope="module")
def totalseg_series(tmp_path_factory):
    root = tmp_path_factory.mktemp("dicom")
    volume, affine = _volume(TS_CT)
    return {"forward": write_dicom_series(volume, affine, root / "forward"),
            "reverse": write_dicom_series(volume, affine, root / "reverse", reverse=True),
            "scaled": write_dicom_series(volume, affine, root / "scaled", slope=0.5, intercept=-1024.5)}


def _crops(ct, mask, label_map):
    crops, rows, _ = ingest_case(Case(str(ct), str(mask), "p"), IngestOptions(label_map=label_map))
    return crops, [r["vertebra"] for r in rows]


def test_series_geometry_and_values_equal_the_nifti(totalseg_series):
    volume, affine = _volume(TS_CT)
    array, series_affine = load_dicom_series(totalseg_series["forward"])
    assert array.dtype == np.int16 and array.shape == volume.shape
    np.testing.assert_allclose(series_affine, affine, atol=1e-5)  # LPS geometry back to RAS
    assert np.array_equal(array, volume)  # slope and intercept applied


def test_dicom_crops_equal_the_nifti_crops_in_any_slice_order(totalseg_series):
    nifti, names = _crops(TS_CT, TS_VERT, "totalseg_v2")
    forward, forward_names = _crops(totalseg_series["forward"], TS_VERT, "totalseg_v2")
    reverse, reverse_names = _crops(totalseg_series["reverse"], TS_VERT, "totalseg_v2")
    assert names == forward_names == reverse_names and len(names) == 7
    assert np.abs(forward.astype(int) - nifti.astype(int)).max() <= 1  # DICOM geometry is decimal text
    assert np.array_equal(reverse, forward)


def test_a_non_integer_rescale_is_read_as_float(totalseg_series):
    array, _ = load_dicom_series(totalseg_series["scaled"])
    assert array.dtype == np.float32
    assert np.array_equal(array, _volume(TS_CT)[0])  # stored 2 HU + 2049, read back as stored / 2 - 1024.5


def test_a_non_axial_series_with_an_axial_mask(tmp_path):
    """The PIR TPTBox CT written slice by slice along its first axis (coronal slices in LPS), its
    mask left as NIfTI on the original voxel order: one grid, the same crops."""
    volume, affine = _volume(TP_CT)
    series = write_dicom_series(volume, affine, tmp_path / "coronal", slice_axis=0)
    array, series_affine = load_dicom_series(series)
    assert array.shape == (volume.shape[1], volume.shape[2], volume.shape[0])
    nifti, names = _crops(TP_CT, TP_MASK, "verse")
    dicom, dicom_names = _crops(series, TP_MASK, "verse")
    assert names == dicom_names == ["L3"]
    assert np.abs(dicom.astype(int) - nifti.astype(int)).max() <= 1


def test_cli_ingests_a_series_as_the_ct(tmp_path, totalseg_series):
    out = tmp_path / "store"
    assert main(["data", "ingest", f"ct={totalseg_series['reverse']}", f"mask={TS_VERT}", "label_map=totalseg_v2",
                 f"out={out}", "progress=false", "workers=1"]) == 0
    crops, manifest, _ = open_store(out)
    nifti, names = _crops(TS_CT, TS_VERT, "totalseg_v2")
    assert list(manifest["vertebra"]) == names and set(manifest["patient_id"]) == {"reverse"}
    assert np.abs(np.asarray(crops).astype(int) - nifti.astype(int)).max() <= 1


def _bad_series(tmp_path, kind):
    volume, affine = _volume(TS_CT)
    volume = volume[:, :, 40:60]  # a short series keeps the fixture fast
    folder = tmp_path / kind
    if kind == "mixed":
        write_dicom_series(volume, affine, folder)
        other = write_dicom_series(volume, affine, tmp_path / "other")
        shutil.copy(next(other.iterdir()), folder / "IM9999.dcm")
    elif kind == "missing_slice":
        write_dicom_series(volume, affine, folder, drop=(7,))
    elif kind == "tilt":
        write_dicom_series(volume, affine, folder, tilt_mm=0.3)
    elif kind == "duplicate":
        write_dicom_series(volume, affine, folder)
        shutil.copy(folder / "IM0003.dcm", folder / "IM0003b.dcm")
    elif kind == "text_dcm":  # a slice replaced by a text file of the same name
        write_dicom_series(volume, affine, folder)
        (folder / "IM0008.dcm").write_text("not an image")
    elif kind == "corrupt":
        write_dicom_series(volume, affine, folder)
        first = folder / "IM0001.dcm"
        first.write_bytes(first.read_bytes()[:400])
    return folder


@pytest.mark.parametrize("kind, expected", [("mixed", "2 series in one folder"),
                                            ("missing_slice", "non-uniform slice spacing"),
                                            ("tilt", "gantry tilt"),
                                            ("duplicate", "two slices at the same position"),
                                            ("corrupt", "IM0001.dcm"),
                                            ("text_dcm", "IM0008.dcm': named as a DICOM file but is not one")])
def test_bad_series_is_one_line_and_writes_nothing(tmp_path, capsys, kind, expected):
    series = _bad_series(tmp_path, kind)
    out = tmp_path / "out" / "store"
    assert main(["data", "ingest", f"ct={series}", f"mask={TS_VERT}", "label_map=totalseg_v2", f"out={out}",
                 "progress=false", "workers=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err
    assert not out.exists() and not (tmp_path / "out").exists()
