"""Resolve `data=...` to a split VertebraSet: a registered data set name, or a crop store path.

Every source ends up as a crop store (see bench.datasets.cropstore): the synthetic data set is
generated into one in the cache, so one loader serves both, and `bench data synth out=DIR` makes a
store that `data=DIR` reads back.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from bench.config import config_hash
from bench.datasets.base import VertebraSet, crop_checksum
from bench.datasets.cropstore import MASKS_FILE, StoreWriter, is_store, open_masks, open_store
from bench.datasets.splits import check_disjoint, check_no_leakage, splits_for
from bench.envinfo import now
from bench.errors import BenchError, choices_hint
from bench.locks import locked
from bench.registry import DATASETS, register_dataset
from bench.store import naming


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
    crops, manifest, meta = open_store(path, verified_in=cache_root(cfg))
    labelled = manifest[manifest["label"] >= 0]
    if labelled.empty:
        raise BenchError(f"crop store '{path}' has no labelled crops; ingest it with labels=CSV")
    table = labelled.drop(columns=["split"], errors="ignore").copy()
    table["split"] = splits_for(table, path, cfg.synthetic.seed, cfg.splits)
    check_no_leakage(table)
    table["crop_index"] = table.index.to_numpy()  # rows of the memory map; nothing is copied
    return VertebraSet(crops, table.reset_index(drop=True), name=f"store:{path.name}",
                       masks=open_masks(path, len(crops)))


_LABELLED_KEYS = ("n_patients", "n_val_patients", "n_test_patients",
                  "min_vertebrae", "max_vertebrae", "fracture_rate", "fov_mm", "noise_hu",
                  "difficulty", "seed")


def synthetic_spec(cfg: DictConfig, labelled: bool = True) -> dict:
    """What determines a synthetic vertebra set (and so its cache key)."""
    from bench.datasets import synthetic

    spec = {k: cfg.synthetic[k] for k in _LABELLED_KEYS}
    if not labelled:
        spec.update(n_patients=cfg.synthetic.n_unlabelled_patients, n_val_patients=0, n_test_patients=0)
    return {**spec, "labelled": labelled, "crop_size": cfg.crop_size, "version": synthetic.GENERATOR_VERSION}


def synthesize_store(cfg: DictConfig, target: Path, overwrite: bool = False, labelled: bool = True) -> Path:
    """Generate the labelled (or the unlabelled) synthetic set of `cfg` into a crop store at `target`."""
    from bench.datasets import synthetic

    writer = StoreWriter(target, overwrite=overwrite)
    s = cfg.synthetic
    cohorts = (s.n_patients, s.n_val_patients, s.n_test_patients) if labelled and s.n_test_patients else None
    masks: list[np.ndarray] | None = [] if labelled else None
    try:
        images, table = synthetic.generate(
            n_patients=sum(cohorts) if cohorts else (s.n_patients if labelled else s.n_unlabelled_patients),
            min_vertebrae=cfg.synthetic.min_vertebrae,
            max_vertebrae=cfg.synthetic.max_vertebrae, fracture_rate=cfg.synthetic.fracture_rate,
            noise_hu=cfg.synthetic.noise_hu, fov_mm=cfg.synthetic.fov_mm,
            crop_size=cfg.crop_size, seed=cfg.synthetic.seed, progress=cfg.progress,
            difficulty=cfg.synthetic.difficulty, labelled=labelled, masks=masks,
        )
        if masks is not None:
            with naming(writer.stage / MASKS_FILE):
                np.save(writer.stage / MASKS_FILE, np.stack(masks))
        table["checksum"] = [crop_checksum(c) for c in images]
        table["split"] = ""
        table["spacing"] = cfg.synthetic.fov_mm / cfg.crop_size
        with naming(writer.chunk_path(0)):
            np.save(writer.chunk_path(0), images)
        if cohorts:  # the cohorts are the splits: train, then validation, then test patients
            write_cohort_splits(table, cohorts, writer.stage / "splits.csv")
        meta = {"frame": "RAS", "size": cfg.crop_size, "spacing_mm": cfg.synthetic.fov_mm / cfg.crop_size,
                "dtype": "int16", "source": "synthetic", "generator": synthetic_spec(cfg, labelled),
                "cases": int(table.patient_id.nunique()),
                "crops": len(table), "skipped": 0, "created": now()}
        return writer.commit([0], table, meta, pd.DataFrame(), (cfg.crop_size,) * 3, "int16")
    except BaseException:
        writer.abort()
        raise


def write_cohort_splits(table, cohorts: tuple[int, int, int], path: Path) -> None:
    """splits.csv of a synthetic set made of a training, a validation and a test cohort, in that order."""
    import pandas as pd

    patients = pd.unique(table["patient_id"])
    bounds = np.cumsum(cohorts)
    split = np.where(np.arange(len(patients)) < bounds[0], "train",
                     np.where(np.arange(len(patients)) < bounds[1], "val", "test"))
    pd.DataFrame({"patient_id": patients, "split": split}).to_csv(path, index=False)


@register_dataset("synthetic")
class SyntheticDataset:
    """Generated on first use, then cached under <cache>/synthetic/<config hash>/ as a crop store."""

    description = "synthetic vertebra phantoms with Genant-graded fractures (embedded default)"

    def load(self, cfg: DictConfig) -> VertebraSet:
        folder = self.ensure(cfg, labelled=True)
        data = load_store(folder, cfg)
        data.name = f"synthetic-{folder.name}"
        return data

    def ensure(self, cfg: DictConfig, labelled: bool) -> Path:
        folder = cache_root(cfg) / "synthetic" / config_hash(synthetic_spec(cfg, labelled))
        with locked(folder):  # concurrent trials wait for one generator instead of each generating
            if not is_store(folder):
                synthesize_store(cfg, folder, labelled=labelled)
        return folder

    def load_unlabelled(self, cfg: DictConfig) -> VertebraSet:
        """The unlabelled pretraining vertebrae (other patients than the labelled set's)."""
        folder = self.ensure(cfg, labelled=True), self.ensure(cfg, labelled=False)
        labelled, unlabelled = (open_store(f)[1] for f in folder)
        check_disjoint(labelled["patient_id"], unlabelled["patient_id"])
        crops = open_store(folder[1])[0]
        table = unlabelled.assign(split="pretrain")
        return VertebraSet(crops, table, name=f"synthetic-unlabelled-{folder[1].name}")


def load_unlabelled(cfg: DictConfig) -> VertebraSet:
    """Unlabelled vertebrae for self-supervised pretraining, disjoint from the labelled patients:
    the stores named by `pretrain.data`, else the unlabelled crops of the data itself."""
    if cfg.pretrain.data:
        return load_pretrain_stores(cfg)
    if cfg.data in DATASETS.names():
        source = DATASETS.get(cfg.data)()
        if not hasattr(source, "load_unlabelled"):
            raise BenchError(f"data set '{cfg.data}' has no unlabelled vertebrae for pretraining")
        return source.load_unlabelled(cfg)
    crops, manifest, _ = open_store(cfg.data, verified_in=cache_root(cfg))
    labelled_patients = set(manifest.loc[manifest["label"] >= 0, "patient_id"])
    # a labelled patient's ungraded vertebrae (VerSe levels left blank) belong to that patient: never pretrained on
    unlabelled = manifest[(manifest["label"] < 0) & ~manifest["patient_id"].isin(labelled_patients)]
    if unlabelled.empty:
        raise BenchError(f"crop store '{cfg.data}' has no unlabelled crops (label -1) of patients without labels to "
                         f"pretrain on; name a separate store with pretrain.data=")
    table = unlabelled.assign(split="pretrain", crop_index=unlabelled.index.to_numpy())
    return VertebraSet(crops, table.reset_index(drop=True), name=f"store:{Path(cfg.data).name}:unlabelled")


class StackedCrops:
    """Several stores' crop arrays (memory maps) read as one, without copying: crop `i` is a crop of
    the store whose range holds `i`."""

    def __init__(self, parts: list[np.ndarray]) -> None:
        self.parts = parts
        self.starts = np.cumsum([0] + [len(p) for p in parts])
        self.shape = (int(self.starts[-1]), *parts[0].shape[1:])
        self.dtype = parts[0].dtype
        self.ndim = parts[0].ndim

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: int) -> np.ndarray:
        part = int(np.searchsorted(self.starts, index, side="right")) - 1
        return self.parts[part][index - self.starts[part]]


