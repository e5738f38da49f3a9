"""What each method costs at the `paper` preset, measured on this machine: `bench cost`.

Every method is built at the paper's architecture and takes one real training step (forward,
backward, AdamW step) at batch 2 (the smallest that BatchNorm heads train with; `batch=1` halves the
memory a large pretext needs on a small machine, for methods without such a head) on the input it
would see (96^3 crops, slice-view clips, videos), and one pretext step where it has a pretext, so
a shape or size problem of the paper preset shows here rather than on a user's GPU. While stepping,
torch's FLOP counter counts the step's floating point operations and a saved-tensor hook adds up
the activations kept for the backward pass.

From those: the projected GPU time per epoch (the paper's epoch sizes: 60 % of 6,245 labelled
vertebrae for finetuning, 27,776 unlabelled vertebrae for pretraining) at a stated fraction of the
GPU's dense bf16 peak (MFU), and the training memory at the preset's batch sizes (fp32 weights,
gradients and AdamW moments, plus fp32 activations times the batch: an upper bound, bf16 autocast
keeps roughly half the activations).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import default_collate

from bench.loop import measured_step

GPU_PEAK_BF16 = {"A40": 149.7e12, "H100": 989.4e12}  # dense bf16 tensor-core FLOP/s, vendor datasheets
GPU_MEMORY_GB = {"A40": 48, "H100": 80, "H200": 141}  # vendor datasheets, decimal GB
USABLE = 0.9  # of a GPU's memory, for the CUDA context, the allocator's fragmentation and the data
FINETUNE_SAMPLES = round(0.6 * 6245)  # the paper's labelled training split (60 % of 6,245 vertebrae)
PRETRAIN_SAMPLES = 27776  # the paper's unlabelled vertebrae
PAPER_A40_FINETUNE_MIN = 9.0  # Video-CT MAE finetuning, minutes per epoch on one A40 (the paper, Table 2)


BATCH = 2


def _finetune_sample(method: Any, cfg: Any, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    from bench.datasets.base import VertebraSet
    from bench.evaluation import make_dataset

    rng = np.random.default_rng(0)
    images = rng.integers(-1000, 1000, (batch, cfg.crop_size, cfg.crop_size, cfg.crop_size)).astype(np.int16)
    label = np.arange(batch) % 2
    table = pd.DataFrame({"patient_id": [f"p{i}" for i in range(batch)], "vertebra": "L1", "label": label,
                          "grade": 2 * label, "split": "train", "crop_index": np.arange(batch)})
    dataset = make_dataset(method, cfg, VertebraSet(images, table, "cost"), augment=True)
    return default_collate([dataset[i] for i in range(batch)])


def _pretext_sample(method: Any, cfg: Any, stage: str, batch: int, sample_views: Any) -> Any:
    from bench.datasets import pretext as p

    rng = np.random.default_rng(0)
    kind, s = method.pretext_data_kind(stage), cfg.crop_size
    crops = rng.integers(-1000, 1000, (batch, s, s, s)).astype(np.int16)
    if kind == "volume":
        dataset = p.VolumeCorpus(crops, np.arange(batch), s, 0)
    elif kind == "segmentation":
        from bench.datasets.corpora import ORGANS

        dataset = p.OrganCorpus(crops, rng.integers(0, len(ORGANS), crops.shape).astype(np.uint8), 0)
    elif kind == "video":
        v, frames = cfg.synthetic.video_size, cfg.synthetic.video_frames
        dataset = p.VideoCorpus(rng.integers(0, 255, (batch, frames, v, v, 3)).astype(np.uint8), 0)
    else:
        views = cfg.views
        dataset = p.SliceCorpus(crops, np.arange(batch), np.zeros(batch), s, augment=True, seed=0, axis=views.axis,
                                frames=views.frames, channels=views.channels,
                                frame_size=method.view_options().get("frame_size", views.frame_size))
    if sample_views is not None:
        dataset = p.WithViews(dataset, sample_views, 0)
    return default_collate([dataset[i] for i in range(batch)])


def method_cost(name: str, preset: str = "paper", batch: int = BATCH,
                overrides: dict[str, str] | None = None, checkpointed: bool = False) -> dict[str, Any]:
    """The costs of one method at `preset` with config `overrides` (one real step of each kind at
    `batch`), per sample; with `checkpointed`, also the activations kept under
    `model.grad_checkpointing=true` (another step of each kind)."""
    row = _one_cost(name, preset, batch, overrides)
    if checkpointed:
        again = _one_cost(name, preset, batch, {**(overrides or {}), "model.grad_checkpointing": "true"})
        row["finetune_act_ckpt_gib"] = again["finetune_act_gib"]
        if "pretrain_act_gib" in again:
            row["pretrain_act_ckpt_gib"] = again["pretrain_act_gib"]
    return row


def _one_cost(name: str, preset: str, batch: int, overrides: dict[str, str] | None) -> dict[str, Any]:
    from bench.evaluation import forward_views
    from bench.registry import create_method
    from bench.run import resolve_runs

    cfg = resolve_runs({**(overrides or {}), "method": name, "regime": "scratch", "preset": preset,
                        "progress": "false"})[0]
    method = create_method(name, cfg)
    torch.manual_seed(0)
    model = method.build_model()
    x, y = _finetune_sample(method, cfg, batch)
    loss_fn = torch.nn.CrossEntropyLoss()

    def finetune_loss(m: torch.nn.Module) -> torch.Tensor:
        if x.dim() == 6:  # multi-view clips at training time would be a single view; count one view
            return loss_fn(forward_views(m, x[:, :1]).float(), y)
        return method.training_loss(m, x, y, loss_fn)

    finetune = measured_step(model, finetune_loss, batch)
    row: dict[str, Any] = {"method": name, "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
                           "finetune_gflop": finetune.flops / 1e9,
                           "finetune_act_gib": finetune.activation_bytes / 2**30,
                           "finetune_cpu_s": finetune.seconds, "batch": int(cfg.batch_size),
                           "pretrain_batch": int(cfg.pretrain.batch_size)}
    stage = next((s for s in ("vertebrae", "public") if method.pretext_data_kind(s) is not None), None)
    if stage is not None:
        pretext = method.make_pretext(stage)
        sample = _pretext_sample(method, cfg, stage, batch, pretext.sample_views)
        pre = measured_step(pretext, lambda m: pretext.step(m, sample)["loss"], batch)
        row.update(pretext_stage=stage, pretext_params_m=sum(p.numel() for p in pretext.parameters()) / 1e6,
                   pretrain_gflop=pre.flops / 1e9, pretrain_act_gib=pre.activation_bytes / 2**30,
                   pretrain_cpu_s=pre.seconds)
    return row


def gpu_gib(gpu: str) -> float:
    """The memory of `gpu` (a name in GPU_MEMORY_GB, or a number of GiB) in GiB."""
    if gpu.upper() in GPU_MEMORY_GB:
        return GPU_MEMORY_GB[gpu.upper()] * 1e9 / 2**30
    try:
        value = float(gpu)
    except ValueError:
        value = -1.0
    if value <= 0:
        from bench.errors import BenchError

        raise BenchError(f"bad value for 'gpu': '{gpu}'; expected {', '.join(GPU_MEMORY_GB)} or a size in GiB")
    return value


def fitting_setting(state_gib: float, act_gib: float, act_checkpointed_gib: float, batch: int,
                    memory_gib: float) -> str:
    """The cheapest setting under which one step of the global `batch` fits in `memory_gib`: the whole
    batch; else the largest micro-batch (a divisor of the batch) without, then with, activation
    checkpointing; else "does not fit". From the fp32 upper bound of the measured activations."""
    budget = USABLE * memory_gib - state_gib
    for act, extra in ((act_gib, ""), (act_checkpointed_gib, " + model.grad_checkpointing=true")):
        if pd.isna(act):
            continue
        fitting = [m for m in range(batch, 0, -1) if batch % m == 0 and act * m <= budget]
        if fitting:
            return ("fits" if fitting[0] == batch and not extra else f"micro_batch={fitting[0]}") + extra
    return "does not fit"


def fits(table: pd.DataFrame, gpu: str) -> pd.DataFrame:
    """Per method, the setting that fits finetuning and pretraining at the preset's batches on `gpu`."""
    memory = gpu_gib(gpu)
    table = table.copy()
    for stage, params, batch in (("finetune", "params_m", "batch"), ("pretrain", "pretext_params_m", "pretrain_batch")):
        if f"{stage}_act_gib" not in table:
            continue
        params_m = table.get(params, table.params_m).fillna(table.params_m)
        checkpointed = table.get(f"{stage}_act_ckpt_gib", pd.Series(np.nan, index=table.index))
        table[f"{stage}_fit"] = [
            "-" if pd.isna(act) else fitting_setting(p * 1e6 * 16 / 2**30, act, ck, int(b), memory)
            for p, act, ck, b in zip(params_m, table[f"{stage}_act_gib"], checkpointed, table[batch])]
    return table


