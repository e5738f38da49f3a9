"""The self-supervised pretraining stage, and how each regime initialises the encoder.

A method with a pretext task (`Method.pretext_input` is "volume" or "video") pretrains on
  - the out-of-domain corpus for `public` on the embedded default (body-CT patches or videos),
  - the unlabelled vertebrae for `vertebrae` (random init) and `public_to_vertebrae` (init from
    the public weights: the embedded `public` artifact, or the real file `weights.public=PATH`).
An artifact is named by the hash of everything that made it (method, model keys, pretraining
keys, data, parent artifact or public file hash), built once under a file lock, and reused by
every finetuning run that needs it, whatever their seed. Its folder holds the whole pretext model
(safetensors), the per-epoch loss curve, the config and the environment.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file
from timm.scheduler import CosineLRScheduler
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from bench.config import config_hash
from bench.envinfo import environment, now
from bench.errors import BenchError
from bench.locks import locked
from bench.store import dumps, write_text_atomic
from bench.weights import fetch, load_into, read_checkpoint, sha256_of, unwrap_state_dict

ARTIFACT_VERSION = 4  # bumped whenever a pretext task changes what it computes (2: numpy local shuffling;
# 3: Genesis sub-cubes, MAE visible-patch embedding, channels_last and bf16 in the conv pretexts;
# 4: fused optimiser steps, ViT patch embedding as a matrix product, MAE predicts hidden patches only)


class VolumeCorpus(Dataset):
    """(1, S, S, S) crops or patches in [0, 1], random flips along every axis (pretext augmentation)."""

    def __init__(self, images: np.ndarray, rows: np.ndarray, size: int, seed: int) -> None:
        self.images, self.rows, self.size, self.seed, self.epoch = images, rows, size, seed, 0

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> torch.Tensor:
        from bench.datasets.torch_data import resize_cube, scale_hu

        x = resize_cube(scale_hu(self.images[self.rows[index]]), self.size)
        rng = np.random.default_rng([self.seed, self.epoch, index, 2])
        for axis in range(3):
            if rng.random() < 0.5:
                x = np.flip(x, axis)
        return torch.from_numpy(np.ascontiguousarray(x)[None])


class VideoCorpus(Dataset):
    """(3, T, H, W) clips in [0, 1] from uint8 (N, T, H, W, 3) videos, random horizontal flip."""

    def __init__(self, clips: np.ndarray, seed: int) -> None:
        self.clips, self.seed, self.epoch = clips, seed, 0

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, index: int) -> torch.Tensor:
        x = np.asarray(self.clips[index], dtype=np.float32) / 255.0  # (T, H, W, 3)
        if np.random.default_rng([self.seed, self.epoch, index, 3]).random() < 0.5:
            x = x[:, :, ::-1]
        return torch.from_numpy(np.ascontiguousarray(x.transpose(3, 0, 1, 2)))


class SliceCorpus(Dataset):
    """Unlabelled vertebrae as slice-view clips (3, T, H, W), for the video methods' pretraining."""

    def __init__(self, images: np.ndarray, rows: np.ndarray, cfg: DictConfig, seed: int, frame_size: int) -> None:
        from bench.datasets.torch_data import SliceViewDataset

        v = cfg.views
        self.inner = SliceViewDataset(images, rows, np.zeros(len(rows)), cfg.crop_size, augment=True, seed=seed,
                                      axis=v.axis, frames=v.frames, frame_size=frame_size, channels=v.channels)

    @property
    def epoch(self) -> int:
        return self.inner.epoch

    @epoch.setter
    def epoch(self, value: int) -> None:
        self.inner.epoch = value

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.inner[index][0]


def _corpus(method: Any, cfg: DictConfig, source: str, seed: int) -> tuple[Dataset, dict[str, Any]]:
    from bench.datasets.loading import load_corpus, load_unlabelled, synthetic_spec

    kind = method.pretext_data(source)
    if source == "public":
        if cfg.data != "synthetic" and not cfg.weights.public:
            raise BenchError(f"regime public on data '{cfg.data}' needs weights.public=PATH_OR_URL "
                             "(the embedded public corpus belongs to data=synthetic)")
        kind = "video" if kind == "video" else "body_ct"
        items = load_corpus(cfg, kind)
        spec = {"corpus": kind, "n": len(items), "synthetic": synthetic_spec(cfg), "crop_size": cfg.crop_size}
        if kind == "video":
            return VideoCorpus(items, seed), spec
        return VolumeCorpus(items, np.arange(len(items)), cfg.crop_size, seed), spec
    data = load_unlabelled(cfg)
    spec = {"corpus": "unlabelled_vertebrae", "name": data.name, "fingerprint": data.fingerprint(),
            "crop_size": cfg.crop_size}
    if kind == "slices":
        spec["views"] = OmegaConf.to_container(cfg.views)
        frame_size = method.view_options().get("frame_size", cfg.views.frame_size)
        return SliceCorpus(data.images, data.crop_indices, cfg, seed, frame_size), spec
    return VolumeCorpus(data.images, data.crop_indices, cfg.crop_size, seed), spec


