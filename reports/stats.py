"""Statistics of the report: cells over seeds, patient-level bootstrap CIs, DeLong, CD diagram.

A cell is one (method, regime, variant) over its seeds: mean and sd of the seeds' test metrics,
and a 95 % CI from a bootstrap over PATIENTS (all vertebrae of a drawn patient together, since
they are correlated), the metric averaged over seeds inside each resample.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from bench.metrics import grade_metrics, resampled_binary_metrics

METRICS = ("f1", "acc", "auc", "ap")
GRADE_COLUMNS = ("macro_f1", "qwk", "recall_g0", "recall_g1", "recall_g2", "recall_g3", "sensitivity", "specificity")


def patient_draw_weights(patient_ids: np.ndarray, n_boot: int, seed: int = 0) -> np.ndarray:
    """(n_boot, rows) weights of a bootstrap over patients: each row's weight is how often its
    patient was drawn, drawing as many patients as there are (in order of appearance), with replacement."""
    codes, patients = pd.factorize(np.asarray(patient_ids))
    rng = np.random.default_rng(seed)
    weights = np.empty((n_boot, len(codes)))
    for b in range(n_boot):
        drawn = rng.choice(len(patients), size=len(patients), replace=True)
        weights[b] = np.bincount(drawn, minlength=len(patients))[codes]
    return weights


def bootstrap_ci(predictions: list[pd.DataFrame], n_boot: int, seed: int = 0,
                 threshold: float = 0.5) -> dict[str, tuple[float, float]]:
    """95 % percentile CIs of the seed-averaged metrics, resampling patients."""
    weights = patient_draw_weights(predictions[0]["patient_id"].to_numpy(), n_boot, seed)
    per_seed = [resampled_binary_metrics(p["label"].to_numpy(), p["score"].to_numpy(), weights, threshold)
                for p in predictions]
    out = {}
    for k in METRICS:
        values = np.vstack([m[k] for m in per_seed])  # (seeds, n_boot)
        defined = ~np.isnan(values).all(axis=0)
        arr = np.nanmean(values[:, defined], axis=0)
        out[k] = _percentiles(arr)
    return out


def cells(runs: pd.DataFrame, n_boot: int, by: tuple[str, ...] = ()) -> pd.DataFrame:
    """One row per (method, regime, variant, *by): n seeds, mean, sd and CI of every metric."""
    rows = []
    keys = ["method", "regime", "variant", *by]
    for key_values, group in runs.groupby(keys, sort=False):
        preds = [pd.read_parquet(f"{f}/predictions.parquet") for f in group["folder"]]
        preds = align_seeds(preds)
        ci = bootstrap_ci(preds, n_boot) if n_boot and preds else {}
        row = {**dict(zip(keys, key_values)), "seeds": len(group),
               "s_per_epoch": group["s_per_epoch"].mean(), "pretrain_s": group["pretrain_s"].mean(),
               "n_params": group["n_params"].mean()}
        for m in METRICS:
            values = group[m].astype(float)
            row[m] = values.mean()
            row[f"{m}_sd"] = values.std(ddof=1) if len(values) > 1 else np.nan
            row[f"{m}_lo"], row[f"{m}_hi"] = ci.get(m, (np.nan, np.nan))
        rows.append(row)
    return pd.DataFrame(rows)


def grade_cells(runs: pd.DataFrame, n_boot: int, seed: int = 0) -> pd.DataFrame:
    """Genant grading cells: mean and sd over seeds of the grading metrics, and a 95 % patient-
    bootstrap CI of the seed-averaged macro-F1 and quadratic kappa."""
    rows = []
    for (method, regime, variant), group in runs.groupby(["method", "regime", "variant"], sort=False):
        row = {"method": method, "regime": regime, "variant": variant, "seeds": len(group)}
        for m in GRADE_COLUMNS:
            values = group[m].astype(float)
            row[m] = values.mean()
            row[f"{m}_sd"] = values.std(ddof=1) if len(values) > 1 else np.nan
        preds = align_seeds([pd.read_parquet(f"{f}/predictions.parquet") for f in group["folder"]])
        probs = [p[[f"p_grade{g}" for g in range(4)]].to_numpy() for p in preds]
        base, rng = preds[0], np.random.default_rng(seed)
        index = {p: np.flatnonzero(base["patient_id"].to_numpy() == p) for p in base["patient_id"].unique()}
        draws: dict[str, list[float]] = {"macro_f1": [], "qwk": []}
        for _ in range(n_boot):
            rows_ = np.concatenate([index[p] for p in rng.choice(list(index), size=len(index), replace=True)])
            ms = [grade_metrics(base["grade"].to_numpy()[rows_], pr[rows_]) for pr in probs]
            for k in draws:
                values = [m[k] for m in ms if not np.isnan(m[k])]
                draws[k].append(float(np.mean(values)) if values else np.nan)
        for k, v in draws.items():
            arr = np.asarray(v, float)
            arr = arr[~np.isnan(arr)]
            row[f"{k}_lo"], row[f"{k}_hi"] = _percentiles(arr)
        rows.append(row)
    return pd.DataFrame(rows)


def _percentiles(arr: np.ndarray) -> tuple[float, float]:
    return (float(np.percentile(arr, 2.5)), float(np.percentile(arr, 97.5))) if len(arr) else (np.nan, np.nan)


def align_seeds(preds: list[pd.DataFrame]) -> list[pd.DataFrame]:
    """The seeds' predictions on the same test vertebrae, in the same order."""
    key = ["patient_id", "vertebra"]
    first = preds[0].sort_values(key).reset_index(drop=True)
    out = [first]
    for p in preds[1:]:
        p = p.sort_values(key).reset_index(drop=True)
        if not p[key].equals(first[key]):
            continue  # another test set (other data): not pooled
        out.append(p)
    return out


