"""Genant grading (task=grade), SupCon, class-balanced batches and label-efficiency subsets."""
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import cohen_kappa_score

from bench.cli import main
from bench.datasets.splits import patient_fraction
from bench.datasets.torch_data import BalancedBatchSampler
from bench.metrics import grade_metrics


def supcon_by_hand(z: torch.Tensor, labels: torch.Tensor, t: float) -> float:
    """Khosla et al. (2020), L_out: for each anchor i, minus the mean over its positives p of
    log(exp(z_i.z_p / t) / sum_{a != i} exp(z_i.z_a / t)); averaged over anchors."""
    z = F.normalize(z, dim=1).double()
    total = 0.0
    for i in range(len(z)):
        others = [a for a in range(len(z)) if a != i]
        denominator = sum(math.exp(float(z[i] @ z[a]) / t) for a in others)
        positives = [p for p in others if labels[p] == labels[i]]
        total += -sum(math.log(math.exp(float(z[i] @ z[p]) / t) / denominator) for p in positives) / len(positives)
    return total / len(z)


def test_supcon_loss_matches_a_direct_computation():
    from pytorch_metric_learning.losses import SupConLoss

    z = torch.tensor([[1.0, 0.2, 0.0], [0.9, 0.1, 0.3], [0.0, 1.0, 0.1], [0.2, 0.8, -0.3],
                      [-0.5, 0.1, 1.0], [-0.4, 0.3, 0.9], [1.0, -0.2, 0.1], [0.1, 0.9, 0.2]])
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 0, 1])  # two views of 4 vertebrae: every anchor has a positive
    ours = float(SupConLoss(temperature=0.07)(F.normalize(z, dim=1), labels))
    assert ours == pytest.approx(supcon_by_hand(z, labels, 0.07), rel=1e-5)


def test_supcon_training_loss_is_ce_on_detached_features_plus_supcon():
    from bench.config import compose
    from bench.registry import create_method, get_method

    cfg = compose({"method": "supcon", "preset": "tiny", "regime": "scratch", "task": "grade"}, get_method("supcon"))
    method = create_method("supcon", cfg)
    model = method.build_model(num_classes=4)
    x, y = torch.rand(8, 1, 32, 32, 32), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    calls = []  # the step is one call of the model itself, so a torch.compile'd model compiles it
    model.register_forward_pre_hook(lambda module, args, kwargs: calls.append((type(args[0]), args[0].shape, kwargs)),
                                    with_kwargs=True)
    loss = method.training_loss(model, x, y, torch.nn.CrossEntropyLoss())
    # both views in one batch, as a plain tensor: a compiled graph cannot take MONAI's MetaTensor
    assert calls == [(torch.Tensor, (16, 1, 32, 32, 32), {"contrastive": True})]
    loss.backward()
    assert torch.isfinite(loss)
    assert model.head.weight.grad is not None and model.projector.weight.grad is not None
    # the encoder learns from SupCon only: zero the projector path and no gradient reaches it
    model.zero_grad()
    ce_only = torch.nn.CrossEntropyLoss()(model.head(model.encoder(x).detach()), y)
    ce_only.backward()
    assert all(p.grad is None for p in model.encoder.parameters())


def test_balanced_batches_hold_every_class_equally():
    labels = np.array([0] * 40 + [1] * 6 + [2] * 3 + [3] * 2)
    sampler = BalancedBatchSampler(labels, batch_size=12, seed=0)
    batches = list(sampler)
    assert len(batches) == len(sampler) == len(labels) // 12
    for batch in batches:
        assert np.bincount(labels[batch], minlength=4).tolist() == [3, 3, 3, 3]
    sampler.epoch = 1
    assert list(sampler) != batches  # a new draw per epoch, the same one for the same seed and epoch
    sampler.epoch = 0
    assert list(sampler) == batches


def test_grade_metrics_by_hand():
    grades = np.array([0, 0, 0, 0, 1, 1, 2, 3])
    called = np.array([0, 0, 1, 0, 1, 2, 2, 0])
    probs = np.full((8, 4), 0.1)
    probs[np.arange(8), called] = 0.7
    m = grade_metrics(grades, probs)
    assert m["recall_g0"] == 0.75 and m["recall_g1"] == 0.5 and m["recall_g2"] == 1.0 and m["recall_g3"] == 0.0
    assert m["qwk"] == pytest.approx(cohen_kappa_score(grades, called, weights="quadratic"))
    # screening at grade >= 1: fractured 1,1,2,3 called 1,2,2,0 -> 3 of 4; normal called 0,0,1,0 -> 3 of 4
    assert m["sensitivity"] == 0.75 and m["specificity"] == 0.75
    per_grade_f1 = [2 * 3 / (2 * 3 + 1 + 1), 2 * 1 / (2 * 1 + 1 + 1), 2 * 1 / (2 * 1 + 1), 0.0]
    assert m["macro_f1"] == pytest.approx(np.mean(per_grade_f1))


