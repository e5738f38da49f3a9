"""CT + mask -> crops, on the real fixtures in ../shared/data."""
import gzip

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from bench.cli import main
from bench.datasets.cropstore import open_store
from bench.datasets.ingest import (
    Case,
    IngestOptions,
    ingest_case,
    read_verse_centroids,
    sample_crop,
    vertebra_centroids,
)
from bench.datasets.ingest_many import ingest
from bench.datasets.labelmaps import LABEL_MAPS
from tests_helpers import SHARED_DATA

TS_CT = SHARED_DATA / "totalseg_example_ct.nii.gz"
TS_VERT = SHARED_DATA / "totalseg_example_ct_vertebrae_seg.nii.gz"
TS_MULTI = SHARED_DATA / "totalseg_example_ct_total_v2_fast_multilabel.nii.gz"
TP_CT = SHARED_DATA / "tptbox_sub-ct_label-22_ct.nii.gz"
TP_MASK = SHARED_DATA / "tptbox_sub-ct_seg-vert_label-22_msk.nii.gz"
VERSE_MASK = SHARED_DATA / "sub-verse004_seg-vert_msk.nii.gz"
VERSE_CTD = SHARED_DATA / "sub-verse004_seg-subreg_ctd.json"


def _ingest(ct, mask, label_map, **kw):
    crops, rows, skipped = ingest_case(Case(str(ct), str(mask), "p1"), IngestOptions(label_map=label_map, **kw))
    return crops, pd.DataFrame(rows), pd.DataFrame(skipped)


@pytest.fixture(scope="module")
def totalseg():
    return _ingest(TS_CT, TS_VERT, "totalseg_v2")


def test_totalseg_pair_yields_the_expected_vertebrae(totalseg):
    crops, rows, skipped = totalseg
    full = rows[rows.missing_fraction == 0].vertebra.tolist()
    assert full == ["L2", "L3", "L4", "L5", "S1"]
    l1 = rows.set_index("vertebra").loc["L1", "missing_fraction"]
    assert 0.015 < l1 < 0.03  # 2 mm of 96 at the superior edge
    t12 = rows.set_index("vertebra").loc["T12", "missing_fraction"]
    assert 0.34 < t12 < 0.37  # padded: 34 mm missing, within the default max_missing=0.4
    assert skipped.vertebra.tolist() == ["T11"] and "outside the scan" in skipped.reason[0]
    assert crops.shape == (7, 96, 96, 96) and crops.dtype == np.int16
    # padding is -1000 HU: T12's missing superior slab
    t12_crop = crops[rows.vertebra.tolist().index("T12")]
    assert (t12_crop[:, :, -30:] == -1000).all() and (t12_crop[:, :, :40] > -1000).any()


def test_stricter_policy_skips_t12():
    _, rows, skipped = _ingest(TS_CT, TS_VERT, "totalseg_v2", max_missing=0.3)
    assert "T12" not in rows.vertebra.tolist() and set(skipped.vertebra) == {"T11", "T12"}


def test_multi_organ_mask_gives_the_same_vertebrae(totalseg):
    _, rows, skipped = _ingest(TS_CT, TS_MULTI, "totalseg_v2")
    assert rows.vertebra.tolist() == totalseg[1].vertebra.tolist()
    assert skipped.vertebra.tolist() == ["T11"]


def test_tptbox_pir_pair_yields_a_padded_l3():
    crops, rows, skipped = _ingest(TP_CT, TP_MASK, "verse")
    assert rows.vertebra.tolist() == ["L3"]
    assert 0.2 < rows.missing_fraction[0] < 0.4
    assert set(skipped.vertebra) == {"L2", "L4"}  # cut by the field of view


@pytest.mark.parametrize("ct, mask, label_map", [(TS_CT, TS_VERT, "totalseg_v2"), (TP_CT, TP_MASK, "verse")])
def test_crop_centres_are_the_mask_centroids_in_world_coordinates(ct, mask, label_map):
    _, rows, _ = _ingest(ct, mask, label_map, max_missing=0.99)
    img = nib.load(str(mask))
    data = np.asanyarray(img.dataobj)
    names = {v: k for k, v in LABEL_MAPS[label_map].items()}
    for row in rows.itertuples():
        voxels = np.argwhere(data == names[row.vertebra])
        world = nib.affines.apply_affine(img.affine, voxels.mean(0))
        np.testing.assert_allclose([row.centroid_x, row.centroid_y, row.centroid_z], world, atol=1e-6)
    # and the crop really is centred there: crop the mask itself (nearest neighbour) and find the label;
    # nearest-neighbour resampling moves a label's centre of mass by up to one source voxel
    tolerance = float(np.sqrt((img.affine[:3, :3] ** 2).sum(0)).max())
    labels = data.astype(np.int16)
    for row in rows.itertuples():
        centre = np.array([row.centroid_x, row.centroid_y, row.centroid_z])
        crop, _ = sample_crop(labels, img.affine, centre, 96, 1.0, order=0)
        com = np.argwhere(crop == names[row.vertebra]).mean(0)
        np.testing.assert_allclose(com, [47.5] * 3, atol=tolerance)


