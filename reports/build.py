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
from bench.protocols import PROTOCOLS
from bench.reports import plots
from bench.reports.collect import EXECUTION_KEYS, load_failures, load_runs
from bench.reports.efficiency import efficiency_rows, load_machine, stage_compute
from bench.reports.explain_section import explain_section
from bench.reports.export import CELL_COLUMNS, cell_rows, write_cells
from bench.reports.stats import (
    GRADE_COLUMNS,
    METRICS,
    WORSE_THAN_CHANCE,
    adjust,
    cells,
    critical_difference,
    delong_vs_best,
    detectable_difference,
    did_not_learn,
    grade_cells,
    pretraining_effect,
    sd_sources,
)
from bench.reports.verdict import verdict_section
from bench.store import write_text_atomic

TABLE3 = ("models_genesis", "vit_unetr", "swin_unetr", "mae3d", "video_mae", "video_ct_mae")
# today's public 3D CT checkpoints, shown beside Table 3 under the same protocol
TODAY = ("openmind_resencl", "openmind_primusm", "voco", "suprem", "suprem_unet", "ctfm", "merlin", "spectre")
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


def _cis(c: pd.Series, metric: str) -> str:
    lo = c.get(f"{metric}_lo", np.nan)
    return "" if pd.isna(lo) else f"[{plots.fmt(lo)}, {plots.fmt(c[f'{metric}_hi'])}]"


def _rows(keys: list[tuple[str, str, str]], table: pd.DataFrame, paper: pd.DataFrame, key_of, delong,
          failed: dict[tuple, str], runs: pd.DataFrame) -> list[dict]:
    """One row per key: the cell (or why there is none), the published numbers beside it. Bold and
    "best" go to the best cell among those whose model learned. "vs best" is one family of tests per
    table: the raw DeLong p, Holm's adjusted p and the BH q-value of each learned cell against the best."""
    holm, bh = adjust(list(delong.values()))
    adjusted = {k: (h, q) for k, h, q in zip(delong, holm, bh)}
    present = table.set_index(["method", "regime", "variant"]) if not table.empty else None
    learned = table[table["not_learned"] == ""] if not table.empty else table
    best = {m: learned[m].max() for m in METRICS} if not learned.empty else {}
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
            row["failed"] = failed.get((method, regime, variant), "")
            out.append(row)
            continue
        c = present.loc[(method, regime, variant)]
        row.update(missing=False, seeds=int(c["seeds"]), not_learned=c["not_learned"],
                   worse=str(c["not_learned"]).startswith(WORSE_THAN_CHANCE))
        members = runs[(runs.method == method) & (runs.regime == regime) & (runs.variant == variant)]
        row["sources"] = sd_sources(members) if len(members) > 1 else "one seed: no sd"
        row["weights"] = ", ".join(sorted(set(members["weights"]) - {""})) if "weights" in members else ""
        row["cell"] = {m: _mean_sd(c, m) for m in METRICS}
        row["cis"] = {m: _cis(c, m) for m in METRICS}
        row["best"] = {m: bool(not c["not_learned"] and c[m] == best.get(m)) for m in METRICS}
        p = delong.get((method, regime, variant))
        row["delong"] = "best" if row["best"]["auc"] else ("" if p is None else f"{p:.3g}")
        h, q = adjusted.get((method, regime, variant), (None, None))
        row["holm"] = "" if h is None else f"{h:.3g}"
        row["bh"] = "" if q is None else f"{q:.3g}"
        row["indistinguishable"] = h is not None and h >= 0.05
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
            "cis": {m: _cis(c, m) for m in GRADE_COLUMNS},
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
        geometries = sorted(set(runs.geometry))
        for geometry in geometries:  # cells of one input geometry only; models that did not learn stay out
            cd = critical_difference(runs[(runs.not_learned == "") & (runs.geometry == geometry)])
            if cd is not None:
                where = f" (input {geometry})" if len(geometries) > 1 else ""
                figures.append((f"Critical-difference diagram{where}", plots.cd_plot(*cd)))
    return figures


def _learning_marks(runs: pd.DataFrame) -> pd.Series:
    """Per run: why its model did not learn, or ""."""
    return pd.Series([did_not_learn(r, pd.read_parquet(Path(r["folder"]) / "predictions.parquet"))
                      for _, r in runs.iterrows()], index=runs.index, dtype=object)


def _test_size(runs: pd.DataFrame) -> dict[str, Any]:
    n, pos = int(runs["n_test"].max()), int(runs["n_test_positive"].fillna(0).max())
    return {"n": n, "positives": pos, "smoke": pos < 30,
            "detectable": detectable_difference(pos, n - pos) if pos and n > pos else float("nan")}


