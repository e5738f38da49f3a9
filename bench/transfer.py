"""How pretrained tensors reach the finetuning model: the real public file, or a pretraining
artifact, mapped by the method's `transfer` and checked key by key.

`check_contract` builds the pretext and the finetuning model and dry-runs the key mapping before
any pretraining starts (as nnssl checks its adaptation plan up front), so a layout mismatch fails
in seconds, not after hours of pretraining.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from safetensors.torch import load_file
from torch import nn

from bench.config import pretrain_seed
from bench.errors import BenchError
from bench.weights import fetch, load_into, read_checkpoint, sha256_of, unwrap_state_dict


def public_file(method: Any, cfg: DictConfig) -> tuple[Path, str]:
    """The real public checkpoint named by weights.public, fetched and hashed."""
    from bench.datasets.loading import cache_root

    spec = method.public_weights
    if spec is None:
        raise BenchError(f"method '{method.name}' has no public weights layout; weights.public cannot be used")
    path = fetch(cfg.weights.public, cfg.weights.sha256 or spec.sha256, cache_root(cfg) / "weights", cfg.weights.dir)
    return path, sha256_of(path)


def public_encoder_state(method: Any, cfg: DictConfig,
                         target: nn.Module) -> tuple[dict[str, torch.Tensor], str, int, str]:
    """The encoder tensors of the real public file, in the layout of `target`, its source, how many
    of the file's tensors the method's key mapping left out (decoders, heads), and its sha256."""
    path, digest = public_file(method, cfg)
    spec = method.public_weights
    try:
        raw = (spec.unwrap or unwrap_state_dict)(read_checkpoint(path))
    except BenchError as exc:
        message = str(exc)
        raise BenchError(message if message.startswith("weights '") else f"weights '{path}': {message}") from None
    state = method.transfer(spec.convert(raw, target), target)
    if not state:
        sample = ", ".join(list(raw)[:4])
        raise BenchError(f"weights '{path}': none of its keys is an encoder key of {method.name} (the file's keys "
                         f"look like: {sample}); expected the layout {spec.layout}")
    return state, f"{path} (sha256 {digest[:12]})", max(len(raw) - len(state), 0), digest


def load_public(method: Any, cfg: DictConfig, target: nn.Module) -> dict[str, Any]:
    state, source, left_out, digest = public_encoder_state(method, cfg, target)
    report = load_into(target, state, source, optional=tuple(method.optional_encoder_keys()))
    summary = report.summary()
    summary["ignored_outside_encoder"] += left_out
    return {"init": source, "load_report": summary, "public_file_sha256": digest}


def pretext_from_artifact(method: Any, folder: Path) -> nn.Module:
    """The pretext model of an artifact folder (written by this suite: safetensors, no pickle)."""
    record = json.loads((folder / "pretrain.json").read_text())
    pretext = method.build_pretext(record["source"])
    pretext.load_state_dict(load_file(str(folder / "pretext.safetensors")))
    return pretext


def mismatches(method: Any, state: dict[str, torch.Tensor], target: nn.Module) -> list[str]:
    """Finetuning-encoder tensors that `state` does not provide by name and shape."""
    optional = set(method.optional_encoder_keys())
    out = []
    for key, tensor in target.state_dict().items():
        if key.endswith("num_batches_tracked") or key in optional:
            continue
        if key not in state:
            out.append(f"{key} (missing)")
        elif tuple(state[key].shape) != tuple(tensor.shape):
            out.append(f"{key} (pretext {tuple(state[key].shape)} vs finetuning {tuple(tensor.shape)})")
    return out


def check_contract(method: Any, plan: list[str]) -> None:
    """Build the pretext of the plan's last stage and the finetuning model, map the pretext's
    encoder tensors onto the finetuning encoder, and fail with one line if any is left over."""
    if not plan:
        return
    stage = plan[-1]
    pretext = method.build_pretext(stage)
    target = method.finetune_encoder(method.build_model())
    bad = mismatches(method, method.transfer(method.pretext_encoder_state(pretext), target), target)
    if bad:
        shown = ", ".join(bad[:6]) + (f", ... ({len(bad)} in all)" if len(bad) > 6 else "")
        raise BenchError(f"method '{method.name}': the pretext encoder ({stage} stage) does not provide the "
                         f"finetuning encoder's tensors: {shown}; nothing was pretrained")


def initialise_encoder(method: Any, cfg: DictConfig, model: nn.Module, artifact: Path | None) -> dict[str, Any]:
    """Initialise the classifier's encoder as the run's regime says; returns what was done."""
    plan = method.pretraining_plan(cfg.regime)
    target = method.finetune_encoder(model)
    if not plan:
        return {"init": "random", "plan": plan}
    if artifact is None:  # the plan is the real public file alone
        return {**load_public(method, cfg, target), "plan": plan}
    record = json.loads((artifact / "pretrain.json").read_text())
    state = method.transfer(method.pretext_encoder_state(pretext_from_artifact(method, artifact)), target)
    report = load_into(target, state, f"artifact {artifact.name}", optional=tuple(method.optional_encoder_keys()))
    return {"init": f"artifact {artifact.name}", "artifact": str(artifact), "load_report": report.summary(),
            "plan": plan, "pretrain_curve": record["curve"], "pretrain_s": record["train_s"],
            "pretrain_source": record["source"], "pretrain_init": record["init"],
            "pretrain_seed": pretrain_seed(cfg), "pretrain_seed_pinned": cfg.pretrain.seed is not None,
            "public_file_sha256": _public_parent(artifact)}


def _public_parent(artifact: Path) -> str | None:
    """The sha256 of the real public file an artifact's chain of stages started from, if any."""
    while artifact is not None:
        parent = json.loads((artifact / "pretrain.json").read_text())["spec"].get("parent", {})
        if "public_file" in parent:
            return parent["public_file"]
        artifact = Path(parent["artifact"]) if "artifact" in parent else None
    return None
