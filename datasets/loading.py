"""Resolve `data=...` to a split VertebraSet: a registered data set name, or a crop store path.

Every source ends up as a crop store (see bench.datasets.cropstore): the synthetic data set is
generated into one in the cache, so one loader serves both, and `bench data synth out=DIR` makes a
store that `data=DIR` reads back.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from bench.config import config_hash
from bench.datasets.base import VertebraSet, crop_checksum
from bench.datasets.cropstore import StoreWriter, is_store, open_store
from bench.datasets.splits import check_disjoint, check_no_leakage, splits_for
from bench.envinfo import now
from bench.errors import BenchError, choices_hint
from bench.registry import DATASETS, register_dataset


def cache_root(cfg: DictConfig) -> Path:
    root = cfg.cache_dir or os.environ.get("BENCH_CACHE") or Path.home() / ".cache" / "vertebench"
    return Path(root)


def load_data(cfg: DictConfig) -> VertebraSet:
    """The labelled data of a run, with a `split` column (patient-level, written once)."""
    if cfg.data in DATASETS.names():
        return DATASETS.get(cfg.data)().load(cfg)
    path = Path(cfg.data)
    if not path.exists():
        raise BenchError(
            f"data '{cfg.data}' is neither a registered data set nor an existing path; "
            f"{choices_hint(cfg.data, DATASETS.names())}"
        )
    return load_store(path, cfg)


def load_store(path: Path, cfg: DictConfig) -> VertebraSet:
    """The labelled crops of a store (label >= 0) with their split; unlabelled ones are left out."""
    crops, manifest, meta = open_store(path)
    labelled = manifest[manifest["label"] >= 0]
    if labelled.empty:
        raise BenchError(f"crop store '{path}' has no labelled crops; ingest it with labels=CSV")
    unlabelled = manifest[manifest["label"] < 0]
    check_disjoint(labelled["patient_id"], unlabelled["patient_id"], "unlabelled crops of the same store")
    table = labelled.drop(columns=["split"], errors="ignore").copy()
    table["split"] = splits_for(table, path, cfg.synthetic.seed, cfg.splits)
    check_no_leakage(table)
    table["crop_index"] = table.index.to_numpy()  # rows of the memory map; nothing is copied
    return VertebraSet(crops, table.reset_index(drop=True), name=f"store:{path.name}")


def synthetic_spec(cfg: DictConfig) -> dict:
    from bench.datasets import synthetic

    return {**dict(cfg.synthetic), "crop_size": cfg.crop_size, "version": synthetic.GENERATOR_VERSION}


def synthesize_store(cfg: DictConfig, target: Path, overwrite: bool = False) -> Path:
    """Generate the labelled synthetic set of `cfg` into a crop store at `target`."""
    from bench.datasets import synthetic

    writer = StoreWriter(target, overwrite=overwrite)
    try:
        images, table = synthetic.generate(
            n_patients=cfg.synthetic.n_patients, min_vertebrae=cfg.synthetic.min_vertebrae,
            max_vertebrae=cfg.synthetic.max_vertebrae, fracture_rate=cfg.synthetic.fracture_rate,
            noise_hu=cfg.synthetic.noise_hu, fov_mm=cfg.synthetic.fov_mm,
            crop_size=cfg.crop_size, seed=cfg.synthetic.seed, progress=cfg.progress,
        )
        table["checksum"] = [crop_checksum(c) for c in images]
        table["split"] = ""
        table["spacing"] = cfg.synthetic.fov_mm / cfg.crop_size
        np.save(writer.chunk_path(0), images)
        meta = {"frame": "RAS", "size": cfg.crop_size, "spacing_mm": cfg.synthetic.fov_mm / cfg.crop_size,
                "dtype": "int16", "source": "synthetic", "generator": synthetic_spec(cfg), "cases": int(table.patient_id.nunique()),
                "crops": len(table), "skipped": 0, "created": now()}
        import pandas as pd

        return writer.commit([0], table, meta, pd.DataFrame(), (cfg.crop_size,) * 3, "int16")
    except BaseException:
        writer.abort()
        raise


@register_dataset("synthetic")
class SyntheticDataset:
    """Generated on first use, then cached under <cache>/synthetic/<config hash>/ as a crop store."""

    description = "synthetic vertebra phantoms with Genant-graded fractures (embedded default)"

    def load(self, cfg: DictConfig) -> VertebraSet:
        folder = cache_root(cfg) / "synthetic" / config_hash(synthetic_spec(cfg))
        if not is_store(folder):
            try:
                synthesize_store(cfg, folder)
            except BenchError:
                if not is_store(folder):  # another process won the race: its store is identical
                    raise
        data = load_store(folder, cfg)
        data.name = f"synthetic-{folder.name}"
        return data