def _paper_tables(runs: pd.DataFrame, protocol: str, fraction: float, n_boot: int, paper: pd.DataFrame,
                  failures: list[dict[str, Any]], geometry: str = "") -> list[dict[str, Any]]:
    """Tables 3, 4, 2 and "Other runs" for one protocol's runs of one input geometry."""
    table = cells(runs, n_boot)
    reasons = runs.groupby(["method", "regime", "variant"], sort=False)["not_learned"].agg(
        lambda r: next((x for x in r if x), ""))
    table["not_learned"] = [reasons[k] for k in zip(table.method, table.regime, table.variant)]
    failed = {(f["method"], f["regime"], f["variant"]): f["error"] for f in failures if f["protocol"] == protocol}
    size = _test_size(runs)
    suffix = f" (protocol: {protocol}" + (f", training fraction {fraction:g}" if fraction != 1.0 else "") + \
        (f", input {geometry})" if geometry else ")")
    tables: list[dict[str, Any]] = []

    def add(title, caption, keys, key_label, key_of):
        members = set(keys)
        sub = table[[k in members for k in zip(table.method, table.regime, table.variant)]]
        if sub.empty and not members & set(failed):
            return
        learned_runs = runs[runs.not_learned == ""]
        delong = delong_vs_best(learned_runs, sub[sub.not_learned == ""])
        tables.append({"title": title + suffix, "caption": caption, "key_label": key_label, "size": size,
                       "rows": _rows(keys, sub, paper, key_of, delong, failed, runs),
                       "cells": cell_rows(title + suffix, protocol, fraction, keys, sub, key_of, delong, size)})

    order = regimes.order
    t3_keys = [(m, r, "full" if m == "video_ct_mae" else "") for m in TABLE3
               for r in sorted(set(paper[(paper.table == 3) & (paper.method == m)].regime) |
                               set(table[table.method == m].regime), key=order)]
    add("Table 3: pretraining regimes", "Each method from scratch, with public weights, and adapted to vertebrae.",
        t3_keys, "pretraining", lambda r, v: r)
    ran = {(m, r) for m, r in zip(table.method, table.regime)} | {(k[0], k[1]) for k in failed}
    today_keys = [(m, r, "") for m in TODAY for r in sorted({r for mm, r in ran if mm == m}, key=order)]
    add("Today's checkpoints", "The public 3D CT checkpoints of 2024-2026 (OpenMind/nnssl, VoCo, SuPreM, CT-FM, "
        "Merlin, SPECTRE), each from scratch and from its own pretraining, beside Table 3.", today_keys,
        "pretraining", lambda r, v: r)
    t4_keys = [(m, "scratch", "") for m in TABLE4] + [("video_ct_mae", "public_to_vertebrae", "full")]
    add("Table 4: baselines", "Trained from scratch, against Video-CT MAE (public_to_vertebrae).",
        t4_keys, "pretraining", lambda r, v: r)
    t2_keys = [("video_ct_mae", "public_to_vertebrae", v) for v in TABLE2]
    add("Table 2: Video-CT MAE ablations", "Each row removes one component of the full method (public_to_vertebrae).",
        t2_keys, "variant", lambda r, v: v)
    shown = set(t3_keys) | set(today_keys) | set(t4_keys) | set(t2_keys)
    other = sorted({k for k in [*zip(table.method, table.regime, table.variant), *failed] if k not in shown},
                   key=lambda k: (k[0], order(k[1]), k[2]))
    if other:
        add("Other runs", "Methods and regimes outside the paper's tables (plugins included).",
            other, "pretraining", lambda r, v: r + (f" / {v}" if v else ""))
    return tables


def _effect_rows(effect: pd.DataFrame, several_geometries: bool) -> list[dict[str, Any]]:
    adjusted = lambda v: "" if pd.isna(v) else f"{v:.3g}"  # noqa: E731
    return [{"method": r.method + (f" / {r.variant}" if r.variant else ""), "protocol": r.protocol,
             "regime": r.regime + (f" ({r.geometry})" if several_geometries else ""),
             "auc_pre": plots.fmt(r.auc_pre), "auc_scratch": plots.fmt(r.auc_scratch),
             "diff": f"{100 * r.diff:+.1f}", "ci": f"[{100 * r.lo:+.1f}, {100 * r.hi:+.1f}]", "p": f"{r.p:.3g}",
             "holm": adjusted(r.p_holm), "bh": adjusted(r.q_bh), "excluded": r.excluded,
             "significant": not r.excluded and r.p_holm < 0.05} for r in effect.itertuples()]


def _table_fraction(runs: pd.DataFrame) -> float:
    """The training fraction the paper's tables show: all patients, or else the largest one run."""
    fractions = set(runs.loc[runs.task == "fracture", "train_fraction"])
    return 1.0 if 1.0 in fractions or not fractions else max(fractions)


