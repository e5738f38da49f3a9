"""`bench report`: the results store -> one self-contained index.html laid out like the paper."""
from __future__ import annotations

from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from jinja2 import Environment, select_autoescape

from bench import regimes
from bench.reports import plots
from bench.reports.collect import load_runs
from bench.reports.stats import GRADE_COLUMNS, METRICS, cells, critical_difference, delong_vs_best, grade_cells
from bench.store import write_text_atomic

TABLE3 = ("models_genesis", "vit_unetr", "swin_unetr", "mae3d", "video_mae", "video_ct_mae")
TABLE4 = ("densenet121", "densenet169", "resnet18", "resnet50", "vit_b", "vit_l", "engstler")
TABLE2 = ("no_video_pretraining", "no_vertebra_pretraining", "no_multi_view", "no_pe_cropping",
          "no_format_adaptation", "no_vertebra_pretraining_no_pe_cropping", "full")


def paper_results() -> pd.DataFrame:
    text = resources.files("bench.reports").joinpath("paper_results.csv").read_text()
    import io

    return pd.read_csv(io.StringIO(text), dtype={"variant": str}).fillna({"variant": ""})


def _mean_sd(cell: pd.Series, metric: str) -> str:
    sd = cell[f"{metric}_sd"]
    return plots.fmt(cell[metric]) + ("" if np.isnan(sd) else f" ± {plots.fmt(sd)}")


def _rows(keys: list[tuple[str, str, str]], table: pd.DataFrame, paper: pd.DataFrame, key_of, delong) -> list[dict]:
    present = table.set_index(["method", "regime", "variant"]) if not table.empty else None
    best = {m: table[m].max() for m in METRICS} if not table.empty else {}
    out = []
    for method, regime, variant in keys:
        same_variant = paper.variant == (variant if variant != "" else paper.variant)
        pub = paper[(paper.method == method) & (paper.regime == regime) & same_variant]
        pub_row = pub.iloc[0] if len(pub) else None
        row: dict[str, Any] = {"method": method, "key": key_of(regime, variant),
                               "paper": {m: ("" if pub_row is None or pd.isna(pub_row[m]) else f"{pub_row[m]:.1f}")
                                         for m in METRICS}}
        if present is None or (method, regime, variant) not in present.index:
            row["missing"] = True
        else:
            c = present.loc[(method, regime, variant)]
            row.update(missing=False, seeds=int(c["seeds"]))
            row["cell"] = {m: _mean_sd(c, m) for m in METRICS}
            row["cis"] = {m: (f"[{plots.fmt(c[f'{m}_lo'])}, "
                              f"{plots.fmt(c[f'{m}_hi'])}]" if not np.isnan(c[f"{m}_lo"]) else "") for m in METRICS}
            row["best"] = {m: bool(c[m] == best[m]) for m in METRICS}
            p = delong.get((method, regime, variant))
            row["delong"] = "best" if row["best"]["auc"] else ("" if p is None else f"{p:.3g}")
        out.append(row)
    return out


def _grade_section(runs: pd.DataFrame, n_boot: int) -> dict[str, Any] | None:
    """The Genant grading table (task=grade runs on all training patients)."""
    grade = runs[(runs.task == "grade") & (runs.train_fraction == 1.0)]
    if grade.empty:
        return None
    table = grade_cells(grade, n_boot)
    best = {m: table[m].max() for m in GRADE_COLUMNS}
    rows = []
    for _, c in table.sort_values("macro_f1", ascending=False).iterrows():
        rows.append({
            "method": c["method"], "key": c["regime"] + (f" / {c['variant']}" if c["variant"] else ""),
            "seeds": int(c["seeds"]), "cell": {m: _mean_sd(c, m) for m in GRADE_COLUMNS},
            "cis": {m: (f"[{plots.fmt(c[f'{m}_lo'])}, "
                        f"{plots.fmt(c[f'{m}_hi'])}]" if f"{m}_lo" in c and not np.isnan(c[f"{m}_lo"]) else "")
                    for m in GRADE_COLUMNS},
            "best": {m: bool(c[m] == best[m]) for m in GRADE_COLUMNS},
        })
    return {"columns": GRADE_COLUMNS, "rows": rows}


def _figures(runs: pd.DataFrame, table: pd.DataFrame, everything: pd.DataFrame) -> list[tuple[str, str]]:
    """The report's plots, as (title, inline image)."""
    figures = []
    if not runs.empty:
        figures += [("Test AUC per method and regime", plots.metric_plot(table, "auc")),
                    ("Test F1 per method and regime", plots.metric_plot(table, "f1")),
                    ("ROC and precision-recall curves", plots.roc_pr_plot(runs)),
                    ("Finetuning learning curves", plots.learning_curves(runs))]
    pre = plots.pretraining_curves(everything)
    if pre:
        figures.append(("Pretraining loss curves", pre))
    if not runs.empty:
        figures.append(("Cost per run", plots.cost_plot(table)))
        cd = critical_difference(runs)
        if cd is not None:
            figures.append(("Critical-difference diagram", plots.cd_plot(*cd)))
    return figures


