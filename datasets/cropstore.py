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

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench.errors import BenchError

STORE_VERSION = 1
PLAN_FILE = "ingest-plan.json"
MASKS_FILE = "masks.npy"


def is_store(path: Path) -> bool:
    return (path / "store.json").is_file() and (path / "crops.npy").is_file()


MARKER = "vertebench crop store"  # store.json's `written_by`: this suite made the folder
LATER_FILES = ("splits.csv",)  # written into a finished store on first use


def files_not_ours(path: Path) -> list[str] | None:
    """What `overwrite=true` would lose that this suite did not write: the folder's entries outside the
    file list its store.json records (None when the folder is no store this suite marked as its own)."""
    try:
        meta = json.loads((path / "store.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("written_by") != MARKER or not isinstance(meta.get("files"), list):
        return None
    ours = set(meta["files"]) | set(LATER_FILES)
    return sorted(p.name for p in path.iterdir()
                  if p.name not in ours and not (p.name.startswith(".") and p.name.endswith((".tmp", ".lock"))))


def open_store(path: str | Path, verified_in: Path | None = None) -> tuple[np.ndarray, pd.DataFrame, dict[str, Any]]:
    """The crops (a memory map), the manifest and store.json of a store, checked: a sample of crops
    against their checksums on every open, and, with `verified_in` (the cache), every crop once per
    version of the store's files (`ensure_verified`)."""
    path = Path(path)
    if not is_store(path):
        raise BenchError(f"'{path}' is not a crop store (expected store.json and crops.npy; make one with `bench data "
                         f"ingest`)")
    try:
        meta = json.loads((path / "store.json").read_text())
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        raise BenchError(f"crop store '{path}': store.json is unreadable ({exc}); re-ingest the store") from None
    try:
        crops = np.load(path / "crops.npy", mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:  # a truncated file cannot be memory-mapped at its header's size
        raise BenchError(f"crop store '{path}': crops.npy is unreadable or truncated ({exc}); re-ingest the "
                         f"store") from None
    try:
        manifest = pd.read_parquet(path / "manifest.parquet")
    except (OSError, ValueError) as exc:
        raise BenchError(f"crop store '{path}': manifest.parquet is unreadable ({type(exc).__name__}); re-ingest "
                         f"the store") from None
    if len(crops) != len(manifest):
        raise BenchError(f"crop store '{path}' is inconsistent: {len(crops)} crops, {len(manifest)} manifest rows")
    verify_crops(path, crops, manifest, sample=VERIFY_SAMPLE)
    open_masks(path, len(crops))  # the ground truth, when there is one, must be whole too
    if verified_in is not None:
        ensure_verified(path, crops, manifest, verified_in)
    return crops, manifest, meta


VERIFY_SAMPLE = 16


def verify_crops(path: Path, crops: np.ndarray, manifest: pd.DataFrame, sample: int | None = None) -> int:
    """Check crops against the manifest's content checksums: all of them, or `sample` rows (the first,
    the last and a fixed spread between), which catches reordered or altered crops at open for the
    cost of reading a few. Returns how many were checked."""
    from bench.datasets.base import crop_checksum

    if "checksum" not in manifest or not len(manifest):
        return 0
    rows = np.arange(len(manifest)) if sample is None else np.unique(
        np.linspace(0, len(manifest) - 1, num=min(sample, len(manifest))).round().astype(int))
    for row in rows:
        expected = manifest["checksum"].iloc[row]
        if isinstance(expected, str) and expected and crop_checksum(crops[row]) != expected:
            r = manifest.iloc[row]
            raise BenchError(f"crop store '{path}': crop {row} ({r.get('patient_id')} {r.get('vertebra')}) does not "
                             f"match its checksum in manifest.parquet (crops reordered or altered); re-ingest the "
                             f"store")
    return len(rows)


def _file_version(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def ensure_verified(path: Path, crops: np.ndarray, manifest: pd.DataFrame, cache: Path) -> bool:
    """Check every crop against its checksum once per version of crops.npy and manifest.parquet
    (size, modification time, inode), recorded under `cache`/verified/; returns whether it checked.

    The runs' data fingerprint hashes the manifest's checksums; with every crop checked against them
    whenever either file changed, it stands for the crops' bytes, while an unchanged store is read in
    full only once. A cache that cannot be written means checking again next time, nothing worse."""
    key = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:32]
    record = cache / "verified" / f"{key}.json"
    version = {"store": str(path.resolve()),
               **{name: _file_version(path / name) for name in ("crops.npy", "manifest.parquet")}}
    try:
        if json.loads(record.read_text()) == version:
            return False
    except (OSError, ValueError):
        pass
    verify_crops(path, crops, manifest)
    try:
        record.parent.mkdir(parents=True, exist_ok=True)
        tmp = record.with_name(f".{record.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(version))
        os.replace(tmp, record)
    except OSError:
        pass
    return True


def open_masks(path: str | Path, n_crops: int) -> np.ndarray | None:
    """The store's ground-truth masks (memory-mapped), or None when it has none."""
    file = Path(path) / MASKS_FILE
    if not file.is_file():
        return None
    try:
        masks = np.load(file, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:  # a truncated file cannot be memory-mapped at its header's size
        raise BenchError(f"crop store '{path}': {MASKS_FILE} is unreadable or truncated ({exc}); re-ingest the "
                         f"store") from None
    if masks.ndim != 4 or len(masks) != n_crops or masks.dtype != np.uint8:
        raise BenchError(f"crop store '{path}': {MASKS_FILE} holds {masks.dtype} {masks.shape}; expected uint8 "
                         f"masks of its {n_crops} crops")
    return masks


class StoreWriter:
    """Collects per-case chunks in a staging folder next to the target; `commit` assembles them and
    renames the folder into place.

    The staging folder has a fixed name (`.<name>.staging`) and records the ingestion options, so an
    interrupted ingestion into the same `out=` with the same options continues: a case whose chunk
    is complete and whose inputs have the same content digest is not ingested again."""

    def __init__(self, target: str | Path, overwrite: bool = False, plan: dict[str, Any] | None = None) -> None:
        self.target = Path(target)
        if self.target.exists() and not overwrite:
            raise BenchError(f"out '{self.target}' already exists; choose another out= or pass overwrite=true")
        if self.target.exists():
            foreign = files_not_ours(self.target) if self.target.is_dir() else None
            if foreign is None:
                raise BenchError(f"out '{self.target}' exists and is not a crop store this suite made (its store.json "
                                 f"carries no marker and file list); overwrite=true only replaces one, choose "
                                 f"another out=")
            if foreign:
                raise BenchError(f"out '{self.target}' holds files this suite did not write ({', '.join(foreign[:5])}"
                                 f"{', ...' if len(foreign) > 5 else ''}); overwrite=true would lose them: move them "
                                 f"out or choose another out=")
        self._created = [p for p in reversed(self.target.parents) if not p.exists()]
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.stage = self.target.with_name(f".{self.target.name}.staging")
        plan_text = json.dumps({"version": STORE_VERSION, **(plan or {})}, sort_keys=True, default=str)
        self.resumed = (self.stage / PLAN_FILE).is_file() and (self.stage / PLAN_FILE).read_text() == plan_text
        if not self.resumed:
            shutil.rmtree(self.stage, ignore_errors=True)  # our own staging of another ingestion
            (self.stage / "chunks").mkdir(parents=True)
            (self.stage / PLAN_FILE).write_text(plan_text)

    def chunk_path(self, index: int) -> Path:
        return self.stage / "chunks" / f"{index:06d}.npy"

    def finished_chunk(self, index: int, digest: str) -> dict[str, Any] | None:
        """The record of chunk `index` when it is complete and was made from inputs with `digest`."""
        record_path = self.chunk_path(index).with_suffix(".json")
        if not record_path.is_file():
            return None
        record = json.loads(record_path.read_text())
        return record if record.get("digest") == digest else None

    def finish_chunk(self, index: int, record: dict[str, Any]) -> dict[str, Any]:
        """Mark chunk `index` complete (its arrays are written): the record is written last,
        atomically. Returns the record as read back, the form a resumed ingestion sees."""
        path = self.chunk_path(index).with_suffix(".json")
        staged = path.with_suffix(".json.tmp")
        text = json.dumps(record, default=lambda v: v.item() if hasattr(v, "item") else str(v))
        staged.write_text(text)
        staged.replace(path)
        return json.loads(text)

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
        (self.stage / PLAN_FILE).unlink()
        manifest.to_parquet(self.stage / "manifest.parquet", index=False)
        skipped.to_csv(self.stage / "skipped.csv", index=False)
        files = sorted([*(p.name for p in self.stage.iterdir()), "store.json"])
        (self.stage / "store.json").write_text(json.dumps({"version": STORE_VERSION, "written_by": MARKER,
                                                           "files": files, **meta}, indent=2, default=str) + "\n")
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
        from bench.store import naming

        with naming(target):
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