def build_report(run_dirs: list[Path], out: Path, name: str, n_boot: int = 300) -> Path:
    everything = load_runs(run_dirs)
    failures = load_failures(run_dirs)
    # The paper's tables hold the binary task at one training fraction; grading and label-efficiency
    # runs get their own sections, so a cell never mixes tasks or training-set sizes.
    fraction = _table_fraction(everything)
    runs = everything[(everything.task == "fracture") & (everything.train_fraction == fraction)]
    runs = runs.assign(not_learned=_learning_marks(runs) if not runs.empty else pd.Series(dtype=object))
    paper = paper_results()
    protocols = [p for p in PROTOCOLS if p in set(runs.protocol) | {f["protocol"] for f in failures}]
    geometries = sorted(set(runs.geometry)) or [""]
    tables = [t for p in protocols for g in geometries
              for t in _paper_tables(runs[(runs.protocol == p) & ((runs.geometry == g) | (g == ""))], p, fraction,
                                     n_boot, paper,
                                     failures if g == geometries[0] else [], g if len(geometries) > 1 else "")]
    effect = pretraining_effect(runs, n_boot) if not runs.empty else pd.DataFrame()
    main = runs[runs.protocol == protocols[0]] if protocols else runs
    table = cells(main, n_boot) if not main.empty else pd.DataFrame(columns=["method", "regime", "variant", "seeds"])
    figures = _figures(main, table, everything)
    html = _render(name, everything, table, tables, figures, {
        "grading": _grade_section(everything, n_boot), "label_efficiency": _label_efficiency(everything, n_boot),
        "effect": _effect_rows(effect, len(geometries) > 1) if not effect.empty else [], "failures": failures,
        "not_learned": [{"run": Path(r.folder).name, "reason": r.not_learned,
                         "worse": r.not_learned.startswith(WORSE_THAN_CHANCE)} for r in runs.itertuples()
                        if r.not_learned],
        "verdict": verdict_section(runs, effect, paper, protocols, geometries, n_boot),
        "explained": explain_section(everything),
        "compute": efficiency_rows(stage_compute(list(everything.folder)), load_machine(run_dirs)),
    })
    target = out / "index.html"
    write_text_atomic(target, html)
    frames = [t["cells"] for t in tables if not t["cells"].empty]
    write_cells(pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(CELL_COLUMNS)), out)
    return target


def _label_efficiency(everything: pd.DataFrame, n_boot: int) -> dict[str, Any] | None:
    fractions = everything[(everything.task == "fracture") & (everything.protocol == "finetune")]
    if fractions["train_fraction"].nunique() < 2:
        return None
    points = cells(fractions, n_boot, by=("train_fraction",))
    return {
        "plot": plots.label_efficiency_plot(points),
        "rows": [{"cell": f"{r.method} / {r.regime}" + (f" / {r.variant}" if r.variant else ""),
                  "fraction": f"{r.train_fraction:g}", "seeds": int(r.seeds),
                  "auc": plots.fmt(r.auc) + (f" ± {plots.fmt(r.auc_sd)}" if not np.isnan(r.auc_sd) else ""),
                  "ci": f"[{plots.fmt(r.auc_lo)}, {plots.fmt(r.auc_hi)}]" if not np.isnan(r.auc_lo) else "",
                  "f1": plots.fmt(r.f1)}
                 for r in points.sort_values(["method", "regime", "variant", "train_fraction"]).itertuples()],
    }


def _render(name: str, runs: pd.DataFrame, table: pd.DataFrame, tables: list, figures: list,
            sections: dict[str, Any]) -> str:
    provenance = [{"run": Path(r.folder).name, "seed": r.seed, "preset": r.preset, "fingerprint": r.fingerprint[:12],
                   "commit": (r.commit or "")[:10], "torch": r.torch, "hardware": f"{r.cpu}; GPUs: {r.cuda or 'none'}",
                   "started": r.started, "config": r.config_text} for r in runs.itertuples()]
    env = Environment(autoescape=select_autoescape(default=True, default_for_string=True))
    template = env.from_string(resources.files("bench.reports").joinpath("templates", "report.html.j2").read_text())
    from bench import __version__

    return template.render(
        name=name, n_runs=len(runs), n_cells=len(table), seeds=sorted(set(table.seeds)), **sections,
        execution_keys=EXECUTION_KEYS,
        config_splits=sorted({f"{m} / {r} / {v}" for m, r, v in zip(runs.method, runs.regime, runs.variant)
                              if "cfg " in v}),
        data=", ".join(sorted(set(runs.data))), tables=tables, metrics=METRICS, plots=figures,
        provenance=provenance, version=__version__, generated=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