def artifact_root(cfg: DictConfig) -> Path:
    from bench.datasets.loading import cache_root

    return cache_root(cfg) / "pretrain"


def public_file(method: Any, cfg: DictConfig) -> tuple[Path, str]:
    """The real public checkpoint named by weights.public, fetched and hashed."""
    spec = method.public_weights
    if spec is None:
        raise BenchError(f"method '{method.name}' has no public weights layout; weights.public cannot be used")
    sha = cfg.weights.sha256 or spec.sha256
    from bench.datasets.loading import cache_root

    path = fetch(cfg.weights.public, sha, cache_root(cfg) / "weights")
    return path, sha256_of(path)


def public_encoder_state(method: Any, cfg: DictConfig, target: nn.Module) -> tuple[dict[str, torch.Tensor], str]:
    """The encoder tensors of the real public file, in the layout of `target`."""
    path, digest = public_file(method, cfg)
    raw = unwrap_state_dict(read_checkpoint(path))
    state = method.transfer(method.public_weights.convert(raw, target), target)
    return state, f"{path} (sha256 {digest[:12]})"


def ensure_artifact(method: Any, cfg: DictConfig, source: str, parent: dict[str, Any] | None) -> Path:
    """The folder of the pretext model pretrained on `source` ("public" or "vertebrae") from `parent`
    (None: random init; {"artifact": path} or {"public_file": ...}); built only if missing."""
    seed = cfg.pretrain.seed
    dataset, data_spec = _corpus(method, cfg, source, seed)
    if method.pretext_data(source) == "slices":
        data_spec["view_options"] = method.view_options()
    identity = method.artifact_key(source)
    spec = {
        "version": ARTIFACT_VERSION, **identity, "stage": source,
        "pretrain": OmegaConf.to_container(cfg.pretrain, resolve=True), "data": data_spec,
        "amp": [cfg.amp, cfg.amp_dtype],  # bf16 and fp32 pretexts are different artifacts
        "compile": bool(cfg.compile),  # inductor's kernels round differently from eager ones
        "parent": {k: str(v) for k, v in (parent or {}).items()},
    }
    key = config_hash(spec, length=16)
    folder = artifact_root(cfg) / identity["family"] / key
    with locked(folder):
        if (folder / "pretext.safetensors").exists():
            return folder
        _pretrain(method, cfg, dataset, parent, folder, spec, source)
    return folder


def _init_pretext(method: Any, cfg: DictConfig, pretext: nn.Module, parent: dict[str, Any] | None) -> dict:
    if not parent:
        return {"init": "random"}
    if "artifact" in parent:
        state = method.transfer(load_file(str(Path(parent["artifact"]) / "pretext.safetensors")), pretext)
        report = load_into(pretext, state, f"artifact {Path(parent['artifact']).name}", what="pretext")
        return {"init": f"artifact {Path(parent['artifact']).name}", "load_report": report.summary()}
    state, source = public_encoder_state(method, cfg, method.pretext_encoder(pretext))
    report = load_into(method.pretext_encoder(pretext), state, source,
                       require_all=method.public_weights.require_all_encoder_keys)
    extra = method.load_public_extras(pretext, cfg) if hasattr(method, "load_public_extras") else {}
    return {"init": source, "load_report": report.summary(), **extra}