def projections(rows: list[dict[str, Any]], mfu: float) -> pd.DataFrame:
    """Per method: minutes per epoch on each GPU at `mfu`, and training memory at the preset's batch sizes."""
    table = pd.DataFrame(rows)
    if "pretrain_gflop" not in table:
        table["pretrain_gflop"] = np.nan
        table["pretrain_act_gib"] = np.nan
    state_gib = table.params_m * 1e6 * 16 / 2**30  # fp32 weights + gradients + two AdamW moments
    for gpu, peak in GPU_PEAK_BF16.items():
        table[f"finetune_min_{gpu}"] = FINETUNE_SAMPLES * table.finetune_gflop * 1e9 / (peak * mfu) / 60
        table[f"pretrain_min_{gpu}"] = PRETRAIN_SAMPLES * table.pretrain_gflop * 1e9 / (peak * mfu) / 60
    table["finetune_mem_gib"] = state_gib + table.finetune_act_gib * table.batch
    pretext_params = table.get("pretext_params_m", table.params_m).fillna(table.params_m)
    table["pretrain_mem_gib"] = pretext_params * 1e6 * 16 / 2**30 + table.pretrain_act_gib * table.pretrain_batch
    return table


def fit_markdown(table: pd.DataFrame, gpu: str) -> str:
    """`bench cost gpu=...`: per method, whether the paper preset fits and what makes it fit."""
    lines = [f"| method | finetuning (batch) on {gpu} | pretraining (batch) on {gpu} |", "|---|---|---|"]
    for r in table.itertuples():
        lines.append(f"| `{r.method}` | {r.finetune_fit} ({r.batch}) | {getattr(r, 'pretrain_fit', '-')} "
                     f"({r.pretrain_batch}) |")
    lines += ["", f"{gpu}: {gpu_gib(gpu):.1f} GiB, {USABLE:.0%} of it usable; fp32 weights, gradients and AdamW "
              "moments plus the measured fp32 activations per sample times the micro-batch (bf16 autocast keeps "
              "about half: these are upper bounds)."]
    return "\n".join(lines)


