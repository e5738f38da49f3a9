"""The verdict: which pretraining to pick, with the uncertainty of the test patients and of the seeds.

Per protocol (and data set and input geometry: only cells tested on the same vertebrae and seeing
the same crops are ranked together), every cell whose model learned is ranked by test AUC. Each
bootstrap replicate draws the test patients with replacement (one draw shared by every cell, so the
comparison stays paired) and, for each cell, its seeds with replacement; a cell's AUC in the
replicate is the mean over its drawn seeds of their AUCs on the drawn patients, as its point value is
the mean over its seeds. From the replicates: each cell's rank distribution (the challengeR blob
plot), its probability of being best (ties share the credit) and of being in the top 3, the
ranking's stability (Kendall tau between the point ranking and each replicate's), and the top set:
the best cell and every cell whose AUC difference to it is not significant after Holm's correction
(two-sided bootstrap p). A consensus across protocols averages each cell's ranks over the protocols
within each replicate. The sentences are written from these numbers alone.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import kendalltau, rankdata

from bench.metrics import resampled_binary_metrics
from bench.reports.stats import adjust, align_seeds, patient_draw_weights

MIN_SEEDS_FOR_RANKING = 3
ALPHA = 0.05


@dataclass
class Ranking:
    """One protocol's ranking: cells in point order and the bootstrap's summaries."""

    title: str
    cells: list[str]
    auc: np.ndarray  # point AUC (mean over seeds), in `cells` order
    seeds: np.ndarray
    replicate_auc: np.ndarray  # (n_boot, cells)
    p_best: np.ndarray = field(init=False)
    p_top3: np.ndarray = field(init=False)
    ranks: np.ndarray = field(init=False)  # (n_boot, cells), 1 = best, ties at their minimum
    tau: np.ndarray = field(init=False)  # per replicate, against the point ranking
    p_vs_top: np.ndarray = field(init=False)  # bootstrap p of the difference to the top cell (nan for it)
    p_holm: np.ndarray = field(init=False)
    top_set: list[str] = field(init=False)

    def __post_init__(self) -> None:
        boot = self.replicate_auc
        self.ranks = np.vstack([rankdata(-row, method="min") for row in boot]) if len(boot) else np.empty((0, 0))
        best = boot == boot.max(axis=1, keepdims=True)
        self.p_best = (best / best.sum(axis=1, keepdims=True)).mean(axis=0)
        self.p_top3 = (self.ranks <= 3).mean(axis=0)
        point = rankdata(-self.auc, method="average")
        self.tau = np.array([_tau(point, rankdata(-row, method="average")) for row in boot])
        diffs = boot[:, :1] - boot  # the top cell (first) minus each
        with np.errstate(invalid="ignore"):
            p = np.minimum(1.0, 2 * np.minimum((diffs <= 0).mean(axis=0), (diffs >= 0).mean(axis=0)))
        p[0] = np.nan
        self.p_vs_top = p
        self.p_holm = np.full(len(p), np.nan)
        if len(p) > 1:
            self.p_holm[1:] = adjust(list(p[1:]))[0]
        self.top_set = [self.cells[0]] + [c for c, q in zip(self.cells[1:], self.p_holm[1:]) if q >= ALPHA]

    @property
    def stability(self) -> tuple[float, float, float]:
        """Median Kendall tau of the replicates' rankings against the point ranking, and its 95 % interval."""
        tau = self.tau[~np.isnan(self.tau)]
        if not len(tau):
            return (np.nan, np.nan, np.nan)
        return float(np.median(tau)), float(np.percentile(tau, 2.5)), float(np.percentile(tau, 97.5))