def test_gz_volumes_read_through_indexed_gzip_give_the_same_bytes(monkeypatch):
    from nibabel import _compression

    from bench.datasets.nifti import load_volume

    assert _compression.HAVE_INDEXED_GZIP  # a dependency: nibabel decompresses .nii.gz through it
    fast, fast_affine = load_volume(TS_CT, "ct")
    monkeypatch.setattr(_compression, "HAVE_INDEXED_GZIP", False)  # the standard library's gzip
    plain, plain_affine = load_volume(TS_CT, "ct")
    assert fast.dtype == plain.dtype and np.array_equal(fast, plain) and np.array_equal(fast_affine, plain_affine)


@pytest.mark.parametrize("codes", [("L", "P", "S"), ("P", "I", "R"), ("S", "L", "A")])
def test_same_crops_in_any_orientation(tmp_path, totalseg, codes):
    ornt = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt(("R", "A", "S")),
                                           nib.orientations.axcodes2ornt(codes))
    paths = []
    for src in (TS_CT, TS_VERT):
        img = nib.load(str(src)).as_reoriented(ornt)
        assert nib.aff2axcodes(img.affine) == codes
        paths.append(tmp_path / src.name)
        nib.save(img, str(paths[-1]))
    crops, rows, _ = _ingest(paths[0], paths[1], "totalseg_v2")
    assert rows.vertebra.tolist() == totalseg[1].vertebra.tolist()
    diff = np.abs(crops.astype(int) - totalseg[0].astype(int))
    assert diff.max() <= 1  # identical up to float rounding in the interpolation


def test_verse_centroid_json_matches_the_mask():
    img = nib.load(str(VERSE_MASK))
    data = np.asanyarray(img.dataobj)
    from_mask = {v.name: v.centroid_world for v in vertebra_centroids(data, img.affine, LABEL_MAPS["verse"])}
    from_json = read_verse_centroids(VERSE_CTD, img.affine, data.shape, LABEL_MAPS["verse"])
    assert sorted(from_json) == sorted(from_mask) == sorted(["T9", "T10", "T11", "T12", "L1", "L2", "L3", "L4", "L5"])
    inv = np.linalg.inv(img.affine)
    ids = {v: k for k, v in LABEL_MAPS["verse"].items()}
    for name, point in from_json.items():
        # VerSe annotates the vertebral BODY centre: inside its own label, anterior of the whole-vertebra
        # centroid (posterior elements pull that one back), and neither lateral nor far off S-I
        voxel = np.round(inv[:3, :3] @ point + inv[:3, 3]).astype(int)
        assert data[tuple(voxel)] == ids[name]
        dx, dy, dz = point - from_mask[name]
        assert 5 < dy < 20 and abs(dx) < 3 and abs(dz) < 6


def test_store_labels_join_and_report(tmp_path):
    labels = tmp_path / "labels.csv"
    pd.DataFrame({
        "patient_id": ["ts", "ts", "ts", "ts", "ts"],
        "vertebra": ["L1", "L2", "L2", "L3", "T5"],
        "fracture": [1, 0, 0, 0, 1],
        "grade": [2, 0, 0, 0, 1],
    }).to_csv(labels, index=False)
    path, summary = ingest([Case(str(TS_CT), str(TS_VERT), "ts")], IngestOptions(label_map="totalseg_v2"),
                           str(tmp_path / "store"), labels=str(labels), progress=False)
    crops, manifest, meta = open_store(path)
    assert isinstance(crops, np.memmap) and crops.shape[0] == len(manifest) == 7
    by_name = manifest.set_index("vertebra")
    assert by_name.loc["L1", "label"] == 1 and by_name.loc["L1", "grade"] == 2
    assert by_name.loc["L4", "label"] == -1  # imaged, no row: unlabelled
    report = meta["labels_report"]
    assert report["rows_without_image"] == ["ts:T5"] and report["duplicate_rows"] == ["ts:L2"]
    assert len(report["images_without_row"]) == 4 and meta["frame"] == "RAS"
    assert (path / "skipped.csv").read_text().count("T11") == 1
    # the stored checksum is the crop's
    import hashlib

    assert hashlib.sha256(np.ascontiguousarray(crops[0]).tobytes()).hexdigest()[:16] == manifest.checksum[0]


