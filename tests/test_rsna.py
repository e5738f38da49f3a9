"""The RSNA 2022 cervical spine layout: DICOM studies, train.csv labels, segmentations/ and a
user's mask folder, on a tree built from the real TotalSegmentator CT."""
import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from bench.cli import main
from bench.datasets.rsna import find_rsna_cases, read_rsna_labels
from tests_helpers import SHARED_DATA, write_dicom_series

# The fixture CT shows T11-S1, not the neck: its lumbar vertebrae are relabelled C3-C7 in the
# study's own segmentation so that the C1-C7 labels of train.csv reach crops.
TOTALSEG_TO_RSNA = {31: 3, 30: 4, 29: 5, 28: 6, 27: 7, 32: 19}  # L1..L5 -> C3..C7, T12 -> T12 (id 19)
UIDS = ("1.2.826.0.1.1", "1.2.826.0.1.2", "1.2.826.0.1.3")
TRAIN_CSV = """StudyInstanceUID,patient_overall,C1,C2,C3,C4,C5,C6,C7
1.2.826.0.1.1,1,0,0,1,0,0,1,0
1.2.826.0.1.2,0,0,0,0,0,0,0,0
1.2.826.0.1.3,1,1,0,0,0,0,0,0
"""


@pytest.fixture(scope="module")
def rsna(tmp_path_factory):
    root = tmp_path_factory.mktemp("rsna")
    ct = nib.load(str(SHARED_DATA / "totalseg_example_ct.nii.gz"))
    volume = np.asanyarray(ct.dataobj)[:, :, 30:]  # a shorter study keeps the fixture fast
    affine = ct.affine @ np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 30], [0, 0, 0, 1]])
    seg = np.asanyarray(nib.load(str(SHARED_DATA / "totalseg_example_ct_vertebrae_seg.nii.gz")).dataobj)[:, :, 30:]
    own = np.zeros_like(seg)
    for total_id, rsna_id in TOTALSEG_TO_RSNA.items():
        own[seg == total_id] = rsna_id
    write_dicom_series(volume, affine, root / "train_images" / UIDS[0], reverse=True)  # reversed slice order
    write_dicom_series(volume, affine, root / "train_images" / UIDS[1])
    write_dicom_series(volume[:, :, :20], affine, root / "train_images" / UIDS[2])
    (root / "segmentations").mkdir()
    nib.save(nib.Nifti1Image(own, affine), str(root / "segmentations" / f"{UIDS[0]}.nii"))
    user_masks = root.parent / "totalseg_outputs"
    user_masks.mkdir()
    nib.save(nib.Nifti1Image(seg, affine), str(user_masks / f"{UIDS[1]}.nii.gz"))  # TotalSegmentator v2 ids
    (root / "train.csv").write_text(TRAIN_CSV)
    return root, user_masks


def test_studies_pair_with_their_segmentation_or_the_users_mask(rsna):
    root, user_masks = rsna
    cases, without = find_rsna_cases(root, str(user_masks))
    assert [(c.patient_id, c.label_map) for c in cases] == [(UIDS[0], "verse"), (UIDS[1], "totalseg_v2")]
    assert without == [UIDS[2]]
    labels = read_rsna_labels(root)
    assert len(labels) == 21 and labels.set_index(["patient_id", "vertebra"]).loc[(UIDS[0], "C6"), "fracture"] == 1


def test_one_command_ingests_crops_with_the_csv_labels(rsna, tmp_path, capsys):
    root, user_masks = rsna
    out = tmp_path / "store"
    assert main(["data", "ingest", f"rsna={root}", f"masks={user_masks}", f"out={out}", "progress=false",
                 "workers=1"]) == 0
    assert f"1 of 3 studies have no mask (segmentations/ or masks=) and are not ingested, e.g. {UIDS[2]}" in \
        capsys.readouterr().err
    manifest = pd.read_parquet(out / "manifest.parquet")
    first = manifest[manifest.patient_id == UIDS[0]].set_index("vertebra")["label"].to_dict()
    assert first == {"C3": 1, "C4": 0, "C5": 0, "C6": 1, "C7": 0, "T12": -1}  # T12 has no row in train.csv
    second = manifest[manifest.patient_id == UIDS[1]].set_index("vertebra")["label"].to_dict()
    assert set(second) == {"L1", "L2", "L3", "L4", "L5", "S1", "T12"} and set(second.values()) == {-1}


def test_a_segmentation_off_its_series_grid_is_one_line(rsna, tmp_path, capsys):
    root, _ = rsna
    bad = tmp_path / "bad"
    (bad / "segmentations").mkdir(parents=True)
    (bad / "train_images").symlink_to(root / "train_images")
    (bad / "train.csv").write_text(TRAIN_CSV)
    seg = nib.load(str(root / "segmentations" / f"{UIDS[0]}.nii"))
    flipped = nib.Nifti1Image(np.asanyarray(seg.dataobj), seg.affine @ np.diag([-1, 1, 1, 1]))  # a known pitfall
    nib.save(flipped, str(bad / "segmentations" / f"{UIDS[0]}.nii"))
    assert main(["data", "ingest", f"rsna={bad}", f"out={tmp_path / 'store'}", "progress=false", "workers=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "is not on the CT's grid" in err[-1] and UIDS[0] in err[-1]
    assert not (tmp_path / "store").exists()
