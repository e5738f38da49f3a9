"""The finetuning loop shared by every method.

Optimiser and cosine-with-warmup schedule from timm, class-weighted cross entropy
(w_c = 1 - n_c / n), the checkpoint with the best validation F1 (ties: higher validation AUC, then
the earlier epoch; for `task=grade` macro-F1, then quadratic kappa), evaluation of that checkpoint
on the test split. A method may replace the loss of a training batch (`Method.training_loss`, e.g.
SupCon's two views) and the batch composition (`Method.train_batch_sampler`, e.g. grade-balanced;
the loss is then unweighted). AMP and `torch.compile` are switches that work on CPU too, so the GPU
paths are exercised by the CPU test suite.
"""
from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from bench.datasets.base import VertebraSet
from bench.datasets.torch_data import CropDataset, SliceViewDataset
from bench.errors import BenchError
from bench.metrics import binary_metrics, class_weights, grade_metrics

NUM_CLASSES = {"fracture": 2, "grade": 4}


def select_device(cfg: DictConfig) -> torch.device:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise BenchError("device=cuda but no CUDA device is available; use device=auto or device=cpu")
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def amp_dtype(cfg: DictConfig, device: torch.device) -> torch.dtype | None:
    """None when AMP is off; bf16 on CPU (fp16 autocast is poorly supported there), fp16 on CUDA."""
    if not cfg.amp:
        return None
    if cfg.amp_dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.bfloat16
    if cfg.amp_dtype == "fp16" and device.type == "cpu":
        raise BenchError("amp_dtype=fp16 is not supported on CPU; use amp_dtype=bf16 or auto")
    return torch.float16 if cfg.amp_dtype == "fp16" else torch.bfloat16


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


@dataclass
class FinetuneResult:
    model: nn.Module
    test_metrics: dict[str, float]
    val_metrics: dict[str, float]
    predictions: pd.DataFrame
    epochs: list[dict[str, Any]]
    cost: dict[str, float]
    extra: dict[str, Any] = field(default_factory=dict)


def targets(part: VertebraSet, cfg: DictConfig) -> np.ndarray:
    """The class of every row: fracture 0/1, or the Genant grade 0-3 for `task=grade`."""
    if cfg.task == "grade":
        grades = part.table["grade"] if "grade" in part.table else None
        if grades is None or grades.isna().any():
            raise BenchError(f"task=grade needs a Genant grade (0-3) for every vertebra; data '{cfg.data}' "
                             f"has {'none' if grades is None else f'{int(grades.isna().sum())} missing'} in {part.name}")
        return grades.astype(int).to_numpy()
    return part.table["label"].astype(int).to_numpy()


