"""`bench explain RUN_DIR... [n=3]`: where a finished run's model looks, scored against ground truth.

For a finetuning run that kept its model (`model.safetensors`), the same test vertebrae are always
chosen: the `n` most confident true positives, the `n` most confident false negatives (lowest
score among fractured) and the `n` most confident false positives. Each gets the maps of
bench.attribution that fit its model (occlusion for every method; Grad-CAM for conv nets;
attention rollout and last-block attention for transformers), two baselines that say what chance
looks like (a random map, a centred Gaussian), and scores:

- `mass_body`: the share of the map's mass inside the centre vertebral body;
- `point_body` / `point_deformity`: whether the map's maximum falls in the body / in the fracture
  deformity (fractured vertebrae only; the pointing game);
- `deletion`: the mean fracture probability, relative to the unmodified crop's, while the top
  2-50 % of voxels by the map are replaced by a blurred copy of the crop (lower: the map found what
  the model uses; it needs no mask).

For a run whose encoder came from a masked-reconstruction pretext (a method with
`pretext_reconstruction`, e.g. `mae3d` in `vertebrae`), the pretrained pretext model also
reconstructs each explained crop from a masked copy (the run's seed fixes the mask): a PNG with the
original, the masked input and the reconstruction, and the reconstruction as NIfTI.

Masks come from the crop store (`masks.npy`: the synthetic generator writes the body and the
deformity, ingestion the centre vertebra). Outputs go to `RUN_DIR/explain/` (written in a staging
folder, then renamed; nothing else in the run changes): one PNG per vertebra (three orthogonal
mid-slices, a row per map), each map as NIfTI in the crop's frame, and `explain.json`.
"""
from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf
from scipy import ndimage

from bench import attribution
from bench.errors import BenchError
from bench.store import MODEL_FILE, dumps, normal_mode, replace_folder

KINDS = ("TP", "FN", "FP")
BASELINES = ("random", "gaussian")
DELETION_FRACTIONS = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5)
SCORES = ("mass_body", "point_body", "point_deformity", "deletion")


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
        out[name] = _normalised(np.clip(m, 0, None))
    return out


