"""What `bench explain` computes from a run's model: the run loaded back, the explained vertebrae
chosen, the maps of bench.attribution that fit the model in the crop's frame, and the pretrained
pretext's reconstructions of the explained crops."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from bench import attribution
from bench.errors import BenchError
from bench.explain_output import write_reconstruction
from bench.explain_scores import normalised
from bench.store import MODEL_FILE


def load_run(folder: Path) -> tuple[DictConfig, Any, torch.nn.Module, pd.DataFrame]:
    """(config, method, model with the kept weights, test predictions) of a run folder."""
    from safetensors.torch import load_file

    from bench.config import _merge, compose
    from bench.registry import create_method, get_method

    files = [folder / f for f in ("config.yaml", "metrics.json", "predictions.parquet")]
    if not folder.is_dir() or not all(f.is_file() for f in files):
        raise BenchError(f"'{folder}' is not a run folder (expected config.yaml, metrics.json and predictions.parquet)")
    stored = OmegaConf.load(folder / "config.yaml")
    if stored.get("protocol", "finetune") != "finetune":
        raise BenchError(f"run '{folder}': protocol {stored.protocol} keeps no model to explain; "
                         f"expected a finetune run")
    if not (folder / MODEL_FILE).is_file():
        raise BenchError(f"run '{folder}' has no {MODEL_FILE} (it ran with save_model=false or before runs kept "
                         f"their model); rerun it to explain it")
    cls = get_method(str(stored.method))
    cfg = _merge(compose({"method": str(stored.method), "preset": str(stored.preset)}, cls), stored,
                 f"run '{folder}' config.yaml")
    method = create_method(cfg.method, cfg)
    from bench.evaluation import NUM_CLASSES

    model = method.build_model(num_classes=NUM_CLASSES[cfg.task])
    if cfg.head_init == "linear_probe":
        from bench.probes import probe_head_layout

        model.head = probe_head_layout(model.head, method)
    try:
        state = load_file(str(folder / MODEL_FILE))
    except Exception as exc:  # safetensors raises its own errors on a damaged header
        raise BenchError(f"run '{folder}': {MODEL_FILE} is not a readable safetensors file ({exc})") from None
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problems = sorted({*expected} ^ {*state}) + sorted(k for k in expected.keys() & state.keys()
                                                      if tuple(state[k].shape) != expected[k])
    if problems:
        raise BenchError(f"run '{folder}': {MODEL_FILE} does not fit method {cfg.method} ({len(problems)} "
                         f"tensors missing, unexpected or of another shape: {', '.join(problems[:5])})")
    model.load_state_dict(state)
    return cfg, method, model.eval(), pd.read_parquet(folder / "predictions.parquet")


def choose(predictions: pd.DataFrame, n: int) -> pd.DataFrame:
    """The explained vertebrae: the `n` most confident TP, FN and FP (ties by row order)."""
    p = predictions.reset_index(names="row")
    groups = {
        "TP": p[(p.label == 1) & (p.prediction == 1)].sort_values(["score", "row"], ascending=[False, True]),
        "FN": p[(p.label == 1) & (p.prediction == 0)].sort_values(["score", "row"], ascending=[True, True]),
        "FP": p[(p.label == 0) & (p.prediction == 1)].sort_values(["score", "row"], ascending=[False, True]),
    }
    return pd.concat([g.head(n).assign(kind=k) for k, g in groups.items()], ignore_index=True)


def _inputs(method: Any, cfg: DictConfig, crops: np.ndarray, multi_view: bool) -> torch.Tensor:
    """Model inputs of crops (k, X, Y, Z), built by the evaluation pipeline itself."""
    from bench.datasets.base import VertebraSet
    from bench.evaluation import make_dataset

    table = pd.DataFrame({"patient_id": [f"x{i}" for i in range(len(crops))], "vertebra": "x", "label": 0,
                          "grade": 0})
    dataset = make_dataset(method, cfg, VertebraSet(crops, table, "explain"))
    if method.input_format == "slices" and not multi_view:
        dataset.multi_view = False  # the centre view only: the frame maps go back to the crop from it
    return torch.stack([dataset[i][0] for i in range(len(crops))])


def fracture_probability(method: Any, cfg: DictConfig, model: torch.nn.Module, crops: np.ndarray) -> np.ndarray:
    from bench.evaluation import forward_views

    with torch.no_grad():
        logits = forward_views(model, _inputs(method, cfg, crops, multi_view=True)).float()
    return torch.softmax(logits, dim=1)[:, 1:].sum(dim=1).numpy()  # P(fractured), also for grades


def maps_of(method: Any, cfg: DictConfig, model: torch.nn.Module, crop: np.ndarray) -> dict[str, np.ndarray]:
    """Every map that fits the method, in the crop's frame, each scaled to sum 1."""
    x = _inputs(method, cfg, crop[None], multi_view=False)
    spatial = tuple(x.shape[2:])
    found: dict[str, torch.Tensor] = {}
    found["occlusion"] = attribution.occlusion(model, x, attribution.centred_cubes(spatial))  # 27 occlusions
    layout = method.token_layout()
    if layout is not None:
        prefix, grid, pooling = layout
        attentions = attribution.attention_maps(model, x)
        found["rollout"] = attribution.tokens_to_input(
            attribution.token_relevance(attribution.attention_rollout(attentions), prefix, pooling), grid, spatial)
        found["last_attention"] = attribution.tokens_to_input(
            attribution.token_relevance(attentions[-1].float().mean(dim=1), prefix, pooling), grid, spatial)
    layer = method.cam_layer(model)
    if layer is not None:
        found["gradcam"] = method.cam_to_input(attribution.gradcam(model, x, layer))
    out = {}
    for name, volume in found.items():
        m = attribution.to_crop(method, cfg, volume[0].detach().numpy(), crop.shape)
        out[name] = normalised(np.clip(m, 0, None))
    return out


