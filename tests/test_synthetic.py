import numpy as np
import pandas as pd
import pytest

from bench.datasets import synthetic
from bench.datasets.splits import check_no_leakage, patient_split
from bench.errors import BenchError


@pytest.fixture(scope="module")
def small_set():
    return synthetic.generate(n_patients=12, min_vertebrae=3, max_vertebrae=4, fracture_rate=0.3,
                              noise_hu=20, fov_mm=96, crop_size=24, seed=7)


def test_deterministic_from_seed(small_set):
    images, table = small_set
    again_images, again_table = synthetic.generate(12, 3, 4, 0.3, 20, 96, 24, seed=7)
    np.testing.assert_array_equal(images, again_images)
    pd.testing.assert_frame_equal(table, again_table)
    other, _ = synthetic.generate(12, 3, 4, 0.3, 20, 96, 24, seed=8)
    assert not np.array_equal(images[: len(other)], other[: len(images)])


def test_crops_look_like_ct(small_set):
    images, table = small_set
    assert images.dtype == np.int16 and images.shape[1:] == (24, 24, 24)
    centre = images[:, 10:14, 8:16, 10:14].astype(float)  # inside the vertebral body
    corner = images[:, :3, -3:, :].astype(float)  # anterior-lateral soft tissue / fat
    assert 50 < np.median(centre) < 600  # bone, from osteoporotic to dense
    assert np.median(corner) < 80  # fat or muscle, not bone
    assert images.max() > 400  # cortical bone somewhere in every set


def test_fracture_rate_grades_and_patients():
    # drawing patients is cheap: check the label statistics on many of them without rendering
    rows = []
    for i in range(600):
        p = synthetic.draw_patient(i, 6, 0.15, 25, seed=0)
        rows += [(p["patient_id"], v.grade, max(v.loss_anterior, v.loss_middle, v.loss_posterior),
                  p["osteoporotic"]) for v, labelled in p["spine"] if labelled]
    df = pd.DataFrame(rows, columns=["patient", "grade", "loss", "osteo"])
    assert 0.12 < (df.grade > 0).mean() < 0.18  # ~15 % as in the paper
    # Genant: the largest relative height loss sets the grade
    assert (df.loss[df.grade == 0] < 0.20).all()
    assert ((df.loss[df.grade == 1] >= 0.20) & (df.loss[df.grade == 1] < 0.25)).all()
    assert ((df.loss[df.grade == 2] >= 0.25) & (df.loss[df.grade == 2] < 0.40)).all()
    assert (df.loss[df.grade == 3] >= 0.40).all()
    # osteoporosis raises the fracture rate, as in reality
    assert (df[df.osteo].grade > 0).mean() > 2 * (df[~df.osteo].grade > 0).mean()
    assert df.groupby("patient").size().eq(6).all()


def _body_height_voxels(img: np.ndarray) -> int:
    """Contiguous run of bone along S-I through the body centre (3x3 column mean vs disc HU)."""
    column = img[23:26, 27:30, :].astype(float).mean(axis=(0, 1))
    centre = img.shape[2] // 2
    bone = column > 170
    top = bottom = centre
    while top + 1 < len(bone) and bone[top + 1]:
        top += 1
    while bottom - 1 >= 0 and bone[bottom - 1]:
        bottom -= 1
    return top - bottom + 1


def test_fractured_bodies_are_shorter():
    """The label is visible in the image: a crushed body is shorter along S-I."""
    p = synthetic.draw_patient(3, 6, 0.15, 25, seed=0)
    for v, _ in p["spine"]:
        v.loss_anterior = v.loss_middle = v.loss_posterior = 0.0
        v.grade, v.trabecular_hu, v.endplate_irregularity = 0, 250.0, 0.0
    pos = 3
    normal = _body_height_voxels(synthetic.render_crop(p, pos, 48, 96, seed=0))
    v = p["spine"][pos][0]
    v.loss_anterior, v.loss_middle, v.loss_posterior, v.grade = 0.5, 0.5, 0.5, 3
    crushed = _body_height_voxels(synthetic.render_crop(p, pos, 48, 96, seed=0))
    expected = v.height / 2.0  # mm -> 2 mm voxels
    assert abs(normal - expected) <= 3
    assert crushed <= 0.7 * normal


