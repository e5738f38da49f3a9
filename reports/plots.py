"""Seaborn figures of the report, returned as inline PNG data URIs (the report opens offline)."""
from __future__ import annotations

import base64
import io
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.ticker import NullFormatter  # noqa: E402
from sklearn.metrics import precision_recall_curve, roc_curve  # noqa: E402


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _label(df: pd.DataFrame) -> pd.Series:
    return df["method"] + " / " + df["regime"] + df["variant"].map(lambda v: f" / {v}" if v else "")


REGIMES = ("scratch", "public", "public_to_vertebrae", "vertebrae")


def regime_palette(regimes: list[str] | None = None) -> dict[str, Any]:
    """One colour per regime, the same in every figure of every report (plugins' own regimes after)."""
    names = list(REGIMES) + sorted(set(regimes or []) - set(REGIMES))
    return dict(zip(names, sns.color_palette("colorblind", len(names))))


def metric_plot(cells: pd.DataFrame, metric: str) -> str:
    df = cells.assign(cell=_label(cells)).sort_values(metric)
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(df) + 1.2))
    palette = regime_palette(df["regime"].tolist())
    sns.scatterplot(data=df, x=metric, y="cell", hue="regime", ax=ax, s=50, palette=palette,
                    hue_order=[r for r in palette if r in set(df["regime"])])
    ax.errorbar(df[metric], df["cell"], xerr=[df[metric] - df[f"{metric}_lo"], df[f"{metric}_hi"] - df[metric]],
                fmt="none", ecolor="grey", capsize=3)
    ax.set_xlabel(f"test {metric.upper()} (95 % patient-bootstrap CI)")
    ax.set_ylabel("")
    ax.legend(fontsize=7, title="regime", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _png(fig)


def roc_pr_plot(runs: pd.DataFrame) -> str:
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    for (label, group) in runs.assign(cell=_label(runs)).groupby("cell"):
        pred = pd.read_parquet(f"{group['folder'].iloc[0]}/predictions.parquet")  # the first seed
        if pred["label"].nunique() < 2:
            continue
        fpr, tpr, _ = roc_curve(pred["label"], pred["score"])
        prec, rec, _ = precision_recall_curve(pred["label"], pred["score"])
        ax1.plot(fpr, tpr, label=label, lw=1)
        ax2.plot(rec, prec, label=label, lw=1)
    ax1.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax1.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC (first seed)")
    ax2.set(xlabel="recall", ylabel="precision", title="precision-recall (first seed)")
    ax2.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _png(fig)


def learning_curves(runs: pd.DataFrame) -> str:
    rows = [{"cell": c, "seed": s, **e} for c, s, epochs in zip(_label(runs), runs["seed"],
                                                                runs["epochs"]) for e in epochs]
    df = pd.DataFrame(rows)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    if not df.empty:
        sns.lineplot(data=df, x="epoch", y="train_loss", hue="cell", ax=ax1, legend=False, lw=1)
        sns.lineplot(data=df, x="epoch", y="val_auc", hue="cell", ax=ax2, lw=1)
        ax2.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax1.set_title("finetuning: training loss")
    ax2.set_title("finetuning: validation AUC")
    return _png(fig)


def pretraining_curves(runs: pd.DataFrame) -> str | None:
    seen, rows = set(), []
    for _, r in runs.iterrows():
        if not r["pretrain_curve"] or r["artifact"] in seen:
            continue
        seen.add(r["artifact"])
        for e in r["pretrain_curve"]:
            rows.append({"run": f"{r['method']} ({r['regime']})", "epoch": e["epoch"], "loss": e["loss"]})
    if not rows:
        return None
    df = pd.DataFrame(rows)
    fig, ax = plt.subplots(figsize=(7, 4))
    sns.lineplot(data=df, x="epoch", y="loss", hue="run", ax=ax, lw=1.2)
    ax.set(title="self-supervised pretraining loss (as the paper's Figure 4)", yscale="log")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _png(fig)


def cost_plot(cells: pd.DataFrame) -> str:
    df = cells.assign(cell=_label(cells))
    fig, axes = plt.subplots(1, 3, figsize=(13, 0.3 * len(df) + 1.5), sharey=True)
    for ax, col, title in zip(axes, ("s_per_epoch", "pretrain_s", "n_params"),
                              ("finetuning s / epoch", "pretraining s (shared artifacts)", "parameters")):
        sns.barplot(data=df, x=df[col].fillna(0), y="cell", ax=ax, color="steelblue")
        ax.set(title=title, xlabel="", ylabel="")
    return _png(fig)


def label_efficiency_plot(points: pd.DataFrame, metric: str = "auc") -> str:
    """Metric against the share of training patients, one line per method / regime, with the
    95 % patient-bootstrap CI of each point (the figure Ke et al. argue from)."""
    df = points.assign(cell=_label(points)).sort_values(["cell", "train_fraction"])
    fig, ax = plt.subplots(figsize=(8, 4.5))
    palette = dict(zip(sorted(df["cell"].unique()), sns.color_palette("tab10", df["cell"].nunique())))
    for cell, g in df.groupby("cell"):
        ax.errorbar(g["train_fraction"], g[metric], yerr=[g[metric] - g[f"{metric}_lo"], g[f"{metric}_hi"] - g[metric]],
                    marker="o", capsize=3, lw=1.2, color=palette[cell], label=cell)
    ax.set(xscale="log", xlabel="share of training patients (log scale)", ylabel=f"test {metric.upper()}",
           title=f"label efficiency: test {metric.upper()} with 95 % patient-bootstrap CI")
    ax.set_xticks(sorted(df["train_fraction"].unique()), [f"{f:g}" for f in sorted(df["train_fraction"].unique())])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _png(fig)


def cd_plot(ranks, sig) -> str:
    import scikit_posthocs as sp

    fig, ax = plt.subplots(figsize=(9, 0.25 * len(ranks) + 1.5))
    sp.critical_difference_diagram(ranks, sig, ax=ax)
    ax.set_title("critical difference (Friedman + Nemenyi over seeds, test AUC)")
    return _png(fig)


def rank_blob_plot(ranking: Any) -> str:
    """The challengeR blob plot: per cell (rows, in point order), a disc per rank whose area is how
    often the bootstrap gave that rank; the cross marks the median rank."""
    n = len(ranking.cells)
    fig, ax = plt.subplots(figsize=(7, 0.32 * n + 1.4))
    for row in range(n):
        ranks, counts = np.unique(ranking.ranks[:, row], return_counts=True)
        ax.scatter(ranks, np.full(len(ranks), row), s=300 * counts / counts.sum() + 2, color="steelblue", alpha=0.75)
        ax.scatter([np.median(ranking.ranks[:, row])], [row], marker="x", color="black", s=25)
    ax.set_yticks(range(n), ranking.cells, fontsize=7)
    ax.invert_yaxis()
    ax.set_xticks(range(1, n + 1))
    ax.set(xlabel="rank in bootstrap replicates (patients and seeds resampled)", title=ranking.title)
    ax.grid(axis="x", lw=0.3)
    return _png(fig)


def fmt(value: float, digits: int = 1) -> str:
    return "" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{100 * value:.{digits}f}"