def pretext_input(method: Any, cfg: DictConfig, crop: np.ndarray, stage: str) -> tuple[torch.Tensor, str]:
    """A crop as the pretext of `stage` saw its inputs: the cube scaled to [0, 1] at crop_size
    ("volume"), or the centre slice-view clip at the pretext's frame size ("slices"; a video
    pretext gets the clip padded to the video frames, as `format_adaptation=false` does)."""
    from bench.datasets.pretext import corpus_frame_size
    from bench.datasets.torch_data import SliceViewDataset, load_crop

    kind = method.pretext_data_kind(stage)
    if kind == "volume":
        return torch.from_numpy(load_crop(crop[None], 0, cfg.crop_size))[None, None].float(), \
            "crops scaled to [0, 1] at crop_size, as the pretext saw them"
    v = cfg.views
    frame_size = corpus_frame_size(cfg) if kind == "video" else method.view_options().get("frame_size", v.frame_size)
    clips = SliceViewDataset(crop[None], np.array([0]), np.array([0]), cfg.crop_size, augment=False, axis=v.axis,
                             frames=v.frames, frame_size=frame_size, channels=v.channels, multi_view=False)
    return clips[0][0][None].float(), (f"the centre {v.axis} slice-view clip ({v.frames} frames at {frame_size} "
                                       f"pixels, frames along the first axis), as the pretext saw it")


def mae_reconstructions(method: Any, cfg: DictConfig, folder: Path, crops: dict[str, tuple[np.ndarray, float]],
                        stage: Path) -> dict[str, Any] | None:
    """The pretrained pretext's reconstruction of each crop (stem -> (crop, voxel size)), written into `stage`;
    None when the run's encoder did not come from a reconstructing pretext."""
    from bench.methods.pretext import PretextTask
    from bench.transfer import pretext_from_artifact

    init = json.loads((folder / "metrics.json").read_text()).get("pretraining") or {}
    if not init.get("artifact"):
        return None
    plan = method.pretraining_plan(cfg.regime)
    if not plan or type(method.build_pretext(plan[-1])).reconstruction is PretextTask.reconstruction:
        return None
    artifact = Path(init["artifact"])
    if not (artifact / "pretext.safetensors").is_file():
        return {"files": {}, "summary": {"skipped": f"pretraining artifact '{artifact}' is no longer in the cache"}}
    pretext = pretext_from_artifact(method, artifact).eval()
    source = json.loads((artifact / "pretrain.json").read_text())["source"]
    files: dict[str, dict[str, str]] = {}
    errors, inputs = [], ""
    for stem, (crop, spacing) in crops.items():
        x, inputs = pretext_input(method, cfg, crop, source)
        with torch.no_grad(), torch.random.fork_rng():
            torch.manual_seed(cfg.seed)
            masked, recon = pretext.reconstruction(x)
        original, masked, recon = (t[0, 0].float().numpy() for t in (x, masked, recon))
        hidden = masked == 0
        errors.append(float(np.mean((recon[hidden] - original[hidden]) ** 2)) if hidden.any() else 0.0)
        extent = spacing * crop.shape[0]  # mm across the crop; the shown volume spans it on every axis
        files[stem] = write_reconstruction(stage, stem, original, masked, recon,
                                            tuple(extent / n for n in original.shape))
    return {"files": files, "summary": {"artifact": artifact.name, "stage": source, "inputs": inputs,
                                         "mse_hidden": float(np.mean(errors))}}
