"""The self-supervised pretraining stage: a method's pretext task trained through the shared loop.

A regime's plan (bench.regimes, or the method's own `pretraining_plan`) is a list of stages: the
out-of-domain corpus for `public` (body-CT patches or videos on the embedded default), the
unlabelled vertebrae for `vertebrae`. Each stage leaves an artifact named by the hash of everything
that made it (method, model keys, pretraining keys, data, parent artifact or public file hash),
built once under a file lock and reused by every run that needs it. The stage's seed is the run's
unless `pretrain.seed` pins it, so the seeds of a cell sample pretraining as well as initialisation. Its folder
holds the whole pretext model (safetensors), the per-epoch loss curve, the config and the
environment. An interrupted stage resumes from its last epoch: the training state of each epoch
is kept in the artifact's staging folder until the artifact is complete.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset

from bench.config import config_hash, pretext_crop_size, pretrain_seed
from bench.datasets.pretext import WithViews, pretext_dataset
from bench.envinfo import environment, now
from bench.errors import BenchError
from bench.locks import locked
from bench.loop import Execution, Schedule, Stage, TrainingLoop, seed_everything
from bench.methods.pretext import PretextTask
from bench.store import dumps, write_text_atomic
from bench.transfer import PUBLIC, check_contract, initialise, public_file

ARTIFACT_VERSION = 4  # bumped whenever a pretext task changes what it computes
STATE_FILE = "training_state.pt"


class PretextStage(Stage):
    """One pretraining stage for the loop: the method's pretext (a PretextTask, whose hooks the loop
    calls through this stage), its data and its sample views."""

    def __init__(self, method: Any, pretext: PretextTask, dataset: Dataset, cfg: DictConfig, stage: str) -> None:
        p = cfg.pretrain
        self.model, self.name = pretext, f"pretraining of {method.name} ({stage})"
        self.generator = torch.Generator().manual_seed(pretrain_seed(cfg))
        if pretext.sample_views is not None:
            dataset = WithViews(dataset, pretext.sample_views, pretrain_seed(cfg))
        self.loader = DataLoader(dataset, batch_size=min(p.batch_size, len(dataset)), shuffle=True, drop_last=True,
                                 generator=self.generator, num_workers=cfg.num_workers)
        if len(self.loader) == 0:
            raise BenchError(f"pretraining data of {method.name} ({stage}) has {len(dataset)} items, "
                             "fewer than one batch")
        self.epochs, self.logged = p.epochs, {}

    def param_groups(self) -> list[dict[str, Any]] | None:
        return self.model.param_groups()

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.logged = self.model.on_epoch(epoch, self.epochs) or {}

    def step(self, model: nn.Module, batch: Any) -> tuple[dict[str, torch.Tensor], int]:
        first = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self.model.step(model, batch), len(first)

    def before_optimiser_step(self, optimiser: torch.optim.Optimizer, step: int, total_steps: int) -> None:
        self.model.before_optimiser_step(optimiser, step, total_steps)

    def after_step(self, step: int, total_steps: int) -> None:
        self.model.on_step(step, total_steps)

    def end_epoch(self, epoch: int, record: dict[str, Any]) -> None:
        record["loss"] = record.pop("train_loss")
        record.update(self.logged)

    def state(self) -> dict[str, Any]:
        return {"loader_rng": self.generator.get_state()}

    def load_state(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["loader_rng"])


def pretrain_identity(cfg: DictConfig) -> dict[str, Any]:
    """The pretraining keys that name an artifact: the effective seed, and `micro_batch` and `devices`
    only when they split batches (BatchNorm statistics then come from the chunks or shards, and
    in-step randomness is drawn per shard)."""
    keys = {**OmegaConf.to_container(cfg.pretrain, resolve=True), "seed": pretrain_seed(cfg)}
    keys.pop("data")  # the pretraining data is named, by content, in the artifact's data spec
    if not keys.get("micro_batch"):
        keys.pop("micro_batch", None)
    if cfg.devices > 1:
        keys["devices"] = int(cfg.devices)
    return keys


def code_digest(method: Any) -> str:
    """The sha256 of the source files that define the method's class and its bases (a plugin's own
    file, where its pretext is written, included) and of the pretext base classes
    (bench.methods.pretext): an edit to the pretext's code makes a new artifact instead of reusing
    one the old code made. Harness changes are covered by ARTIFACT_VERSION."""
    import hashlib
    import inspect

    digest = hashlib.sha256()
    classes = [*type(method).__mro__, PretextTask]
    files = sorted({inspect.getsourcefile(cls) for cls in classes if cls is not object} - {None})
    for path in files:
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()[:16]


def artifact_root(cfg: DictConfig) -> Path:
    from bench.datasets.loading import cache_root

    return cache_root(cfg) / "pretrain"


def run_plan(method: Any, cfg: DictConfig, execution: Execution | None = None) -> Path | None:
    """Run (or find) every pretraining stage of the run's regime under the run's `execution`; the last
    artifact's folder, or None when the plan is empty or is the real public file alone."""
    plan = method.pretraining_plan(cfg.regime)
    if not plan or (plan == ["public"] and cfg.weights.public):
        return None
    if not method.has_pretext:
        raise BenchError(f"method '{method.name}' has no pretext task, so regime '{cfg.regime}' needs weights.public")
    checked: list[bool] = []

    def check_once() -> None:  # only when an artifact must be built: cached ones were checked then
        if not checked:
            check_contract(method, plan)
            checked.append(True)

    parent: dict[str, Any] | None = None
    folder = None
    for stage in plan:
        if stage == "public" and cfg.weights.public:
            parent = {"public_file": public_file(method, cfg)[1]}
            continue
        folder = ensure_artifact(method, cfg, stage, parent, before_build=check_once,
                                 execution=execution or Execution.of(cfg, method))
        parent = {"artifact": folder}
    return folder


