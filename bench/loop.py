"""The one training loop, under pretraining and finetuning alike.

The loop owns what every stage shares: device, AMP, `torch.compile`, memory format, the optimiser
over parameter groups (timm's factory with torch's fused kernels), the cosine schedule with linear
warmup (timm's, which honours a group's `lr_scale`), gradient clipping, the non-finite-loss guard,
progress, RNG states, and the per-epoch training state from which an interrupted stage resumes
exactly. A stage (see `Stage`) supplies the model to train, its batches, its step and its hooks;
it never re-implements the loop. AMP and compile work on CPU too, so the CPU tests cover the GPU
paths.
"""
from __future__ import annotations

import contextlib
import os
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from bench.errors import BenchError


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def keep_freed_memory() -> None:
    """Keep the memory of freed tensors in the process (glibc's malloc) instead of handing it back to
    the operating system: by default every tensor above glibc's mmap threshold (a 16^3-patch MAE
    target is ~23 MB) is a fresh mapping whose pages fault in on first touch, each step again, which
    made the elementwise parts of a CPU training step several times slower than their arithmetic
    (tests/benchmarks/test_bench_models.py). Allocations up to 32 MiB (glibc's maximum threshold) come
    from the heap and freed heap memory is not trimmed. The price is a resident size that stays at
    its peak, as with the caching allocators PyTorch's CPU tuning guides recommend. Not glibc: a no-op."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    mallopt(m_mmap_threshold, 32 * 2**20)
    mallopt(m_trim_threshold, 2**31 - 1)
    mallopt(m_top_pad, 256 * 2**20)


def select_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise BenchError("device=cuda but no CUDA device is available; use device=auto or device=cpu")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware: AVX512-BF16 or AMX. oneDNN also accepts bf16 on
    AVX-512 CPUs without them, but emulates it, slower than fp32; and without AVX-512 bf16
    convolutions fall back to PyTorch's slow reference kernels (slow_conv3d). So only the instruction
    sets themselves count (torch.cpu's probes; oneDNN's own answer where torch has no probes)."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if all(probe is None for probe in probes):
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return any(bool(probe()) for probe in probes if probe is not None)


def amp_dtype(amp: bool, name: str, device: torch.device) -> torch.dtype | None:
    """None when AMP is off; fp16 on CUDA; bf16 on a CPU (fp16 autocast is poorly supported there).
    `amp_dtype=auto` on a CPU without native bf16 runs fp32 (`Execution.note` says so, and every run
    records the dtype it used); `amp_dtype=bf16` forces bf16 anyway."""
    if not amp:
        return None
    if name == "auto":
        if device.type == "cuda":
            return torch.float16
        return torch.bfloat16 if native_bf16() else None
    if name == "fp16" and device.type == "cpu":
        raise BenchError("amp_dtype=fp16 is not supported on CPU; use amp_dtype=bf16 or auto")
    return torch.float16 if name == "fp16" else torch.bfloat16


@dataclass
class Execution:
    """Where and how tensors run: device, autocast dtype, memory format, compile; and, for
    data-parallel training (`devices=N`), the device type of the workers."""

    device: torch.device
    dtype: torch.dtype | None
    memory_format: torch.memory_format
    compile: bool
    note: str = ""  # why the dtype differs from what the config asked for
    amp: tuple[bool, str] = (False, "auto")  # the config's (amp, amp_dtype), to choose the dtype on another device
    workers: str = ""  # "cuda" or "cpu": where data-parallel workers train; "": the device's own type

    @classmethod
    def of(cls, cfg: Any, method: Any) -> Execution:
        """channels_last_3d for the conv nets that declare it (`Method.channels_last`): oneDNN's and
        cuDNN's 3D convolutions with few channels run faster in it; `channels_last=false` turns it off.
        Data-parallel workers train on GPUs when this process has one or the config says device=cuda;
        a process that holds no GPU itself (a suite trial whose workers hold them) then evaluates on
        its CPU."""
        parallel = cfg.devices > 1
        if parallel and cfg.device == "cuda" and not torch.cuda.is_available():
            device = torch.device("cpu")
        else:
            device = select_device(cfg.device)
        if device.type == "cpu":
            keep_freed_memory()
        fmt = torch.channels_last_3d if cfg.channels_last and method.channels_last else torch.contiguous_format
        dtype = amp_dtype(cfg.amp, cfg.amp_dtype, device)
        note = "amp=true, but this CPU has no native bf16 kernels: fp32" if cfg.amp and dtype is None else ""
        if device.type == "cpu" and dtype == torch.bfloat16:
            note = "bf16, with 3D convolutions of input depth between 1 and the kernel's in fp32 (bench.numerics)"
        workers = ("cuda" if cfg.device == "cuda" or device.type == "cuda" else "cpu") if parallel else ""
        return cls(device, dtype, fmt, bool(cfg.compile), note, (bool(cfg.amp), str(cfg.amp_dtype)), workers)

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.") if self.dtype else "float32"

    @property
    def training_dtype_name(self) -> str:
        """The autocast dtype the training steps run in: this device's, or the workers' when they
        train on another device type."""
        if not self.workers or self.workers == self.device.type:
            return self.dtype_name
        dtype = amp_dtype(*self.amp, torch.device(self.workers))
        return str(dtype).removeprefix("torch.") if dtype else "float32"

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None)

    def to(self, batch: Any) -> Any:
        """A batch (a tensor, or a tuple/list/dict of them) on the device, 5-D tensors in the memory format."""
        if isinstance(batch, torch.Tensor):
            if batch.dim() == 5:
                return batch.to(self.device, non_blocking=True, memory_format=self.memory_format)
            return batch.to(self.device, non_blocking=True)
        if isinstance(batch, (list, tuple)):
            return type(batch)(self.to(b) for b in batch)
        if isinstance(batch, dict):
            return {k: self.to(v) for k, v in batch.items()}
        return batch

    def place(self, model: nn.Module) -> tuple[nn.Module, nn.Module]:
        """The model on the device, and the module to call in steps (compiled, sharing its parameters).
        Under CPU bf16 autocast the 3D convolutions whose bf16 kernel is wrong are guarded (bench.numerics)."""
        model = model.to(self.device, memory_format=self.memory_format)
        if self.device.type == "cpu" and self.dtype == torch.bfloat16:
            from bench.numerics import guard_bf16_convolutions

            guard_bf16_convolutions(model)
        return model, (torch.compile(model) if self.compile else model)


def make_optimizer(model_or_groups: nn.Module | list[dict[str, Any]], name: str, lr: float, weight_decay: float,
                   **kwargs: Any) -> torch.optim.Optimizer:
    """timm's optimiser factory (no weight decay on biases and norms when given a model) with torch's
    fused kernels: one multi-tensor kernel per step instead of a dozen elementwise ops per parameter
    tensor. Fused and per-tensor updates agree to rounding, and fused runs are deterministic too."""
    from timm.optim import create_optimizer_v2

    if name == "sgd":
        kwargs.setdefault("momentum", 0.9)
    return create_optimizer_v2(model_or_groups, opt=name, lr=lr, weight_decay=weight_decay, fused=True, **kwargs)


@dataclass
class Schedule:
    """The optimisation of one stage."""

    epochs: int
    lr: float
    min_lr: float
    weight_decay: float
    optimizer: str = "adamw"
    betas: tuple[float, float] | None = None  # None: the optimiser's default
    warmup_epochs: float = 1.0
    grad_clip: float = 0.0  # 0: no clipping
    lr_key: str = "lr"  # the config key to name when the loss diverges
    micro_batch: int | str = 0  # > 0: each batch runs in chunks of this many samples, one optimiser step per
    # batch; "auto": the largest chunk that fits the device (a probe step on CUDA; the whole batch on CPU)
    devices: int = 1  # > 1: data-parallel workers through Ray Train (bench.parallel), sharing the global batch

    @classmethod
    def of(cls, optim: Any, devices: int = 1, lr_key: str = "lr") -> Schedule:
        """The schedule of a stage's optimisation keys (bench.config.OptimConfig: the top-level keys for
        finetuning, `pretrain.*` for pretraining)."""
        return cls(epochs=optim.epochs, lr=optim.lr, min_lr=optim.min_lr, weight_decay=optim.weight_decay,
                   optimizer=optim.optimizer, betas=tuple(optim.betas), warmup_epochs=optim.warmup_epochs,
                   grad_clip=optim.grad_clip, lr_key=lr_key, micro_batch=optim.micro_batch, devices=devices)


class Stage:
    """What a stage gives the loop. Override `step`; the rest has working defaults."""

    name: str = "training"
    model: nn.Module  # the trained module (its parameters, state and checkpoints)
    step_model: nn.Module  # set by the loop: the module steps call (compiled when compile is on)
    loader: Iterable  # the training batches; `set_epoch` reseeds its augmentation and order

    def param_groups(self) -> list[dict[str, Any]] | None:
        """Optimiser parameter groups (each may set `lr_scale`, `weight_decay`); None: every
        trainable parameter, with no weight decay on biases and norms."""
        return None

    def set_epoch(self, epoch: int) -> None:
        for holder in (getattr(self.loader, "dataset", None), getattr(self.loader, "batch_sampler", None)):
            if hasattr(holder, "epoch"):
                holder.epoch = epoch

    def step(self, model: nn.Module, batch: Any) -> tuple[dict[str, torch.Tensor], int]:
        """The losses of one batch ({"loss": ..., other parts}), computed under autocast by `model`
        (the compiled module when compile is on), and the batch's number of samples."""
        raise NotImplementedError

    def before_optimiser_step(self, optimiser: torch.optim.Optimizer, step: int, total_steps: int) -> None:
        """The step's gradients are complete (summed over workers), the optimiser has not used them:
        e.g. a weight-decay schedule, or freezing a group by dropping its gradients. `step` counts the
        steps taken before this one (0 at the first)."""

    def after_step(self, step: int, total_steps: int) -> None:
        """After each optimiser step (e.g. an EMA teacher update); `step` counts the steps taken (1
        after the first)."""

    def batch_weight(self, batch: Any) -> float:
        """How much a (micro-)batch weighs in its batch's mean loss: its number of samples, or, for a
        class-weighted loss, its samples' class weights. Accumulated micro-batches are weighed by it,
        so their summed gradient is the whole batch's."""
        first = batch[0] if isinstance(batch, (list, tuple)) else batch
        return float(len(first))

    def end_epoch(self, epoch: int, record: dict[str, Any]) -> None:
        """After each epoch: may evaluate and add to the epoch's record."""

    def state(self) -> dict[str, Any]:
        """The stage's own part of the training state (tensors and plain containers only)."""
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        pass