def seed_mean_scores(runs: pd.DataFrame) -> pd.DataFrame | None:
    preds = align_seeds([pd.read_parquet(f"{f}/predictions.parquet") for f in runs["folder"]])
    out = preds[0][["patient_id", "vertebra", "label"]].copy()
    out["score"] = np.mean([p["score"].to_numpy() for p in preds], axis=0)
    return out


def delong_vs_best(runs: pd.DataFrame, table: pd.DataFrame) -> dict[tuple, float]:
    """Two-sided DeLong p-value of each cell's AUC against the table's best cell (seed-averaged scores)."""
    from MLstatkit import Delong_test

    if table.empty or table["auc"].isna().all():
        return {}
    best = table.loc[table["auc"].idxmax()]
    key = lambda r: (r["method"], r["regime"], r["variant"])  # noqa: E731
    members = lambda k: runs[(runs.method == k[0]) & (runs.regime == k[1]) & (runs.variant == k[2])]  # noqa: E731
    ref = seed_mean_scores(members(key(best)))
    out = {}
    for _, row in table.iterrows():
        if key(row) == key(best):
            continue
        other = seed_mean_scores(members(key(row)))
        merged = ref.merge(other, on=["patient_id", "vertebra", "label"], suffixes=("_best", "_other"))
        if len(merged) < 10 or merged["label"].nunique() < 2:
            continue
        result = Delong_test(merged["label"].to_numpy(), merged["score_best"].to_numpy(),
                             merged["score_other"].to_numpy(), return_ci=False, return_auc=False)
        out[key(row)] = float(result[1])
    return out


def critical_difference(runs: pd.DataFrame, metric: str = "auc"):
    """Mean ranks and Nemenyi p-values over seeds (blocks) when >= 3 cells share >= 3 seeds."""
    import scikit_posthocs as sp

    variant = runs["variant"].map(lambda v: f" / {v}" if v else "")
    runs = runs.assign(cell=runs["method"] + " / " + runs["regime"] + variant)
    wide = runs.pivot_table(index="seed", columns="cell", values=metric, aggfunc="mean").dropna(axis=1)
    if wide.shape[0] < 3 or wide.shape[1] < 3:
        return None
    ranks = wide.rank(axis=1, ascending=False).mean()
    sig = sp.posthoc_nemenyi_friedman(wide.to_numpy())
    sig.index = sig.columns = wide.columns
    return ranks, sig


Z_95, Z_POWER_80 = 1.959964, 0.841621


def hanley_mcneil_se(auc: float, n_pos: int, n_neg: int) -> float:
    """Standard error of an AUC from its class counts (Hanley & McNeil 1982)."""
    q1, q2 = auc / (2 - auc), 2 * auc**2 / (1 + auc)
    var = (auc * (1 - auc) + (n_pos - 1) * (q1 - auc**2) + (n_neg - 1) * (q2 - auc**2)) / max(n_pos * n_neg, 1)
    return float(np.sqrt(max(var, 0.0)))


def detectable_difference(n_pos: int, n_neg: int, auc: float = 0.75) -> float:
    """The smallest AUC difference between two models a test split of these counts detects with 80 %
    power at a two-sided 5 % level, treating the two AUCs as independent (conservative: a paired
    DeLong test on correlated scores detects somewhat less)."""
    return (Z_95 + Z_POWER_80) * np.sqrt(2) * hanley_mcneil_se(auc, n_pos, n_neg)


Z_ONE_SIDED_95 = 1.644854
WORSE_THAN_CHANCE = "worse than chance"


def did_not_learn(run: pd.Series, predictions: pd.DataFrame) -> str:
    """Why a run's model is no trained model, or "": it predicts a single class on the test split, or
    its validation AUC is not above chance (one-sided: the 95 % lower bound, Hanley-McNeil, is at or
    below 0.5). A model whose upper bound is below 0.5 learned something backwards: its reason starts
    with "worse than chance". Either way it enters no ranking and no family of tests."""
    if predictions["prediction"].nunique() < 2:
        return f"predicts only class {int(predictions['prediction'].iloc[0])} on test"
    auc, n, n_pos = run.get("val_auc"), run.get("val_n"), run.get("val_n_positive")
    if auc is None or n is None or n_pos is None or pd.isna(auc):
        return ""
    margin = Z_ONE_SIDED_95 * hanley_mcneil_se(float(auc), int(n_pos), int(n - n_pos))
    if float(auc) + margin < 0.5:
        return f"{WORSE_THAN_CHANCE}: validation AUC {auc:.3f} (one-sided 95 % upper bound {auc + margin:.3f})"
    if float(auc) - margin <= 0.5:
        return f"validation AUC {auc:.3f} (one-sided 95 % lower bound {auc - margin:.3f}) is not above chance"
    return ""


