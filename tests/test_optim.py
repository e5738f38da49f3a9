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


def test_pretext_hooks_see_the_optimiser_before_each_step_and_are_numbered_as_documented():
    """`before_optimiser_step` gets the optimiser with the step's gradients (steps taken before it:
    0 first) and can schedule weight decay and freeze a group; `on_step` follows (1 after the first);
    `on_epoch` precedes each epoch (0 first). Through the real pretraining stage and loop."""
    from types import SimpleNamespace

    from bench.config import compose
    from bench.loop import Execution, Schedule, TrainingLoop
    from bench.methods.pretext import PretextTask
    from bench.pretrain import PretextStage
    from bench.registry import get_method

    class Frozen(PretextTask):
        def __init__(self) -> None:
            super().__init__()
            self.encoder, self.head = nn.Linear(4, 4), nn.Linear(4, 1)
            self.calls: list[tuple] = []

        def forward(self, x):
            return {"loss": self.head(self.encoder(x)).pow(2).mean()}

        def param_groups(self):
            return [{"params": list(self.encoder.parameters())}, {"params": list(self.head.parameters())}]

        def before_optimiser_step(self, optimiser, step, total_steps):
            assert all(p.grad is not None for p in self.parameters())
            optimiser.param_groups[0]["weight_decay"] = 0.01 * (step + 1)
            for p in self.head.parameters():  # frozen: no update, no weight decay
                p.grad = None
            self.calls.append(("before", step, total_steps))

        def on_step(self, step, total_steps):
            self.calls.append(("after", step, total_steps))

        def on_epoch(self, epoch, epochs):
            self.calls.append(("epoch", epoch, epochs))
            return {"epoch_seen": float(epoch)}

    cfg = compose({"method": "mae3d", "preset": "tiny", "pretrain.epochs": "2", "pretrain.batch_size": "4"},
                  get_method("mae3d"))
    torch.manual_seed(0)
    pretext = Frozen()
    head, encoder = [p.detach().clone() for p in pretext.head.parameters()], pretext.encoder.weight.detach().clone()
    stage = PretextStage(SimpleNamespace(name="frozen"), pretext, [torch.randn(4) for _ in range(8)], cfg, "vertebrae")
    schedule = Schedule(epochs=2, lr=1e-2, min_lr=1e-4, weight_decay=0.05, warmup_epochs=0.0)
    loop = TrainingLoop(stage, schedule, Execution(torch.device("cpu"), None, torch.contiguous_format, False),
                        progress=False)
    result = loop.run()
    assert pretext.calls == [("epoch", 0, 2), ("before", 0, 4), ("after", 1, 4), ("before", 1, 4), ("after", 2, 4),
                             ("epoch", 1, 2), ("before", 2, 4), ("after", 3, 4), ("before", 3, 4), ("after", 4, 4)]
    assert [e["epoch_seen"] for e in result.history] == [0.0, 1.0]
    assert all(torch.equal(a, b) for a, b in zip(head, pretext.head.parameters()))
    assert not torch.equal(encoder, pretext.encoder.weight)
    assert loop.optimizer.param_groups[0]["weight_decay"] == pytest.approx(0.04)
