"""What one input geometry costs the four methods that used to see 32^3 crops at `small`.

Run: pytest tests/benchmarks/test_bench_geometry.py --benchmark-enable -s
Per method, at its `small` preset (autocast as the run would use it): one finetuning step (batch 16)
and one pretext step (batch 16, the pretext's own data) at crop 32 and at crop 48, in the same
process; the ratio 48/32 is what moving the method to the other methods' geometry costs per step
(the FLOPs grow with the voxels: 3.4x). The Swin methods' `small` pretexts see 32^3 sub-crops of the
48^3 crops (`pretrain.crop_size`); their pretext step is timed at that setting and, for the record,
on whole 48^3 crops.
"""
from __future__ import annotations

import time

import pytest
import torch
from torch.utils.data import default_collate

from bench.config import compose
from bench.datasets.pretext import pretext_dataset
from bench.loop import Execution, make_optimizer
from bench.registry import create_method, get_method

METHODS = ("swin_unetr", "voco", "suprem", "ctfm")


def _median(fn, repeats: int = 3) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _steps(name: str, crop: int, pretext_crop: int | None = None) -> tuple[float, float]:
    overrides = {"method": name, "regime": "public", "preset": "small", "crop_size": str(crop), "progress": "false"}
    if pretext_crop is not None:
        overrides["pretrain.crop_size"] = str(pretext_crop)
    cfg = compose(overrides, get_method(name))
    method = create_method(name, cfg)
    execution = Execution.of(cfg, method)
    model = method.build_model()
    opt = make_optimizer(model, "adamw", 1e-4, 0.05)
    x, y = torch.rand(16, 1, crop, crop, crop), torch.randint(0, 2, (16,))

    def finetune_step():
        opt.zero_grad(set_to_none=True)
        with execution.autocast():
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()

    dataset, _ = pretext_dataset(method, cfg, "public", 0)
    pretext = method.make_pretext("public")
    popt = make_optimizer(pretext, "adamw", 1e-4, 0.05)
    batch = default_collate([dataset[i] for i in range(16)])

    def pretext_step():
        popt.zero_grad(set_to_none=True)
        with execution.autocast():
            loss = pretext.step(pretext, batch)["loss"]
        loss.backward()
        popt.step()

    return _median(finetune_step), _median(pretext_step)


@pytest.mark.parametrize("name", METHODS)
def test_step_cost_of_48_against_32_voxel_crops(name, report_lines):
    torch.set_num_threads(2)
    f32, p32 = _steps(name, 32)
    f48, p48 = _steps(name, 48)
    line = (f"{name}: finetune step {f32:.2f} s -> {f48:.2f} s ({f48 / f32:.1f}x), pretext step "
            f"{p32:.2f} s -> {p48:.2f} s ({p48 / p32:.1f}x) for crops 32^3 -> 48^3 at the small preset")
    if get_method(name).pretext_any_size:
        _, whole = _steps(name, 48, pretext_crop=0)
        line += f"; on whole 48^3 crops the pretext step would take {whole:.2f} s ({whole / p32:.1f}x)"
    report_lines.append(line)
    assert f48 > f32  # more voxels cost more: the ratios are the finding, printed above
