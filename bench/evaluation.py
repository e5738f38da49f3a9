"""What every evaluation protocol shares: targets, datasets of a split, prediction, metrics and the
predictions table of the results store."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader

from bench.datasets.base import VertebraSet
from bench.datasets.torch_data import CropDataset, SliceViewDataset
from bench.errors import BenchError
from bench.loop import Execution
from bench.metrics import binary_metrics, grade_metrics

NUM_CLASSES = {"fracture": 2, "grade": 4}


@dataclass
class ProtocolResult:
    """What a protocol hands to the results store."""

    model: nn.Module
    test_metrics: dict[str, float]
    val_metrics: dict[str, float]
    predictions: pd.DataFrame
    epochs: list[dict[str, Any]]
    cost: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)


def targets(part: VertebraSet, cfg: DictConfig) -> np.ndarray:
    """The class of every row: fracture 0/1, or the Genant grade 0-3 for `task=grade`."""
    if cfg.task == "grade":
        grades = part.table["grade"] if "grade" in part.table else None
        if grades is None or grades.isna().any():
            missing = "none" if grades is None else f"{int(grades.isna().sum())} missing"
            raise BenchError(f"task=grade needs a Genant grade (0-3) for every vertebra; data '{cfg.data}' "
                             f"has {missing} in {part.name}")
        return grades.astype(int).to_numpy()
    return part.table["label"].astype(int).to_numpy()


def split_parts(data: VertebraSet, cfg: DictConfig) -> tuple[VertebraSet, VertebraSet, VertebraSet]:
    """train, val, test; `train_fraction` keeps the first share of the training patients."""
    train, val, test = (data.subset(s) for s in ("train", "val", "test"))
    if cfg.train_fraction < 1:  # label efficiency: fewer training patients; val and test untouched
        from bench.datasets.splits import patient_fraction

        train = VertebraSet(train.images, patient_fraction(train.table, cfg.train_fraction, cfg.seed), train.name)
    for part in (train, val, test):
        if len(part.table) == 0:
            raise BenchError(f"data '{cfg.data}': split '{part.name}' is empty")
    if len(np.unique(targets(train, cfg))) < 2:
        raise BenchError(f"data '{cfg.data}': the training split holds only one class")
    return train, val, test


def task_metrics(cfg: DictConfig, y: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    if cfg.task == "grade":
        return grade_metrics(y, probs)
    return binary_metrics(y, probs[:, 1], cfg.threshold)


def make_dataset(method: Any, cfg: DictConfig, part: VertebraSet, augment: bool = False) -> CropDataset:
    """Cubic crops for 3D models, slice views (video clips) for methods whose input is "slices"."""
    labels = targets(part, cfg)
    if method.input_format == "slices":
        v = cfg.views
        options = {"frame_size": v.frame_size, "multi_view": v.multi_view, **method.view_options()}
        return SliceViewDataset(part.images, part.crop_indices, labels, cfg.crop_size, augment, cfg.seed,
                                axis=v.axis, frames=v.frames, channels=v.channels, **options)
    if method.input_format != "volume":
        raise BenchError(f"method '{method.name}' declares unknown input_format '{method.input_format}'")
    return CropDataset(part.images, part.crop_indices, labels, cfg.crop_size, augment, cfg.seed)


def eval_loader(method: Any, cfg: DictConfig, part: VertebraSet, execution: Execution) -> DataLoader:
    return DataLoader(make_dataset(method, cfg, part), batch_size=cfg.eval_batch_size, num_workers=cfg.num_workers,
                      pin_memory=execution.device.type == "cuda")


def forward_views(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Outputs of a batch; a (B, V, C, T, H, W) multi-view batch gives the mean output over V."""
    if x.dim() == 6:
        b, v = x.shape[:2]
        return model(x.flatten(0, 1)).view(b, v, -1).mean(dim=1)
    return model(x)


@torch.no_grad()
def predict(model: nn.Module, loader: DataLoader, execution: Execution,
            loss_fn: nn.Module | None = None) -> tuple[np.ndarray, float]:
    """Class probabilities (N, C) (softmax of the view-averaged logits) and the mean loss."""
    model.eval()
    scores, total, count = [], 0.0, 0
    for x, y in loader:
        x, y = execution.to(x), y.to(execution.device)
        with execution.autocast():
            logits = forward_views(model, x)
        logits = logits.float()
        if loss_fn is not None:
            total += float(loss_fn(logits, y)) * len(y)
            count += len(y)
        scores.append(torch.softmax(logits, dim=1).cpu().double().numpy())
    return np.concatenate(scores), (total / count if count else math.nan)


def predictions_table(cfg: DictConfig, part: VertebraSet, probs: np.ndarray) -> pd.DataFrame:
    """One row per vertebra: ids, label (and grade), score (the fracture probability) and prediction."""
    columns = [c for c in ("patient_id", "vertebra", "label", "grade") if c in part.table]
    preds = part.table[columns].copy()
    if cfg.task == "grade":  # score: P(grade >= 1), the screening probability; plus every grade's
        preds["score"] = 1.0 - probs[:, 0]
        preds["prediction"] = (probs.argmax(axis=1) >= 1).astype(int)
        preds["predicted_grade"] = probs.argmax(axis=1)
        for g in range(probs.shape[1]):
            preds[f"p_grade{g}"] = probs[:, g]
    else:
        preds["score"] = probs[:, 1]
        preds["prediction"] = (probs[:, 1] >= cfg.threshold).astype(int)
    return preds


def training_used(cfg: DictConfig, train: VertebraSet) -> dict[str, Any]:
    y = targets(train, cfg)
    return {"fraction": cfg.train_fraction, "patients": int(train.table["patient_id"].nunique()),
            "vertebrae": len(train.table), "classes": np.bincount(y, minlength=NUM_CLASSES[cfg.task]).tolist()}


def selection_key(cfg: DictConfig, m: dict[str, float], val_loss: float) -> tuple[float, ...]:
    """What the best checkpoint maximises on validation (`select`): F1 at the threshold, as the
    paper (macro-F1, then kappa, for grading), then AUC; AUC, then F1; or the lowest loss. NaN ranks lowest;
    ties keep the earlier epoch."""
    f1, second = ("macro_f1", "qwk") if cfg.task == "grade" else ("f1", "auc")
    if cfg.select == "val_loss":
        return (-val_loss if math.isfinite(val_loss) else -math.inf,)
    order = (f1, second) if cfg.select == "val_f1" else ("auc", f1)
    return tuple(-1.0 if math.isnan(m[k]) else m[k] for k in order)