def markdown(table: pd.DataFrame, mfu: float) -> str:
    """The Markdown table `bench cost` prints."""
    def num(v: float, digits: int = 1) -> str:
        return "-" if pd.isna(v) else f"{v:,.{digits}f}"

    lines = ["| method | params (M) | finetune GFLOP/sample | pretrain GFLOP/sample | finetune min/epoch A40 / H100 "
             "| pretrain min/epoch A40 / H100 | memory GiB finetune (batch) / pretrain (batch) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in table.itertuples():
        lines.append(f"| `{r.method}` | {num(r.params_m)} | {num(r.finetune_gflop)} | {num(r.pretrain_gflop)} | "
                     f"{num(r.finetune_min_A40)} / {num(r.finetune_min_H100)} | "
                     f"{num(r.pretrain_min_A40)} / {num(r.pretrain_min_H100)} | "
                     f"{num(r.finetune_mem_gib)} ({r.batch}) / {num(r.pretrain_mem_gib)} ({r.pretrain_batch}) |")
    ref = table[table.method == "video_ct_mae"]
    if len(ref):
        implied = FINETUNE_SAMPLES * float(ref.finetune_gflop.iloc[0]) * 1e9 / (
            PAPER_A40_FINETUNE_MIN * 60 * GPU_PEAK_BF16["A40"])
        lines.append("")
        lines.append(f"At MFU {mfu:.0%} of dense bf16 peak (A40 149.7, H100 989.4 TFLOP/s); epochs of "
                     f"{FINETUNE_SAMPLES:,} (finetuning) and {PRETRAIN_SAMPLES:,} (pretraining) vertebrae. The paper's "
                     f"{PAPER_A40_FINETUNE_MIN:g} min per Video-CT MAE finetuning epoch on an A40 implies an MFU of "
                     f"{implied:.1%} by these FLOP counts.")
    return "\n".join(lines)