def load_pretrain_stores(cfg: DictConfig) -> VertebraSet:
    """Every crop of the `pretrain.data` stores (their labels are not used), after checking that no
    patient id and no crop content of the labelled data is among them."""
    paths = [Path(p.strip()) for p in str(cfg.pretrain.data).split(",") if p.strip()]
    arrays, tables, geometry = [], [], {}
    for path in paths:
        crops, manifest, meta = open_store(path, verified_in=cache_root(cfg))
        geometry[str(path)] = (meta["size"], meta["spacing_mm"])
        table = manifest.assign(crop_index=manifest.index.to_numpy() + sum(len(a) for a in arrays),
                                store=str(path), split="pretrain", label=-1, grade=-1)
        if "checksum" not in table:
            table["checksum"] = [crop_checksum(crops[i]) for i in range(len(crops))]
        arrays.append(crops)
        tables.append(table)
    if len(set(geometry.values())) > 1:
        raise BenchError(f"pretrain.data: the stores differ in crop size or spacing ({geometry}); ingest them "
                         f"with the same size= and spacing=")
    table = pd.concat(tables, ignore_index=True)
    check_pretraining_is_apart(load_data(cfg), table, cfg.data)
    images = arrays[0] if len(arrays) == 1 else StackedCrops(arrays)
    return VertebraSet(images, table, name="pretrain.data:" + ",".join(p.name for p in paths))


