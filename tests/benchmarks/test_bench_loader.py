"""Can the crop-store loader feed a GPU at the paper preset?

For the paper's method (slice-view clips) and a 3D volume network, the training input pipeline
(memory-mapped int16 crops -> augmentation -> views -> batches) is timed through torch's
DataLoader with 0, 1 and 2 worker processes, and its samples per second set against the rate one
A40 and one H100 consume at the paper preset: the GPU's dense bf16 peak times the MFU, divided by
the FLOPs of one training step per sample (counted by `bench.cost` on a real paper-preset step).
The crops are in the page cache, as a store that fits in RAM is after its first epoch.

Run: pytest tests/benchmarks/test_bench_loader.py --benchmark-enable -s
"""
from __future__ import annotations

import math
import time

import numpy as np
import pandas as pd
import pytest

METHODS = ("video_ct_mae", "resnet50")  # slice views (the paper's method) and a 3D volume network
MFU = 0.3
N_CROPS = 256


@pytest.fixture(scope="module")
def crop_part(tmp_path_factory):
    from bench.datasets.base import VertebraSet

    path = tmp_path_factory.mktemp("loader") / "crops.npy"
    rng = np.random.default_rng(0)
    crops = np.lib.format.open_memmap(path, mode="w+", dtype=np.int16, shape=(N_CROPS, 96, 96, 96))
    for i in range(N_CROPS):
        crops[i] = rng.integers(-1000, 1500, size=(96, 96, 96), dtype=np.int16)
    crops.flush()
    table = pd.DataFrame({"patient_id": [f"p{i // 8}" for i in range(N_CROPS)], "vertebra": ["L1"] * N_CROPS,
                          "label": rng.integers(0, 2, N_CROPS), "grade": 0, "split": "train"})
    return VertebraSet(np.load(path, mmap_mode="r"), table, "loader")


def _samples_per_second(dataset, batch_size: int, workers: int, batches: int) -> float:
    from torch.utils.data import DataLoader

    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=True,
                        persistent_workers=workers > 0)
    it = iter(loader)
    next(it)  # workers started and warm
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * batch_size / (time.perf_counter() - t0)


@pytest.mark.parametrize("name", METHODS)
def test_loader_rate_against_the_projected_gpu_step_rate(name, crop_part, report_lines):
    from bench.cost import GPU_PEAK_BF16, method_cost
    from bench.evaluation import make_dataset
    from bench.registry import create_method
    from bench.run import resolve_runs

    cfg = resolve_runs({"method": name, "regime": "scratch", "preset": "paper", "progress": "false"})[0]
    method = create_method(name, cfg)
    flop_per_sample = method_cost(name)["finetune_gflop"] * 1e9
    needed = {gpu: peak * MFU / flop_per_sample for gpu, peak in GPU_PEAK_BF16.items()}
    dataset = make_dataset(method, cfg, crop_part, augment=True)
    batch = int(cfg.batch_size)
    delivered = {w: _samples_per_second(dataset, batch, w, batches=max(2, 48 // batch)) for w in (0, 1, 2)}
    per_worker = delivered[1]
    workers = {gpu: math.ceil(rate / per_worker) for gpu, rate in needed.items()}
    report_lines.append(
        f"{name} (paper preset, batch {batch}, {flop_per_sample / 1e9:.0f} GFLOP per training sample): "
        f"a GPU at MFU {MFU:.0%} consumes {needed['A40']:.1f} samples/s (A40) / {needed['H100']:.1f} (H100); "
        f"the loader delivers {delivered[0]:.1f} samples/s in the main process, {delivered[1]:.1f} with 1 worker, "
        f"{delivered[2]:.1f} with 2: about {workers['A40']} worker(s) keep an A40 fed, {workers['H100']} an H100")
    assert all(rate > 0 for rate in delivered.values())
