"""The results as pandas DataFrames, for papers and re-plots.

    from bench import results
    runs = results.runs("runs/quick")            # one row per run: config keys, test metrics, provenance
    cells = results.cells("reports/quick")       # one row per table cell, as in cells.csv
    preds = results.predictions(runs.folder[0])  # one row per test vertebra of a run
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from bench.errors import BenchError


def runs(*roots: str | Path) -> pd.DataFrame:
    """Every finished run under the given run folders or suite folders."""
    from bench.reports.collect import load_runs

    return load_runs([Path(r) for r in roots])


def cells(report: str | Path) -> pd.DataFrame:
    """The table cells `bench report` wrote into the report folder `report` (cells.parquet)."""
    path = Path(report) / "cells.parquet"
    if not path.is_file():
        raise BenchError(f"report '{report}': no cells.parquet; make it with `bench report`")
    return pd.read_parquet(path)


def predictions(run: str | Path) -> pd.DataFrame:
    """A run's test predictions: ids, label, score, prediction (and grades for task=grade)."""
    path = Path(run) / "predictions.parquet"
    if not path.is_file():
        raise BenchError(f"run '{run}': no predictions.parquet")
    return pd.read_parquet(path)