def test_patient_split_is_patient_level_stratified_and_seeded():
    table = pd.DataFrame({
        "patient_id": np.repeat([f"p{i}" for i in range(50)], 4),
        "label": np.tile([1, 0, 0, 0], 50) * np.repeat(np.arange(50) % 3 == 0, 4),
    })
    split = patient_split(table, seed=1)
    table["split"] = split
    check_no_leakage(table)
    per_patient = table.groupby("patient_id").split.first().value_counts()
    assert dict(per_patient) == {"train": 30, "val": 10, "test": 10}
    fractured = table.groupby("patient_id").agg(split=("split", "first"), f=("label", "max"))
    assert fractured.groupby("split").f.sum().min() >= 3  # every split holds fractured patients
    assert split.equals(patient_split(table, seed=1))
    assert not split.equals(patient_split(table, seed=2))


def test_leakage_guard():
    table = pd.DataFrame({"patient_id": ["a", "a", "b"], "split": ["train", "test", "val"]})
    with pytest.raises(BenchError, match="patient leakage: 1 patient"):
        check_no_leakage(table)


def _label_stats(difficulty, n=800):
    rows = []
    for i in range(n):
        p = synthetic.draw_patient(i, 6, 0.15, 25, seed=0, difficulty=difficulty)
        rows += [(v.grade, v.sclerosis_hu, max(v.loss_anterior, v.loss_middle, v.loss_posterior))
                 for v, labelled in p["spine"] if labelled]
    return pd.DataFrame(rows, columns=["grade", "sclerosis", "loss"])


def test_difficulty_makes_fractures_subtler_and_normals_less_normal():
    easy, hard = _label_stats(0.0), _label_stats(1.0)
    frac_easy, frac_hard = easy[easy.grade > 0], hard[hard.grade > 0]
    assert (frac_hard.grade == 1).mean() > (frac_easy.grade == 1).mean() + 0.1
    assert (frac_hard.sclerosis > 0).mean() < (frac_easy.sclerosis > 0).mean() - 0.3
    assert hard[hard.grade == 0].loss.mean() > easy[easy.grade == 0].loss.mean()
    assert (hard[hard.grade == 0].loss < 0.2).all()  # still not a fracture by Genant's definition
    assert abs((hard.grade > 0).mean() - (easy.grade > 0).mean()) < 0.03  # prevalence unchanged


def test_unlabelled_set_is_disjoint_and_unlabelled():
    _, labelled = synthetic.generate(6, 3, 3, 0.3, 20, 96, 16, seed=3)
    images, unlabelled = synthetic.generate(4, 3, 3, 0.3, 20, 96, 16, seed=3, labelled=False)
    assert not set(labelled.patient_id) & set(unlabelled.patient_id)
    assert (unlabelled.label == -1).all() and (unlabelled.grade == -1).all()
    assert images.shape == (12, 16, 16, 16)


def test_corpora_are_deterministic_and_shaped():
    from bench.datasets import corpora

    ct = corpora.body_ct_patch(5, 24, 96, seed=1)
    assert ct.dtype == np.int16 and ct.shape == (24, 24, 24)
    np.testing.assert_array_equal(ct, corpora.body_ct_patch(5, 24, 96, seed=1))
    assert ct.min() < 200 and ct.std() > 10  # tissue contrast, not a constant cube
    clip = corpora.video_clip(2, 16, 32, seed=1)
    assert clip.dtype == np.uint8 and clip.shape == (16, 32, 32, 3)
    np.testing.assert_array_equal(clip, corpora.video_clip(2, 16, 32, seed=1))
    motion = np.abs(clip[-1].astype(int) - clip[0].astype(int)).mean()
    assert motion > 5  # objects and background move


def test_bench_data_synth_makes_every_part(tmp_path):
    from tests_helpers import run_cli

    out = run_cli("data", "synth", "preset=tiny", env={"BENCH_CACHE": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    assert "labelled vertebrae" in out.stdout and "unlabelled:" in out.stdout
    assert "body_ct corpus: 32 items" in out.stdout and "video corpus: 32 items of shape (16, 64, 64, 3)" in out.stdout
    again = run_cli("data", "synth", "preset=tiny", env={"BENCH_CACHE": str(tmp_path)})
    assert again.stdout == out.stdout  # cached and deterministic
