"""The `bench` command as a user runs it, on the tiny preset."""
import json

import pandas as pd
import pytest
import torch
import yaml

from bench.cli import main
from bench.config import compose
from bench.registry import create_method, get_method
from bench.store import FILES, MODEL_FILE
from tests_helpers import run_cli

BAD_RUNS = [
    (["run", "method=nope"], "unknown method 'nope'"),
    (["run", "method=resnet18", "regime=nope"], "does not support regime 'nope'; valid: scratch"),
    (["run", "method=resnet18", "lr=abc"], "bad value for 'lr'"),
    (["run", "method=resnet18", "lrr=1"], "unknown config key 'lrr'"),
    (["run", "seed=1"], "needs method=NAME"),
]


def test_bad_runs_print_one_line_and_exit_2(tmp_path):
    """Each bad command prints one line, exits 2 and writes nothing; the first also in a process of its
    own, as a user types it, so nothing printed while importing torch and MONAI adds a line."""
    from tests_helpers import run_cli_fresh

    for i, (args, expected) in enumerate(BAD_RUNS):
        for runner in (run_cli, run_cli_fresh) if i == 0 else (run_cli,):
            done = runner(*args, f"out={tmp_path}/runs{i}")
            lines = done.stderr.strip().splitlines()
            assert done.returncode == 2 and len(lines) == 1 and expected in lines[0], (args, done.stderr)
            assert not (tmp_path / f"runs{i}").exists()  # nothing written


def test_list_methods_shows_the_cnns():
    out = run_cli("list", "methods")
    assert out.returncode == 0
    names = [line.split()[0] for line in out.stdout.splitlines()]
    assert {"densenet121", "densenet169", "resnet18", "resnet50"} <= set(names)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    proc = run_cli("run", "method=resnet18", "preset=tiny", f"out={out}")  # no regime: all it supports
    assert proc.returncode == 0, proc.stderr
    return out / "single" / "resnet18-scratch-s0", proc


def test_tiny_run_leaves_the_four_files(tiny_run):
    folder, proc = tiny_run
    assert sorted(p.name for p in folder.iterdir()) == sorted([*FILES, MODEL_FILE])  # finetuning keeps its model
    assert str(folder) in proc.stdout
    metrics = json.loads((folder / "metrics.json").read_text())
    for key in ("f1", "acc", "auc", "ap", "sensitivity", "specificity", "balanced_acc"):
        assert key in metrics["test"] and key in metrics["val"]
    assert len(metrics["epochs"]) == 4 and metrics["cost"]["s_per_epoch"] > 0
    assert metrics["data"]["splits"]["test"]["vertebrae"] == metrics["test"]["n"]
    config = yaml.safe_load((folder / "config.yaml").read_text())
    assert config["method"] == "resnet18" and config["regime"] == "scratch"
    assert config["model"]["widen_factor"] == 0.25 and config["crop_size"] == 32
    env = json.loads((folder / "env.json").read_text())
    assert env["versions"]["torch"] and env["hardware"]["cpu_count"] and env["started"] <= env["finished"]
    preds = pd.read_parquet(folder / "predictions.parquet")
    assert list(preds.columns) == ["patient_id", "vertebra", "label", "grade", "score", "prediction"]
    assert len(preds) == metrics["test"]["n"] and preds.score.between(0, 1).all()


def test_same_seed_gives_identical_predictions(tmp_path, tiny_run):
    folder, _ = tiny_run
    assert main(["run", "method=resnet18", "regime=scratch", "preset=tiny", f"out={tmp_path}"]) == 0
    again = tmp_path / "single" / "resnet18-scratch-s0" / "predictions.parquet"
    pd.testing.assert_frame_equal(pd.read_parquet(folder / "predictions.parquet"), pd.read_parquet(again))
    assert main(["run", "method=resnet18", "regime=scratch", "preset=tiny", "seed=1", f"out={tmp_path}"]) == 0
    other = pd.read_parquet(tmp_path / "single" / "resnet18-scratch-s1" / "predictions.parquet")
    assert not other.score.equals(pd.read_parquet(again).score)


def test_amp_path_runs_on_cpu(tmp_path):
    """A tiny CNN: forced bf16 without native kernels runs PyTorch's slow reference convolutions."""
    from bench.loop import native_bf16

    args = ["run", "method=_test_tiny_cnn", "regime=scratch", "preset=tiny", "epochs=1", "amp=true"]
    assert main([*args, "amp_dtype=bf16", f"out={tmp_path / 'forced'}"]) == 0  # bf16 even without native kernels
    metrics = json.loads((tmp_path / "forced" / "single" / "_test_tiny_cnn-scratch-s0" / "metrics.json").read_text())
    assert metrics["cost"]["amp_dtype"] == "bfloat16"
    assert main([*args, f"out={tmp_path / 'auto'}"]) == 0  # auto: bf16 only where the CPU has bf16 kernels
    cost = json.loads((tmp_path / "auto" / "single" / "_test_tiny_cnn-scratch-s0" / "metrics.json").read_text())["cost"]
    if native_bf16():
        assert cost["amp_dtype"] == "bfloat16" and "bench.numerics" in cost["amp_note"]  # the conv guard is on
    else:
        assert cost["amp_dtype"] is None and "no native bf16" in cost["amp_note"]


