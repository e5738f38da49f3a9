"""The small interface every method implements.

A method says which regimes it supports, what input it takes, how to build its encoder and its
classifier head, and which config keys it owns (`Params`, validated by OmegaConf like every other
key). The harness does the rest: data, the training loop, checkpoint selection, evaluation and
storage.

Self-supervised pretraining is a declared surface of hooks, all optional except `pretext_data` and
`build_pretext` (a method without them has no pretext task):

- what the pretext reads: `pretext_data(stage)` ("volume", "video", "slices" or "segmentation",
  see bench.datasets.pretext) and how each sample becomes views: `pretext_views(stage)`;
- the pretext module: `build_pretext(stage)`, whose forward returns {"loss": ..., other parts}, or
  a custom `pretext_step(pretext, batch)`;
- what is trained: `pretext_param_groups(pretext)` (per-group `lr_scale`, `weight_decay`; frozen
  parameters simply have requires_grad False);
- step and epoch hooks: `on_pretext_step` (EMA teacher, momentum schedule) and `on_pretext_epoch`
  (temperature schedule; its values join the loss curve);
- how the pretrained tensors reach the finetuning model: `pretext_encoder_state`, `transfer`,
  `finetune_encoder`, `optional_encoder_keys`. This transfer contract is checked (both models built,
  keys mapped by name and shape) before any pretraining starts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn

from bench.checkpointing import BLOCKS


@dataclass
class NoParams:
    """For methods without keys of their own."""


class Classifier(nn.Module):
    """encoder -> features (B, F) -> head -> logits (B, classes)."""

    def __init__(self, encoder: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


class Method:
    """Base class of all methods; subclasses are registered with `@register_method(name)`."""

    name: ClassVar[str] = ""
    regimes: ClassVar[tuple[str, ...]] = ("scratch",)
    input_format: ClassVar[str] = "volume"  # (B, 1, D, H, W) HU scaled to [0, 1]; or "slices"
    description: ClassVar[str] = ""
    Params: ClassVar[type] = NoParams
    presets: ClassVar[dict[str, dict[str, Any]]] = {}  # preset -> config overrides
    public_weights: ClassVar[Any] = None  # bench.weights.WeightsSpec of the real public checkpoint
    channels_last: ClassVar[bool] = False  # 3D conv nets: run in channels_last_3d (see bench.loop.Execution)
    architecture: ClassVar[str] = "convolutional"  # or "transformer": how the report groups what models look at
    pretext_any_size: ClassVar[bool] = False  # the pretext may see smaller crops (`pretrain.crop_size`)
    # the blocks `model.grad_checkpointing` checkpoints (bench.checkpointing); None: the network's own switch
    checkpoint_pattern: ClassVar[str | None] = BLOCKS

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.params = cfg.model

    # ---- the classifier --------------------------------------------------------------------------
    def build_encoder(self) -> tuple[nn.Module, int]:
        """The encoder, mapping an input batch to (B, F) features, and F."""
        raise NotImplementedError

    def build_head(self, in_features: int, num_classes: int) -> nn.Module:
        """The classifier head on the encoder's features; a linear layer unless overridden."""
        return nn.Linear(in_features, num_classes)

    def build_model(self, num_classes: int = 2) -> nn.Module:
        encoder, features = self.build_encoder()
        return self.checkpointed(Classifier(encoder, self.build_head(features, num_classes)))

    def checkpointed(self, model: nn.Module) -> nn.Module:
        """`model` with its blocks checkpointed when `model.grad_checkpointing` is on (bench.checkpointing)."""
        if self.params.get("grad_checkpointing") and self.checkpoint_pattern:
            from bench.checkpointing import enable

            enable(model, self.checkpoint_pattern)
        return model

    def finetune_encoder(self, model: nn.Module) -> nn.Module:
        """The module of the classifier that pretrained tensors initialise."""
        return model.encoder

    # ---- finetuning hooks (the defaults suit most methods) ---------------------------------------
    def training_loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: nn.Module) -> torch.Tensor:
        """The loss of one training batch (called under autocast); class-weighted CE by default."""
        return loss_fn(model(x).float(), y)

    def layer_groups(self) -> dict[str, Any] | None:
        """The classifier's parameters in depth order, as a timm group matcher over their names
        ({"stem": regex, "blocks": regex with the block index as a group}); unmatched parameters
        (the head, a final norm) form the top group. Layer-wise lr decay (`layer_decay`) reads it;
        None: the method has no layer order and `layer_decay` < 1 is refused."""
        return None

    # ---- where the model looks (bench explain) ---------------------------------------------------
    def token_layout(self) -> tuple[int, tuple[int, ...], str] | None:
        """Transformers: (prefix tokens, token grid in the input's axis order, pooling "cls" or
        "mean"), so attention maps go back to voxels; None: no attention maps."""
        return None

    def cam_layer(self, model: nn.Module) -> str | None:
        """The module Grad-CAM reads (a 5D activation); by default the last Conv3d of a model
        without attention maps."""
        if self.token_layout() is not None:
            return None
        from bench.attribution import last_conv_layer

        return last_conv_layer(model)

    def cam_to_input(self, cam: torch.Tensor) -> torch.Tensor:
        """(B, *spatial) Grad-CAM in the frame of the cam layer's input -> the model input's frame, for
        encoders that reorient their input first; the identity by default."""
        return cam

    def train_batch_sampler(self, labels: np.ndarray, batch_size: int, seed: int) -> Any:
        """A batch sampler for training (with an `epoch` attribute), or None for shuffled batches."""
        return None

    def search_space(self) -> dict[str, tuple]:
        """What `bench tune` searches: config key -> ("loguniform"|"uniform", lo, hi) or
        ("choice", [values]). Plain data, so a plugin declares it without importing Ray."""
        return {"lr": ("loguniform", 1e-5, 3e-3), "weight_decay": ("loguniform", 1e-4, 0.3)}

    def view_options(self) -> dict[str, Any]:
        """Overrides of the slice-view options (frame_size, multi_view) for "slices" methods."""
        return {}

    # ---- self-supervised pretraining -------------------------------------------------------------
    def pretext_data(self, stage: str) -> str | None:
        """What the pretext of a stage ("public" or "vertebrae") reads: "volume", "video", "slices"
        or "segmentation" (bench.datasets.pretext); None: the method has no pretext task."""
        return None

    @classmethod
    def runs_without_a_file(cls, regime: str) -> bool:
        """Whether `regime` runs without `weights.public`: it pretrains nothing, or the method has a
        pretext task to build its stages with (suites with `runs: all` run only these)."""
        from bench.regimes import stages

        return not stages(regime) or cls.pretext_data is not Method.pretext_data

    @property
    def has_pretext(self) -> bool:
        return self.pretext_data("vertebrae") is not None or self.pretext_data("public") is not None

    def pretext_views(self, stage: str) -> Any:
        """None, or `views(sample, rng) -> views` applied to each pretext sample in the data loader
        (e.g. two augmented crops as a tuple); `rng` is a numpy Generator seeded per sample and epoch."""
        return None

    def build_pretext(self, stage: str = "vertebrae") -> nn.Module:
        """The pretext model of a stage. Its forward(batch) returns {"loss": ..., other parts} (or
        override `pretext_step`), and `pretext_encoder_state` of it maps onto `finetune_encoder`."""
        raise NotImplementedError(f"method '{self.name}' has no pretext task")

    def pretext_step(self, pretext: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        """The losses of one pretraining batch, under autocast; `pretext` may be the compiled module."""
        return pretext(batch)

    def pretext_param_groups(self, pretext: nn.Module) -> list[dict[str, Any]] | None:
        """Optimiser groups of the pretext ({"params": [...], "lr_scale": 0.1, "weight_decay": 0.0});
        None: every parameter with requires_grad, no decay on biases and norms."""
        return None

    def on_pretext_step(self, pretext: nn.Module, step: int, total_steps: int) -> None:
        """After each optimiser step (e.g. move an EMA teacher; its momentum follows `step / total_steps`).
        `step` counts the steps taken so far, 1 after the first and `total_steps` after the last; a
        schedule that wants 0 at the first update uses `step - 1`."""

    def on_pretext_epoch(self, pretext: nn.Module, epoch: int, epochs: int) -> dict[str, float] | None:
        """Before each epoch (e.g. set a temperature); returned values are logged in the loss curve."""
        return None

    def pretext_reconstruction(self, pretext: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Masked-reconstruction pretexts: (masked input, reconstruction) of a pretext batch `x`, shaped
        like `x`, which `bench explain` shows; None: the pretext reconstructs nothing to show."""
        return None

    def pretext_encoder(self, pretext: nn.Module) -> nn.Module:
        """The part of the pretext model that public weights initialise: its `encoder` by default."""
        encoder = getattr(pretext, "encoder", None)
        if not isinstance(encoder, nn.Module):
            from bench.errors import BenchError

            raise BenchError(f"method '{self.name}': its pretext ({type(pretext).__name__}) has no `encoder` "
                             "module; name the encoder `encoder` or override Method.pretext_encoder")
        return encoder

    def pretext_encoder_state(self, pretext: nn.Module) -> dict[str, torch.Tensor]:
        """The tensors a finetuning run takes from a pretrained pretext model."""
        return self.pretext_encoder(pretext).state_dict()

    def transfer(self, state: dict[str, torch.Tensor], target: nn.Module) -> dict[str, torch.Tensor]:
        """Adapt tensors from one stage's model to another's (e.g. position-embedding cropping)."""
        return state

    def optional_encoder_keys(self) -> tuple[str, ...]:
        """Finetuning-encoder keys that a pretrained state may leave at their initialisation
        (e.g. position embeddings an ablation does not transfer)."""
        return ()

    def pretraining_plan(self, regime: str) -> list[str]:
        """The pretraining stages a regime runs, in order (bench.regimes); methods with ablation
        switches override this."""
        from bench.regimes import stages

        return stages(regime)

    def artifact_key(self, stage: str) -> dict[str, Any]:
        """What identifies this method's pretext model in a stage: artifacts with equal keys are
        shared (e.g. by two methods that pretrain the same network on the same videos)."""
        from omegaconf import OmegaConf

        return {"family": self.name, "model": OmegaConf.to_container(self.params, resolve=True)}
