"""The report's "Where the models look" section, from the `explain/` folders of the runs
(bench.explain): localisation and deletion scores with bootstrap CIs against the chance baselines,
and a gallery of the explained vertebrae (one image per kind per run, embedded, shown small and
opened full size on click)."""
from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench.explain import BASELINES, KINDS, SCORES, read_explanations


def _fmt(entry: dict[str, Any]) -> str:
    mean, lo, hi = (entry.get(k) for k in ("mean", "lo", "hi"))
    if mean is None or (isinstance(mean, float) and np.isnan(mean)):
        return "n/a"
    ci = f" [{lo:.2f}, {hi:.2f}]" if lo is not None and hi is not None and hi > lo else ""
    return f"{mean:.2f}{ci}"


def explain_section(runs: pd.DataFrame) -> dict[str, Any] | None:
    """Rows of the score table (each map of each explained run, then its baselines) and the gallery."""
    rows, gallery = [], []
    for run in runs.sort_values(["method", "regime", "protocol"]).itertuples():
        folder = Path(run.folder)
        found = read_explanations(folder)
        if found is None:
            continue
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
                png = folder / "explain" / first["files"].get(key, "")
                if key in first["files"] and png.is_file():
                    uri = "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode()
                    images.append({"kind": kind, "uri": uri,
                                   "caption": f"{kind} {first['patient_id']} {first['vertebra']} "
                                              f"(score {first['score']:.2f}): {what}"})
        if images:
            gallery.append({"run": folder.name, "images": images})
    if not rows:
        return None
    return {"rows": rows, "gallery": gallery, "scores": SCORES}
