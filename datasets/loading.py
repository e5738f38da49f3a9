"""Resolve `data=...` to a split VertebraSet: a registered data set name, or a crop store path."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from bench.config import config_hash
from bench.datasets.base import VertebraSet
from bench.datasets.splits import check_no_leakage, patient_split
from bench.errors import BenchError, choices_hint
from bench.registry import DATASETS, register_dataset
from bench.store import normal_mode


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
    raise BenchError(f"data '{cfg.data}': reading crop stores is not available yet (issue #3)")


@register_dataset("synthetic")
class SyntheticDataset:
    """Generated on first use, then cached under <cache>/synthetic/<config hash>/."""

    description = "synthetic vertebra phantoms with Genant-graded fractures (embedded default)"

    def load(self, cfg: DictConfig) -> VertebraSet:
        from bench.datasets import synthetic

        spec = {**dict(cfg.synthetic), "crop_size": cfg.crop_size, "version": synthetic.GENERATOR_VERSION}
        folder = cache_root(cfg) / "synthetic" / config_hash(spec)
        if not (folder / "table.parquet").exists():
            images, table = synthetic.generate(
                n_patients=cfg.synthetic.n_patients, min_vertebrae=cfg.synthetic.min_vertebrae,
                max_vertebrae=cfg.synthetic.max_vertebrae, fracture_rate=cfg.synthetic.fracture_rate,
                noise_hu=cfg.synthetic.noise_hu, fov_mm=cfg.synthetic.fov_mm,
                crop_size=cfg.crop_size, seed=cfg.synthetic.seed, progress=cfg.progress,
            )
            # the split is a property of the data (seeded by the data seed), not of the run
            table["split"] = patient_split(table, seed=cfg.synthetic.seed)
            _write_atomically(folder, images, table)
        images = np.load(folder / "images.npy", mmap_mode="r")
        table = pd.read_parquet(folder / "table.parquet")
        check_no_leakage(table)
        return VertebraSet(images, table, name=f"synthetic-{folder.name}")


def _write_atomically(folder: Path, images: np.ndarray, table: pd.DataFrame) -> None:
    """Write into a temporary sibling folder, then rename: readers never see half a cache."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        normal_mode(tmp)
        np.save(tmp / "images.npy", images)
        table.to_parquet(tmp / "table.parquet", index=False)
        try:
            os.rename(tmp, folder)
        except OSError:  # another process finished the same cache first: theirs is identical
            if not (folder / "table.parquet").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

