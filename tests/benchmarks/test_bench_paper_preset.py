"""The `paper` preset, proven on a CPU: every registered method is built at the paper's architecture
and takes one training step at batch 2 on its real input (96^3 crops, slice-view clips), plus one
pretext step where it has a pretext (what `bench cost` prints, per method).

Run with `pytest tests/benchmarks --benchmark-enable -m paper_preset -s` (tens of minutes: the
paper's ViT-L and ResEnc-L steps are real); the other benchmarks leave it out."""
import math

import pytest

from bench.cost import method_cost
from bench.registry import list_methods

METHODS = [m for m in list_methods() if not m.startswith("_")]


@pytest.mark.paper_preset
@pytest.mark.parametrize("name", METHODS)
def test_paper_preset_takes_a_finetuning_and_a_pretext_step(name, report_lines):
    row = method_cost(name)
    assert row["finetune_gflop"] > 0 and math.isfinite(row["finetune_gflop"])
    report_lines.append(f"{name}: {row['params_m']:.1f} M params, finetune {row['finetune_gflop']:.1f} GFLOP "
                        f"({row['finetune_cpu_s']:.1f} s on this CPU)"
                        + (f", pretext {row['pretrain_gflop']:.1f} GFLOP ({row['pretrain_cpu_s']:.1f} s)"
                           if "pretrain_gflop" in row else ""))