def baselines(shape: tuple[int, ...], seed: int) -> dict[str, np.ndarray]:
    """What chance looks like: uniform noise, and a Gaussian centred on the crop (sigma = 1/6 edge)."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.arange(s) - (s - 1) / 2 for s in shape], indexing="ij")
    r2 = sum((g / (s / 6)) ** 2 for g, s in zip(grids, shape))
    return {"random": _normalised(rng.random(shape)), "gaussian": _normalised(np.exp(-r2 / 2))}


def _normalised(m: np.ndarray) -> np.ndarray:
    total = float(m.sum())
    return (m / total if total > 0 else np.full(m.shape, 1.0 / m.size)).astype(np.float32)


def map_peak(m: np.ndarray) -> tuple[int, ...] | None:
    """The voxel the pointing game takes as the map's maximum: the centroid of every voxel at the
    maximum. Occlusion cubes and token patches make flat plateaus, and the first voxel of a plateau
    (np.argmax) is its corner, not where the map points. None for a constant map (nothing changed the
    model's output): it points nowhere, and its centroid, the crop centre, would score a hit."""
    if np.ptp(m) <= 1e-6 * abs(float(m.max())):
        return None
    top = np.argwhere(m >= m.max() - 1e-6 * abs(float(m.max())))
    return tuple(int(v) for v in np.rint(top.mean(axis=0)))


def mask_scores(m: np.ndarray, truth: np.ndarray | None, label: int) -> dict[str, float]:
    if truth is None:
        return {"mass_body": np.nan, "point_body": np.nan, "point_deformity": np.nan}
    body, deformity = (truth & 1) > 0, (truth & 2) > 0
    peak = map_peak(m)

    def hit(region: np.ndarray) -> float:
        return 0.0 if peak is None else float(region[peak])

    return {"mass_body": float(m[body].sum()), "point_body": hit(body),
            "point_deformity": hit(deformity) if label == 1 and deformity.any() else np.nan}


def deletion_curves(predict: Callable[[np.ndarray], np.ndarray], crop: np.ndarray,
                    maps: dict[str, np.ndarray]) -> dict[str, float]:
    """The mean change of P(fracture) from the intact crop's while the top 2-50 % voxels of each map are
    blurred away (`predict`: crops -> P(fracture)). Negative: the map found what the fracture call rests
    on. A difference, not a ratio: a ratio to a near-zero intact probability (a confident negative)
    blows up."""
    blurred = ndimage.gaussian_filter(crop.astype(np.float32), 3.0)
    order = {name: np.argsort(-m.ravel(), kind="stable") for name, m in maps.items()}
    batch = [crop.astype(np.float32)]
    for name in maps:
        for f in DELETION_FRACTIONS:
            x = crop.astype(np.float32).ravel().copy()
            top = order[name][: int(round(f * x.size))]
            x[top] = blurred.ravel()[top]
            batch.append(x.reshape(crop.shape))
    probs = predict(np.stack(batch))
    k = len(DELETION_FRACTIONS)
    return {name: float(probs[1 + i * k: 1 + (i + 1) * k].mean() - probs[0]) for i, name in enumerate(maps)}


def mean_ci(values: Any, seed: int) -> dict[str, float]:
    """Mean and 95 % percentile bootstrap CI of the finite values (lo = hi = mean when they do not vary)."""
    from scipy.stats import bootstrap

    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    entry = {"mean": float(values.mean()) if len(values) else np.nan, "lo": np.nan, "hi": np.nan, "n": len(values)}
    if len(values) >= 2 and np.ptp(values) > 0:
        ci = bootstrap((values,), np.mean, n_resamples=1000, confidence_level=0.95, method="percentile",
                       random_state=np.random.default_rng(seed)).confidence_interval
        entry.update(lo=float(ci.low), hi=float(ci.high))
    elif len(values):
        entry.update(lo=entry["mean"], hi=entry["mean"])
    return entry


def summarise(rows: list[dict[str, Any]], maps: list[str], seed: int) -> dict[str, dict[str, dict[str, float]]]:
    """Mean and 95 % bootstrap CI (over explained vertebrae) of every score of every map."""
    return {name: {score: mean_ci([r["scores"][name][score] for r in rows if name in r["scores"]], seed)
                   for score in SCORES} for name in maps}


def explain_run(folder: Path, n: int = 3) -> Path:
    """Explain one run; returns its `explain/` folder."""
    from bench.datasets.loading import load_data
    from bench.evaluation import split_parts

    cfg, method, model, predictions = load_run(folder)
    data = load_data(cfg)
    _, _, test = split_parts(data, cfg)
    if len(test.table) != len(predictions) or not (
            test.table["vertebra"].astype(str).to_numpy() == predictions["vertebra"].astype(str).to_numpy()).all():
        raise BenchError(f"run '{folder}': predictions.parquet does not match the test split of data '{cfg.data}' "
                         f"(the data or its splits changed since the run)")
    chosen = choose(predictions, n)
    target = folder / "explain"
    stage = Path(tempfile.mkdtemp(prefix=".explain.staging-", dir=folder))
    normal_mode(stage)
    try:
        rows, crops = [], {}
        for i, pick in chosen.iterrows():
            crop_index = int(test.table["crop_index"].iloc[int(pick.row)])
            crop = np.asarray(test.images[crop_index])
            truth = None if test.masks is None else np.asarray(test.masks[crop_index])
            maps = maps_of(method, cfg, model, crop)
            every = {**maps, **baselines(crop.shape, cfg.seed + i)}
            deletion = deletion_curves(lambda crops: fracture_probability(method, cfg, model, crops), crop, every)
            scores = {name: {**mask_scores(m, truth, int(pick.label)), "deletion": deletion[name]}
                      for name, m in every.items()}
            stem = file_stem(i, pick.kind, pick.patient_id, pick.vertebra)
            spacing = float(test.table["spacing"].iloc[int(pick.row)]) if "spacing" in test.table else 1.0
            crops[stem] = (crop, spacing)
            files = _write_outputs(stage, stem, crop, truth, maps, spacing)
            rows.append({"kind": pick.kind, "patient_id": str(pick.patient_id), "vertebra": str(pick.vertebra),
                         "label": int(pick.label), "score": float(pick.score), "files": files, "scores": scores,
                         "has_mask": truth is not None})
        names = list(rows[0]["scores"]) if rows else []
        reconstruction = mae_reconstructions(method, cfg, folder, crops, stage)
        if reconstruction is not None:
            for stem, row in zip(crops, rows):
                row["files"].update(reconstruction["files"].get(stem, {}))
        summary = {"run": folder.name, "method": cfg.method, "regime": cfg.regime, "n_per_kind": n,
                   "architecture": method.architecture,
                   "maps": names, "baselines": list(BASELINES), "summary": summarise(rows, names, cfg.seed),
                   "vertebrae": rows, "deletion_fractions": list(DELETION_FRACTIONS),
                   "reconstruction": None if reconstruction is None else reconstruction["summary"]}
        (stage / "explain.json").write_text(dumps(summary))
        replace_folder(stage, target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return target


def pretext_input(method: Any, cfg: DictConfig, crop: np.ndarray, stage: str) -> tuple[torch.Tensor, str]:
    """A crop as the pretext of `stage` saw its inputs: the cube scaled to [0, 1] at crop_size
    ("volume"), or the centre slice-view clip at the pretext's frame size ("slices"; a video
    pretext gets the clip padded to the video frames, as `format_adaptation=false` does)."""
    from bench.datasets.pretext import corpus_frame_size
    from bench.datasets.torch_data import SliceViewDataset, load_crop

    kind = method.pretext_data(stage)
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
    from bench.methods.base import Method
    from bench.transfer import pretext_from_artifact

    if type(method).pretext_reconstruction is Method.pretext_reconstruction:
        return None
    init = json.loads((folder / "metrics.json").read_text()).get("pretraining") or {}
    if not init.get("artifact"):
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
            masked, recon = method.pretext_reconstruction(pretext, x)
        original, masked, recon = (t[0, 0].float().numpy() for t in (x, masked, recon))
        hidden = masked == 0
        errors.append(float(np.mean((recon[hidden] - original[hidden]) ** 2)) if hidden.any() else 0.0)
        extent = spacing * crop.shape[0]  # mm across the crop; the shown volume spans it on every axis
        files[stem] = _write_reconstruction(stage, stem, original, masked, recon,
                                            tuple(extent / n for n in original.shape))
    return {"files": files, "summary": {"artifact": artifact.name, "stage": source, "inputs": inputs,
                                         "mse_hidden": float(np.mean(errors))}}


def crop_affine(shape: tuple[int, ...], spacing: float | tuple[float, ...]) -> np.ndarray:
    """RAS mm of a crop's voxels: `spacing` (one for all axes, or one per axis), the crop's centre at
    the origin."""
    zooms = np.broadcast_to(np.asarray(spacing, dtype=float), (3,))
    affine = np.diag([*zooms, 1.0])
    affine[:3, 3] = -zooms * (np.array(shape) - 1) / 2
    return affine


def _mid_slice_grid(path: Path, shape: tuple[int, ...], rows: dict[str, Callable[[Any, tuple], None]]) -> None:
    """A PNG of the three orthogonal mid-slices, one row per entry; `draw(ax, index)` paints a row's slice."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    centre = [s // 2 for s in shape]
    fig, axes = plt.subplots(len(rows), 3, figsize=(6, 2 * len(rows)), squeeze=False)
    for r, (name, draw) in enumerate(rows.items()):
        for c, title in enumerate(("sagittal", "coronal", "axial")):
            index = [slice(None)] * 3
            index[c] = centre[c]
            ax = axes[r, c]
            draw(ax, tuple(index))
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=8)
        axes[r, 0].set_ylabel(name, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=60)
    plt.close(fig)


def _write_reconstruction(stage: Path, stem: str, original: np.ndarray, masked: np.ndarray,
                          recon: np.ndarray, spacing: tuple[float, ...]) -> dict[str, str]:
    """Original / masked / reconstruction, three orthogonal mid-slices each, and the reconstruction as
    NIfTI spanning the crop (`spacing`: the shown voxels' size on each axis)."""
    import nibabel as nib

    nib.save(nib.Nifti1Image(recon.astype(np.float32), crop_affine(recon.shape, spacing)),
             stage / f"{stem}_mae_reconstruction.nii.gz")

    def gray(volume: np.ndarray) -> Callable[[Any, tuple], None]:
        return lambda ax, index: ax.imshow(np.rot90(volume[index]), cmap="gray", vmin=0.0, vmax=1.0)

    _mid_slice_grid(stage / f"{stem}_mae.png", original.shape,
                    {"original": gray(original), "masked": gray(masked), "reconstruction": gray(recon)})
    return {"mae_png": f"{stem}_mae.png", "mae_reconstruction": f"{stem}_mae_reconstruction.nii.gz"}


def _write_outputs(stage: Path, stem: str, crop: np.ndarray, truth: np.ndarray | None,
                   maps: dict[str, np.ndarray], spacing: float) -> dict[str, str]:
    """A PNG (three orthogonal mid-slices, a row per map, the body outlined) and a NIfTI per map."""
    import nibabel as nib

    files, affine = {}, crop_affine(crop.shape, spacing)
    for name, m in maps.items():
        nib.save(nib.Nifti1Image(m.astype(np.float32), affine), stage / f"{stem}_{name}.nii.gz")
        files[name] = f"{stem}_{name}.nii.gz"
    image = np.clip(crop.astype(np.float32), -200, 1200)

    def overlay(m: np.ndarray) -> Callable[[Any, tuple], None]:
        def draw(ax: Any, index: tuple) -> None:
            ax.imshow(np.rot90(image[index]), cmap="gray")
            ax.imshow(np.rot90(m[index]), cmap="inferno", alpha=0.45)
            if truth is not None:
                ax.contour(np.rot90((truth[index] & 1) > 0), levels=[0.5], colors="cyan", linewidths=0.6)
                if (truth & 2).any():
                    ax.contour(np.rot90((truth[index] & 2) > 0), levels=[0.5], colors="lime", linewidths=0.6)
        return draw

    _mid_slice_grid(stage / f"{stem}.png", crop.shape, {name: overlay(m) for name, m in maps.items()})
    files["png"] = f"{stem}.png"
    return files


def explained_per_kind(text: str, key: str) -> int:
    """`n` (vertebrae explained per kind: TP, FN, FP), checked before any work."""
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise BenchError(f"bad value for '{key}': {text!r}; expected a whole number >= 1")
    return n


def explain_command(args: list[str]) -> list[Path]:
    """bench explain RUN_DIR... [n=3]"""
    from bench.config import parse_overrides

    dirs = [Path(a) for a in args if "=" not in a]
    opts = parse_overrides([a for a in args if "=" in a])
    unknown = set(opts) - {"n"}
    if unknown:
        raise BenchError(f"unknown explain key '{sorted(unknown)[0]}'; valid: n")
    n = explained_per_kind(opts.get("n", "3"), "n")
    if not dirs:
        raise BenchError("bench explain needs at least one run folder (bench explain RUN_DIR... [n=3])")
    return [explain_run(d, n) for d in dirs]


def file_stem(index: int, kind: str, patient_id: Any, vertebra: Any) -> str:
    """One file name for an explained vertebra: patient ids come from the user's data and may hold
    '/', '..' or spaces, so everything but a safe set of characters becomes '_'."""
    return re.sub(r"[^A-Za-z0-9_.+=-]", "_", f"{index:02d}_{kind}_{patient_id}_{vertebra}").replace("..", "__")


def read_explanations(folder: Path) -> dict[str, Any] | None:
    file = folder / "explain" / "explain.json"
    return json.loads(file.read_text()) if file.is_file() else None
