"""One training stage on several devices (`devices=N`): data-parallel workers through Ray Train.

The driver builds the stage as for one device and hands the whole `TrainingLoop` to Ray Train's
`TorchTrainer`, which starts N workers and their process group (NCCL on GPUs, gloo on CPUs). Every
worker draws the same global batch (the loaders' order and augmentation are seeded by seed, epoch and
index, so they agree without communication) and keeps its shard of it; each shard's loss is weighed
by its share of the global batch's loss, and one all-reduce sums the gradients before the optimiser
step. The step is therefore the one-device step at the same `batch_size`, up to the order of float
sums, for networks without BatchNorm (a BatchNorm layer normalises each shard by its own statistics,
as under `micro_batch`) and for losses that are means over samples (a contrastive loss sees the
shard's negatives). Randomness inside a step (masks, views drawn on the device) is seeded per epoch
and rank, so the shards do not repeat each other's draws.

The gradients are summed after the backward pass rather than bucketed into it as
`DistributedDataParallel` does: stages call their modules' own methods (pretexts, encoders), not only
`forward`, which DDP's hooks require. Rank 0 alone evaluates validation, calls the epoch callback
(checkpoints) and hands the trained state back through Ray's object store (a queue, so the workers
may sit on any node), which the driver loads; test evaluation and frozen features then run once,
on the driver, over the whole split.

Workers train on GPUs (NCCL) when the driver has one or the config says `device=cuda`; a driver
that holds no GPU itself (a suite trial under `ray.gpus_per_run`, whose workers hold them)
evaluates on its CPU. Each worker moves the loop to its device (`TrainingLoop.retarget`: the autocast
dtype and `micro_batch=auto` chosen there).
"""
from __future__ import annotations

import math
import random
import tempfile
from typing import Any

import numpy as np
import torch
from torch import nn

from bench.errors import BenchError


def shard_of(batch: Any, world: int) -> list[Any]:
    """The global batch in `world` contiguous shards of equal size (the last may be smaller; with
    fewer samples than workers, some workers get none)."""
    from bench.loop import micro_batches, samples_in

    return micro_batches(batch, math.ceil(samples_in(batch) / world))


def seed_rank(base: int, epoch: int, rank: int) -> None:
    """Each worker's generators for the epoch: distinct per rank, the same on a rerun or a resume."""
    seed = int(np.random.SeedSequence([base, epoch, rank]).generate_state(1)[0])
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def sum_gradients(model: nn.Module) -> None:
    """All workers' gradients summed in place, in one flat buffer. A parameter that no worker's shard
    reached keeps no gradient (as on one device); one that only some reached gets zeros elsewhere."""
    import torch.distributed as dist

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        return
    reached = torch.tensor([p.grad is not None for p in params], dtype=torch.uint8)
    dist.all_reduce(reached, op=dist.ReduceOp.MAX)
    used = [p for p, r in zip(params, reached.tolist()) if r]
    for p in used:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if not used:
        return
    flat = torch.cat([p.grad.reshape(-1) for p in used])
    dist.all_reduce(flat)
    offset = 0
    for p in used:
        n = p.grad.numel()
        p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
        offset += n


def summed(sums: dict[str, float], seen: int) -> tuple[dict[str, float], int]:
    """The epoch's loss sums and sample count over all workers (every worker holds the same keys)."""
    import torch.distributed as dist

    keys = sorted(sums)
    values = torch.tensor([sums[k] for k in keys] + [float(seen)], dtype=torch.float64)
    dist.all_reduce(values)
    return dict(zip(keys, values[:-1].tolist())), int(values[-1].item())


def _worker(config: dict[str, Any]) -> None:
    import cloudpickle
    import ray
    import ray.train

    loop, on_epoch, resume = cloudpickle.loads(ray.get(config["payload"]))
    context = ray.train.get_context()
    loop.rank, loop.world = context.get_world_rank(), context.get_world_size()
    if loop.execution.workers == "cuda":
        import ray.train.torch

        loop.retarget(ray.train.torch.get_device())
    if loop.execution.compile:
        loop.step_model = loop.stage.step_model = torch.compile(loop.model)
    result = loop.run_here(on_epoch, resume)
    if loop.rank == 0:  # the trained state back to the driver through Ray's object store, on any node
        config["handback"].put({"state": loop.state(), "result": vars(result)})
    ray.train.report({"epochs": len(result.history)})


def run_data_parallel(loop: Any, on_epoch: Any, resume: dict[str, Any] | None) -> Any:
    """`loop.run` on `loop.schedule.devices` Ray Train workers; the driver's loop ends holding rank 0's
    trained state, and the result is rank 0's (its loss curve averages every worker's shards).
    `on_epoch` (per-epoch checkpoints: a suite trial's state file, a pretraining stage's staging
    folder) runs in rank 0's process and writes where the driver would, so an interrupted run resumes
    from its last epoch as on one device."""
    import cloudpickle

    from bench.loop import LoopResult
    from bench.orchestrate import ray_session

    devices = int(loop.schedule.devices)
    driver = loop.execution.device
    gpus = loop.execution.workers == "cuda"
    if driver.type == "cuda":  # the driver keeps its copy on the CPU; each worker moves its own to its GPU
        loop.retarget(torch.device("cpu"))
    loop.step_model = loop.stage.step_model = loop.model  # a compiled module is rebuilt inside each worker
    loop.rank_seed = int(torch.randint(0, 2**31 - 1, ()).item())  # drawn from the run's seeded generator
    import ray

    with ray_session(None):  # a Ray already running (a suite's trial, a notebook) is used as it is
        from ray.train import RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer
        from ray.util.queue import Queue

        if gpus and ray.cluster_resources().get("GPU", 0) < devices:
            raise BenchError(f"{loop.stage.name}: devices={devices} on GPUs, but the Ray cluster has "
                             f"{ray.cluster_resources().get('GPU', 0):g}; use device=cpu for CPU workers")
        handback = Queue(maxsize=1)
        payload = ray.put(cloudpickle.dumps((loop, on_epoch, resume)))
        try:
            with tempfile.TemporaryDirectory(prefix="bench-ray-train-") as storage:
                trainer = TorchTrainer(
                    _worker, train_loop_config={"payload": payload, "handback": handback},
                    scaling_config=ScalingConfig(num_workers=devices, use_gpu=gpus, resources_per_worker={"CPU": 1}),
                    run_config=RunConfig(name="stage", storage_path=storage))
                try:
                    trainer.fit()
                except Exception as exc:  # Ray wraps a worker's error; its first line names what failed
                    raise BenchError(f"{loop.stage.name} on {devices} devices: {_root_cause(exc)}") from None
            saved = handback.get(timeout=60)
        finally:
            handback.shutdown()
    if driver.type == "cuda":
        loop.retarget(driver)
    loop.restore(saved["state"])
    return LoopResult(**saved["result"])


def _root_cause(exc: BaseException) -> str:
    text = str(exc)
    for line in text.splitlines():
        if "BenchError:" in line:
            return line.split("BenchError:", 1)[1].strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else type(exc).__name__
