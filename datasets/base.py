"""The in-memory form of a labelled vertebra data set, shared by every source."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pandas as pd

from bench.errors import BenchError

REQUIRED_COLUMNS = ("patient_id", "vertebra", "label")


@dataclass
class VertebraSet:
    """Crops (N, X, Y, Z) in HU, RAS axis order, and one table row per crop.

    `table` has at least patient_id, vertebra, label (1 = fractured) and, once split, `split`
    ("train" / "val" / "test"); grade, morphology and source when known.
    """

    images: np.ndarray
    table: pd.DataFrame
    name: str

    def __post_init__(self) -> None:
        missing = [c for c in REQUIRED_COLUMNS if c not in self.table.columns]
        if missing:
            raise BenchError(f"data set '{self.name}': table lacks column(s) {', '.join(missing)}")
        if len(self.images) != len(self.table):
            raise BenchError(
                f"data set '{self.name}': {len(self.images)} crops but {len(self.table)} table rows"
            )
        self.table = self.table.reset_index(drop=True)

    def fingerprint(self) -> str:
        """sha256 of the crops and the labelling, recorded with every run for provenance."""
        digest = hashlib.sha256()
        digest.update(np.ascontiguousarray(self.images).tobytes())
        cols = [c for c in ("patient_id", "vertebra", "label", "grade", "split") if c in self.table]
        digest.update(self.table[cols].to_csv(index=False).encode())
        return digest.hexdigest()

    def subset(self, split: str) -> "VertebraSet":
        idx = np.flatnonzero(self.table["split"].to_numpy() == split)
        return VertebraSet(self.images[idx], self.table.iloc[idx].reset_index(drop=True), f"{self.name}:{split}")
