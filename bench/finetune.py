"""The `finetune` protocol: train the whole classifier on the training split, keep the best
validation checkpoint, evaluate it on test.

Class-weighted cross entropy (w_c = 1 - n_c / n), the checkpoint chosen on validation by `select`
(the paper: the best F1 at the threshold; or AUC, or loss). A
method may replace the loss of a training batch (`Method.training_loss`, e.g. SupCon's two views)
and the batch composition (`Method.train_batch_sampler`, e.g. grade-balanced; the loss is then
unweighted). The recipe keys: `layer_decay` (lr scaled per layer group of `Method.layer_groups`,
through timm), `label_smoothing`, and `head_init=linear_probe` (LP-FT: the head starts as the linear
probe of the initialised encoder, bench.probes). The optimisation itself is the shared loop (bench.loop).
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader

from bench.datasets.base import VertebraSet
from bench.errors import BenchError
from bench.evaluation import (
    NUM_CLASSES,
    ProtocolResult,
    eval_loader,
    make_dataset,
    predict,
    predictions_table,
    selection_key,
    split_parts,
    targets,
    task_metrics,
    training_used,
)
from bench.loop import Execution, OnEpoch, Schedule, Stage, TrainingLoop, seed_everything
from bench.metrics import class_weights


class FinetuneStage(Stage):
    """Supervised training of the classifier, with validation and best-checkpoint tracking each epoch."""

    def __init__(self, method: Any, cfg: DictConfig, model: nn.Module, train: VertebraSet, val: VertebraSet,
                 execution: Execution) -> None:
        self.name, self.method, self.cfg, self.model, self.execution = method.name, method, cfg, model, execution
        y_train = targets(train, cfg)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        loader_kw = dict(num_workers=cfg.num_workers, pin_memory=execution.device.type == "cuda")
        dataset = make_dataset(method, cfg, train, augment=cfg.augment)
        sampler = method.train_batch_sampler(y_train, cfg.batch_size, cfg.seed)
        if sampler is not None:
            self.loader = DataLoader(dataset, batch_sampler=sampler, **loader_kw)
        else:
            self.loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, generator=self.generator,
                                     drop_last=len(dataset) > cfg.batch_size, **loader_kw)
        self.val, self.val_loader = val, eval_loader(method, cfg, val, execution)
        # w_c = 1 - n_c / n corrects for the class frequencies the batches carry; batches that are
        # already class-balanced (a balanced sampler) need no correction, or rare classes win twice.
        num_classes = NUM_CLASSES[cfg.task]
        balanced = sampler is not None and getattr(sampler, "balanced", False)
        weights = np.ones(num_classes) if balanced else class_weights(y_train, num_classes)
        self.loss_fn = nn.CrossEntropyLoss(weight=torch.tensor(weights, dtype=torch.float32, device=execution.device),
                                           label_smoothing=cfg.label_smoothing)
        self.best: dict[str, Any] | None = None  # key, epoch, state, val

    def param_groups(self) -> list[dict[str, Any]] | None:
        """Layer-wise lr decay (BEiT / MAE) over the method's layer groups, through timm."""
        if self.cfg.layer_decay >= 1:
            return None
        from timm.optim import param_groups_layer_decay

        return param_groups_layer_decay(_Grouped(self.model, layer_groups(self.method, self.cfg)),
                                        weight_decay=self.cfg.weight_decay, layer_decay=self.cfg.layer_decay)

    def step(self, model: nn.Module, batch: Any) -> tuple[dict[str, torch.Tensor], int]:
        x, y = batch
        return {"loss": self.method.training_loss(model, x, y, self.loss_fn)}, len(y)

    def batch_weight(self, batch: Any) -> float:
        """The class-weighted loss is a weighted mean: a micro-batch weighs its samples' class weights."""
        y = batch[1].to(self.loss_fn.weight.device)
        return float(self.loss_fn.weight[y.long()].sum()) if y.dim() == 1 else float(len(y))

    def end_epoch(self, epoch: int, record: dict[str, Any]) -> None:
        cfg = self.cfg
        probs, val_loss = predict(self.step_model, self.val_loader, self.execution, self.loss_fn)
        if not np.isfinite(probs).all():
            raise BenchError(f"{self.name} diverged at epoch {epoch} (non-finite validation predictions); "
                             f"lower lr={cfg.lr}")
        m = task_metrics(cfg, targets(self.val, cfg), probs)
        record.update(val_loss=val_loss, val_f1=m["f1"], val_auc=m["auc"], val_ap=m["ap"])
        if cfg.task == "grade":
            record.update(val_macro_f1=m["macro_f1"], val_qwk=m["qwk"])
        key = selection_key(cfg, m, val_loss)
        if self.best is None or key > tuple(self.best["key"]):
            state = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
            self.best = {"key": list(key), "epoch": epoch, "state": state, "val": m}

    def state(self) -> dict[str, Any]:
        return {"best": self.best, "loader_rng": self.generator.get_state()}

    def load_state(self, state: dict[str, Any]) -> None:
        self.best = state["best"]
        self.generator.set_state(state["loader_rng"])


