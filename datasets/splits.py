"""Patient-level train/val/test splits, stratified by whether a patient has a fracture.

Vertebrae of one patient are correlated (same bone density, scanner, neighbouring anatomy), so a
split by vertebra would leak; every patient goes to exactly one split.
"""
from __future__ import annotations

from pathlib import Path

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


SPLITS = ("train", "val", "test")


def read_splits(path: Path) -> pd.Series:
    """A user's or a stored splits file: patient_id,split -> Series indexed by patient_id."""
    try:
        table = pd.read_csv(path, dtype=str)
    except (OSError, ValueError) as exc:
        raise BenchError(f"splits '{path}': unreadable ({exc})") from None
    if not {"patient_id", "split"} <= set(table.columns):
        raise BenchError(f"splits '{path}': expected columns patient_id,split")
    bad = table[~table["split"].isin(SPLITS)]
    if len(bad):
        raise BenchError(f"splits '{path}': patient {bad.patient_id.iloc[0]} has split '{bad.split.iloc[0]}'; valid: "
                         f"train, val, test")
    dup = table[table.duplicated("patient_id", keep=False)]
    if len(dup):
        raise BenchError(f"patient leakage in splits '{path}': patient {dup.patient_id.iloc[0]} is listed twice")
    return table.set_index("patient_id")["split"]


def splits_for(labelled: pd.DataFrame, folder: Path, seed: int, user_file: str = "") -> pd.Series:
    """The split of every labelled row: from the user's file, else from FOLDER/splits.csv, else
    made once (patient-level, stratified, seeded) and written there for every later run."""
    stored = folder / "splits.csv"
    if user_file:
        source = Path(user_file)
        if not source.is_file():
            raise BenchError(f"splits '{user_file}': no such file")
        assignment = read_splits(source)
    elif stored.is_file():
        source, assignment = stored, read_splits(stored)
    else:
        split = patient_split(labelled, seed)
        assignment = split.groupby(labelled["patient_id"]).first()
        from bench.store import write_text_atomic

        write_text_atomic(stored, assignment.rename_axis("patient_id").reset_index().to_csv(index=False))
        source = stored
    missing = sorted(set(labelled["patient_id"]) - set(assignment.index))
    if missing:
        raise BenchError(f"splits '{source}' has no split for {len(missing)} labelled patient(s), e.g. '{missing[0]}'")
    return labelled["patient_id"].map(assignment).rename("split")


def check_disjoint(labelled_patients, unlabelled_patients, what: str = "unlabelled pretraining data") -> None:
    """Refuse pretraining on patients whose vertebrae are also labelled (finetuned or tested)."""
    shared = sorted(set(labelled_patients) & set(unlabelled_patients))
    if shared:
        raise BenchError(
            f"patient leakage: {len(shared)} patient(s) are in both the labelled data and the {what}, "
            f"e.g. '{shared[0]}'"
        )


def patient_fraction(table: pd.DataFrame, fraction: float, seed: int) -> pd.DataFrame:
    """The rows of the first `fraction` of the patients in a seeded order (at least one patient).

    The order is one permutation per seed, so the subsets are nested: the 0.1 subset is inside the
    0.25 subset of the same seed. Patients with and without a fracture are interleaved by their
    quantile rank in their own group, so every prefix keeps the full set's share of fractured
    patients (label-efficiency sweeps compare sizes, not class balances).
    """
    if not 0 < fraction <= 1:
        raise BenchError(f"bad value for 'train_fraction': {fraction}; expected in (0, 1]")
    if fraction == 1:
        return table
    patients = table.groupby("patient_id", sort=True)["label"].max()
    rng = np.random.default_rng([seed, 1009])
    rank = pd.Series(0.0, index=patients.index)
    for _, group in patients.groupby(patients):
        order = rng.permutation(len(group))
        rank[group.index] = (order + rng.random(len(group))) / len(group)
    ordered = rank.sort_values(kind="stable").index
    keep = set(ordered[: max(1, int(round(fraction * len(ordered))))])
    return table[table["patient_id"].isin(keep).to_numpy()]