def task_metrics(cfg: DictConfig, y: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    if cfg.task == "grade":
        return grade_metrics(y, probs)
    return binary_metrics(y, probs[:, 1], cfg.threshold)


def selection_key(cfg: DictConfig, m: dict[str, float]) -> tuple[float, float]:
    """What the best checkpoint maximises on validation; NaN (one class present) ranks lowest."""
    first, second = ("macro_f1", "qwk") if cfg.task == "grade" else ("f1", "auc")
    return tuple(-1.0 if math.isnan(m[k]) else m[k] for k in (first, second))  # type: ignore[return-value]


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


def forward_views(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Logits of a batch; a (B, V, C, T, H, W) multi-view batch gives the mean logits over V."""
    if x.dim() == 6:
        b, v = x.shape[:2]
        return model(x.flatten(0, 1)).view(b, v, -1).mean(dim=1)
    return model(x)


def memory_format(method: Any, cfg: DictConfig) -> torch.memory_format:
    """channels_last_3d for the conv nets that ask for it: oneDNN's 3D convolutions with few channels
    run 1.1-2x faster in it on CPU (Models Genesis 1.42 -> 0.72 s per step at `small`), and so do
    cuDNN's under AMP. `channels_last=false` turns it off."""
    use = cfg.channels_last and getattr(method, "channels_last", False)
    return torch.channels_last_3d if use else torch.contiguous_format


def make_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float, **kwargs: Any) -> torch.optim.Optimizer:
    """timm's optimiser factory (no weight decay on biases and norms) with torch's fused kernels:
    one multi-tensor kernel per step instead of a dozen elementwise ops per parameter tensor. On
    CPU the per-tensor AdamW update took 27 ms of a 325 ms ViT-S training step; fused, it takes 8 ms.
    Fused and per-tensor updates agree to rounding, and fused runs are deterministic too."""
    if name == "sgd":
        kwargs.setdefault("momentum", 0.9)
    return create_optimizer_v2(model, opt=name, lr=lr, weight_decay=weight_decay, fused=True, **kwargs)


def to_device(x: torch.Tensor, device: torch.device, fmt: torch.memory_format) -> torch.Tensor:
    """A batch on the device, 5-D batches in the model's memory format."""
    if x.dim() == 5:
        return x.to(device, non_blocking=True, memory_format=fmt)
    return x.to(device, non_blocking=True)


@torch.no_grad()
def predict(model: nn.Module, loader: DataLoader, device: torch.device, dtype: torch.dtype | None,
            loss_fn: nn.Module | None = None,
            fmt: torch.memory_format = torch.contiguous_format) -> tuple[np.ndarray, float]:
    """Class probabilities (N, C) (softmax of the view-averaged logits) and the mean loss."""
    model.eval()
    scores, total, count = [], 0.0, 0
    for x, y in loader:
        x, y = to_device(x, device, fmt), y.to(device)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = forward_views(model, x)
        logits = logits.float()
        if loss_fn is not None:
            total += float(loss_fn(logits, y)) * len(y)
            count += len(y)
        scores.append(torch.softmax(logits, dim=1).cpu().double().numpy())
    return np.concatenate(scores), (total / count if count else math.nan)


def finetune(method: Any, data: VertebraSet, cfg: DictConfig,
             on_epoch: Callable[[dict[str, Any], Callable[[], dict[str, Any]]], None] | None = None,
             evaluate_test: bool = True, resume: dict[str, Any] | None = None) -> FinetuneResult:
    """Train, keep the best validation checkpoint, evaluate it on test.

    `on_epoch(record, state)` is called after every epoch with the epoch's record and a function
    that returns the whole training state (model, optimiser, scheduler step, scaler, RNG states,
    history, best checkpoint so far); `resume=state` continues from such a state and ends exactly
    where the uninterrupted run ends (Ray Tune retries a failed trial from it). `evaluate_test=False`
    never touches the test split (`bench tune` selects on validation only)."""
    seed_everything(cfg.seed, cfg.deterministic)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    device = select_device(cfg)
    dtype = amp_dtype(cfg, device)
    train, val, test = (data.subset(s) for s in ("train", "val", "test"))
    if cfg.train_fraction < 1:  # label efficiency: fewer training patients; val and test untouched
        from bench.datasets.splits import patient_fraction

        train = VertebraSet(train.images, patient_fraction(train.table, cfg.train_fraction, cfg.seed), train.name)
    for part in (train, val, test):
        if len(part.table) == 0:
            raise BenchError(f"data '{cfg.data}': split '{part.name}' is empty")
    y_train = targets(train, cfg)
    if len(np.unique(y_train)) < 2:
        raise BenchError(f"data '{cfg.data}': the training split holds only one class")
    num_classes = NUM_CLASSES[cfg.task]

    model = method.build_model(num_classes=num_classes)
    from bench.pretrain import encoder_init

    init = encoder_init(method, cfg, model)  # may pretrain (once per artifact) before finetuning
    seed_everything(cfg.seed, cfg.deterministic)  # finetuning draws do not depend on the pretraining
    fmt = memory_format(method, cfg)
    model = model.to(device, memory_format=fmt)
    n_params = sum(p.numel() for p in model.parameters())
    step_model = torch.compile(model) if cfg.compile else model

    train_ds = make_dataset(method, cfg, train, augment=cfg.augment)
    gen = torch.Generator().manual_seed(cfg.seed)
    loader_kw = dict(num_workers=cfg.num_workers, pin_memory=device.type == "cuda")
    sampler = method.train_batch_sampler(y_train, cfg.batch_size, cfg.seed)
    if sampler is not None:
        train_loader = DataLoader(train_ds, batch_sampler=sampler, **loader_kw)
    else:
        train_loader = DataLoader(train_ds, batch_size=cfg.batch_size, shuffle=True, generator=gen,
                                  drop_last=len(train_ds) > cfg.batch_size, **loader_kw)
    val_loader = DataLoader(make_dataset(method, cfg, val), batch_size=cfg.eval_batch_size, **loader_kw)
    test_loader = DataLoader(make_dataset(method, cfg, test), batch_size=cfg.eval_batch_size, **loader_kw)

    # w_c = 1 - n_c / n corrects for the class frequencies the batches carry; batches that are
    # already class-balanced (a balanced sampler) need no correction, or rare classes win twice.
    balanced = sampler is not None and getattr(sampler, "balanced", False)
    weights = torch.tensor(np.ones(num_classes) if balanced else class_weights(y_train, num_classes),
                           dtype=torch.float32, device=device)
    loss_fn = nn.CrossEntropyLoss(weight=weights)
    optimizer = make_optimizer(model, cfg.optimizer, cfg.lr, cfg.weight_decay)
    steps_per_epoch = len(train_loader)
    total_steps = cfg.epochs * steps_per_epoch
    scheduler = CosineLRScheduler(
        optimizer, t_initial=total_steps, lr_min=cfg.min_lr, t_in_epochs=False,
        warmup_t=int(round(cfg.warmup_epochs * steps_per_epoch)), warmup_lr_init=cfg.lr * 0.01,
    )
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)

    history: list[dict[str, Any]] = []
    best: tuple[tuple[float, float], int, dict[str, torch.Tensor], dict[str, float]] | None = None
    step, first_epoch = 0, 0
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        scaler.load_state_dict(resume["scaler"])
        step, first_epoch, history = resume["step"], resume["epoch"] + 1, list(resume["history"])
        best = (tuple(resume["best"]["key"]), resume["best"]["epoch"], resume["best"]["state"], resume["best"]["val"])
        scheduler.step_update(step)
        torch.set_rng_state(resume["rng"]["torch"])
        gen.set_state(resume["rng"]["loader"])
        random.setstate((resume["rng"]["python"][0], tuple(resume["rng"]["python"][1]), resume["rng"]["python"][2]))
        np.random.set_state(("MT19937", resume["rng"]["numpy"].numpy().astype(np.uint32), *resume["rng"]["numpy_pos"]))

    def training_state() -> dict[str, Any]:
        """Everything `resume` needs, in types that torch.load(weights_only=True) accepts."""
        np_state = np.random.get_state()
        py_state = random.getstate()
        assert best is not None
        return {"model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
                "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "step": step, "epoch": epoch,
                "history": history, "best": {"key": list(best[0]), "epoch": best[1], "state": best[2], "val": best[3]},
                "rng": {"torch": torch.get_rng_state(), "loader": gen.get_state(),
                        "python": [py_state[0], list(py_state[1]), py_state[2]],
                        "numpy": torch.from_numpy(np_state[1].astype(np.int64)), "numpy_pos": list(np_state[2:])}}

    t_train = time.perf_counter()
    bar = tqdm(range(first_epoch, cfg.epochs), desc=f"{method.name}", disable=not cfg.progress, leave=False)
    for epoch in bar:
        t_epoch = time.perf_counter()
        train_ds.epoch = epoch
        if sampler is not None:
            sampler.epoch = epoch
        step_model.train()
        loss_sum, n_seen = 0.0, 0
        for x, y in train_loader:
            x, y = to_device(x, device, fmt), y.to(device)
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                loss = method.training_loss(step_model, x, y, loss_fn)
            if not torch.isfinite(loss):
                raise BenchError(f"training diverged at epoch {epoch} (loss {float(loss.detach())}); lower lr={cfg.lr}")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.grad_clip > 0:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            step += 1
            scheduler.step_update(step)
            loss_sum += float(loss.detach()) * len(y)
            n_seen += len(y)
        train_s = time.perf_counter() - t_epoch
        val_probs, val_loss = predict(step_model, val_loader, device, dtype, loss_fn, fmt)
        val_m = task_metrics(cfg, targets(val, cfg), val_probs)
        history.append({
            "epoch": epoch, "train_loss": loss_sum / max(n_seen, 1), "val_loss": val_loss,
            "val_f1": val_m["f1"], "val_auc": val_m["auc"], "val_ap": val_m["ap"],
            **({"val_macro_f1": val_m["macro_f1"], "val_qwk": val_m["qwk"]} if cfg.task == "grade" else {}),
            "lr": optimizer.param_groups[0]["lr"], "train_s": train_s,
        })
        key = selection_key(cfg, val_m)
        if best is None or key > best[0]:
            state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            best = (key, epoch, state, val_m)
        bar.set_postfix(loss=f"{history[-1]['train_loss']:.3f}", val_f1=f"{val_m['f1']:.3f}")
        if on_epoch is not None:
            on_epoch(history[-1], training_state)
    train_total = time.perf_counter() - t_train

    assert best is not None
    model.load_state_dict(best[2])
    if not evaluate_test:
        return FinetuneResult(model, {}, best[3], pd.DataFrame(), history, {"train_s": train_total, "best_epoch": best[1]})
    t_eval = time.perf_counter()
    test_probs, _ = predict(model, test_loader, device, dtype, fmt=fmt)
    eval_s = time.perf_counter() - t_eval
    test_m = task_metrics(cfg, targets(test, cfg), test_probs)
    columns = [c for c in ("patient_id", "vertebra", "label", "grade") if c in test.table]
    preds = test.table[columns].copy()
    if cfg.task == "grade":  # score: P(grade >= 1), the screening probability; plus every grade's
        preds["score"] = 1.0 - test_probs[:, 0]
        preds["prediction"] = (test_probs.argmax(axis=1) >= 1).astype(int)
        preds["predicted_grade"] = test_probs.argmax(axis=1)
        for g in range(num_classes):
            preds[f"p_grade{g}"] = test_probs[:, g]
    else:
        preds["score"] = test_probs[:, 1]
        preds["prediction"] = (test_probs[:, 1] >= cfg.threshold).astype(int)
    cost = {
        "train_s": train_total,
        "s_per_epoch": train_total / max(1, cfg.epochs - first_epoch),
        "resumed_at_epoch": first_epoch if resume is not None else None,
        "eval_s": eval_s,
        "n_params": n_params,
        "best_epoch": best[1],
        "steps": step,
        "device": str(device),
        "amp_dtype": str(dtype).removeprefix("torch.") if dtype else None,
    }
    used = {"fraction": cfg.train_fraction, "patients": int(train.table["patient_id"].nunique()),
            "vertebrae": len(train.table), "classes": np.bincount(y_train, minlength=num_classes).tolist()}
    return FinetuneResult(model, test_m, best[3], preds, history, cost, extra={"init": init, "train_used": used})