def _nifti(path, data, affine=None):
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))
    return path


def _bad_inputs(tmp_path):
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(gzip.compress(b"not a nifti at all" * 20))
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(TS_CT.read_bytes()[: TS_CT.stat().st_size // 2])
    cube = np.zeros((20, 20, 20), np.int16)
    nan_ct = np.zeros((20, 20, 20), np.float32)
    nan_ct[3, 3, 3] = np.nan
    mask = np.zeros((20, 20, 20), np.uint8)
    mask[5:15, 5:15, 5:15] = 22
    labels_cols = tmp_path / "labels_cols.csv"
    labels_cols.write_text("patient_id,vertebra\np,L3\n")
    labels_names = tmp_path / "labels_names.csv"
    labels_names.write_text("patient_id,vertebra,fracture\np,L9,1\n")
    good_mask = _nifti(tmp_path / "mask.nii.gz", mask)
    good_ct = _nifti(tmp_path / "ct.nii.gz", cube)
    return {
        "corrupt": ([f"ct={corrupt}", f"mask={good_mask}"], "not a readable NIfTI"),
        "truncated": ([f"ct={truncated}", f"mask={TS_VERT}"], "not a readable NIfTI"),
        "grid": ([f"ct={TS_CT}", f"mask={TP_MASK}"], "not on the CT's grid"),
        "empty": ([f"ct={good_ct}", f"mask={_nifti(tmp_path / 'empty.nii.gz', np.zeros_like(mask))}"],
                  "the mask is empty"),
        "2d": ([f"ct={_nifti(tmp_path / 'flat.nii.gz', np.zeros((20, 20), np.int16))}", f"mask={good_mask}"],
               "expected a 3D volume"),
        "4d": ([f"ct={_nifti(tmp_path / 'four.nii.gz', np.zeros((20, 20, 20, 2), np.int16))}", f"mask={good_mask}"],
               "expected a 3D volume"),
        "nan": ([f"ct={_nifti(tmp_path / 'nan.nii.gz', nan_ct)}", f"mask={good_mask}"], "NaN or infinite"),
        "label_map": ([f"ct={good_ct}", f"mask={good_mask}", "label_map=verse2"], "unknown label map 'verse2'"),
        "labels_columns": ([f"ct={good_ct}", f"mask={good_mask}", f"labels={labels_cols}"],
                           "missing column(s) fracture"),
        "labels_names": ([f"ct={good_ct}", f"mask={good_mask}", f"labels={labels_names}"],
                         "unknown vertebra name 'L9'"),
    }


@pytest.mark.parametrize("case", ["corrupt", "truncated", "grid", "empty", "2d", "4d", "nan", "label_map",
                                  "labels_columns", "labels_names"])
def test_bad_inputs_are_one_line_and_write_nothing(tmp_path, capsys, case):
    args, expected = _bad_inputs(tmp_path)[case]
    if not any(a.startswith("label_map=") for a in args):
        args.append("label_map=verse")
    out = tmp_path / "out" / "store"
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["data", "ingest", *args, f"out={out}", "progress=false", "workers=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err
    assert not out.exists() and (not out.parent.exists() or not any(out.parent.iterdir()))
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_existing_store_is_not_overwritten(tmp_path, capsys):
    out = tmp_path / "store"
    args = ["data", "ingest", f"ct={TP_CT}", f"mask={TP_MASK}", "label_map=verse", f"out={out}", "progress=false"]
    assert main(args) == 0
    stamp = (out / "store.json").read_text()
    assert main(args) == 2 and "already exists" in capsys.readouterr().err
    assert (out / "store.json").read_text() == stamp
    assert main([*args, "overwrite=true"]) == 0


def test_folder_of_cases_in_parallel(tmp_path):
    cts, masks = tmp_path / "ct", tmp_path / "mask"
    cts.mkdir(), masks.mkdir()
    for name in ("a.nii.gz", "b.nii.gz"):
        (cts / name).write_bytes(TP_CT.read_bytes())
        (masks / name).write_bytes(TP_MASK.read_bytes())
    assert main(["data", "ingest", f"ct={cts}", f"mask={masks}", "label_map=verse", f"out={tmp_path / 's'}",
                 "workers=2", "progress=false"]) == 0
    crops, manifest, meta = open_store(tmp_path / "s")
    assert meta["cases"] == 2 and manifest.patient_id.tolist() == ["a", "b"]  # case order, not finish order
    np.testing.assert_array_equal(crops[0], crops[1])


def test_overwrite_never_replaces_what_is_not_a_crop_store(tmp_path):
    """overwrite=true replaces a crop store only: not a folder of inputs, not the folder holding the CT."""
    folder = tmp_path / "inputs"
    folder.mkdir()
    keep = folder / "notes.txt"
    keep.write_text("mine")
    ct, mask = folder / "ct.nii.gz", folder / "mask.nii.gz"
    ct.write_bytes(TS_CT.read_bytes())
    mask.write_bytes(TS_VERT.read_bytes())
    for out in (folder, tmp_path):  # the inputs' own folder, and a folder above it
        code = main(["data", "ingest", f"ct={ct}", f"mask={mask}", "label_map=totalseg_v2", f"out={out}",
                     "overwrite=true", "progress=false"])
        assert code == 2
    assert keep.read_text() == "mine" and ct.is_file() and mask.is_file()
    other = tmp_path / "other"
    other.mkdir()
    (other / "x.txt").write_text("x")
    assert main(["data", "ingest", f"ct={ct}", f"mask={mask}", "label_map=totalseg_v2", f"out={other}",
                 "overwrite=true", "progress=false"]) == 2
    assert (other / "x.txt").read_text() == "x"


def test_ct_given_as_its_own_mask_is_refused(tmp_path, capsys):
    assert main(["data", "ingest", f"ct={TS_CT}", f"mask={TS_CT}", "label_map=totalseg_v2", f"out={tmp_path / 's'}",
                 "progress=false"]) == 2
    assert "same path" in capsys.readouterr().err


def test_a_killed_ingestion_resumes_to_the_uninterrupted_store(tmp_path):
    import json
    import os
    import shutil
    import signal
    import subprocess
    import sys
    import time

    cts, masks = tmp_path / "cts", tmp_path / "masks"
    cts.mkdir(), masks.mkdir()
    for i in range(8):
        shutil.copy(TS_CT, cts / f"case{i}.nii.gz")
        shutil.copy(TS_VERT, masks / f"case{i}.nii.gz")
    args = [sys.executable, "-m", "bench.cli", "data", "ingest", f"ct={cts}", f"mask={masks}", "label_map=totalseg_v2",
            "workers=1", "progress=false"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([*args, f"out={killed}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    chunks = tmp_path / ".killed.staging" / "chunks"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(chunks.glob("*.json"))) < 2:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list(chunks.glob("*.json")))
    assert 2 <= done < 8 and not killed.exists()
    resumed = subprocess.run([*args, f"out={killed}"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming an interrupted ingestion: {done} of 8 case(s) already done" in resumed.stderr
    assert main(["data", "ingest", f"ct={cts}", f"mask={masks}", "label_map=totalseg_v2", "workers=2",
                 "progress=false", f"out={tmp_path / 'whole'}"]) == 0
    for name in ("crops.npy", "masks.npy"):
        assert (killed / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
    pd.testing.assert_frame_equal(pd.read_parquet(killed / "manifest.parquet"),
                                  pd.read_parquet(tmp_path / "whole" / "manifest.parquet"))
    meta = [json.loads((root / "store.json").read_text()) for root in (killed, tmp_path / "whole")]
    assert [{k: v for k, v in m.items() if k != "created"} for m in meta] == [
        {k: v for k, v in meta[1].items() if k != "created"}] * 2
    assert not (tmp_path / ".killed.staging").exists()


def test_a_ctspine1k_style_collection_pairs_by_suffix_and_stays_unlabelled(tmp_path):
    cts, masks = tmp_path / "data" / "HNSCC", tmp_path / "label" / "HNSCC"
    cts.mkdir(parents=True), masks.mkdir(parents=True)
    for name in ("case1", "case2"):
        (cts / f"{name}.nii.gz").write_bytes(TP_CT.read_bytes())
        (masks / f"{name}_seg.nii.gz").write_bytes(TP_MASK.read_bytes())
    assert main(["data", "ingest", f"ct={cts}", f"mask={masks}", "mask_suffix=_seg", "label_map=verse",
                 f"out={tmp_path / 's'}", "workers=1", "progress=false"]) == 0
    _, manifest, _ = open_store(tmp_path / "s")
    assert manifest.patient_id.tolist() == ["case1", "case2"] and set(manifest.label) == {-1}


def test_overwrite_never_empties_a_folder_holding_a_users_file(tmp_path, capsys):
    """overwrite=true replaces only a store this suite made (its store.json's marker and file list),
    and refuses while anything it did not write sits inside: a fake store with the user's file, and a
    real store the user kept notes in, both stay as they are."""
    args = ["data", "ingest", f"ct={TP_CT}", f"mask={TP_MASK}", "label_map=verse", "overwrite=true", "progress=false"]
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "store.json").write_text("{}")
    (fake / "crops.npy").write_bytes(b"")
    (fake / "important.txt").write_text("mine")
    assert main([*args, f"out={fake}"]) == 2
    assert "is not a crop store this suite made" in capsys.readouterr().err
    assert sorted(p.name for p in fake.iterdir()) == ["crops.npy", "important.txt", "store.json"]
    real = tmp_path / "real"
    assert main([*args, f"out={real}"]) == 0
    (real / "labels.csv").write_text("patient_id,vertebra,label\n")
    stamp = (real / "store.json").read_text()
    assert main([*args, f"out={real}"]) == 2
    assert "holds files this suite did not write (labels.csv)" in capsys.readouterr().err
    assert (real / "labels.csv").is_file() and (real / "store.json").read_text() == stamp
    (real / "labels.csv").unlink()
    assert main([*args, f"out={real}"]) == 0  # nothing of the user's inside: replaced


def test_two_ingests_into_one_out_take_turns(tmp_path):
    """Started together, one ingestion makes the store and the other finds it there and stops with
    one line; the store is whole (every crop matches its checksum)."""
    import os
    import subprocess
    import sys

    out = tmp_path / "store"
    args = [sys.executable, "-m", "bench.cli", "data", "ingest", f"ct={TP_CT}", f"mask={TP_MASK}", "label_map=verse",
            f"out={out}", "progress=false", "workers=1"]
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
             for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert sorted(code for code, _ in results) == [0, 2], results
    refused = next(err for code, err in results if code == 2)
    assert "already exists" in refused and "Traceback" not in refused
    crops, manifest, _ = open_store(out)
    from bench.datasets.cropstore import verify_crops

    assert verify_crops(out, crops, manifest) == len(manifest) > 0


@pytest.mark.parametrize("ornt", [None, [[2, 1], [0, -1], [1, 1]]], ids=["as stored", "axes permuted and flipped"])
def test_an_axis_aligned_scan_is_sampled_axis_by_axis_to_map_coordinates_values(monkeypatch, ornt):
    """The fast path for scans whose voxel axes run along R, A, S gives map_coordinates' crop: the
    centre of every vertebra, and one whose crop leaves the scan (padding and missing fraction)."""
    import bench.datasets.ingest as ingest_module

    img = nib.load(str(TS_CT))
    if ornt is not None:
        img = img.as_reoriented(np.array(ornt))
    ct = np.asanyarray(img.dataobj)
    mask = nib.load(str(TS_VERT))
    centres = [v.centroid_world for v in vertebra_centroids(np.asanyarray(mask.dataobj), mask.affine,
                                                             LABEL_MAPS["totalseg_v2"])]
    assert ingest_module._axis_aligned(np.linalg.inv(img.affine)[:3, :3], np.arange(96) - 47.5) is not None
    fast = [sample_crop(ct, img.affine, c, 96, 1.0) for c in centres]
    monkeypatch.setattr(ingest_module, "_axis_aligned", lambda step, offsets: None)
    general = [sample_crop(ct, img.affine, c, 96, 1.0) for c in centres]
    assert any(0 < missing < 1 for _, missing in general)
    for (crop, missing), (expected, expected_missing) in zip(fast, general):
        assert missing == expected_missing
        # map_coordinates is given float32 voxel coordinates (~1e-5 voxel apart from exact), the axes
        # float64 ones: 1e-2 HU bounds that at the fixture's steepest edges, far below the stores' 1 HU
        np.testing.assert_allclose(crop, expected, atol=1e-2, rtol=0)


def test_an_oblique_scan_is_not_taken_for_an_axis_aligned_one():
    from bench.datasets.ingest import _axis_aligned

    angle = np.deg2rad(0.5)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    offsets = np.arange(96) - 47.5
    assert _axis_aligned(rotation, offsets) is None
    assert _axis_aligned(np.diag([1.28, -1.28, 1.0]) + 1e-9, offsets) is not None  # stored rounding
