"""Generate the embedded synthetic data a suite will read before its trials start, in parallel.

Every trial makes the data it needs on first use, under a file lock, so it is always correct to skip
this step (a cluster node with its own cache does exactly that). But on a fresh cache the first
trials would each wait on the lock of the one generating the labelled set, their cores idle, and
the labelled set, the unlabelled vertebrae and the two out-of-domain corpora would be made one
after another. Made here, they are made side by side, one process per core.
"""
from __future__ import annotations

import os
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Any

from omegaconf import DictConfig, OmegaConf

from bench.config import config_hash


def data_jobs(configs: list[DictConfig]) -> dict[str, tuple[str, dict[str, Any]]]:
    """What the runs read from the synthetic data set: name -> (kind, config), one per distinct item.
    Kinds: "labelled", "unlabelled" (vertebrae pretraining), "body_ct", "body_ct_organs" and "video"
    (the corpora of the embedded `public` regime)."""
    from bench.datasets.loading import corpus_path, synthetic_spec
    from bench.datasets.pretext import public_corpora
    from bench.registry import create_method

    jobs: dict[str, tuple[str, dict[str, Any]]] = {}

    def add(kind: str, cfg: DictConfig, identity: Any) -> None:
        jobs.setdefault(f"{kind}-{config_hash(identity)}", (kind, OmegaConf.to_container(cfg, resolve=True)))

    for cfg in configs:
        if cfg.data != "synthetic":
            continue
        add("labelled", cfg, synthetic_spec(cfg, True))
        method = create_method(cfg.method, cfg)
        for stage in method.pretraining_plan(cfg.regime):
            if stage == "vertebrae":
                if not cfg.pretrain.data:  # separate pretraining stores need no synthetic unlabelled set
                    add("unlabelled", cfg, synthetic_spec(cfg, False))
            elif not cfg.weights.public:
                for kind in public_corpora(method.pretext_data_kind("public")):
                    add(kind, cfg, str(corpus_path(cfg, kind)))  # the loader's own identity of a corpus
    return jobs


def _make(kind: str, container: dict[str, Any]) -> str:
    from bench.datasets.loading import load_corpus, load_data
    from bench.registry import DATASETS

    cfg = OmegaConf.create(container)
    if kind == "labelled":
        load_data(cfg)  # the crop store and its splits file
    elif kind == "unlabelled":
        DATASETS.get("synthetic")().ensure(cfg, labelled=False)
    else:
        load_corpus(cfg, kind)
    return kind


def prepare_data(configs: list[DictConfig], workers: int | None = None) -> tuple[list[str], float]:
    """Make every synthetic item the runs read (items already in the cache cost a lookup);
    returns the kinds handled and the seconds it took."""
    jobs = data_jobs(configs)
    t0 = time.perf_counter()
    if not jobs:
        return [], 0.0
    workers = max(1, min(len(jobs), workers or os.cpu_count() or 1))
    if workers == 1:
        done = [_make(kind, cfg) for kind, cfg in jobs.values()]
    else:
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            done = list(pool.map(_make, *zip(*jobs.values())))
    return done, time.perf_counter() - t0