class _Grouped:
    """A model seen through the method's layer groups, in the shape timm's grouping reads."""

    def __init__(self, model: nn.Module, matcher: dict[str, Any]) -> None:
        self.model, self.matcher = model, matcher

    def named_parameters(self) -> Any:
        return self.model.named_parameters()

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return self.matcher


def layer_groups(method: Any, cfg: DictConfig) -> dict[str, Any]:
    """The method's layer groups, or one line saying `layer_decay` cannot apply to it."""
    matcher = method.layer_groups()
    if matcher is None:
        raise BenchError(f"bad value for 'layer_decay': {cfg.layer_decay}; method '{method.name}' declares no layer "
                         f"order (Method.layer_groups), expected 1")
    return matcher


def finetune(method: Any, data: VertebraSet, cfg: DictConfig, model: nn.Module | None = None,
             on_epoch: OnEpoch | None = None, evaluate_test: bool = True,
             resume: dict[str, Any] | None = None) -> ProtocolResult:
    """Train `model` (the initialised classifier; a fresh one when None), keep the best validation
    checkpoint, evaluate it on test.

    `on_epoch(record, state)` is called after every epoch with the epoch's record and a function
    that returns the whole training state; `resume=state` continues from such a state and ends
    exactly where the uninterrupted run ends (Ray Tune retries a failed trial from it).
    `evaluate_test=False` never touches the test split (`bench tune` selects on validation only)."""
    train, val, test = split_parts(data, cfg)
    if model is None:
        seed_everything(cfg.seed, cfg.deterministic)
        model = method.build_model(num_classes=NUM_CLASSES[cfg.task])
    head_init = None
    if cfg.head_init == "linear_probe":
        from bench.probes import init_head_from_probe

        head_init = init_head_from_probe(method, data, cfg, model)
    seed_everything(cfg.seed, cfg.deterministic)  # finetuning draws do not depend on what came before
    execution = Execution.of(cfg, method)
    stage = FinetuneStage(method, cfg, model, train, val, execution)
    loop = TrainingLoop(stage, Schedule.of(cfg, cfg.devices), execution, progress=cfg.progress)
    result = loop.run(on_epoch, resume)
    best = stage.best
    assert best is not None
    model = loop.model
    model.load_state_dict(best["state"])
    cost = {"micro_batch": result.micro_batch, "train_s": result.train_s, "train_data_s": result.data_s,
            "train_flops": result.flops,
            "threads": torch.get_num_threads(),
            "s_per_epoch": result.train_s / max(1, cfg.epochs - result.first_epoch),
            "resumed_at_epoch": result.first_epoch if resume is not None else None,
            "n_params": sum(p.numel() for p in model.parameters()), "best_epoch": best["epoch"],
            "steps": result.steps, "device": str(execution.device),
            "amp_dtype": str(execution.dtype).removeprefix("torch.") if execution.dtype else None,
            "amp_note": execution.note or None}
    extra = {"train_used": training_used(cfg, train)}
    if head_init is not None:
        extra["head_init"] = head_init
    if not evaluate_test:
        return ProtocolResult(model, {}, best["val"], pd.DataFrame(), result.history, cost, extra)
    t_eval = time.perf_counter()
    probs, _ = predict(model, eval_loader(method, cfg, test, execution), execution)
    cost["eval_s"] = time.perf_counter() - t_eval
    return ProtocolResult(model, task_metrics(cfg, targets(test, cfg), probs), best["val"],
                          predictions_table(cfg, test, probs), result.history, cost, extra)
