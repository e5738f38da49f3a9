"""How `bench explain` scores a map: against the vertebra's masks (mass in the body, the pointing
game), by deletion (what the fracture call rests on), beside two baselines that say what chance
looks like, summarised with bootstrap confidence intervals over the explained vertebrae."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from scipy import ndimage

BASELINES = ("random", "gaussian")
DELETION_FRACTIONS = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5)
SCORES = ("mass_body", "point_body", "point_deformity", "deletion")


def baselines(shape: tuple[int, ...], seed: int) -> dict[str, np.ndarray]:
    """What chance looks like: uniform noise, and a Gaussian centred on the crop (sigma = 1/6 edge)."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.arange(s) - (s - 1) / 2 for s in shape], indexing="ij")
    r2 = sum((g / (s / 6)) ** 2 for g, s in zip(grids, shape))
    return {"random": normalised(rng.random(shape)), "gaussian": normalised(np.exp(-r2 / 2))}


def normalised(m: np.ndarray) -> np.ndarray:
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
