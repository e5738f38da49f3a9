"""The real-data walkthrough of docs/data.md, command by command, on trees built from the real fixtures:
a VerSe release with its grades spreadsheet, an unlabelled CTSpine1K-style collection, one run
that pretrains on the collection and finetunes on VerSe, and the report."""
import shutil

import nibabel as nib
import numpy as np

from tests_helpers import SHARED_DATA, make_verse_tree, run_cli, write_verse_grades

SPLITS = "patient_id,split\nsub-verse004,train\nsub-verse501,val\nsub-verse502,test\n"


def _collection(root):
    """Two 'patients' made from the TotalSegmentator pair with scanner noise of their own, so that
    their crops are new content (a real collection holds other people; the same scan under another
    name is what the leakage guard refuses)."""
    cts, masks = root / "data" / "COLONOG", root / "label" / "COLONOG"
    cts.mkdir(parents=True), masks.mkdir(parents=True)
    ct, seg = (nib.load(str(SHARED_DATA / f)) for f in ("totalseg_example_ct.nii.gz",
                                                         "totalseg_example_ct_vertebrae_seg.nii.gz"))
    for i in range(2):
        noise = np.random.default_rng(i).integers(-30, 30, ct.shape, dtype=np.int32)
        nib.save(nib.Nifti1Image(np.asanyarray(ct.dataobj) + noise, ct.affine), str(cts / f"colon{i}.nii.gz"))
        nib.save(nib.Nifti1Image(np.asanyarray(seg.dataobj), ct.affine), str(masks / f"colon{i}_seg.nii.gz"))
    return cts, masks


def test_from_a_verse_release_and_an_unlabelled_collection_to_a_report(tmp_path):
    release = make_verse_tree(tmp_path / "VerSe19")
    grades = write_verse_grades(tmp_path / "verse19_grades.xlsx")
    cts, masks = _collection(tmp_path / "ctspine1k")
    (tmp_path / "splits.csv").write_text(SPLITS)
    env = {"BENCH_CACHE": str(tmp_path / "cache")}
    steps = [
        ["data", "ingest", f"verse={release}", f"grades={grades}", "out=labelled", "progress=false"],
        ["data", "ingest", f"ct={cts}", f"mask={masks}", "mask_suffix=_seg", "label_map=totalseg_v2",
         "out=unlabelled", "progress=false"],
        ["run", "method=mae3d", "regime=vertebrae", "data=labelled", "pretrain.data=unlabelled",
         "splits=splits.csv", "preset=tiny", "epochs=1", "pretrain.epochs=1", "progress=false"],
        ["report", "runs/single"],
    ]
    for step in steps:
        done = run_cli(*step, env=env, cwd=tmp_path)
        assert done.returncode == 0, (step, done.stderr[-2000:])
    assert (tmp_path / "reports" / "single" / "index.html").is_file()
    run = next((tmp_path / "runs" / "single").glob("mae3d-vertebrae*"))
    assert "\n  data: unlabelled\n" in (run / "config.yaml").read_text()  # under pretrain:
    shutil.rmtree(tmp_path / "cache")