def build_report(run_dirs: list[Path], out: Path, name: str, n_boot: int = 300) -> Path:
    everything = load_runs(run_dirs)
    # The paper's tables hold the binary task on all training patients; grading and label-efficiency
    # runs get their own sections, so a cell never mixes tasks or training-set sizes.
    runs = everything[(everything.task == "fracture") & (everything.train_fraction == 1.0)]
    table = cells(runs, n_boot) if not runs.empty else pd.DataFrame(columns=["method", "regime", "variant", "seeds"])
    paper = paper_results()
    tables = []
    sort_regime = regimes.order

    def add(title, caption, keys, key_label, key_of, members):
        sub = table[[k in members for k in zip(table.method, table.regime, table.variant)]]
        if sub.empty:
            return
        delong = delong_vs_best(runs, sub)
        rows = _rows(keys, sub, paper, key_of, delong)
        tables.append({"title": title, "caption": caption, "key_label": key_label, "rows": rows})

    t3_keys = [(m, r, "full" if m == "video_ct_mae" else "") for m in TABLE3
               for r in sorted(set(paper[(paper.table == 3) & (paper.method == m)].regime) |
                               set(table[table.method == m].regime), key=sort_regime)]
    add("Table 3: pretraining regimes", "Each method from scratch, with public weights, and adapted to vertebrae.",
        t3_keys, "pretraining", lambda r, v: r, set(t3_keys))
    t4_keys = [(m, "scratch", "") for m in TABLE4] + [("video_ct_mae", "public_to_vertebrae", "full")]
    add("Table 4: baselines", "Trained from scratch, against Video-CT MAE (public_to_vertebrae).",
        t4_keys, "pretraining", lambda r, v: r, set(t4_keys))
    t2_keys = [("video_ct_mae", "public_to_vertebrae", v) for v in TABLE2]
    add("Table 2: Video-CT MAE ablations", "Each row removes one component of the full method (public_to_vertebrae).",
        t2_keys, "variant", lambda r, v: v, set(t2_keys))
    shown = set(t3_keys) | set(t4_keys) | set(t2_keys)
    other = [k for k in zip(table.method, table.regime, table.variant) if k not in shown]
    if other:
        add("Other runs", "Methods and regimes outside the paper's tables (plugins included).",
            sorted(other, key=lambda k: (k[0], sort_regime(k[1]), k[2])), "pretraining",
            lambda r, v: r + (f" / {v}" if v else ""), set(other))

    figures = _figures(runs, table, everything)
    fractions = everything[everything.task == "fracture"]
    label_efficiency = None
    if fractions["train_fraction"].nunique() > 1:
        points = cells(fractions, n_boot, by=("train_fraction",))
        label_efficiency = {
            "plot": plots.label_efficiency_plot(points),
            "rows": [{"cell": f"{r.method} / {r.regime}" + (f" / {r.variant}" if r.variant else ""),
                      "fraction": f"{r.train_fraction:g}", "seeds": int(r.seeds),
                      "auc": plots.fmt(r.auc) + (f" ± {plots.fmt(r.auc_sd)}" if not np.isnan(r.auc_sd) else ""),
                      "ci": f"[{plots.fmt(r.auc_lo)}, {plots.fmt(r.auc_hi)}]" if not np.isnan(r.auc_lo) else "",
                      "f1": plots.fmt(r.f1)}
                     for r in points.sort_values(["method", "regime", "variant", "train_fraction"]).itertuples()],
        }
    grading = _grade_section(everything, n_boot)
    runs = everything

    provenance = [{"run": Path(r.folder).name, "seed": r.seed, "preset": r.preset, "fingerprint": r.fingerprint[:12],
                   "commit": (r.commit or "")[:10], "torch": r.torch, "hardware": f"{r.cpu}; GPUs: {r.cuda or 'none'}",
                   "started": r.started, "config": r.config_text} for r in runs.itertuples()]
    env = Environment(autoescape=select_autoescape(default=True, default_for_string=True))
    template = env.from_string(resources.files("bench.reports").joinpath("templates", "report.html.j2").read_text())
    from bench import __version__

    html = template.render(
        name=name, n_runs=len(runs), n_cells=len(table), seeds=sorted(set(table.seeds)),
        grading=grading, label_efficiency=label_efficiency,
        data=", ".join(sorted(set(runs.data))), tables=tables, metrics=METRICS, plots=figures,
        provenance=provenance, version=__version__, generated=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    target = out / "index.html"
    write_text_atomic(target, html)
    return target
