"""Model step costs: MAE at mask 0.8 vs a full-token step; ViT MFU; Video-CT MAE format adaptation.

Run: pytest tests/benchmarks/test_bench_models.py --benchmark-enable -s
FLOPs are counted by torch's FlopCounterMode on one real step (bench.flops.counted, which adds the
CPU's fused attention); the peak is this process's own matmul FLOP/s, measured in the same run (the
machines are noisy, ratios are what we quote).
"""
from __future__ import annotations

import time

import torch
from torch import nn

from bench.flops import counted
from bench.loop import keep_freed_memory, make_optimizer
from bench.methods.mae3d import MAE3D, Masking
from bench.methods.video_mae import VideoViT
from bench.methods.vit import ViT3D, take


def _median_time(fn, repeats: int = 5) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _matmul_flops_per_s(dtype: torch.dtype, n: int = 2048) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return 2 * n**3 / _median_time(lambda: a @ b, repeats=10)


def _step(model, x, opt):
    def run():
        opt.zero_grad(set_to_none=True)
        out = model(x)
        loss = out["loss"] if isinstance(out, dict) else out.float().pow(2).mean()
        loss.backward()
        opt.step()
    return run


def _flops(fn) -> float:
    return counted(fn)[1]  # the suite's own count: torch's counter with the CPU's fused attention


def _vit(size=96):
    return ViT3D(size, 16, embed_dim=384, depth=6, num_heads=6)