def _tau(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 2:
        return np.nan
    return float(kendalltau(a, b).statistic)


def cell_label(method: str, regime: str, variant: str) -> str:
    return f"{method} / {regime}" + (f" / {variant}" if variant else "")


def per_seed_auc(runs: pd.DataFrame, n_boot: int, seed: int = 0) -> dict[str, np.ndarray]:
    """(seeds, n_boot) AUC of each cell's seeds on shared patient resamples of the common test split."""
    groups = {cell_label(*k): g for k, g in runs.groupby(["method", "regime", "variant"], sort=True)}
    preds = {c: align_seeds([pd.read_parquet(f"{f}/predictions.parquet") for f in g["folder"]])
             for c, g in groups.items()}
    key = ["patient_id", "vertebra"]
    common = None
    for ps in preds.values():
        rows = ps[0][key + ["label"]]
        common = rows if common is None else common.merge(rows, on=key + ["label"])
    if common is None or common.empty or common["label"].nunique() < 2:
        return {}
    common = common.sort_values(key).reset_index(drop=True)
    weights = patient_draw_weights(common["patient_id"].to_numpy(), n_boot, seed)
    y = common["label"].to_numpy()
    out = {}
    for cell, ps in preds.items():
        scores = [common.merge(p[key + ["score"]], on=key, how="left")["score"].to_numpy() for p in ps]
        out[cell] = np.vstack([resampled_binary_metrics(y, s, weights)["auc"] for s in scores])
    return out


def rank_cells(title: str, seed_auc: dict[str, np.ndarray], point_auc: dict[str, float],
               seed: int = 0) -> Ranking | None:
    """The bootstrap ranking of the cells in `seed_auc` (each (seeds, n_boot)), best first."""
    cells = sorted(seed_auc, key=lambda c: (-point_auc[c], c))
    if len(cells) < 2:
        return None
    rng = np.random.default_rng(seed + 1)
    n_boot = next(iter(seed_auc.values())).shape[1]
    columns = []
    for cell in cells:
        values = seed_auc[cell]
        draw = rng.integers(0, len(values), size=(n_boot, len(values)))  # seeds with replacement, per replicate
        columns.append(np.nanmean(values[draw, np.arange(n_boot)[:, None]], axis=1))
    boot = np.column_stack(columns)
    boot = boot[~np.isnan(boot).any(axis=1)]  # resamples with one class have no AUC
    return Ranking(title, cells, np.array([point_auc[c] for c in cells]),
                   np.array([len(seed_auc[c]) for c in cells]), boot)


def consensus(rankings: list[Ranking]) -> Ranking | None:
    """Rank, then aggregate: each cell's mean rank over the protocols that rank it, in every replicate
    (replicates share their patient draws across protocols), over the cells every protocol ranks."""
    if len(rankings) < 2:
        return None
    shared = sorted(set.intersection(*(set(r.cells) for r in rankings)))
    n = min(len(r.replicate_auc) for r in rankings)
    if len(shared) < 2 or n == 0:
        return None

    columns = {id(r): [r.cells.index(c) for c in shared] for r in rankings}

    def mean_rank(values: list[np.ndarray]) -> np.ndarray:  # one AUC vector per protocol -> mean rank per cell
        return np.mean([rankdata(-v, method="average") for v in values], axis=0)

    point = mean_rank([r.auc[columns[id(r)]] for r in rankings])
    boot = np.vstack([mean_rank([r.replicate_auc[b, columns[id(r)]] for r in rankings]) for b in range(n)])
    seeds = np.array([min(r.seeds[r.cells.index(c)] for r in rankings) for c in shared])
    order = np.argsort(point, kind="stable")
    # a Ranking orders by "higher is better": the negated mean rank
    return Ranking("consensus over protocols (mean rank)", [shared[i] for i in order], -point[order], seeds[order],
                   -boot[:, order])


def paper_agreement(ranking: Ranking, paper: pd.DataFrame, labels: dict[str, tuple[str, str, str]],
                    ) -> dict[str, Any] | None:
    """Kendall tau between this ranking and the paper's published AUCs over the cells both have, with
    a 95 % interval from the bootstrap replicates (the paper's numbers held fixed)."""
    published = {}
    for cell in ranking.cells:
        method, regime, variant = labels[cell]
        rows = paper[(paper.method == method) & (paper.regime == regime) & (paper.variant == variant)]
        if len(rows) and not pd.isna(rows.iloc[0]["auc"]):
            published[cell] = float(rows.iloc[0]["auc"])
    if len(published) < 4:
        return None
    idx = [ranking.cells.index(c) for c in published]
    theirs = np.array(list(published.values()))
    tau = _tau(ranking.auc[idx], theirs)
    boot = np.array([_tau(row[idx], theirs) for row in ranking.replicate_auc])
    boot = boot[~np.isnan(boot)]
    return {"n": len(published), "tau": tau, "lo": float(np.percentile(boot, 2.5)) if len(boot) else np.nan,
            "hi": float(np.percentile(boot, 97.5)) if len(boot) else np.nan,
            "paper_best": max(published, key=published.get),
            "paper_best_rank": int(rankdata(-ranking.auc[idx], method="min")[list(published).index(
                max(published, key=published.get))])}


def provenance_sentence(data_names: list[str]) -> tuple[str, bool]:
    """What the data are, and whether they are the embedded synthetic default."""
    synthetic = bool(data_names) and all(n.startswith("synthetic") for n in data_names)
    if synthetic:
        return ("These numbers come from the embedded synthetic benchmark: phantom vertebrae with stand-in "
                "pretraining on phantom corpora. It is a complete small-scale rehearsal of the protocol; it shows "
                "the mechanics and the effects within the synthetic task, and it does not rank pretraining for "
                "real CT. The same suite on your own crop store (data=STORE) is the real comparison.", True)
    return (f"These numbers come from the crop store(s) {', '.join(sorted(set(data_names)))}: a comparison on "
            "that data.", False)


def ranking_sentences(r: Ranking, claimed: bool, consensus: bool = False) -> list[str]:
    fmt = (lambda v: f"mean rank {-v:.2f}") if consensus else (lambda v: f"AUC {100 * v:.1f}")  # noqa: E731
    med, lo, hi = r.stability
    top = ", ".join(f"{c} ({fmt(r.auc[r.cells.index(c)])}, P(best) {r.p_best[r.cells.index(c)]:.2f})"
                    for c in r.top_set)
    lines = []
    if claimed:
        lines.append(f"{r.title}: {len(r.top_set)} of {len(r.cells)} cells cannot be told apart from the top "
                     f"(Holm-corrected, alpha {ALPHA}): {top}.")
    else:
        lines.append(f"{r.title}: no ranking is claimed (fewer than {MIN_SEEDS_FOR_RANKING} seeds per cell, so the "
                     f"seeds' variance is not sampled); over the test patients alone the top set would be: {top}.")
    if not np.isnan(med):
        lines.append(f"Stability of the ranking: Kendall tau between the point ranking and the bootstrap rankings, "
                     f"median {med:.2f} [95 % {lo:.2f}, {hi:.2f}].")
    return lines


def _effect_sentences(effect: pd.DataFrame) -> list[str]:
    """For each method: does pretraining help after correction, per protocol."""
    if effect.empty:
        return []
    lines = []
    for method, group in effect.groupby("method", sort=True):
        parts = []
        for protocol, g in group.groupby("protocol", sort=False):
            helps = g[(g.excluded == "") & (g.p_holm < ALPHA) & (g["diff"] > 0)]
            hurts = g[(g.excluded == "") & (g.p_holm < ALPHA) & (g["diff"] < 0)]
            tested = g[g.excluded == ""]
            for word, rows in (("helps", helps), ("hurts", hurts)):
                if len(rows):
                    parts.append(f"under {protocol}, " + "; ".join(
                        f"{r.regime} {word} ({100 * r.diff:+.1f} AUC points, Holm p {r.p_holm:.3g})"
                        for r in rows.itertuples()))
            if len(tested) and not len(helps) and not len(hurts):
                parts.append(f"under {protocol}, no pretrained regime differs from scratch after correction")
            if not len(tested):
                parts.append(f"under {protocol}, nothing can be said ({'; '.join(sorted(set(g.excluded)))})")
        lines.append(f"{method}: " + "; ".join(parts) + ".")
    return lines


def verdict_section(runs: pd.DataFrame, effect: pd.DataFrame, paper: pd.DataFrame, protocols: list[str],
                    geometries: list[str], n_boot: int) -> dict[str, Any] | None:
    """The report's first section: rankings with their uncertainty, and sentences from the numbers."""
    from bench.reports import plots

    if runs.empty:
        return None
    learned = runs[runs.not_learned == ""]
    labels = {cell_label(m, r, v): (m, r, v) for m, r, v in zip(runs.method, runs.regime, runs.variant)}
    text, synthetic = provenance_sentence(sorted(set(runs.data)))
    caveats = [text]
    n_pos = int(runs["n_test_positive"].fillna(0).max())
    if n_pos < 30:
        caveats.append(f"The test split is smoke-sized ({n_pos} fractured vertebrae): no difference here means "
                       "anything.")
    min_seeds = int(learned.groupby(["protocol", "method", "regime", "variant"]).size().min()) if len(learned) else 0
    claimed = min_seeds >= MIN_SEEDS_FOR_RANKING and n_pos >= 30
    if min_seeds < MIN_SEEDS_FOR_RANKING:
        caveats.append(f"No ranking is claimed: some cells have {min_seeds} seed(s), fewer than "
                       f"{MIN_SEEDS_FOR_RANKING}, so the variance between seeds (pretraining, initialisation, "
                       f"augmentation, data order) is not sampled. Run the suite with seeds=3 or more.")
    blocks = []
    datasets = sorted(set(learned.data)) or [""]
    for data in datasets:
        for geometry in geometries:
            where = ", ".join(filter(None, [f"data {data}" if len(datasets) > 1 else "",
                                            f"input {geometry}" if len(geometries) > 1 else ""]))
            same = []
            for protocol in protocols:
                part = learned[(learned.protocol == protocol) & ((learned.geometry == geometry) | (geometry == ""))
                               & (learned.data == data)]
                if part.empty:
                    continue
                seed_auc = per_seed_auc(part, n_boot)
                point = part.groupby(["method", "regime", "variant"])["auc"].mean()
                ranking = rank_cells(protocol + (f", {where}" if where else ""), seed_auc,
                                     {cell_label(*k): float(v) for k, v in point.items()})
                if ranking is not None:
                    same.append(ranking)
                    blocks.append(_block(ranking, claimed, paper, labels, plots))
            both = consensus(same)
            if both is not None:
                both.title += f", {where}" if where else ""
                blocks.append(_block(both, claimed, paper, labels, plots, agreement=False))
    return {"caveats": caveats, "synthetic": synthetic, "claimed": claimed, "blocks": blocks,
            "effects": _effect_sentences(effect), "alpha": ALPHA, "n_boot": n_boot}


def _p_text(p: float, n_boot: int) -> str:
    """A bootstrap p-value; 0 means below the resolution of the replicates, so it says so."""
    if np.isnan(p):
        return ""
    return f"< {1 / max(n_boot, 1):.2g}" if p == 0 else f"{p:.3g}"


def _block(r: Ranking, claimed: bool, paper: pd.DataFrame, labels: dict, plots: Any,
           agreement: bool = True) -> dict[str, Any]:
    med, lo, hi = r.stability
    rows = [{"cell": c, "value": f"{100 * r.auc[i]:.1f}" if agreement else f"{-r.auc[i]:.2f}",
             "seeds": int(r.seeds[i]), "p_best": f"{r.p_best[i]:.2f}", "p_top3": f"{r.p_top3[i]:.2f}",
             "median_rank": f"{np.median(r.ranks[:, i]):g}" if len(r.ranks) else "",
             "p_holm": _p_text(r.p_holm[i], len(r.replicate_auc)), "top": c in r.top_set}
            for i, c in enumerate(r.cells)]
    agree = paper_agreement(r, paper, labels) if agreement else None
    return {"title": r.title, "rows": rows, "sentences": ranking_sentences(r, claimed, consensus=not agreement),
            "stability": {"median": med, "lo": lo, "hi": hi}, "plot": plots.rank_blob_plot(r),
            "consensus": not agreement, "agreement": agree}
