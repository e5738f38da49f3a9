"""The crop store: one memory-mapped array of crops plus a manifest, made by `bench data ingest`.

    STORE/crops.npy         (N, S, S, S) int16 or float16 HU, RAS axis order, plain .npy
    STORE/manifest.parquet  one row per crop: patient_id, vertebra, source, label, grade, split,
                            missing_fraction, spacing, checksum, centroid in RAS mm, ...
    STORE/store.json        frame, size, spacing, dtype, label map, what was skipped and why
    STORE/splits.csv        patient_id,split: written on first use, then reused
    STORE/masks.npy         optional (N, S, S, S) uint8 ground truth per crop: bit 1 the centre
                            vertebra (body), bit 2 its fracture deformity where known

Loading a crop is a slice of the memory map: no decompression, no file open per sample.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench.errors import BenchError
from bench.store import normal_mode

STORE_VERSION = 1
MASKS_FILE = "masks.npy"


def is_store(path: Path) -> bool:
    return (path / "store.json").is_file() and (path / "crops.npy").is_file()


def open_store(path: str | Path) -> tuple[np.ndarray, pd.DataFrame, dict[str, Any]]:
    path = Path(path)
    if not is_store(path):
        raise BenchError(f"'{path}' is not a crop store (expected store.json and crops.npy; make one with `bench data "
                         f"ingest`)")
    meta = json.loads((path / "store.json").read_text())
    crops = np.load(path / "crops.npy", mmap_mode="r")
    manifest = pd.read_parquet(path / "manifest.parquet")
    if len(crops) != len(manifest):
        raise BenchError(f"crop store '{path}' is inconsistent: {len(crops)} crops, {len(manifest)} manifest rows")
    return crops, manifest, meta


def open_masks(path: str | Path, n_crops: int) -> np.ndarray | None:
    """The store's ground-truth masks (memory-mapped), or None when it has none."""
    file = Path(path) / MASKS_FILE
    if not file.is_file():
        return None
    masks = np.load(file, mmap_mode="r", allow_pickle=False)
    if masks.ndim != 4 or len(masks) != n_crops or masks.dtype != np.uint8:
        raise BenchError(f"crop store '{path}': {MASKS_FILE} holds {masks.dtype} {masks.shape}; expected uint8 "
                         f"masks of its {n_crops} crops")
    return masks


class StoreWriter:
    """Collects per-case chunks in a staging folder; `commit` assembles and renames into place."""

    def __init__(self, target: str | Path, overwrite: bool = False) -> None:
        self.target = Path(target)
        if self.target.exists() and not overwrite:
            raise BenchError(f"out '{self.target}' already exists; choose another out= or pass overwrite=true")
        if self.target.exists() and not is_store(self.target):
            raise BenchError(f"out '{self.target}' exists and is not a crop store (no store.json and crops.npy); "
                             f"overwrite=true only replaces a crop store, choose another out=")
        self._created = [p for p in reversed(self.target.parents) if not p.exists()]
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.stage = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.staging-", dir=self.target.parent))
        normal_mode(self.stage)
        (self.stage / "chunks").mkdir()

    def chunk_path(self, index: int) -> Path:
        return self.stage / "chunks" / f"{index:06d}.npy"

    def commit(self, chunk_ids: list[int], manifest: pd.DataFrame, meta: dict[str, Any],
               skipped: pd.DataFrame, shape: tuple[int, ...], dtype: str, keep: np.ndarray | None = None) -> Path:
        """Assemble the chunks in `chunk_ids` order into the store; `keep` (one flag per crop of the
        chunks) leaves crops out, so that the manifest's rows and the crops stay aligned."""
        n = len(manifest)
        self._assemble([self.chunk_path(i) for i in chunk_ids], self.stage / "crops.npy", dtype, (n, *shape), keep)
        mask_chunks = [self.chunk_path(i).with_suffix(".mask.npy") for i in chunk_ids]
        if chunk_ids and all(p.is_file() for p in mask_chunks):  # ground truth, when every case has it
            self._assemble(mask_chunks, self.stage / MASKS_FILE, np.uint8, (n, *shape), keep)
        shutil.rmtree(self.stage / "chunks")
        manifest.to_parquet(self.stage / "manifest.parquet", index=False)
        skipped.to_csv(self.stage / "skipped.csv", index=False)
        (self.stage / "store.json").write_text(json.dumps({"version": STORE_VERSION, **meta}, indent=2,
                                                          default=str) + "\n")
        old = None
        if self.target.exists():
            old = self.target.with_name(f".{self.target.name}.old-{os.getpid()}")
            os.rename(self.target, old)
        os.rename(self.stage, self.target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.target

    @staticmethod
    def _assemble(chunks: list[Path], target: Path, dtype: Any, shape: tuple[int, ...],
                  keep: np.ndarray | None) -> None:
        """Stream chunk by chunk into one memory-mapped array: memory stays at one case's crops."""
        out = np.lib.format.open_memmap(target, mode="w+", dtype=dtype, shape=shape)
        pos = seen = 0
        for path in chunks:
            chunk = np.load(path)
            if keep is not None:
                chunk, seen = chunk[keep[seen:seen + len(chunk)]], seen + len(chunk)
            out[pos:pos + len(chunk)] = chunk
            pos += len(chunk)
        assert pos == shape[0], (pos, shape[0])
        out.flush()
        del out

    def abort(self) -> None:
        """Remove the staging folder and any parent folder this writer created."""
        shutil.rmtree(self.stage, ignore_errors=True)
        for folder in reversed(self._created):
            try:
                folder.rmdir()
            except OSError:
                break
