"""Patient-level train/val/test splits, stratified by whether a patient has a fracture.

Vertebrae of one patient are correlated (same bone density, scanner, neighbouring anatomy), so a
split by vertebra would leak; every patient goes to exactly one split.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from bench.errors import BenchError


def patient_split(
    table: pd.DataFrame, seed: int, fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)
) -> pd.Series:
    """A "train"/"val"/"test" label per row, the same for all rows of a patient."""
    patients = table.groupby("patient_id", sort=True)["label"].max()
    if len(patients) < 5:
        raise BenchError(f"need at least 5 patients for a train/val/test split, got {len(patients)}")
    strata = patients.to_numpy() if patients.value_counts().min() >= 3 else None
    ids = patients.index.to_numpy()
    train_ids, rest = train_test_split(
        ids, train_size=fractions[0], random_state=seed, stratify=strata, shuffle=True
    )
    rest_strata = patients.loc[rest].to_numpy() if strata is not None else None
    if rest_strata is not None and np.bincount(rest_strata).min() < 2:
        rest_strata = None
    val_share = fractions[1] / (fractions[1] + fractions[2])
    val_ids, test_ids = train_test_split(
        rest, train_size=val_share, random_state=seed, stratify=rest_strata, shuffle=True
    )
    assignment = {**{p: "train" for p in train_ids}, **{p: "val" for p in val_ids},
                  **{p: "test" for p in test_ids}}
    return table["patient_id"].map(assignment).rename("split")


def check_no_leakage(table: pd.DataFrame) -> None:
    """Refuse a split in which a patient appears in more than one split."""
    per_patient = table.groupby("patient_id")["split"].nunique()
    leaked = per_patient[per_patient > 1]
    if len(leaked):
        raise BenchError(
            f"patient leakage: {len(leaked)} patient(s) in more than one split, e.g. '{leaked.index[0]}'"
        )
