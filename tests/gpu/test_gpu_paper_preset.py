"""The paper preset on a GPU: every method's training and pretext steps under fp16 and bf16
autocast (channels_last where the method asks for it), its peak memory against `bench cost`'s
estimate and its MFU; torch.compile on one method per family; a two-epoch paper-preset finetuning
of resnet18 and video_ct_mae whose training loss falls."""
import time

import pytest
import torch

from bench.registry import list_methods

pytestmark = pytest.mark.gpu
METHODS = [m for m in list_methods() if not m.startswith("_")]
COMPILED = ("resnet18", "vit_b", "video_ct_mae", "swin_unetr")  # one per family: compiling all 23 takes too long
PEAK_BF16 = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12, "A40": 149.7e12, "L40S": 362e12}


def _peak_flops() -> float | None:
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def _step(name: str, dtype: torch.dtype, compile_: bool, batch: int = 2) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    from bench.cost import _finetune_sample, _pretext_sample
    from bench.registry import create_method
    from bench.run import resolve_runs

    cfg = resolve_runs({"method": name, "regime": "scratch", "preset": "paper", "progress": "false",
                        "device": "cuda"})[0]
    method = create_method(name, cfg)
    fmt = torch.channels_last_3d if method.channels_last else torch.contiguous_format
    out = {}
    for kind in ("finetune", "pretext"):
        if kind == "finetune":
            model = method.build_model().cuda().to(memory_format=fmt)
            x, y = (t.cuda() for t in _finetune_sample(method, cfg, batch))
            loss_fn = torch.nn.CrossEntropyLoss()
            inputs = x.to(memory_format=fmt) if x.dim() == 5 else x

            def loss_of(m, inputs=inputs, y=y, loss_fn=loss_fn):
                if inputs.dim() == 6:
                    from bench.evaluation import forward_views

                    return loss_fn(forward_views(m, inputs[:, :1]).float(), y)
                return method.training_loss(m, inputs, y, loss_fn)
        else:
            stage = next((s for s in ("vertebrae", "public") if method.pretext_data_kind(s) is not None), None)
            if stage is None:
                continue
            model = method.make_pretext(stage).cuda()
            sample = _pretext_sample(method, cfg, stage, batch, model.sample_views)
            sample = [t.cuda() for t in sample] if isinstance(sample, (list, tuple)) else sample.cuda()

            def loss_of(m, sample=sample, pretext=model):
                return pretext.step(m, sample)["loss"]
        stepped = torch.compile(model) if compile_ else model
        optimiser = torch.optim.AdamW(model.parameters(), lr=1e-6)
        scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
        for _ in ("warm-up", "measured"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            with FlopCounterMode(display=False) as counter:
                with torch.autocast("cuda", dtype=dtype):
                    loss = loss_of(stepped)
                scaler.scale(loss).backward()
            scaler.step(optimiser)
            scaler.update()
            optimiser.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        assert torch.isfinite(loss), f"{name} {kind} {dtype}: loss {float(loss)}"
        peak = _peak_flops()
        out[kind] = {"loss": float(loss), "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "s": seconds,
                     "mfu": counter.get_total_flops() / seconds / peak if peak else None}
        del model, stepped, optimiser
        torch.cuda.empty_cache()
    return out


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("name", METHODS)
def test_paper_preset_steps_under_autocast(name, dtype, gpu_results):
    from bench.cost import method_cost, projections

    compile_ = name in COMPILED and dtype == "bfloat16"
    measured = _step(name, getattr(torch, dtype), compile_)
    estimate = projections([method_cost(name, "paper", 2)], 0.3).iloc[0] if dtype == "bfloat16" else None
    for kind, row in measured.items():
        bound = None
        if estimate is not None:
            act = estimate["finetune_act_gib" if kind == "finetune" else "pretrain_act_gib"]
            params = estimate["params_m"] if kind == "finetune" else estimate.get("pretext_params_m",
                                                                                  estimate["params_m"])
            bound = params * 1e6 * 16 / 2**30 + act * 2  # the estimate at this batch (2)
            assert row["peak_gib"] <= 1.2 * bound + 1.0, (name, kind, row["peak_gib"], bound)
        gpu_results.append({"check": "step", "method": name, "kind": kind, "dtype": dtype, "compile": compile_,
                            **row, "estimate_gib": bound})


@pytest.mark.parametrize("name", ["resnet18", "video_ct_mae"])
def test_two_paper_preset_epochs_lower_the_training_loss(name, tmp_path, gpu_results):
    import json

    from bench.cli import main

    args = ["run", f"method={name}", "regime=scratch", "preset=paper", "epochs=2", "warmup_epochs=0",
            "device=cuda", "synthetic.n_patients=40", "synthetic.n_val_patients=10", "synthetic.n_test_patients=10",
            f"out={tmp_path}", "progress=false", f"cache_dir={tmp_path / 'cache'}"]
    assert main(args) == 0
    metrics = json.loads(next(tmp_path.rglob("metrics.json")).read_text())
    losses = [e["train_loss"] for e in metrics["epochs"]]
    gpu_results.append({"check": "two epochs", "method": name, "losses": losses})
    assert losses[-1] < losses[0], losses


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="data parallel needs two GPUs")
def test_two_gpus_take_the_one_gpu_steps(tmp_path, gpu_results):
    """devices=2 on two GPUs (NCCL): vit_b (no BatchNorm) at the one-GPU run's validation curve."""
    import json

    from tests_helpers import run_cli

    curves = {}
    for devices in (1, 2):
        out = tmp_path / f"d{devices}"
        done = run_cli("run", "method=vit_b", "regime=scratch", "preset=paper", "epochs=2", "device=cuda",
                       f"devices={devices}", "synthetic.n_patients=40", "synthetic.n_val_patients=10",
                       "synthetic.n_test_patients=10", f"out={out}", "progress=false", f"cache_dir={tmp_path / 'c'}")
        assert done.returncode == 0, done.stderr[-2000:]
        curves[devices] = [e["val_loss"] for e in json.loads(next(out.rglob("metrics.json")).read_text())["epochs"]]
    gpu_results.append({"check": "two gpus", "method": "vit_b", "losses": curves[2], "one": curves[1]})
    assert curves[2] == pytest.approx(curves[1], rel=1e-3), curves


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="data parallel needs two GPUs")
def test_a_suite_spans_each_run_over_two_gpus(tmp_path, gpu_results):
    """ray.gpus_per_run=2: each trial holds no GPU itself, its two workers hold one each (NCCL, fp16
    autocast chosen on the workers' device), and the trial evaluates on its CPU."""
    import json

    from bench.cli import main

    suite = tmp_path / "dp.yaml"
    suite.write_text("runs:\n  - {method: vit_b, regimes: [scratch]}\n")
    assert main(["run", f"suite={suite}", "preset=tiny", "epochs=2", "amp=true", "ray.gpus_per_run=2",
                 f"out={tmp_path / 'runs'}", f"cache_dir={tmp_path / 'cache'}"]) == 0
    metrics = json.loads(next((tmp_path / "runs").rglob("metrics.json")).read_text())
    losses = [e["train_loss"] for e in metrics["epochs"]]
    gpu_results.append({"check": "suite over two gpus", "method": "vit_b", "losses": losses})
    assert metrics["cost"]["device"] == "cpu" and len(losses) == 2
