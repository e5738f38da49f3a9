"""The `paper` preset, proven on a CPU: every registered method is built at the paper's architecture
and takes one training step at batch 2 on its real input (96^3 crops, slice-view clips), plus one
pretext step where it has a pretext; and the README's cost table is what `bench cost` prints.

Run with `pytest tests/benchmarks/test_bench_paper_preset.py --benchmark-enable -s` (minutes: the
paper's ViT-L and ResEnc-L steps are real)."""
import math
import re

import pytest

from bench.cost import markdown, method_cost, projections
from bench.registry import list_methods
from tests_helpers import REPO

METHODS = [m for m in list_methods() if not m.startswith("_")]
MFU = 0.3


@pytest.fixture(scope="module")
def costs():
    return {}


@pytest.mark.parametrize("name", METHODS)
def test_paper_preset_takes_a_finetuning_and_a_pretext_step(name, costs, report_lines):
    row = method_cost(name)
    costs[name] = row
    assert row["finetune_gflop"] > 0 and math.isfinite(row["finetune_gflop"])
    report_lines.append(f"{name}: {row['params_m']:.1f} M params, finetune {row['finetune_gflop']:.1f} GFLOP "
                        f"({row['finetune_cpu_s']:.1f} s on this CPU)"
                        + (f", pretext {row['pretrain_gflop']:.1f} GFLOP ({row['pretrain_cpu_s']:.1f} s)"
                           if "pretrain_gflop" in row else ""))


def test_readme_table_is_the_commands_output(costs):
    if set(costs) != set(METHODS):
        pytest.skip("needs every method's step (run the whole module)")
    table = markdown(projections([costs[m] for m in METHODS], MFU), MFU)
    readme = (REPO / "README.md").read_text()
    block = re.search(r"<!-- cost-table -->\n(.*?)\n<!-- /cost-table -->", readme, re.S)
    assert block, "README has no <!-- cost-table --> block"
    assert block.group(1).strip() == table.strip(), "README's cost table differs from `bench cost mfu=0.3`:\n" + table
