"""Crop stores as run data: splits written once and reused, user splits, the leakage guard."""
import json

import pandas as pd
import pytest

from bench.cli import main
from bench.config import compose
from bench.datasets.loading import load_data
from bench.errors import BenchError


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("stores") / "synth"
    assert main(["data", "synth", "preset=tiny", f"out={path}"]) == 0
    return path


def test_synth_store_runs_and_its_split_is_written_once(store, tmp_path):
    splits = pd.read_csv(store / "splits.csv")  # made by `bench data synth` on first use
    assert set(splits.split) == {"train", "val", "test"}
    stamp = (store / "splits.csv").stat().st_mtime_ns
    assert main(["run", "method=_test_tiny_cnn", "preset=tiny", "epochs=1", f"data={store}", f"out={tmp_path}"]) == 0
    data = load_data(compose({"preset": "tiny", "data": str(store), "synthetic.seed": "5"}))
    assert (store / "splits.csv").stat().st_mtime_ns == stamp  # reused, not re-drawn with the new seed
    assert dict(zip(splits.patient_id, splits.split)) == dict(zip(data.table.patient_id, data.table.split))
    metrics = json.loads((tmp_path / "single" / "_test_tiny_cnn-scratch-s0" / "metrics.json").read_text())
    assert metrics["data"]["name"] == "store:synth"


def test_store_crops_are_resized_to_the_model_input(store, tmp_path):
    assert main(["run", "method=_test_tiny_cnn", "preset=tiny", "epochs=1", "crop_size=24", f"data={store}",
                 f"out={tmp_path}"]) == 0


def test_user_splits_are_used_and_checked(store, tmp_path):
    patients = sorted(pd.read_parquet(store / "manifest.parquet").patient_id.unique())
    user = tmp_path / "splits.csv"
    roles = ["train"] * (len(patients) - 8) + ["val"] * 4 + ["test"] * 4
    pd.DataFrame({"patient_id": patients, "split": roles}).to_csv(user, index=False)
    data = load_data(compose({"preset": "tiny", "data": str(store), "splits": str(user)}))
    assert data.table.groupby("split").patient_id.nunique().to_dict() == {"test": 4, "train": len(patients) - 8,
                                                                          "val": 4}

    pd.DataFrame({"patient_id": patients[:3], "split": ["train"] * 3}).to_csv(user, index=False)
    with pytest.raises(BenchError, match="no split for"):
        load_data(compose({"preset": "tiny", "data": str(store), "splits": str(user)}))
    pd.DataFrame({"patient_id": [patients[0], patients[0]], "split": ["train", "test"]}).to_csv(user, index=False)
    with pytest.raises(BenchError, match="patient leakage"):
        load_data(compose({"preset": "tiny", "data": str(store), "splits": str(user)}))


def test_a_labelled_patients_unlabelled_crop_is_never_pretrained_on(store, tmp_path):
    """Ungraded levels of a graded scan (VerSe) are unlabelled crops of a labelled patient: the store
    loads, and the vertebrae stage never sees them (that would leak the patient into pretraining)."""
    import shutil

    from bench.datasets.loading import load_unlabelled

    copy = tmp_path / "mixed"
    shutil.copytree(store, copy)
    manifest = pd.read_parquet(copy / "manifest.parquet")
    first, other = manifest.patient_id[manifest.label >= 0].unique()[:2]
    manifest.loc[manifest.index[manifest.patient_id == first][0], "label"] = -1
    manifest.loc[manifest.patient_id == other, "label"] = -1  # a patient without labels
    manifest.to_parquet(copy / "manifest.parquet", index=False)
    cfg = compose({"preset": "tiny", "data": str(copy)})
    assert first in set(load_data(cfg).table.patient_id)
    pretraining = load_unlabelled(cfg).table
    assert set(pretraining.patient_id) == {other}


def test_unknown_data_is_one_line(capsys, tmp_path):
    assert main(["run", "method=resnet18", "preset=tiny", "data=synthetc", f"out={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'synthetic'" in err and len(err.strip().splitlines()) == 1
    assert main(["run", "method=resnet18", "preset=tiny", f"data={tmp_path}", f"out={tmp_path}"]) == 2
    assert "is not a crop store" in capsys.readouterr().err