def adjust(p_values: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """Holm's adjusted p-values and Benjamini-Hochberg q-values of one family (statsmodels)."""
    from statsmodels.stats.multitest import multipletests

    p = np.asarray(p_values, dtype=float)
    if not len(p):
        return p, p
    return multipletests(p, method="holm")[1], multipletests(p, method="fdr_bh")[1]


def pretraining_effect(runs: pd.DataFrame, n_boot: int, seed: int = 0) -> pd.DataFrame:
    """Each pretrained regime against `scratch` of the same method, variant, protocol and input
    geometry: the paired difference of test AUC on seed-averaged scores, a 95 % CI from a bootstrap
    over patients, the two-sided DeLong p-value, and, within each protocol's family of comparisons
    whose two sides both learned, Holm's adjusted p and the BH q-value. A comparison with a side that
    did not learn stays in the table with its reason, outside the family (no adjusted p)."""
    from MLstatkit import Delong_test
    from sklearn.metrics import roc_auc_score

    rows = []
    keys = ["method", "variant", "protocol", "geometry"]
    if "not_learned" not in runs:
        runs = runs.assign(not_learned="")
    for key, group in runs.groupby(keys, sort=True):
        if "scratch" not in set(group["regime"]):
            continue
        base = seed_mean_scores(group[group.regime == "scratch"])
        for regime in sorted(set(group["regime"]) - {"scratch"}):
            other = seed_mean_scores(group[group.regime == regime])
            pair = base.merge(other, on=["patient_id", "vertebra", "label"], suffixes=("_scratch", "_pre"))
            y = pair["label"].to_numpy()
            if len(pair) < 10 or len(np.unique(y)) < 2:
                continue
            a, b = pair["score_pre"].to_numpy(), pair["score_scratch"].to_numpy()
            weights = patient_draw_weights(pair["patient_id"].to_numpy(), n_boot, seed)
            draws = (resampled_binary_metrics(y, a, weights)["auc"] - resampled_binary_metrics(y, b, weights)["auc"])
            draws = draws[~np.isnan(draws)]  # resamples with one class have no AUC
            lo, hi = _percentiles(np.asarray(draws))
            p = float(Delong_test(y, a, b, return_ci=False, return_auc=False)[1])
            rows.append({**dict(zip(keys, key)), "regime": regime, "auc_pre": roc_auc_score(y, a),
                         "auc_scratch": roc_auc_score(y, b), "diff": roc_auc_score(y, a) - roc_auc_score(y, b),
                         "lo": lo, "hi": hi, "p": p, "n": len(pair),
                         "excluded": _side_not_learned(group, regime)})
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    table["p_holm"], table["q_bh"] = np.nan, np.nan
    for _, family in table[table.excluded == ""].groupby("protocol"):
        holm, bh = adjust(family["p"].tolist())
        table.loc[family.index, "p_holm"], table.loc[family.index, "q_bh"] = holm, bh
    return table


def _side_not_learned(group: pd.DataFrame, regime: str) -> str:
    """Which side of a pretrained-vs-scratch comparison did not learn, or "" when both did."""
    sides = [(name, group.loc[group.regime == name, "not_learned"]) for name in (regime, "scratch")]
    return "; ".join(f"{name} did not learn" for name, reasons in sides if (reasons != "").any())


def sd_sources(group: pd.DataFrame) -> str:
    """Which sources of variance the seeds of one cell sample, for the sd beside its mean."""
    protocol = group["protocol"].iloc[0] if "protocol" in group else "finetune"
    regime = group["regime"].iloc[0]
    pinned = "pretrain_pinned" in group and bool(group["pretrain_pinned"].any())
    artifacts = group["artifact"].dropna() if "artifact" in group else pd.Series(dtype=object)
    sources = ["initialisation", "augmentation", "data order"] if protocol == "finetune" else []
    if regime == "scratch" and protocol != "finetune":
        sources.append("random encoder")
    if len(artifacts):
        if pinned or artifacts.nunique() < len(artifacts):
            seed = group["pretrain_seed"].dropna()
            note = f"pretrain.seed={int(seed.iloc[0])} pinned" if pinned and len(seed) else "shared"
            sources.append(f"not pretraining ({note}: {artifacts.nunique()} artifact for {len(group)} seeds)")
        else:
            sources.insert(0, "pretraining")
    return ", ".join(sources) if sources else "nothing (every seed is the same model)"
