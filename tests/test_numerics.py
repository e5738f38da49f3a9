"""The bf16 convolution guard (bench.numerics): the 3D convolutions whose CPU bf16 weight gradient is
wrong compute in fp32, the rest stay in bf16, and guarding changes no parameter or key."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from bench.loop import Execution, native_bf16
from bench.numerics import GuardedConv3d, GuardedConvTranspose3d, guard_bf16_convolutions

# (input depth, kernel depth, padding): where oneDNN 3.12's avx512_core_bf16 backward-weights kernel
# was measured wrong (relative error 0.7 to 1e37, sometimes NaN), and shapes next to them that are right
FAULTY = [(2, 3, 1), (2, 5, 2), (3, 5, 2), (4, 5, 2), (6, 7, 3)]
SOUND = [(1, 3, 1), (3, 3, 1), (4, 3, 1), (2, 1, 0)]


def _weight_gradient(conv: nn.Module, x: torch.Tensor, go: torch.Tensor, bf16: bool) -> torch.Tensor:
    conv.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = conv(x)
    out.backward(go.to(out.dtype))
    return conv.weight.grad.detach().clone()


def _conv(depth_kernel: int, padding: int, transpose: bool = False) -> nn.Module:
    kind = nn.ConvTranspose3d if transpose else nn.Conv3d
    return kind(16, 16, (depth_kernel, 3, 3), padding=(padding, 1, 1))


@pytest.mark.parametrize("depth,kernel,padding", FAULTY + SOUND)
@pytest.mark.parametrize("transpose", [False, True])
def test_guarded_weight_gradient_agrees_with_fp32(depth, kernel, padding, transpose):
    torch.manual_seed(0)
    conv = _conv(kernel, padding, transpose)
    guard_bf16_convolutions(conv)
    x = torch.randn(4, 16, depth, 5, 5)
    go = torch.randn_like(conv(x)) * 1e-2
    reference = _weight_gradient(conv, x, go, bf16=False)
    for _ in range(3):  # the faulty kernel's error varies from call to call
        mixed = _weight_gradient(conv, x, go, bf16=True)
        assert torch.isfinite(mixed).all()
        assert float((mixed - reference).norm() / reference.norm()) < 0.02


@pytest.mark.skipif(not native_bf16(), reason="the kernel fault needs a CPU with native bf16")
def test_the_unguarded_kernel_is_what_the_guard_is_for():
    """Records the fault the guard exists for, on the CPUs that have the kernel. If a PyTorch or oneDNN
    release fixes it, this test says so and the guard can go."""
    torch.manual_seed(0)
    conv = _conv(3, 1)
    x = torch.randn(4, 16, 2, 5, 5)
    go = torch.randn_like(conv(x)) * 1e-2
    reference = _weight_gradient(conv, x, go, bf16=False)
    errors = []
    for _ in range(3):
        mixed = _weight_gradient(conv, x, go, bf16=True)
        errors.append(float((mixed - reference).norm() / reference.norm()) if torch.isfinite(mixed).all() else 1e9)
    if max(errors) < 0.02:
        pytest.skip(f"this CPU's bf16 kernel is right here (errors {errors}): the guard is not needed on it")
    assert max(errors) > 0.5


def test_the_guard_keeps_parameters_keys_and_the_bf16_path_elsewhere():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(1, 8, 3, padding=1), nn.ReLU(), nn.ConvTranspose3d(8, 4, 2, stride=2),
                          nn.Conv3d(4, 4, 3, padding=1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 1, 6, 6, 6)
    plain = model(x)
    assert guard_bf16_convolutions(model) == 3
    assert [type(m) for m in model] == [GuardedConv3d, nn.ReLU, GuardedConvTranspose3d, GuardedConv3d]
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert torch.equal(model(x), plain)  # fp32: untouched
    conv = model[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert conv(torch.randn(2, 1, 6, 6, 6)).dtype == torch.bfloat16  # deep enough: bf16 as asked
        assert conv(torch.randn(2, 1, 2, 6, 6)).dtype == torch.float32  # 1 < depth < kernel: fp32
        assert conv(torch.randn(2, 1, 1, 6, 6)).dtype == torch.bfloat16


def test_execution_guards_only_under_cpu_bf16():
    class Cfg:
        device, devices, channels_last, amp_dtype, compile = "cpu", 1, False, "bf16", False

    class Method:
        channels_last = False

    for amp, guarded in ((True, True), (False, False)):
        cfg = Cfg()
        cfg.amp = amp
        model, _ = Execution.of(cfg, Method()).place(nn.Sequential(nn.Conv3d(1, 2, 3)))
        assert isinstance(model[0], GuardedConv3d) is guarded


def test_native_bf16_means_the_instructions_not_onednns_emulation(monkeypatch):
    """An AVX-512 CPU without AVX512-BF16 or AMX: oneDNN still says bf16 is supported (emulated,
    slower than fp32), so amp_dtype=auto must not take it."""
    import bench.loop as loop

    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert not loop.native_bf16()
    assert loop.amp_dtype(True, "auto", torch.device("cpu")) is None
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert loop.native_bf16() and loop.amp_dtype(True, "auto", torch.device("cpu")) == torch.bfloat16
