import math

import numpy as np
import pytest

from bench.metrics import binary_metrics, class_weights


def test_metrics_against_hand_counts():
    labels = np.array([1, 1, 1, 0, 0, 0, 0, 0])
    scores = np.array([0.9, 0.6, 0.2, 0.7, 0.4, 0.3, 0.1, 0.05])
    m = binary_metrics(labels, scores)
    # at 0.5: TP=2 FN=1 FP=1 TN=4
    assert m["sensitivity"] == pytest.approx(2 / 3)
    assert m["specificity"] == pytest.approx(4 / 5)
    assert m["acc"] == pytest.approx(6 / 8)
    assert m["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert m["balanced_acc"] == pytest.approx((2 / 3 + 4 / 5) / 2)
    # AUC: fraction of (pos, neg) pairs ranked correctly: pos 0.9 > all 5, 0.6 > 4, 0.2 > 2
    assert m["auc"] == pytest.approx((5 + 4 + 2) / 15)
    assert m["n"] == 8 and m["n_positive"] == 3


def test_threshold_moves_predictions():
    labels = np.array([1, 0])
    assert binary_metrics(labels, np.array([0.4, 0.1]), threshold=0.3)["sensitivity"] == 1.0
    assert binary_metrics(labels, np.array([0.4, 0.1]), threshold=0.5)["sensitivity"] == 0.0


def test_undefined_metrics_are_nan_not_zero():
    m = binary_metrics(np.array([0, 0, 0]), np.array([0.1, 0.2, 0.9]))
    assert math.isnan(m["auc"]) and math.isnan(m["ap"]) and math.isnan(m["sensitivity"])


def test_class_weights_follow_the_paper():
    w = class_weights(np.array([0] * 85 + [1] * 15))
    assert w == pytest.approx([0.15, 0.85])


def test_resampled_metrics_equal_scikit_learn_on_the_repeated_rows():
    from bench.metrics import resampled_binary_metrics

    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 60)
    scores = np.round(rng.random(60), 1)  # many ties, across classes too
    weights = rng.integers(0, 3, (40, 60)).astype(float)
    weights[0] = labels  # a resample holding only fractured rows: AUC and AP undefined
    fast = resampled_binary_metrics(labels, scores, weights, threshold=0.5)
    for b, w in enumerate(weights):
        rows = np.repeat(np.arange(60), w.astype(int))
        slow = binary_metrics(labels[rows], scores[rows], threshold=0.5)
        for k in ("f1", "acc", "auc", "ap"):
            assert fast[k][b] == pytest.approx(slow[k], abs=1e-12, nan_ok=True), (b, k)


def test_patient_bootstrap_weights_draw_whole_patients():
    from reports.stats import patient_draw_weights

    patients = np.array(["b", "b", "a", "c", "c", "c"])
    weights = patient_draw_weights(patients, n_boot=200, seed=1)
    assert (weights.sum(axis=1) > 0).all()
    for row in weights:  # the rows of a patient share its count; as many patients drawn as there are
        assert row[0] == row[1] and row[3] == row[4] == row[5]
        assert row[[0, 2, 3]].sum() == 3
    assert np.array_equal(weights, patient_draw_weights(patients, n_boot=200, seed=1))