def _pretrain(method: Any, cfg: DictConfig, dataset: Dataset, parent: dict | None, folder: Path,
              spec: dict, source: str) -> None:
    from bench.engine import amp_dtype, make_optimizer, memory_format, seed_everything, select_device, to_device

    p = cfg.pretrain
    seed_everything(p.seed, cfg.deterministic)
    device = select_device(cfg)
    dtype = amp_dtype(cfg, device)
    pretext = method.build_pretext_for(source).to(device)
    init = _init_pretext(method, cfg, pretext.cpu(), parent)
    fmt = memory_format(method, cfg)
    pretext = pretext.to(device, memory_format=fmt)
    step_pretext = torch.compile(pretext) if cfg.compile else pretext  # shares pretext's parameters
    loader = DataLoader(dataset, batch_size=min(p.batch_size, len(dataset)), shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(p.seed), num_workers=cfg.num_workers)
    if len(loader) == 0:
        raise BenchError(f"pretraining data of {method.name} ({source}) has {len(dataset)} items, fewer than one batch")
    optimizer = make_optimizer(pretext, "adamw", p.lr, p.weight_decay, betas=(0.9, 0.95))
    total = p.epochs * len(loader)
    scheduler = CosineLRScheduler(optimizer, t_initial=total, lr_min=p.lr * 0.01, t_in_epochs=False,
                                  warmup_t=int(round(p.warmup_epochs * len(loader))), warmup_lr_init=p.lr * 0.01)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    curve, step, started, t0 = [], 0, now(), time.perf_counter()
    bar = tqdm(range(p.epochs), desc=f"pretrain {method.name} ({source})", disable=not cfg.progress, leave=False)
    for epoch in bar:
        dataset.epoch = epoch
        pretext.train()
        sums: dict[str, float] = {}
        batches = 0
        for x in loader:
            x = to_device(x, device, fmt)
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                parts = step_pretext(x)
            loss = parts["loss"].float()
            if not torch.isfinite(loss):
                raise BenchError(f"pretraining of {method.name} diverged at epoch {epoch}; lower pretrain.lr={p.lr}")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            step += 1
            scheduler.step_update(step)
            for name, value in parts.items():
                sums[name] = sums.get(name, 0.0) + float(value.detach())
            batches += 1
        curve.append({"epoch": epoch, **{k: v / batches for k, v in sums.items()}, "lr": optimizer.param_groups[0]["lr"]})
        bar.set_postfix(loss=f"{curve[-1]['loss']:.4f}")
    elapsed = time.perf_counter() - t0
    stage = folder.with_name(f".{folder.name}.staging")
    stage.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in pretext.state_dict().items()}
    save_file(state, str(stage / "pretext.safetensors"))
    record = {"spec": spec, "source": source, "init": init, "curve": curve, "steps": step,
              "train_s": elapsed, "s_per_epoch": elapsed / max(p.epochs, 1), "n_items": len(dataset),
              "n_params": sum(t.numel() for t in pretext.parameters()), "started": started, "finished": now(),
              "env": environment()}
    write_text_atomic(stage / "pretrain.json", dumps(record))
    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    stage.rename(folder)


def encoder_init(method: Any, cfg: DictConfig, model: nn.Module) -> dict[str, Any]:
    """Initialise the classifier's encoder as the run's regime says; returns what was done."""
    regime = cfg.regime
    target = method.finetune_encoder(model)
    if regime == "scratch":
        return {"init": "random"}
    plan = method.pretraining_plan(regime)
    if not plan:
        return {"init": "random", "plan": plan}
    if plan == ["public"] and cfg.weights.public:
        state, source = public_encoder_state(method, cfg, target)
        report = load_into(target, state, source, require_all=method.public_weights.require_all_encoder_keys)
        return {"init": source, "load_report": report.summary(), "plan": plan}
    if method.pretext_input is None:
        raise BenchError(f"method '{method.name}' has no pretext task, so regime '{regime}' needs weights.public")
    parent: dict[str, Any] | None = None
    folder = None
    for stage in plan:
        if stage == "public" and cfg.weights.public:
            path, digest = public_file(method, cfg)
            parent = {"public_file": digest}
            continue
        folder = ensure_artifact(method, cfg, stage, parent)
        parent = {"artifact": folder}
    assert folder is not None
    record = json.loads((folder / "pretrain.json").read_text())
    pretext = method.build_pretext_for(record["source"])
    pretext.load_state_dict(load_file(str(folder / "pretext.safetensors")))
    state = method.transfer(method.pretext_encoder_state(pretext), target)
    report = load_into(target, state, f"artifact {folder.name}")
    return {"init": f"artifact {folder.name}", "artifact": str(folder), "load_report": report.summary(), "plan": plan,
            "pretrain_curve": record["curve"], "pretrain_s": record["train_s"],
            "pretrain_source": record["source"], "pretrain_init": record["init"]}
