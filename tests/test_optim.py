"""The engine's optimiser: timm's parameter groups, torch's fused kernels, the same updates."""
from __future__ import annotations

import pytest
import torch
from timm.optim import create_optimizer_v2
from torch import nn

from bench.loop import make_optimizer


@pytest.mark.parametrize("name", ["adamw", "adam", "sgd"])
def test_fused_optimiser_makes_the_per_tensor_updates(name):
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 2)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    fused = make_optimizer(models[0], name, 1e-2, 0.05)
    plain = create_optimizer_v2(models[1], opt=name, lr=1e-2, weight_decay=0.05, foreach=False,
                                **({"momentum": 0.9} if name == "sgd" else {}))
    assert fused.defaults["fused"] is True
    # no weight decay on biases and norms, as timm groups them
    assert sorted(g["weight_decay"] for g in fused.param_groups) == [0.0, 0.05]
    for _ in range(5):
        x = torch.randn(4, 8)
        for model, opt in zip(models, (fused, plain)):
            opt.zero_grad(set_to_none=True)
            model(x).pow(2).mean().backward()
            opt.step()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
