"""The pretext side of a self-supervised method: `PretextTask`, the model a pretraining stage
trains, carrying the hooks that act on it; and mixins for what pretext families share.

A method describes itself (`bench.methods.base.Method`) and builds its pretext per stage
(`Method.build_pretext`); everything the training loop asks of the pretext while it trains is a
method of the pretext itself, so a hook never needs the pretext passed in:

- `sample_views`: None, or `views(sample, rng) -> views`, applied to each sample in the data loader
  (two augmented crops, multi-crop); `rng` is a numpy Generator seeded per (seed, epoch, index);
- `step(forward, batch)`: the losses of one batch, {"loss": ..., other parts}, under autocast;
  `forward` is this module or its compiled form, so the default calls it on the batch;
- `param_groups()`: the optimiser's groups ({"params": [...], "lr_scale": 0.1, "weight_decay": 0.0});
  frozen parameters have `requires_grad=False`; None: every trainable parameter, no weight decay on
  biases and norms;
- `before_optimiser_step(optimiser, step, total_steps)`: the gradients of a step are complete and
  the optimiser has not used them yet: set a group's `weight_decay` for this step (a weight-decay
  schedule), or set the `.grad` of a group's parameters to None to freeze it for this step (the
  optimiser then leaves those parameters, weight decay included). `step` counts the steps taken
  before this one: 0 at the first;
- `on_step(step, total_steps)`: after each optimiser step (an EMA teacher); `step` counts the steps
  taken, 1 after the first and `total_steps` after the last;
- `on_epoch(epoch, epochs)`: before each epoch, 0 first (a temperature schedule); returned values
  join the loss curve;
- `reconstruction(x)`: masked-reconstruction pretexts show (masked input, reconstruction);
- `pretrained_encoder()`: the module that public weights initialise and whose tensors reach the
  classifier (`self.encoder` by default); `encoder_state()`: those tensors.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from bench.errors import BenchError

Views = Callable[[Any, np.random.Generator], Any]


class PretextTask(nn.Module):
    """The model of a pretraining stage and the hooks the training loop calls on it (module docstring)."""

    sample_views: ClassVar[Views | None] = None

    def step(self, forward: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        """The losses of one batch, computed by `forward` (this module, compiled when compile is on)."""
        return forward(batch)

    def param_groups(self) -> list[dict[str, Any]] | None:
        return None

    def before_optimiser_step(self, optimiser: torch.optim.Optimizer, step: int, total_steps: int) -> None:
        pass

    def on_step(self, step: int, total_steps: int) -> None:
        pass

    def on_epoch(self, epoch: int, epochs: int) -> dict[str, float] | None:
        return None

    def reconstruction(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(masked input, reconstruction) of a batch `x`, shaped like `x`, for `bench explain`; None:
        this pretext reconstructs nothing to show."""
        return None

    def pretrained_encoder(self) -> nn.Module:
        encoder = self._modules.get("encoder")
        if not isinstance(encoder, nn.Module):
            raise BenchError(f"pretext {type(self).__name__} has no `encoder` module; name the encoder `encoder` or "
                             "override PretextTask.pretrained_encoder")
        return encoder

    def encoder_state(self) -> dict[str, torch.Tensor]:
        return self.pretrained_encoder().state_dict()


class MaskedReconstruction(PretextTask):
    """Masked image modelling (MAE and its kin): a share of the input is hidden and the network
    restores it. Subclasses implement `reconstruct(x) -> (masked input, reconstruction)` in the
    input's intensities, which `bench explain` shows for the pretrained model."""

    def reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    @torch.no_grad()
    def reconstruction(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.reconstruct(x)


def cosine_momentum(step: int, total_steps: int, base: float) -> float:
    """BYOL's and DINO's teacher momentum: from `base` at step 0 to 1 at the last step, on a cosine."""
    return 1.0 - (1.0 - base) * (math.cos(math.pi * step / max(total_steps, 1)) + 1.0) / 2.0


class MomentumTeacher(PretextTask):
    """A teacher that follows the student by an exponential moving average after every optimiser
    step: teacher = m * teacher + (1 - m) * student for each parameter, the teacher's buffers (e.g.
    BatchNorm statistics) copied. `momentum_schedule` "cosine" moves m from `base_momentum` to 1
    over the stage (BYOL, DINO); "constant" keeps it. Subclasses set both attributes and return their
    (student, teacher) module pairs from `teacher_pairs`; the teacher has `requires_grad=False`."""

    base_momentum: float = 0.99
    momentum_schedule: str = "cosine"

    def teacher_pairs(self) -> Iterable[tuple[nn.Module, nn.Module]]:
        raise NotImplementedError

    def momentum(self, step: int, total_steps: int) -> float:
        if self.momentum_schedule == "constant":
            return self.base_momentum
        return cosine_momentum(step, total_steps, self.base_momentum)

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        for student, teacher in self.teacher_pairs():
            for s, t in zip(student.parameters(), teacher.parameters()):
                t.mul_(momentum).add_(s.detach(), alpha=1.0 - momentum)
            for s, t in zip(student.buffers(), teacher.buffers()):
                t.copy_(s)

    def on_step(self, step: int, total_steps: int) -> None:
        self.update_teacher(self.momentum(step, total_steps))