def test_fraction_subsets_are_nested_patient_level_and_stratified():
    rng = np.random.default_rng(0)
    rows = []
    for p in range(80):
        fractured = p % 3 == 0
        for v in range(int(rng.integers(3, 7))):
            rows.append({"patient_id": f"p{p:02d}", "vertebra": f"L{v}", "label": int(fractured and v == 0)})
    table = pd.DataFrame(rows)
    subsets = {f: set(patient_fraction(table, f, seed=3)["patient_id"]) for f in (0.1, 0.25, 0.5, 1.0)}
    assert subsets[0.1] < subsets[0.25] < subsets[0.5] < subsets[1.0]
    assert [len(subsets[f]) for f in (0.1, 0.25, 0.5)] == [8, 20, 40]
    for f in (0.1, 0.25, 0.5):  # whole patients: every vertebra of a chosen patient comes along
        kept = patient_fraction(table, f, seed=3)
        assert len(kept) == table["patient_id"].isin(subsets[f]).sum()
        share = kept.groupby("patient_id")["label"].max().mean()
        assert abs(share - 27 / 80) < 0.1  # 27 of 80 patients have a fracture
    assert set(patient_fraction(table, 0.25, seed=4)["patient_id"]) != subsets[0.25]


@pytest.fixture(scope="module")
def grade_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("grade")
    assert main(["run", "method=supcon", "regime=scratch", "preset=tiny", "task=grade", "epochs=2",
                 f"out={out}", "progress=false"]) == 0
    return out / "single" / "supcon-scratch-grade-s0"


def test_supcon_grades_at_tiny(grade_run):
    metrics = json.loads((grade_run / "metrics.json").read_text())
    assert metrics["task"] == "grade"
    for key in ("macro_f1", "qwk", "recall_g0", "sensitivity", "specificity", "auc"):
        assert key in metrics["test"]
    preds = pd.read_parquet(grade_run / "predictions.parquet")
    probs = preds[[f"p_grade{g}" for g in range(4)]].to_numpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(preds["score"], 1 - probs[:, 0])
    assert (preds["predicted_grade"] == probs.argmax(axis=1)).all()


def test_report_has_the_grading_section_and_the_label_efficiency_plot(grade_run, tmp_path, capsys):
    out = grade_run.parent.parent
    for fraction in ("0.5", "1.0"):
        assert main(["run", "method=resnet18", "regime=scratch", "preset=tiny", "epochs=1",
                     f"train_fraction={fraction}", f"out={out}", "progress=false"]) == 0
    assert (out / "single" / "resnet18-scratch-frac0.5-s0").is_dir()
    assert main(["report", str(out / "single"), f"out={tmp_path}"]) == 0
    html = (tmp_path / "index.html").read_text()
    assert "Genant grading (task=grade)" in html and "supcon" in html
    assert 'alt="label efficiency"' in html
    metrics = json.loads((out / "single" / "resnet18-scratch-frac0.5-s0" / "metrics.json").read_text())
    full = json.loads((out / "single" / "resnet18-scratch-s0" / "metrics.json").read_text())
    assert metrics["data"]["train_used"]["patients"] < full["data"]["train_used"]["patients"]
    assert metrics["data"]["splits"] == full["data"]["splits"]  # validation and test untouched


def test_grade_task_without_grades_is_one_clear_line(tmp_path, capsys):
    import shutil

    out = tmp_path / "store"  # a crop store whose manifest carries no grades (as many real label files)
    assert main(["data", "synth", f"out={out}", "preset=tiny"]) == 0
    manifest = next(out.glob("*.parquet"))
    table = pd.read_parquet(manifest).drop(columns=["grade"])
    table.to_parquet(manifest)
    code = main(["run", "method=resnet18", "regime=scratch", "preset=tiny", "task=grade", f"data={out}",
                 f"out={tmp_path / 'runs'}", "progress=false"])
    assert code == 2
    assert "task=grade needs a Genant grade" in capsys.readouterr().err
    shutil.rmtree(out)


def test_label_efficiency_suite_expands_fractions_and_filters_methods():
    from bench.errors import BenchError
    from bench.suites import expand, load_suite

    suite = load_suite("label_efficiency")
    runs = expand(suite, seeds=2, methods="resnet18,r2plus1d_18")
    assert {r["method"] for r in runs} == {"resnet18", "r2plus1d_18"}
    assert len(runs) == (1 + 3) * 4 * 2
    assert sorted({r.get("train_fraction", "1") for r in runs}) == ["0.1", "0.25", "0.5", "1"]
    assert len(expand(suite, seeds=1, methods="resnet18", train_fractions="0.5,1")) == 2
    with pytest.raises(BenchError, match="'vit_q' is not in suite"):
        expand(suite, seeds=1, methods="vit_q")
    with pytest.raises(BenchError, match="train_fractions"):
        expand(suite, seeds=1, train_fractions="0,1")


def test_balanced_batches_train_with_an_unweighted_loss(monkeypatch):
    """Class weights on top of class-balanced batches would favour the rare grades twice."""
    import bench.finetune as engine
    from bench.datasets.loading import load_data
    from bench.registry import create_method
    from bench.run import resolve_runs

    seen = []
    real = torch.nn.CrossEntropyLoss

    def spy(*args, weight=None, **kwargs):
        seen.append(None if weight is None else weight.tolist())
        return real(*args, weight=weight, **kwargs)

    monkeypatch.setattr(engine.nn, "CrossEntropyLoss", spy)
    for balanced in ("true", "false"):
        cfg = resolve_runs({"method": "supcon", "regime": "scratch", "preset": "tiny", "task": "grade", "epochs": "1",
                            "model.balanced_batches": balanced, "progress": "false"})[0]
        engine.finetune(create_method("supcon", cfg), load_data(cfg), cfg)
    assert seen[0] == [1.0, 1.0, 1.0, 1.0]
    assert seen[1] != [1.0, 1.0, 1.0, 1.0] and seen[1][0] < min(seen[1][1:])
