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

For a run whose encoder came from a masked-reconstruction pretext (a pretext with `reconstruction`,
e.g. `mae3d` in `vertebrae`), the pretrained pretext model also
reconstructs each explained crop from a masked copy (the run's seed fixes the mask): a PNG with the
original, the masked input and the reconstruction, and the reconstruction as NIfTI.

Masks come from the crop store (`masks.npy`: the synthetic generator writes the body and the
deformity, ingestion the centre vertebra). Outputs go to `RUN_DIR/explain/` (written in a staging
folder, then renamed; nothing else in the run changes): one PNG per vertebra (three orthogonal
mid-slices, a row per map), each map as NIfTI in the crop's frame, and `explain.json`.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np

from bench.errors import BenchError
from bench.explain_maps import choose, fracture_probability, load_run, mae_reconstructions, maps_of
from bench.explain_output import file_stem, read_explanations, write_outputs
from bench.explain_scores import BASELINES, DELETION_FRACTIONS, baselines, deletion_curves, mask_scores, summarise
from bench.store import dumps, normal_mode, replace_folder

KINDS = ("TP", "FN", "FP")
__all__ = ["explain_command", "explain_run", "explained_per_kind", "read_explanations"]


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
            files = write_outputs(stage, stem, crop, truth, maps, spacing)
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
