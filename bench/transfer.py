"""Where pretrained tensors reach a model, in one place: `initialise` fills a target (a pretext, or
the classifier) from a source (the run's public file, or a pretraining artifact), through the
method's key mapping (`transfer`), and checks every encoder tensor by name and shape
(bench.weights.load_into). File reading, hashing and the publishers' key layouts stay in
bench.weights and next to each model.

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
from bench.methods.pretext import PretextTask
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


def pretext_from_artifact(method: Any, folder: Path) -> nn.Module:
    """The pretext model of an artifact folder (written by this suite: safetensors, no pickle)."""
    record = json.loads((folder / "pretrain.json").read_text())
    pretext = method.make_pretext(record["source"])
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
    pretext = method.make_pretext(stage)
    target = method.finetune_encoder(method.build_model())
    bad = mismatches(method, method.transfer(pretext.encoder_state(), target), target)
    if bad:
        shown = ", ".join(bad[:6]) + (f", ... ({len(bad)} in all)" if len(bad) > 6 else "")
        raise BenchError(f"method '{method.name}': the pretext encoder ({stage} stage) does not provide the "
                         f"finetuning encoder's tensors: {shown}; nothing was pretrained")


PUBLIC = "public file"  # the source `initialise` reads from the run's `weights.public`


def initialise(method: Any, cfg: DictConfig, target: nn.Module, source: str | Path) -> dict[str, Any]:
    """Fill `target` from `source` (PUBLIC, or an artifact folder) and say what was done.

    A PretextTask from an artifact takes the artifact's whole pretext state (the previous stage's),
    except what lies outside its encoder (decoders differ between stages); a PretextTask from the
    public file fills its `pretrained_encoder`; a classifier fills its `finetune_encoder` with the
    encoder tensors of either. Every encoder tensor must come by name and shape, or one error line."""
    optional = tuple(method.optional_encoder_keys())
    if isinstance(target, PretextTask):
        module = target if source != PUBLIC else target.pretrained_encoder()
    else:
        module = method.finetune_encoder(target)
    info: dict[str, Any] = {}
    left_out, what = 0, "encoder"
    if source == PUBLIC:
        state, name, left_out, digest = public_encoder_state(method, cfg, module)
        info["public_file_sha256"] = digest
    else:
        artifact = Path(source)
        name = f"artifact {artifact.name}"
        info["artifact"] = str(artifact)
        if isinstance(target, PretextTask):
            state = method.transfer(load_file(str(artifact / "pretext.safetensors")), target)
            optional, what = _beyond_encoder(method, target), "pretext"
        else:
            state = method.transfer(pretext_from_artifact(method, artifact).encoder_state(), module)
    report = load_into(module, state, name, optional=optional, what=what).summary()
    report["ignored_outside_encoder"] += left_out
    return {"init": name, **info, "load_report": report}


def _beyond_encoder(method: Any, pretext: PretextTask) -> tuple[str, ...]:
    """Pretext keys a previous stage's artifact may leave at their initialisation: everything
    outside the encoder (decoders differ between stages) and the method's optional encoder keys."""
    encoder = pretext.pretrained_encoder()
    prefix = next(name for name, module in pretext.named_modules() if module is encoder)
    prefix = f"{prefix}." if prefix else ""
    optional = {prefix + k for k in method.optional_encoder_keys()}
    return tuple(k for k in pretext.state_dict() if not k.startswith(prefix) or k in optional)


def initialise_encoder(method: Any, cfg: DictConfig, model: nn.Module, artifact: Path | None) -> dict[str, Any]:
    """Initialise the classifier's encoder as the run's regime says: at random, from the public file
    (a plan of the public stage alone), or from the plan's last artifact; returns what was done."""
    plan = method.pretraining_plan(cfg.regime)
    if not plan:
        return {"init": "random", "plan": plan}
    if artifact is None:
        return {**initialise(method, cfg, model, PUBLIC), "plan": plan}
    record = json.loads((artifact / "pretrain.json").read_text())
    return {**initialise(method, cfg, model, artifact), "plan": plan, "pretrain_curve": record["curve"],
            "pretrain_s": record["train_s"], "pretrain_source": record["source"], "pretrain_init": record["init"],
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
