"""Where a suite's compute went: per stage (pretraining, feature extraction, finetuning), the FLOPs
it counted, the time it took and the rate it reached against the machine's matmul rate.

Each pretraining artifact counts once (every run that shares it reuses it); feature extraction
counts where features were extracted, not where they were read from the cache. The machine's rates
(`machine`, measured by the suite at the trials' thread count, in suite.json) are the ceiling. Of
the time below it, two parts are measured: each training stage's time waiting for the data loader's
next batch (`data_s`), and the time trials waited on a lock for a shared artifact, feature cache or
data set another trial was building (a row of its own); the rest went to Python, elementwise ops and
small matrices.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

STAGES = ("pretraining", "feature extraction", "finetuning")
LOCKS = "waiting on locks"  # trials idle while another builds a shared artifact, feature cache or data set


def _artifact_chain(folder: str | None) -> list[Path]:
    chain, path = [], Path(folder) if folder else None
    while path is not None and (path / "pretrain.json").is_file():
        chain.append(path)
        parent = json.loads((path / "pretrain.json").read_text())["spec"].get("parent", {})
        path = Path(parent["artifact"]) if "artifact" in parent else None
    return chain


def stage_compute(folders: list[str]) -> dict[str, dict[str, Any]]:
    """Per stage and dtype: FLOPs, seconds and the threads each part ran on, over the run folders."""
    out: dict[str, dict[str, Any]] = {}

    def add(stage: str, dtype: str | None, flops: float | None, seconds: float | None, threads: int | None,
            data_s: float | None = None) -> None:
        if not flops or not seconds:
            return
        row = out.setdefault(f"{stage} ({dtype or 'float32'})", {"stage": stage, "dtype": dtype or "float32",
                                                                  "flops": 0.0, "seconds": 0.0, "data_s": 0.0,
                                                                  "threads": []})
        row["flops"] += flops
        row["seconds"] += seconds
        row["data_s"] += data_s or 0.0
        row["threads"].append(threads or 1)

    artifacts: set[Path] = set()
    for folder in folders:
        metrics = json.loads((Path(folder) / "metrics.json").read_text())
        cost = metrics.get("cost", {})
        for artifact in _artifact_chain(metrics.get("pretraining", {}).get("artifact")):
            if artifact not in artifacts:
                artifacts.add(artifact)
                record = json.loads((artifact / "pretrain.json").read_text())
                add("pretraining", record["spec"].get("dtype"), record.get("flops"), record.get("train_s"),
                    record.get("threads"), record.get("data_s"))
        if cost.get("extract_flops"):
            add("feature extraction", "float32", cost.get("extract_flops"), cost.get("extract_s"), cost.get("threads"))
        if cost.get("train_flops"):
            add("finetuning", cost.get("amp_dtype"), cost.get("train_flops"), cost.get("train_s"), cost.get("threads"),
                cost.get("train_data_s"))
        if cost.get("lock_wait_s"):
            waits = out.setdefault(LOCKS, {"stage": LOCKS, "dtype": "", "flops": 0.0, "seconds": 0.0, "data_s": 0.0,
                                           "threads": []})
            waits["seconds"] += cost["lock_wait_s"]
            waits["threads"].append(cost.get("threads") or 1)
    return out


def measure_machine(threads: int) -> dict[str, Any]:
    """The dense matmul rates at `threads` threads: fp32, and bf16 where the CPU has native kernels."""
    import torch

    from bench.flops import matmul_rate
    from bench.loop import native_bf16

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        rates = {"threads": threads, "float32": matmul_rate(torch.float32)}
        rates["bfloat16"] = matmul_rate(torch.bfloat16) if native_bf16() or torch.cuda.is_available() else None
    finally:
        torch.set_num_threads(before)
    return rates


def efficiency_rows(compute: dict[str, dict[str, Any]], machine: dict[str, Any] | None) -> list[dict[str, Any]]:
    """One row per stage and dtype: TFLOP, seconds, GFLOP/s per trial, and the fraction of the
    machine's matmul rate in that dtype (None without a measured rate)."""
    rows = []
    order = (*STAGES, LOCKS)
    for key in sorted(compute, key=lambda k: order.index(compute[k]["stage"])):
        c = compute[key]
        if c["stage"] == LOCKS:
            rows.append({"stage": LOCKS, "dtype": "", "tflop": 0.0, "seconds": c["seconds"], "gflop_s": None,
                         "threads": int(np.median(c["threads"])), "ceiling_gflop_s": None, "efficiency": None,
                         "data_s": None, "data_share": None})
            continue
        rate = c["flops"] / c["seconds"]
        ceiling = (machine or {}).get(c["dtype"]) or (machine or {}).get("float32")
        data_s = c.get("data_s", 0.0)
        rows.append({"stage": c["stage"], "dtype": c["dtype"], "tflop": c["flops"] / 1e12, "seconds": c["seconds"],
                     "gflop_s": rate / 1e9, "threads": int(np.median(c["threads"])),
                     "ceiling_gflop_s": ceiling / 1e9 if ceiling else None,
                     "efficiency": rate / ceiling if ceiling else None,
                     "data_s": data_s if c["stage"] != "feature extraction" else None,
                     "data_share": data_s / c["seconds"] if c["stage"] != "feature extraction" else None})
    return rows


def load_machine(roots: list[Path]) -> dict[str, Any] | None:
    """The machine rates a suite measured (suite.json's `machine`), from the first suite under `roots`."""
    for root in roots:
        for path in [root / "suite.json", *root.glob("*/suite.json")]:
            try:
                machine = json.loads(path.read_text()).get("machine")
            except (OSError, ValueError):
                continue
            if machine:
                return machine
    return None
