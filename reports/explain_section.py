"""The report's "Where the models look" section, from the `explain/` folders of the runs
(bench.explain): localisation and deletion scores with bootstrap CIs against the chance baselines,
and a gallery of the explained vertebrae (one image per kind per run, embedded as JPEG so that a
suite's page stays light, shown small and opened full size on click; the PNGs stay in `explain/`)."""
from __future__ import annotations

import base64
import io
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench.explain import KINDS
from bench.explain_output import read_explanations
from bench.explain_scores import BASELINES, SCORES, mean_ci


def _fmt(entry: dict[str, Any]) -> str:
    mean, lo, hi = (entry.get(k) for k in ("mean", "lo", "hi"))
    if mean is None or (isinstance(mean, float) and np.isnan(mean)):
        return "n/a"
    ci = f" [{lo:.2f}, {hi:.2f}]" if lo is not None and hi is not None and hi > lo else ""
    return f"{mean:.2f}{ci}"


def _jpeg_uri(png: Path, quality: int = 80) -> str:
    """A data URI of the PNG re-encoded as JPEG: the maps are smooth colour fields, which JPEG keeps
    faithfully at a fraction of PNG's bytes."""
    from PIL import Image

    buffer = io.BytesIO()
    with Image.open(png) as image:
        image.convert("RGB").save(buffer, "JPEG", quality=quality, optimize=True)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


GROUPS = (("transformer", True), ("transformer", False), ("convolutional", True), ("convolutional", False))


def _run_means(found: dict[str, Any]) -> dict[str, float]:
    """One explained run's means over its vertebrae: each map's mass in the body relative to the random
    map's on the same vertebra (the body's share of the crop: 1 is chance), its pointing-game hit rate,
    and its deletion score minus the random map's (below 0: more faithful than chance)."""
    native = _native(found)
    out = {}
    for key, name in (("occlusion", "occlusion"), ("native", native), ("gaussian", "gaussian")):
        lift = [v["scores"][name]["mass_body"] / v["scores"]["random"]["mass_body"] for v in found["vertebrae"]
                if name in v["scores"] and v["scores"]["random"]["mass_body"] > 0]
        hit = [v["scores"][name]["point_body"] for v in found["vertebrae"] if name in v["scores"]]
        deletion = [v["scores"][name]["deletion"] - v["scores"]["random"]["deletion"] for v in found["vertebrae"]
                    if name in v["scores"] and "deletion" in v["scores"][name]]
        out[f"{key}_lift"] = float(np.nanmean(lift)) if lift else np.nan
        out[f"{key}_hit"] = float(np.nanmean(hit)) if hit else np.nan
        out[f"{key}_deletion"] = float(np.nanmean(deletion)) if deletion else np.nan
    return out


def _native(found: dict[str, Any]) -> str | None:
    return "rollout" if "rollout" in found["maps"] else "gradcam" if "gradcam" in found["maps"] else None


def group_rows(explained: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Transformers and convolutional networks (the method's `architecture`), pretrained or from
    scratch: does a family look at the vertebral body more than chance, and more than the others?
    Each run's means, then their mean with a bootstrap CI over runs: the run, not the vertebra, is the
    unit (every run explains vertebrae of the same test split)."""
    rows = []
    for family, pretrained in GROUPS:
        chosen = [found for regime, found in explained
                  if found.get("architecture", "convolutional") == family and (regime != "scratch") == pretrained
                  and found["vertebrae"] and found["vertebrae"][0].get("has_mask")]
        if not chosen:
            continue
        means = [_run_means(found) for found in chosen]
        natives = sorted({_native(found) or "none" for found in chosen})
        over_runs = {k: _fmt(mean_ci([m[k] for m in means], seed=0)) for k in means[0]}
        rows.append({"group": f"{family}, {'pretrained' if pretrained else 'scratch'}", "runs": len(means),
                     "native": " / ".join(natives), **over_runs})
    return rows


def _check_explanations(found: Any) -> None:
    """Raise ValueError unless `found` has the shape bench explain writes."""
    if not isinstance(found, dict) or not isinstance(found.get("maps"), list) or \
            not isinstance(found.get("summary"), dict) or not isinstance(found.get("vertebrae"), list):
        raise ValueError("not the layout bench explain writes")
    for name in found["maps"]:
        summary = found["summary"].get(name)
        if not isinstance(summary, dict) or not all(isinstance(summary.get(s), dict) for s in SCORES):
            raise ValueError(f"no summary of every score for map {name!r}")
        numbers = (summary[s].get(k) for s in SCORES for k in ("mean", "lo", "hi"))
        if not all(isinstance(v, (int, float, type(None))) for v in numbers):
            raise ValueError(f"a score of map {name!r} is not a number")
    if not all(isinstance(v, dict) and isinstance(v.get("files", {}), dict) for v in found["vertebrae"]):
        raise ValueError("a vertebra entry is not a mapping")


def inside(root: Path, name: str) -> Path | None:
    """`root / name` when it stays inside `root` (a received run folder is untrusted: an absolute
    path or `..` in its explain.json must not pull another file of this machine into a report)."""
    if not name:
        return None
    path = (root / name).resolve()
    return path if path.is_relative_to(root.resolve()) else None


def explain_section(runs: pd.DataFrame) -> dict[str, Any] | None:
    """Rows of the score table (each map of each explained run, then its baselines), the family
    summary and the gallery."""
    rows, gallery, explained = [], [], []
    for run in runs.sort_values(["method", "regime", "protocol"]).itertuples():
        folder = Path(run.folder)
        try:
            found = read_explanations(folder)
            if found is not None:
                _check_explanations(found)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            print(f"bench report: skipping the explanations of '{folder}': explain/explain.json is unreadable "
                  f"({type(exc).__name__})", file=sys.stderr)
            continue
        if found is None:
            continue
        explained.append((run.regime, found))
        n = len(found.get("vertebrae", []))
        for name in found["maps"]:
            summary = found["summary"][name]
            rows.append({"method": run.method, "regime": run.regime, "map": name, "n": n,
                         "baseline": name in BASELINES, **{s: _fmt(summary[s]) for s in SCORES}})
        images = []
        for kind in KINDS:
            first = next((v for v in found["vertebrae"] if v["kind"] == kind), None)
            if first is None:
                continue
            for key, what in (("png", "maps"), ("mae_png", "MAE reconstruction: original, masked, reconstructed")):
                png = inside(folder / "explain", str(first["files"].get(key, "")))
                if key in first["files"] and png is not None and png.is_file():
                    images.append({"kind": kind, "uri": _jpeg_uri(png),
                                   "caption": f"{kind} {first['patient_id']} {first['vertebra']} "
                                              f"(score {first['score']:.2f}): {what}"})
        if images:
            gallery.append({"run": folder.name, "images": images})
    if not rows:
        return None
    return {"rows": rows, "groups": group_rows(explained), "gallery": gallery, "scores": SCORES}
