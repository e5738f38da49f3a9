"""`model.grad_checkpointing=true`: for every method, one training step's loss and gradients are
unchanged, fewer activations are kept for backward, and BatchNorm statistics advance once."""
import pytest
import torch

from bench.checkpointing import saved_activation_bytes
from bench.config import compose
from bench.registry import create_method, get_method, list_methods

METHODS = [m for m in list_methods() if not m.startswith("_")]


def _step(name: str, flag: str, x: torch.Tensor, y: torch.Tensor):
    cfg = compose({"method": name, "preset": "tiny", "regime": "scratch", "model.grad_checkpointing": flag},
                  get_method(name))
    method = create_method(name, cfg)
    torch.manual_seed(0)
    model = method.build_model().train()
    torch.manual_seed(1)
    saved, loss = saved_activation_bytes(lambda: method.training_loss(model, x, y, torch.nn.CrossEntropyLoss()))
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    buffers = {k: b.clone() for k, b in model.named_buffers()}
    return float(loss.detach()), grads, buffers, saved


@pytest.mark.parametrize("name", METHODS)
def test_checkpointing_keeps_the_step_and_saves_fewer_activations(name):
    cls = get_method(name)
    torch.manual_seed(2)
    size = 32
    if cls.input_format == "slices":
        cfg = compose({"method": name, "preset": "tiny"}, cls)
        frame = create_method(name, cfg).view_options().get("frame_size", cfg.views.frame_size)
        x = torch.rand(2, cfg.views.channels, cfg.views.frames, frame, frame)
    else:
        x = torch.rand(2, 1, size, size, size)
    y = torch.tensor([0, 1])
    loss, grads, buffers, plain = _step(name, "false", x, y)
    loss_c, grads_c, buffers_c, checkpointed = _step(name, "true", x, y)
    assert loss_c == pytest.approx(loss, rel=1e-5, abs=1e-6)
    assert grads.keys() == grads_c.keys()
    for key in grads:
        torch.testing.assert_close(grads_c[key], grads[key], rtol=1e-4, atol=1e-6, msg=key)
    for key in buffers:  # running statistics advance once per step, not once more in the recomputation
        torch.testing.assert_close(buffers_c[key], buffers[key], rtol=1e-5, atol=1e-6, msg=key)
    assert checkpointed < 0.9 * plain, (name, plain, checkpointed)  # the tiny nets' stems and heads stay saved