def check_pretraining_is_apart(labelled: VertebraSet, pretraining: pd.DataFrame, data: str) -> None:
    """Refuse pretraining stores that hold a patient id or a crop (by content checksum) of the
    labelled data, naming the store and the labelled data set."""
    table = labelled.table
    shared = sorted(set(table["patient_id"]) & set(pretraining["patient_id"]))
    if shared:
        store = pretraining.loc[pretraining["patient_id"] == shared[0], "store"].iloc[0]
        raise BenchError(f"patient leakage: {len(shared)} patient id(s) are in both data '{data}' and pretrain.data "
                         f"'{store}', e.g. '{shared[0]}'; a pretraining store must hold other patients")
    checksums = table["checksum"] if "checksum" in table else pd.Series(
        [crop_checksum(labelled.images[i]) for i in labelled.crop_indices])
    same = pretraining[pretraining["checksum"].isin(set(checksums))]
    if len(same):
        r = same.iloc[0]
        raise BenchError(f"leakage: {len(same)} crop(s) of pretrain.data '{r.store}' have the content of crops in "
                         f"data '{data}', e.g. {r.patient_id} {r.vertebra}; the same scan is in both")


def corpus_spec(cfg: DictConfig, kind: str) -> dict:
    """Everything that makes a corpus (its cache file is named by the hash of it)."""
    n = {"body_ct": cfg.synthetic.n_body_ct, "body_ct_organs": cfg.synthetic.n_body_ct, "video": cfg.synthetic.n_videos}
    return {"kind": kind, "n": n[kind],
            "size": cfg.synthetic.video_size if kind == "video" else cfg.crop_size, "fov_mm": cfg.synthetic.fov_mm,
            "frames": cfg.synthetic.video_frames, "seed": cfg.synthetic.seed, "version": 1}


def corpus_path(cfg: DictConfig, kind: str) -> Path:
    return cache_root(cfg) / "corpora" / kind / f"{config_hash(corpus_spec(cfg, kind))}.npy"


def load_corpus(cfg: DictConfig, kind: str) -> np.ndarray:
    """An out-of-domain corpus, generated on first use: "body_ct" (N, S, S, S) int16 HU patches,
    "body_ct_organs" their (N, S, S, S) uint8 organ label maps (bench.datasets.corpora.ORGANS) or
    "video" (N, T, V, V, 3) uint8 clips (S = crop size, V = synthetic.video_size)."""
    path = corpus_path(cfg, kind)
    with locked(path):  # concurrent trials wait for one generator
        if not path.exists():
            spec = corpus_spec(cfg, kind)
            _write_corpus(cfg, kind, spec["n"], spec["size"], path)
    return np.load(path, mmap_mode="r")


def _write_corpus(cfg: DictConfig, kind: str, n: int, size: int, path: Path) -> None:
    from bench.datasets import corpora

    seed, frames = cfg.synthetic.seed, cfg.synthetic.video_frames
    if kind == "body_ct":
        items = [corpora.body_ct_patch(i, size, cfg.synthetic.fov_mm, seed) for i in range(n)]
    elif kind == "body_ct_organs":
        items = [corpora.body_ct_patch(i, size, cfg.synthetic.fov_mm, seed, organs=True)[1] for i in range(n)]
    else:
        items = [corpora.video_clip(i, frames, size, seed) for i in range(n)]
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with naming(path), open(tmp, "wb") as fh:
        np.save(fh, np.stack(items))
    os.replace(tmp, path)