def samples_in(batch: Any) -> int:
    """The number of samples of a batch (a tensor, or a tuple, list or dict of them: its first)."""
    first = batch[0] if isinstance(batch, (list, tuple)) else (next(iter(batch.values())) if isinstance(batch, dict)
                                                                else batch)
    return len(first)


def micro_batches(batch: Any, size: int) -> list[Any]:
    """`batch` in chunks of at most `size` samples along the first axis of every tensor in it (a
    tensor, or a tuple, list or dict of them); other items go to every chunk as they are."""
    n = samples_in(batch)
    if size <= 0 or n <= size:
        return [batch]
    starts = range(0, n, size)

    def cut(item: Any, start: int) -> Any:
        return item[start:start + size] if isinstance(item, torch.Tensor) and len(item) == n else item

    if isinstance(batch, dict):
        return [{k: cut(v, s) for k, v in batch.items()} for s in starts]
    if isinstance(batch, (list, tuple)):
        return [type(batch)(cut(v, s) for v in batch) for s in starts]
    return [cut(batch, s) for s in starts]


AUTO = "auto"


def largest_fitting(batch: int, fits: Callable[[int], bool]) -> int:
    """The largest divisor of `batch` for which `fits(size)` (tried from the whole batch down)."""
    for size in sorted((d for d in range(1, batch + 1) if batch % d == 0), reverse=True):
        if fits(size):
            return size
    raise BenchError("micro_batch=auto: not even one sample per step fits on this device; turn on "
                     "model.grad_checkpointing=true, lower the crop or use a smaller model")


