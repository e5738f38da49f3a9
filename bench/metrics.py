"""Metrics, scikit-learn underneath: on the fracture class (positive = fractured) for the binary
task, and per Genant grade for the 4-class grading task."""
from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    cohen_kappa_score,
    confusion_matrix,
    f1_score,
    recall_score,
    roc_auc_score,
)

GRADES = (0, 1, 2, 3)


def binary_metrics(labels: np.ndarray, scores: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """F1, ACC, AUC, AP, sensitivity, specificity and balanced accuracy at `threshold`.

    `scores` are fracture probabilities. AUC and AP are NaN (stored as null) when the labels hold
    one class only, since they are undefined there, not 0 or 1.
    """
    labels = np.asarray(labels).astype(int)
    scores = np.asarray(scores, dtype=float)
    pred = (scores >= threshold).astype(int)
    tn, fp, fn, tp = confusion_matrix(labels, pred, labels=[0, 1]).ravel()
    both = len(np.unique(labels)) == 2
    return {
        "f1": float(f1_score(labels, pred, zero_division=0.0)),
        "acc": float(accuracy_score(labels, pred)),
        "auc": float(roc_auc_score(labels, scores)) if both else math.nan,
        "ap": float(average_precision_score(labels, scores)) if both else math.nan,
        "sensitivity": float(tp / (tp + fn)) if tp + fn else math.nan,
        "specificity": float(tn / (tn + fp)) if tn + fp else math.nan,
        "balanced_acc": float(balanced_accuracy_score(labels, pred)) if both else math.nan,
        "threshold": float(threshold),
        "n": int(len(labels)),
        "n_positive": int(labels.sum()),
    }


def resampled_binary_metrics(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray,
                             threshold: float = 0.5) -> dict[str, np.ndarray]:
    """F1, ACC, AUC and AP of many bootstrap resamples at once, one per row of `weights`.

    A resample of the rows is the rows with integer weights (how often each was drawn), so every
    resample shares the one sort of `scores`: the weighted cumulative true and false positives at
    each distinct score give the ROC and precision-recall points of scikit-learn's `roc_auc_score`
    and `average_precision_score` on the repeated rows (ties included). A bootstrap of thousands of
    draws spends nearly all its time in scikit-learn's per-call input validation otherwise. The
    equality with `binary_metrics` on the repeated rows is tested. AUC and AP are NaN for a resample
    with one class.
    """
    labels = np.asarray(labels).astype(float)
    scores = np.asarray(scores, dtype=float)
    weights = np.atleast_2d(np.asarray(weights, dtype=float))
    order = np.argsort(-scores, kind="mergesort")
    y, s, w = labels[order], scores[order], weights[:, order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tps = np.cumsum(w * y, axis=1)[:, last_of_tie]
    fps = np.cumsum(w * (1 - y), axis=1)[:, last_of_tie]
    pos, neg = tps[:, -1], fps[:, -1]
    both = (pos > 0) & (neg > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr = np.hstack([np.zeros((len(w), 1)), tps]) / pos[:, None]
        fpr = np.hstack([np.zeros((len(w), 1)), fps]) / neg[:, None]
        auc = np.sum(np.diff(fpr, axis=1) * (tpr[:, 1:] + tpr[:, :-1]) / 2, axis=1)
        precision = np.where(tps + fps > 0, tps / np.maximum(tps + fps, 1e-300), 0.0)
        ap = np.sum(np.diff(tpr, axis=1) * precision, axis=1)
    called = (s >= threshold).astype(float)
    tp = (w * (y * called)).sum(axis=1)
    fp = (w * ((1 - y) * called)).sum(axis=1)
    fn = pos - tp
    n = w.sum(axis=1)
    return {
        "f1": np.where(2 * tp + fp + fn > 0, 2 * tp / np.maximum(2 * tp + fp + fn, 1e-300), 0.0),
        "acc": (n - fp - fn) / n,
        "auc": np.where(both, auc, np.nan),
        "ap": np.where(both, ap, np.nan),
    }


def grade_metrics(grades: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """Genant grading from (N, 4) class probabilities: macro-F1, per-grade recall, quadratic-weighted
    kappa, and the binary screening metrics at grade >= 1, whose score is P(grade >= 1) = 1 - p0.

    The predicted grade is the arg-max; the binary prediction is "predicted grade >= 1", so that
    screening sensitivity/specificity describe the same decisions as the grading metrics.
    """
    grades = np.asarray(grades).astype(int)
    probs = np.asarray(probs, dtype=float)
    pred = probs.argmax(axis=1)
    recalls = recall_score(grades, pred, labels=list(GRADES), average=None, zero_division=np.nan)
    present = set(np.unique(grades))
    fractured = (grades >= 1).astype(int)
    screening = binary_metrics(fractured, 1.0 - probs[:, 0], threshold=0.5)
    called = (pred >= 1).astype(int)
    tn, fp, fn, tp = confusion_matrix(fractured, called, labels=[0, 1]).ravel()
    screening.update(sensitivity=float(tp / (tp + fn)) if tp + fn else math.nan,
                     specificity=float(tn / (tn + fp)) if tn + fp else math.nan,
                     f1=float(f1_score(fractured, called, zero_division=0.0)),
                     acc=float(accuracy_score(fractured, called)),
                     balanced_acc=float(balanced_accuracy_score(fractured, called))
                     if len(np.unique(fractured)) == 2 else math.nan)
    return {
        **screening,
        "macro_f1": float(f1_score(grades, pred, labels=sorted(present), average="macro", zero_division=0.0)),
        "qwk": float(cohen_kappa_score(grades, pred, labels=list(GRADES), weights="quadratic"))
        if len(present | set(np.unique(pred))) > 1 else math.nan,
        "grade_acc": float(accuracy_score(grades, pred)),
        **{f"recall_g{g}": (float(r) if g in present else math.nan) for g, r in zip(GRADES, recalls)},
    }


def class_weights(labels: np.ndarray, num_classes: int = 2) -> np.ndarray:
    """w_c = 1 - n_c / n (the paper's class-weighted cross entropy)."""
    counts = np.bincount(np.asarray(labels, dtype=int), minlength=num_classes).astype(float)
    return 1.0 - counts / counts.sum()
