"""The report's table cells beyond the HTML: `cells.csv` and `cells.parquet` (one row per cell of
every table: metrics with sd and CI, seeds, protocol, DeLong p, "did not learn") and `tables.tex`
(booktabs tables in the paper's layout, built from the same rows)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from bench.reports.stats import METRICS, adjust
from bench.store import write_text_atomic

CELL_COLUMNS = ("table", "protocol", "train_fraction", "method", "regime", "variant", "key", "seeds",
                *(f"{m}{s}" for m in METRICS for s in ("", "_sd", "_lo", "_hi")),
                "delong_p", "delong_p_holm", "delong_q_bh", "best", "not_learned", "n_test", "n_test_positive")


def cell_rows(title: str, protocol: str, fraction: float, keys: list[tuple[str, str, str]], table: pd.DataFrame,
              key_of, delong: dict, size: dict) -> pd.DataFrame:
    """The present cells of one table, in its row order, with numbers unformatted."""
    present = table.set_index(["method", "regime", "variant"]) if not table.empty else None
    learned = table[table["not_learned"] == ""] if not table.empty else table
    best_auc = learned["auc"].max() if not learned.empty else np.nan
    holm, bh = adjust(list(delong.values()))
    adjusted = {k: (h, q) for k, h, q in zip(delong, holm, bh)}
    rows = []
    for method, regime, variant in keys:
        if present is None or (method, regime, variant) not in present.index:
            continue
        c = present.loc[(method, regime, variant)]
        is_best = bool(not c["not_learned"] and c["auc"] == best_auc)
        rows.append({"table": title, "protocol": protocol, "train_fraction": fraction, "method": method,
                     "regime": regime, "variant": variant, "key": key_of(regime, variant), "seeds": int(c["seeds"]),
                     **{f"{m}{s}": float(c[f"{m}{s}"]) for m in METRICS for s in ("", "_sd", "_lo", "_hi")},
                     "delong_p": np.nan if is_best else float(delong.get((method, regime, variant), np.nan)),
                     "delong_p_holm": np.nan if is_best else adjusted.get((method, regime, variant), (np.nan,))[0],
                     "delong_q_bh": np.nan if is_best else adjusted.get((method, regime, variant), (np.nan, np.nan))[1],
                     "best": is_best, "not_learned": c["not_learned"], "n_test": size["n"],
                     "n_test_positive": size["positives"]})
    return pd.DataFrame(rows, columns=list(CELL_COLUMNS))


TEX_ESCAPES = {"\\": r"\textbackslash{}", "_": r"\_", "%": r"\%", "&": r"\&", "#": r"\#", "$": r"\$",
               "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
               "<": r"\textless{}", ">": r"\textgreater{}"}


def _tex(text: str) -> str:
    """A name as LaTeX text: every special character escaped, one character at a time."""
    return "".join(TEX_ESCAPES.get(char, char) for char in str(text))


def tex_number(mean: float, sd: float, lo: float, hi: float) -> str:
    """`81.2 ± 1.3 [78.0, 84.1]`, in percent as the paper prints them; a missing value is `--`."""
    if np.isnan(mean):
        return "--"
    text = f"{100 * mean:.1f}" + ("" if np.isnan(sd) else rf" $\pm$ {100 * sd:.1f}")
    return text + ("" if np.isnan(lo) else f" [{100 * lo:.1f}, {100 * hi:.1f}]")


def latex_tables(cells: pd.DataFrame) -> str:
    """One booktabs table per report table: method, pretraining (or variant), F1, ACC, AUC, AP,
    DeLong p; the best learned AUC in bold, cells that did not learn in grey and marked."""
    parts = ["% vertebench report tables; needs \\usepackage{booktabs,xcolor}"]
    for title, group in cells.groupby("table", sort=False):
        parts += [r"\begin{table}", r"\centering", rf"\caption{{{_tex(title)}}}", r"\begin{tabular}{llrrrrr}",
                  r"\toprule", r"Method & Pretraining & F1 & ACC & AUC & AP & DeLong $p$ \\", r"\midrule"]
        for r in group.itertuples():
            values = [tex_number(getattr(r, m), getattr(r, f"{m}_sd"), getattr(r, f"{m}_lo"), getattr(r, f"{m}_hi"))
                      for m in METRICS]
            if r.best:
                values[METRICS.index("auc")] = rf"\textbf{{{values[METRICS.index('auc')]}}}"
            p = "best" if r.best else ("--" if np.isnan(r.delong_p) else f"{r.delong_p:.3g}")
            fields = [_tex(r.method), _tex(r.key) + (" (did not learn)" if r.not_learned else ""), *values, p]
            if r.not_learned:
                fields = [rf"\textcolor{{gray}}{{{f}}}" for f in fields]
            parts.append(" & ".join(fields) + r" \\")
        parts += [r"\bottomrule", r"\end{tabular}", r"\end{table}", ""]
    return "\n".join(parts) + "\n"


def write_cells(cells: pd.DataFrame, folder: Path) -> None:
    """cells.csv, cells.parquet and tables.tex beside index.html, each written atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(folder / "cells.csv", cells.to_csv(index=False))
    staged = folder / ".cells.parquet.tmp"
    cells.to_parquet(staged, index=False)
    staged.replace(folder / "cells.parquet")
    write_text_atomic(folder / "tables.tex", latex_tables(cells))
