"""One run, as one chain of stages:

    data -> pretraining stages (cached artifacts) -> encoder initialisation -> protocol -> store

Each arrow is one call below; no module further down the chain imports one above it.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from bench.config import compose
from bench.envinfo import environment, now
from bench.errors import BenchError, choices_hint
from bench.registry import get_method
from bench.store import run_dir, write_run


def resolve_runs(overrides: dict[str, str]) -> list[DictConfig]:
    """The configs of `bench run method=X [regime=R] ...`: one per regime when none is given."""
    if "method" not in overrides:
        raise BenchError("bench run needs method=NAME (see `bench list methods`)")
    method_cls = get_method(overrides["method"])
    cfg = compose(overrides, method_cls)
    if cfg.regime is None:
        regimes = list(method_cls.regimes)
    elif cfg.regime in method_cls.regimes:
        regimes = [cfg.regime]
    else:
        raise BenchError(
            f"method '{cfg.method}' does not support regime '{cfg.regime}'; "
            f"{choices_hint(cfg.regime, method_cls.regimes)}"
        )
    runs = []
    for regime in regimes:
        one = cfg.copy()
        one.regime = regime
        runs.append(one)
    return runs


def prepare(cfg: DictConfig) -> tuple[Any, Any, nn.Module, dict[str, Any]]:
    """The run's method and data, its pretraining stages (artifacts made once and cached), and the
    classifier with its encoder initialised as the regime says; and what that initialisation was."""
    from bench.datasets.loading import load_data
    from bench.evaluation import NUM_CLASSES
    from bench.loop import Execution, seed_everything
    from bench.pretrain import run_plan
    from bench.registry import create_method
    from bench.transfer import initialise_encoder

    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    method = create_method(cfg.method, cfg)
    data = load_data(cfg)
    artifact = run_plan(method, cfg, Execution.of(cfg, method))
    seed_everything(cfg.seed, cfg.deterministic)  # the classifier's init depends on the run seed alone
    model = method.build_model(num_classes=NUM_CLASSES[cfg.task])
    return method, data, model, initialise_encoder(method, cfg, model, artifact)


def execute(cfg: DictConfig, on_epoch: Any = None, resume: dict[str, Any] | None = None,
            command: list[str] | None = None) -> Path:
    """Train, select, evaluate and store one run; returns its folder. `on_epoch` and `resume` pass
    through to the protocol (per-epoch checkpoints of suite trials); `command` is the user's command
    line when this process is not the one the user started (a Ray worker)."""
    from bench.locks import waited_s
    from bench.protocols import protocol

    started = now()
    t0, waited = time.perf_counter(), waited_s()
    method, data, model, init = prepare(cfg)
    result = protocol(cfg.protocol)(method, data, cfg, model, on_epoch=on_epoch, resume=resume)
    counts = data.table.groupby("split")["label"].agg(["size", "sum"])
    metrics = {
        "task": cfg.task,
        "protocol": cfg.protocol,
        "test": result.test_metrics,
        "val": result.val_metrics,
        "epochs": result.epochs,
        "cost": {**result.cost, "total_s": time.perf_counter() - t0, "pretrain_s": init.get("pretrain_s"),
                 "lock_wait_s": waited_s() - waited},
        "pretraining": init,
        "data": {
            "name": data.name,
            "fingerprint": data.fingerprint(),
            "splits": {s: {"vertebrae": int(r["size"]), "fractured": int(r["sum"])} for s, r in counts.iterrows()},
            "train_used": result.extra["train_used"],
            "input": data.input_geometry(int(cfg.crop_size)),
        },
        **{key: result.extra[key] for key in ("probe", "head_init") if key in result.extra},
    }
    env = {**environment(), "started": started, "finished": now()}
    if command is not None:
        env["argv"] = list(command)
    resolved = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    model_state = result.model.state_dict() if cfg.save_model and result.model is not None else None
    return write_run(run_dir(cfg), resolved, metrics, result.predictions, env, model_state)