def test_compile_path_runs_on_cpu(tmp_path):
    """torch.compile through inductor on CPU; a tiny CNN keeps the compile itself short."""
    args = ["run", "method=_test_tiny_cnn", "preset=tiny", "epochs=1", f"out={tmp_path}", "compile=true",
            "amp=true", "amp_dtype=bf16"]
    assert main(args) == 0
    metrics = json.loads((tmp_path / "single" / "_test_tiny_cnn-scratch-s0" / "metrics.json").read_text())
    assert metrics["cost"]["amp_dtype"] == "bfloat16" and metrics["test"]["n"] > 0


@pytest.mark.parametrize("name", ["densenet121", "densenet169", "resnet18", "resnet50"])
def test_every_cnn_trains_a_step(name):
    cfg = compose({"preset": "tiny", "method": name}, get_method(name))
    model = create_method(name, cfg).build_model(num_classes=2)
    x = torch.rand(2, 1, 32, 32, 32)
    logits = model(x)
    assert logits.shape == (2, 2)
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_paper_preset_builds_the_published_resnet18():
    cfg = compose({"preset": "paper", "method": "resnet18"}, get_method("resnet18"))
    model = create_method("resnet18", cfg).build_model()
    n = sum(p.numel() for p in model.parameters())
    assert 33.0e6 < n < 33.3e6  # MONAI 3D ResNet-18 at full width: ~33.2M parameters


def test_cost_steps_each_method_and_prints_the_table(tmp_path, capsys):
    """`bench cost` at tiny (the benchmark runs it at paper): a row per method, FLOPs counted; bad keys are one line."""
    out = tmp_path / "cost.md"
    assert main(["cost", "methods=resnet18,mae3d", "preset=tiny", f"out={out}"]) == 0
    rows = [line for line in out.read_text().splitlines() if line.startswith("| `")]
    assert [r.split("`")[1] for r in rows] == ["resnet18", "mae3d"]
    assert rows[1].split("|")[4].strip() != "-"  # mae3d has a pretext step
    capsys.readouterr()
    assert main(["cost", "mfu=2"]) == 2 and "expected a fraction" in capsys.readouterr().err
    assert main(["cost", "methods=nope"]) == 2 and "unknown method 'nope'" in capsys.readouterr().err
    assert main(["cost", "batch=0"]) == 2 and "bad value for 'batch': '0'" in capsys.readouterr().err
    assert main(["cost", "methods=resnet18", "preset=tiny", "model.nope=1"]) == 2
    assert "unknown config key 'model.nope'" in capsys.readouterr().err


def test_swin_activation_checkpointing_changes_memory_not_results():
    """`model.grad_checkpointing=true` (what fits VoCo's paper-preset pretext on a small machine): the same
    loss and gradients, fewer activations kept for backward."""
    from bench.cost import method_cost
    from bench.registry import create_method
    from bench.run import resolve_runs

    grads = []
    for flag in ("false", "true"):
        cfg = resolve_runs({"method": "swin_unetr", "preset": "tiny", "model.grad_checkpointing": flag})[0]
        torch.manual_seed(0)
        model = create_method("swin_unetr", cfg).build_model().train()
        model(torch.rand(2, 1, 32, 32, 32)).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1])
    plain, checkpointed = (method_cost("voco", "tiny", 1, {"model.grad_checkpointing": f}) for f in ("false", "true"))
    assert checkpointed["pretrain_act_gib"] < plain["pretrain_act_gib"]

def test_cost_gpu_says_what_fits_and_what_makes_it_fit(capsys):
    """`bench cost gpu=...`: the whole batch, a micro-batch, checkpointing on top, or does not fit."""
    from bench.cost import fitting_setting, gpu_gib

    assert fitting_setting(1.0, 0.5, 0.1, 16, 20.0) == "fits"  # 1 + 8 <= 18
    assert fitting_setting(1.0, 2.0, 0.5, 16, 20.0) == "micro_batch=8"  # 1 + 16 <= 18 < 1 + 32
    assert fitting_setting(1.0, 40.0, 2.0, 16, 20.0) == "micro_batch=8 + model.grad_checkpointing=true"
    assert fitting_setting(19.0, 1.0, 0.5, 16, 20.0) == "does not fit"
    assert gpu_gib("A40") == pytest.approx(48e9 / 2**30) and gpu_gib("12") == 12.0
    assert main(["cost", "methods=resnet18", "preset=tiny", "gpu=0.05"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| `resnet18` |") and "(" in line.split("|")[2])
    assert row.split("|")[2].strip().endswith("(8)")  # the tiny preset's batch
    assert "0.1 GiB, 90% of it usable" in out or "0.0 GiB, 90% of it usable" in out
    assert main(["cost", "gpu=B200x"]) == 2 and "bad value for 'gpu': 'B200x'" in capsys.readouterr().err


def test_cost_at_batch_one_counts_the_same_flops_per_sample():
    """`batch=1` (what fits a large pretext on a small machine) measures the same per-sample costs."""
    from bench.cost import method_cost

    one, two = method_cost("mae3d", "tiny", batch=1), method_cost("mae3d", "tiny", batch=2)
    for key in ("finetune_gflop", "pretrain_gflop"):
        assert one[key] == pytest.approx(two[key], rel=0.02), key