@dataclass
class StepCost:
    flops: float  # forward + backward, per sample
    activation_bytes: float  # kept for backward, per sample
    seconds: float  # the whole step on this machine


def measured_step(model: nn.Module, loss_of: Callable[[nn.Module], torch.Tensor], batch: int) -> StepCost:
    """One forward / backward / AdamW step of `model` on `loss_of(model)`, outside a training run,
    with its FLOPs (torch's FLOP counter) and the bytes of the tensors saved for backward, per
    sample (`bench cost`)."""
    from bench.checkpointing import saved_activation_bytes
    from bench.flops import counted

    model.train()
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    start = time.perf_counter()

    def forward_backward() -> tuple[int, torch.Tensor]:
        saved, loss = saved_activation_bytes(lambda: loss_of(model))
        loss.backward()
        return saved, loss

    (saved, loss), flops = counted(forward_backward)
    optimiser.step()
    if not torch.isfinite(loss):
        raise RuntimeError(f"non-finite loss {float(loss)}")
    return StepCost(flops / batch, float(saved) / batch, time.perf_counter() - start)


@dataclass
class LoopResult:
    history: list[dict[str, Any]]
    steps: int
    train_s: float
    first_epoch: int  # > 0 when resumed
    micro_batch: int = 0  # the chunk size the batches ran in (0: whole batches)
    flops: float = 0.0  # of the steps run here: one step's count (bench.flops) times the steps
    data_s: float = 0.0  # of train_s, the time spent waiting for the loader's next batch