class EncoderSeesMaskTokens(MAE3D):
    """MAE's "encoder w/ [M]" variant (He et al. 2022, Table 1c): the same pretext, loss and decoder,
    but the encoder processes every position, hidden ones as a learned mask token. This is the
    full-token step the visible-only encoder is measured against."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.encoder_mask_token = nn.Parameter(torch.zeros(1, 1, self.encoder.embed_dim))

    def encode(self, patches: torch.Tensor, masking: Masking) -> torch.Tensor:
        visible = self.encoder.embed(patches, masking.keep)  # (B, k, E), position-embedded
        pos = self.encoder.pos_embed[:, 1:].expand(len(patches), -1, -1)
        hidden = self.encoder_mask_token + take(pos, masking.hidden)  # (B, n - k, E)
        tokens = take(torch.cat([visible, hidden], dim=1), masking.restore)  # (B, n, E), patch order
        return self.decoder_embed(self.encoder.encode(tokens)) + self.decoder_pos_embed


def _mae_ratio(benchmark, encoder: dict, rounds: int = 7, batch: int = 8) -> tuple[float, float, float]:
    """Median times of the visible-only MAE step and the encoder-w/-[M] step (interleaved, so that
    both see the same machine load), and the ratio of their FLOP counts, the floor of the time ratio.
    Both use the benchmark's decoder (192 wide, 2 blocks) and the pretraining stage's optimiser, at
    the paper preset's pretraining batch (8)."""
    keep_freed_memory()  # as every CPU training run does (bench.loop.Execution.of)
    torch.manual_seed(0)
    x = torch.rand(batch, 1, 96, 96, 96)
    masked = MAE3D(ViT3D(96, 16, **encoder), 192, 2, 6, mask_ratio=0.8, norm_pix_loss=True)
    full = EncoderSeesMaskTokens(ViT3D(96, 16, **encoder), 192, 2, 6, mask_ratio=0.8, norm_pix_loss=True)
    step_masked = _step(masked, x, make_optimizer(masked, "adamw", 1e-4, 0.05))
    step_full = _step(full, x, make_optimizer(full, "adamw", 1e-4, 0.05))
    seen = []
    for model in (masked, full):
        model.encoder.blocks[0].register_forward_hook(lambda module, args, out: seen.append(args[0].shape[1]))
        model(x)
    assert seen == [1 + 43, 1 + 216]  # cls + the visible patches; cls + every position
    flop_ratio = _flops(step_masked) / _flops(step_full)
    times: dict[str, list[float]] = {"masked": [], "full": []}

    def pair():
        for name, step in (("masked", step_masked), ("full", step_full)):
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)

    benchmark.pedantic(pair, rounds=rounds, iterations=1, warmup_rounds=1)
    t_masked, t_full = (sorted(times[k][1:])[rounds // 2] for k in ("masked", "full"))  # [0] is the warm-up
    return t_masked, t_full, flop_ratio


def test_mae_step_vs_full_token_step(benchmark, report_lines):
    """The masked step against its FLOP floor: time ratio / FLOP-count ratio. What remains above 1 on
    a CPU is matrix-product efficiency: the masked encoder's products have a fifth of the rows."""
    t_masked, t_full, floor = _mae_ratio(benchmark, dict(embed_dim=384, depth=6, num_heads=6), rounds=11)
    ratio = t_masked / t_full
    report_lines.append(f"MAE step at mask 0.8: {t_masked * 1e3:.0f} ms vs full-token step {t_full * 1e3:.0f} ms "
                        f"(encoder w/ [M]) = {ratio:.3f}x against a FLOP count of {floor:.3f}x: {ratio / floor:.2f}x "
                        f"its floor (goal <= 1.08x); ViT-S/16 encoder, 43 of 216 patches visible, batch 8")
    assert ratio / floor <= 1.08


def test_mae_step_ratio_behind_a_vit_b(benchmark, report_lines):
    """The same decoder behind the method's own ViT-B encoder (reported, not asserted): the ratio is
    set by the share of the step that MAE spends on every token (decoder, prediction, optimiser)."""
    t_masked, t_full, floor = _mae_ratio(benchmark, dict(embed_dim=768, depth=12, num_heads=12), rounds=5)
    report_lines.append(f"MAE step at mask 0.8, ViT-B/16 encoder: {t_masked * 1e3:.0f} ms vs {t_full * 1e3:.0f} ms "
                        f"= {t_masked / t_full:.2f}x (FLOP count {floor:.2f}x)")


def test_vit_training_step_mfu(report_lines):
    torch.manual_seed(0)
    x = torch.rand(4, 1, 96, 96, 96)
    lines = []
    for dtype in (torch.float32, torch.bfloat16):
        model = _vit()
        opt = make_optimizer(model, "adamw", 1e-4, 0.05)  # the engine's optimiser

        def step(model=model, opt=opt, dtype=dtype):
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                loss = model(x).float().pow(2).mean()
            loss.backward()
            opt.step()

        flops = _flops(step)
        seconds = _median_time(step)
        peak = _matmul_flops_per_s(dtype)
        mfu = flops / seconds / peak
        lines.append(f"ViT-S/16 3D training step ({str(dtype)[6:]}): {flops / 1e9:.0f} GFLOP in "
                     f"{seconds * 1e3:.0f} ms = {flops / seconds / 1e9:.0f} GFLOP/s vs matmul "
                     f"{peak / 1e9:.0f} GFLOP/s: MFU {mfu:.0%} (goal 60 %)")
    report_lines.extend(lines)


def test_video_ct_mae_format_adaptation_throughput(benchmark, report_lines):
    """Finetuning step at 96-pixel frames (format adaptation) vs slices zero-padded to 224."""
    torch.manual_seed(0)
    results = {}
    for size in (96, 224):
        model = VideoViT(16, size, 16, embed_dim=384, depth=6, heads=6)
        head = torch.nn.Linear(384, 2)
        params = list(model.parameters()) + list(head.parameters())
        opt = torch.optim.Adam(params, lr=1e-5)
        x = torch.rand(2, 3, 16, size, size)

        def step(model=model, head=head, opt=opt, x=x):
            opt.zero_grad(set_to_none=True)
            loss = head(model(x)).float().pow(2).mean()
            loss.backward()
            opt.step()

        if size == 96:
            benchmark.pedantic(step, rounds=3, iterations=1, warmup_rounds=1)
            results[size] = benchmark.stats.stats.median
        else:
            results[size] = _median_time(step, repeats=3)
    report_lines.append(f"Video-CT MAE finetuning step: 96-pixel frames {results[96] * 1e3:.0f} ms, padded to 224 "
                        f"{results[224] * 1e3:.0f} ms: format adaptation is {results[224] / results[96]:.1f}x faster "
                        f"(paper: 2x); ViT-S width, 288 vs 1568 tokens, batch 2")
