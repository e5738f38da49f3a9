"""The in-memory form of a labelled vertebra data set, shared by every source."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pandas as pd

from bench.errors import BenchError

REQUIRED_COLUMNS = ("patient_id", "vertebra", "label")


def crop_checksum(crop: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(crop).tobytes()).hexdigest()[:16]


@dataclass
class VertebraSet:
    """Crops (N, X, Y, Z) in HU, RAS axis order, usually a memory map, and a table of rows.

    Each row points at its crop through `crop_index`, so a subset is a filtered table over the same
    array: nothing is copied until a batch is read. The table has at least patient_id, vertebra,
    label (1 = fractured) and, once split, `split`; grade, morphology, source, checksum when known.
    """

    images: np.ndarray
    table: pd.DataFrame
    name: str
    masks: np.ndarray | None = None  # ground truth per crop (bench.datasets.cropstore), indexed like images

    def __post_init__(self) -> None:
        missing = [c for c in REQUIRED_COLUMNS if c not in self.table.columns]
        if missing:
            raise BenchError(f"data set '{self.name}': table lacks column(s) {', '.join(missing)}")
        table = self.table.reset_index(drop=True)
        if "crop_index" not in table:
            if len(self.images) != len(table):
                raise BenchError(f"data set '{self.name}': {len(self.images)} crops but {len(table)} table rows")
            table["crop_index"] = np.arange(len(table))
        self.table = table

    @property
    def crop_indices(self) -> np.ndarray:
        return self.table["crop_index"].to_numpy()

    def input_geometry(self, crop_size: int) -> dict[str, float]:
        """The crop a model sees at `crop_size`: its edge in voxels and its voxel spacing (the store's
        field of view resampled to `crop_size`); the report compares only cells of one geometry."""
        stored = self.table["spacing"].to_numpy(float) if "spacing" in self.table else np.array([])
        spacing = float(np.median(stored)) * self.images.shape[-1] / crop_size if stored.size else float("nan")
        return {"crop_size": int(crop_size), "spacing_mm": round(spacing, 4)}

    def fingerprint(self) -> str:
        """sha256 over the rows and their crop checksums, recorded with every run for provenance."""
        table = self.table
        if "checksum" not in table:
            table = table.assign(checksum=[crop_checksum(self.images[i]) for i in self.crop_indices])
        cols = [c for c in ("patient_id", "vertebra", "label", "grade", "split", "checksum") if c in table]
        return hashlib.sha256(table[cols].to_csv(index=False).encode()).hexdigest()

    def subset(self, split: str) -> VertebraSet:
        rows = self.table[self.table["split"].to_numpy() == split]
        return VertebraSet(self.images, rows, f"{self.name}:{split}", self.masks)