OnEpoch = Callable[[dict[str, Any], Callable[[], dict[str, Any]]], None]


class TrainingLoop:
    """Run a stage for `schedule.epochs` epochs, resumable from any epoch's training state."""

    def __init__(self, stage: Stage, schedule: Schedule, execution: Execution, progress: bool = True) -> None:
        self.stage, self.schedule, self.execution, self.progress = stage, schedule, execution, progress
        self.model, self.step_model = execution.place(stage.model)
        stage.model, stage.step_model = self.model, self.step_model
        s = schedule
        extra = {"betas": tuple(s.betas)} if s.betas else {}
        self.optimizer = make_optimizer(stage.param_groups() or self.model, s.optimizer, s.lr, s.weight_decay, **extra)
        self.steps_per_epoch = len(stage.loader)
        self.total_steps = s.epochs * self.steps_per_epoch
        from timm.scheduler import CosineLRScheduler

        self.scheduler = CosineLRScheduler(
            self.optimizer, t_initial=self.total_steps, lr_min=s.min_lr, t_in_epochs=False,
            warmup_t=int(round(s.warmup_epochs * self.steps_per_epoch)), warmup_lr_init=s.lr * 0.01)
        self.scaler = torch.amp.GradScaler("cuda", enabled=execution.dtype == torch.float16)
        self.step, self.epoch, self.history = 0, -1, []
        self.rank, self.world = 0, 1  # set by bench.parallel inside each data-parallel worker
        self.rank_seed = 0  # the base of the workers' per-epoch seeds for in-step randomness (bench.parallel)
        # counted on the first step this process runs (not under torch.compile: the counter breaks graphs)
        self.flops_per_step: float | None = 0.0 if execution.compile else None
        self.micro_batch = self._probe_micro_batch() if s.micro_batch == AUTO else int(s.micro_batch)

    def retarget(self, device: torch.device) -> None:
        """Move the loop to `device` (a data-parallel worker's GPU, or back to the driver): the model
        and the stage's own modules, the autocast dtype the config asks for there, the fp16 loss
        scaler, and `micro_batch=auto` probed on the new device."""
        execution = self.execution
        execution.device = device
        execution.dtype = amp_dtype(*execution.amp, device)
        self.model.to(device, memory_format=execution.memory_format)
        for value in vars(self.stage).values():
            if isinstance(value, nn.Module) and value is not self.model:
                value.to(device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=execution.dtype == torch.float16)
        if self.schedule.micro_batch == AUTO:
            self.micro_batch = self._probe_micro_batch()

    def _probe_micro_batch(self) -> int:
        """micro_batch=auto: on CUDA, the largest divisor of the batch whose forward and backward fit,
        probed on the stage's first samples with the random state and BatchNorm statistics restored
        afterwards (the probe changes nothing the run computes); elsewhere the whole batch (0)."""
        if self.execution.device.type != "cuda":
            return 0
        from torch.utils.data import default_collate

        from bench.checkpointing import statistics_frozen

        loader = self.stage.loader
        size = getattr(loader, "batch_size", None) or len(next(iter(loader.batch_sampler)))
        dataset = loader.dataset
        batch = self.execution.to(default_collate([dataset[i % len(dataset)] for i in range(size)]))

        def fits(chunk_size: int) -> bool:
            chunk = micro_batches(batch, chunk_size)[0]
            try:
                with torch.random.fork_rng(devices=[self.execution.device]), statistics_frozen(self.model):
                    with self.execution.autocast():
                        loss = self.stage.step(self.step_model, chunk)[0]["loss"].float()
                    loss.backward()
                return True
            except torch.cuda.OutOfMemoryError:
                return False
            finally:
                self.optimizer.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()

        chosen = largest_fitting(size, fits)
        return 0 if chosen == size else chosen

    def run(self, on_epoch: OnEpoch | None = None, resume: dict[str, Any] | None = None) -> LoopResult:
        if self.schedule.devices > 1 and self.world == 1:
            from bench.parallel import run_data_parallel

            return run_data_parallel(self, on_epoch, resume)
        return self.run_here(on_epoch, resume)

    def run_here(self, on_epoch: OnEpoch | None = None, resume: dict[str, Any] | None = None) -> LoopResult:
        """The epochs in this process (one of the workers when data-parallel: rank 0 alone evaluates,
        reports and checkpoints)."""
        first = 0
        if resume is not None:
            first = self.restore(resume)
        t0 = time.perf_counter()
        lead = self.rank == 0
        bar = tqdm(range(first, self.schedule.epochs), desc=self.stage.name, disable=not (self.progress and lead),
                   leave=False)
        for epoch in bar:
            self.epoch = epoch
            record = {"epoch": epoch, **self._train_epoch(epoch)}
            bar.set_postfix(loss=f"{record['train_loss']:.4f}")
            if lead:
                self.stage.end_epoch(epoch, record)
            self.history.append(record)
            if on_epoch is not None and lead:
                on_epoch(record, self.state)
        steps_here = self.step - first * self.steps_per_epoch
        data_s = sum(e.get("data_s", 0.0) for e in self.history[first:])
        return LoopResult(self.history, self.step, time.perf_counter() - t0, first, self.micro_batch,
                          (self.flops_per_step or 0.0) * steps_here * self.world, data_s)

    def _train_epoch(self, epoch: int) -> dict[str, float]:
        stage, opt, clip = self.stage, self.optimizer, self.schedule.grad_clip
        t0 = time.perf_counter()
        stage.set_epoch(epoch)
        if self.world > 1:
            from bench.parallel import seed_rank

            seed_rank(self.rank_seed, epoch, self.rank)
        self.step_model.train()
        sums: dict[str, float] = {}
        seen, data_s = 0, 0.0
        batches = iter(stage.loader)
        while True:
            fetched = time.perf_counter()
            batch = next(batches, None)
            data_s += time.perf_counter() - fetched
            if batch is None:
                break
            opt.zero_grad(set_to_none=True)
            if self.flops_per_step is None:
                from bench.flops import counted

                seen, self.flops_per_step = counted(lambda b=batch, s=seen: self._accumulate(b, epoch, sums, s))
            else:
                seen = self._accumulate(batch, epoch, sums, seen)
            if self.world > 1:
                from bench.parallel import sum_gradients

                sum_gradients(self.model)
            stage.before_optimiser_step(opt, self.step, self.total_steps)
            if clip > 0:
                self.scaler.unscale_(opt)
                nn.utils.clip_grad_norm_(self.model.parameters(), clip)
            self.scaler.step(opt)
            self.scaler.update()
            self.step += 1
            self.scheduler.step_update(self.step)
            stage.after_step(self.step, self.total_steps)
        if self.world > 1:
            from bench.parallel import summed

            sums, seen = summed(sums, seen)
        means = {("train_loss" if k == "loss" else k): v / max(seen, 1) for k, v in sums.items()}
        return {**means, "lr": opt.param_groups[0]["lr"], "train_s": time.perf_counter() - t0, "data_s": data_s}

    def _accumulate(self, batch: Any, epoch: int, sums: dict[str, float], seen: int) -> int:
        """Forward and backward of one batch, in micro-batches when asked; the samples seen so far.
        Data-parallel, each worker takes its shard of the global batch, weighed by its share of the
        whole batch's loss, so the workers' summed gradients are the one-device step's."""
        whole = samples_in(batch)
        if self.world > 1:
            from bench.parallel import shard_of

            shards = shard_of(batch, self.world)
            total = sum(self.stage.batch_weight(s) for s in shards)
            chunks = micro_batches(shards[self.rank], self.micro_batch) if self.rank < len(shards) else []
            weights = [self.stage.batch_weight(c) for c in chunks]
        else:
            chunks = micro_batches(batch, self.micro_batch)
            weights = [self.stage.batch_weight(c) for c in chunks] if len(chunks) > 1 else [1.0]
            total = sum(weights)
        for chunk, weight in zip(chunks, weights):
            with self.execution.autocast():
                parts, n = self.stage.step(self.step_model, self.execution.to(chunk))
            loss = parts["loss"].float()
            self._check_finite(loss, epoch)
            self.scaler.scale(loss * (weight / total)).backward()
            for key, value in parts.items():  # the batch's mean loss, whichever way it was split
                sums[key] = sums.get(key, 0.0) + float(value.detach()) * (weight / total) * whole
            seen += n
        return seen

    def _check_finite(self, loss: torch.Tensor, epoch: int) -> None:
        if torch.isfinite(loss):
            return
        name, key, lr = self.stage.name, self.schedule.lr_key, self.schedule.lr
        if not all(torch.isfinite(p).all() for p in self.model.parameters()):
            raise BenchError(f"{name}: the model's weights hold NaN or Inf at epoch {epoch} (loss "
                             f"{float(loss.detach())}); they came so from its initialisation or weights, "
                             f"or diverged: lower {key}={lr} if it trained")
        raise BenchError(f"{name} diverged at epoch {epoch} (loss {float(loss.detach())}); lower {key}={lr}")

    def state(self) -> dict[str, Any]:
        """Everything `run(resume=...)` needs, in types that torch.load(weights_only=True) accepts."""
        np_state, py_state = np.random.get_state(), random.getstate()
        return {"model": {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()},
                "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(), "step": self.step,
                "epoch": self.epoch, "history": self.history, "stage": self.stage.state(),
                "rng": {"torch": torch.get_rng_state(), "python": [py_state[0], list(py_state[1]), py_state[2]],
                        "numpy": torch.from_numpy(np_state[1].astype(np.int64)), "numpy_pos": list(np_state[2:])}}

    def restore(self, state: dict[str, Any]) -> int:
        """The training state of `state()` back in place; the epoch to continue from."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.history = state["step"], list(state["history"])
        self.stage.load_state(state["stage"])
        self.scheduler.step_update(self.step)
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        random.setstate((rng["python"][0], tuple(rng["python"][1]), rng["python"][2]))
        np.random.set_state(("MT19937", rng["numpy"].numpy().astype(np.uint32), *rng["numpy_pos"]))
        return state["epoch"] + 1
