"""Metrics on the fracture class (positive = fractured), scikit-learn underneath."""
from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    roc_auc_score,
)


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


def class_weights(labels: np.ndarray, num_classes: int = 2) -> np.ndarray:
    """w_c = 1 - n_c / n (the paper's class-weighted cross entropy)."""
    counts = np.bincount(np.asarray(labels, dtype=int), minlength=num_classes).astype(float)
    return 1.0 - counts / counts.sum()
