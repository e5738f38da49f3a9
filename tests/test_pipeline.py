"""The run chain's structure: modules import one way, the loop exists once, functions stay short,
and a broken transfer contract fails before any pretraining."""
from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass

import pytest
from torch import nn

from bench import BenchError, register_method
from bench.methods.base import Method
from bench.methods.pretext import PretextTask
from tests_helpers import REPO

HARNESS = sorted(p for p in (REPO / "bench").glob("*.py"))


def _imports(path) -> set[str]:
    """Every bench.* module a file imports, at the top or inside functions."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("bench"):
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.startswith("bench"))
    return names


@pytest.mark.parametrize("module", [p.stem for p in HARNESS])
def test_each_harness_module_imports_alone(module):
    done = subprocess.run([sys.executable, "-c", f"import bench.{module}"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_the_chain_flows_one_way():
    """run -> pretrain -> transfer; finetune and pretrain share only the loop."""
    below = {"finetune": {"bench.pretrain", "bench.run", "bench.transfer"},
             "pretrain": {"bench.finetune", "bench.run", "bench.evaluation"},
             "transfer": {"bench.pretrain", "bench.finetune", "bench.run"},
             "loop": {"bench.pretrain", "bench.finetune", "bench.run", "bench.transfer", "bench.evaluation"},
             "evaluation": {"bench.pretrain", "bench.finetune", "bench.run"}}
    for module, forbidden in below.items():
        found = _imports(REPO / "bench" / f"{module}.py") & forbidden
        assert not found, f"bench.{module} imports {found}"


def test_functions_of_the_harness_are_short():
    files = HARNESS + sorted((REPO / "datasets").glob("*.py")) + sorted((REPO / "reports").glob("*.py"))
    long = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 >= 80:
                long.append(f"{path.name}:{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, long


def test_one_training_loop():
    """Only bench/loop.py calls backward() or steps an optimiser."""
    for path in HARNESS:
        text = path.read_text()
        if path.name != "loop.py":
            assert ".backward()" not in text and "optimizer.step" not in text, path.name


class _Wide(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, width, 3, stride=4)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool3d(1), nn.Flatten())

    def forward(self, x):
        return self.pool(self.conv(x))


class _Pretext(PretextTask):
    steps = 0

    def __init__(self) -> None:
        super().__init__()
        self.encoder = _Wide(6)  # the finetuning encoder has 4 channels: a layout mismatch

    def forward(self, x):
        return {"loss": self.encoder(x).mean()}

    def step(self, forward, batch):
        _Pretext.steps += 1
        return forward(batch)


@register_method("_test_bad_transfer")
class BadTransfer(Method):
    description = "test-only: its pretext encoder does not fit its finetuning encoder"
    regimes = ("scratch", "vertebrae")

    @dataclass
    class Params:
        width: int = 4

    def build_encoder(self):
        return _Wide(self.params.width), self.params.width

    def build_pretext(self, stage="vertebrae"):
        return _Pretext()


def test_a_transfer_mismatch_fails_before_the_first_pretraining_step(tmp_path, bench_cache):
    from bench.run import execute, resolve_runs

    cfg = resolve_runs({"method": "_test_bad_transfer", "regime": "vertebrae", "preset": "tiny",
                        "out": str(tmp_path)})[0]
    with pytest.raises(BenchError) as err:
        execute(cfg)
    message = str(err.value)
    assert "\n" not in message and "conv.weight (pretext (6, 1, 3, 3, 3) vs finetuning (4, 1, 3, 3, 3))" in message
    assert "conv.bias" in message
    family = bench_cache / "pretrain" / "_test_bad_transfer"  # at most its lock file: no artifact, no staging
    assert _Pretext.steps == 0 and not [p for p in family.glob("*") if not p.name.endswith(".lock")]


def test_a_plugin_with_an_unknown_regime_is_refused_at_registration():
    with pytest.raises(BenchError, match=r"method '_test_bad_regime' .* declares regime 'vertebra'.*did you mean"):
        @register_method("_test_bad_regime")
        class BadRegime(Method):
            regimes = ("scratch", "vertebra")


def test_a_hook_of_the_old_surface_is_refused_at_registration_naming_its_new_place():
    with pytest.raises(BenchError, match=r"defines 'on_pretext_step', which is now PretextTask\.on_step"):
        @register_method("_test_old_hook")
        class OldHook(Method):
            def on_pretext_step(self, pretext, step, total_steps):
                pass


def test_a_pretext_that_is_not_a_pretext_task_is_one_line():
    from bench.config import compose

    @register_method("_test_plain_pretext")
    class PlainPretext(Method):
        regimes = ("scratch", "vertebrae")

        def build_encoder(self):
            return _Wide(4), 4

        def build_pretext(self, stage="vertebrae"):
            return _Wide(4)

    method = PlainPretext(compose({"method": "_test_plain_pretext", "preset": "tiny"}, PlainPretext))
    with pytest.raises(BenchError, match=r"build_pretext\('vertebrae'\) returned a _Wide; expected a "
                                         r"bench.methods.pretext.PretextTask"):
        method.make_pretext("vertebrae")


def test_method_describes_the_method_and_the_pretext_carries_its_own_hooks():
    """Method keeps about 15 hooks; whatever acts on a pretext while it trains lives on PretextTask."""
    from bench.methods.pretext import PretextTask

    helpers = {"build_model", "checkpointed", "make_pretext", "has_pretext", "runs_without_a_file"}
    hooks = {n for n, v in vars(Method).items()
             if (callable(v) and not isinstance(v, type)) or isinstance(v, (property, classmethod))} - helpers
    hooks = {n for n in hooks if not n.startswith("_")}
    assert len(hooks) <= 17, sorted(hooks)
    pretext_hooks = {"step", "param_groups", "before_optimiser_step", "on_step", "on_epoch", "reconstruction",
                     "pretrained_encoder", "encoder_state"}
    assert pretext_hooks <= set(vars(PretextTask)) and "sample_views" in vars(PretextTask)
    assert not pretext_hooks & hooks