def ensure_artifact(method: Any, cfg: DictConfig, stage: str, parent: dict[str, Any] | None,
                    before_build: Any = None, execution: Execution | None = None) -> Path:
    """The folder of the pretext model pretrained on `stage` ("public" or "vertebrae") from `parent`
    (None: random init; {"artifact": path} or {"public_file": sha256}); built only if missing, after
    `before_build()` (the transfer-contract check)."""
    execution = execution or Execution.of(cfg, method)
    dataset, data_spec = pretext_dataset(method, cfg, stage, pretrain_seed(cfg), pretext_crop_size(cfg))
    identity = method.artifact_key(stage)
    spec = {
        "version": ARTIFACT_VERSION, **identity, "stage": stage,
        "pretrain": pretrain_identity(cfg),
        "data": data_spec,
        "dtype": execution.training_dtype_name,  # bf16 and fp32 pretexts are different artifacts
        "compile": bool(cfg.compile),  # inductor's kernels round differently from eager ones
        "code": code_digest(method),
        "parent": {k: str(v) for k, v in (parent or {}).items()},
    }
    folder = artifact_root(cfg) / identity["family"] / config_hash(spec, length=16)
    with locked(folder):
        if not (folder / "pretext.safetensors").exists():
            if before_build is not None:
                before_build()
            _pretrain(method, cfg, dataset, parent, folder, spec, stage)
    return folder


def _resume_state(stage_folder: Path) -> dict[str, Any] | None:
    """The last epoch's training state of an interrupted build (a file this suite wrote)."""
    path = stage_folder / STATE_FILE
    return torch.load(path, weights_only=True) if path.is_file() else None


def _pretrain(method: Any, cfg: DictConfig, dataset: Dataset, parent: dict | None, folder: Path,
              spec: dict, stage: str) -> None:
    p = cfg.pretrain
    seed_everything(pretrain_seed(cfg), cfg.deterministic)
    pretext = method.make_pretext(stage)
    init = {"init": "random"} if not parent else \
        initialise(method, cfg, pretext, parent["artifact"] if "artifact" in parent else PUBLIC)
    staging = folder.with_name(f".{folder.name}.staging")
    staging.mkdir(parents=True, exist_ok=True)
    stage_of_loop = PretextStage(method, pretext, dataset, cfg, stage)
    loop = TrainingLoop(stage_of_loop, Schedule.of(p, cfg.devices, "pretrain.lr"), Execution.of(cfg, method),
                        progress=cfg.progress)
    started = now()

    def keep(record: dict[str, Any], state: Any) -> None:
        torch.save(state(), staging / f".{STATE_FILE}.tmp")
        (staging / f".{STATE_FILE}.tmp").replace(staging / STATE_FILE)

    result = loop.run(on_epoch=keep, resume=_resume_state(staging))
    # cloned: safetensors refuses keys that alias one tensor (nnU-Net blocks name a conv twice)
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in loop.model.state_dict().items()},
              str(staging / "pretext.safetensors"))
    record = {"spec": spec, "source": stage, "init": init, "curve": result.history, "steps": result.steps,
              "train_s": result.train_s, "data_s": result.data_s, "flops": result.flops,
              "threads": torch.get_num_threads(),
              "s_per_epoch": result.train_s / max(p.epochs - result.first_epoch, 1),
              "resumed_at_epoch": result.first_epoch or None, "n_items": len(dataset),
              "n_params": sum(t.numel() for t in loop.model.parameters()), "started": started, "finished": now(),
              "env": environment()}
    write_text_atomic(staging / "pretrain.json", dumps(record))
    (staging / STATE_FILE).unlink()
    if folder.exists():  # an incomplete folder of ours (no pretext.safetensors), under our lock
        shutil.rmtree(folder)
    staging.rename(folder)
