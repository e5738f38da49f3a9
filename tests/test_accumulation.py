"""Gradient accumulation: `micro_batch` splits each batch, the optimiser step stays the batch's."""
from __future__ import annotations

import copy

import torch
from torch import nn

from bench.loop import Execution, Schedule, Stage, TrainingLoop, micro_batches


class WeightedStage(Stage):
    """A network without BatchNorm under the finetuning loss: class-weighted, label-smoothed CE."""

    def __init__(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.model, self.loader = model, [batch]
        self.loss_fn = nn.CrossEntropyLoss(weight=torch.tensor([0.3, 1.7]), label_smoothing=0.1)

    def step(self, model, batch):
        x, y = batch
        return {"loss": self.loss_fn(model(x), y)}, len(y)

    def batch_weight(self, batch) -> float:
        return float(self.loss_fn.weight[batch[1]].sum())


def _one_step(micro: int) -> tuple[dict, dict]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.LayerNorm(16), nn.Linear(16, 2))
    x, y = torch.randn(16, 6), torch.tensor([0] * 11 + [1] * 5)
    stage = WeightedStage(copy.deepcopy(model), (x, y))
    schedule = Schedule(epochs=1, lr=1e-2, min_lr=1e-2, weight_decay=0.05, warmup_epochs=0, micro_batch=micro)
    loop = TrainingLoop(stage, schedule, Execution(torch.device("cpu"), None, torch.contiguous_format, False),
                        progress=False)
    loop.run()
    return ({k: p.grad.clone() for k, p in loop.model.named_parameters()},
            {k: v.clone() for k, v in loop.model.state_dict().items()})


def test_micro_batches_give_the_whole_batchs_gradients_and_step():
    grads, weights = _one_step(0)
    grads4, weights4 = _one_step(4)
    for key in grads:
        torch.testing.assert_close(grads4[key], grads[key], rtol=1e-5, atol=1e-6)
    for key in weights:
        torch.testing.assert_close(weights4[key], weights[key], rtol=1e-5, atol=1e-6)


def test_micro_batches_split_every_tensor_of_a_batch_alike():
    x, y, name = torch.arange(10), torch.arange(10) * 2, "keep"
    chunks = micro_batches((x, y, name), 4)
    assert [len(c[0]) for c in chunks] == [4, 4, 2] and all(c[2] == "keep" for c in chunks)
    assert torch.equal(torch.cat([c[1] for c in chunks]), y)
    assert micro_batches(x, 0) == [x] and len(micro_batches({"a": x}, 5)) == 2


def test_the_run_records_the_global_batch_and_the_micro_batch():
    from bench.config import compose, to_yaml
    from bench.registry import get_method

    cfg = compose({"method": "resnet18", "preset": "tiny", "batch_size": "16", "micro_batch": "4"},
                  get_method("resnet18"))
    text = to_yaml(cfg)
    assert "batch_size: 16" in text and "micro_batch: 4" in text and "  micro_batch: 0" in text  # pretrain's too


def test_auto_takes_the_largest_divisor_that_fits_and_the_whole_batch_on_cpu():
    import pytest

    from bench.errors import BenchError
    from bench.loop import largest_fitting

    assert largest_fitting(16, lambda size: size <= 5) == 4  # the divisors of 16 are tried from 16 down
    assert largest_fitting(12, lambda size: size <= 6) == 6
    with pytest.raises(BenchError, match="not even one sample per step fits"):
        largest_fitting(8, lambda size: False)
    plain, _ = _one_step(0)
    auto, _ = _one_step("auto")  # CPU: whole batches, the same step
    for key in plain:
        torch.testing.assert_close(auto[key], plain[key], rtol=0, atol=0)


def test_micro_batch_accepts_a_count_or_auto_and_nothing_else(tmp_path, capsys):
    from bench.cli import main
    from bench.config import compose

    assert compose({"micro_batch": "auto", "pretrain.micro_batch": "4"}).micro_batch == "auto"
    for bad in ("-1", "many", "true"):
        assert main(["run", "method=resnet18", "preset=tiny", f"micro_batch={bad}", f"out={tmp_path}"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "bad value for 'micro_batch'" in err[0] and "or auto" in err[0]
