"""The small interface every method implements.

A method says which regimes it supports, what input it takes, how to build its encoder and its
classifier head, and which config keys it owns (`Params`, validated by OmegaConf like every other
key). The harness does the rest: data, the training loop, checkpoint selection, evaluation and
storage. The hooks, all with working defaults except `build_encoder`:

- the classifier: `build_encoder`, `build_head`, `finetune_encoder` (the module pretrained tensors
  initialise), `training_loss` and `train_batch_sampler` (SupCon's two views and grade-balanced
  batches), `layer_groups` (layer-wise lr decay), `search_space` (`bench tune`), `view_options`
  ("slices" methods);
- where the model looks (`bench explain`): `token_layout`, `cam_layer`, `cam_to_input`;
- self-supervised pretraining: `build_pretext(stage)` returns a `PretextTask`
  (bench.methods.pretext), which carries every hook that acts on the pretext while it trains;
  `pretext_data_kind(stage)` names what it reads, `pretraining_plan` its stages, `artifact_key`
  what identifies its artifacts;
- how pretrained tensors (an artifact's or a public file's) reach the classifier: `transfer` and
  `optional_encoder_keys`. This transfer contract is checked (both models built, keys mapped by
  name and shape) before any pretraining starts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn

from bench.checkpointing import BLOCKS
from bench.errors import BenchError
from bench.methods.pretext import PretextTask

# Hooks of earlier versions that now live on the pretext (or were renamed): a class that still defines
# one is refused when it registers, with the new place named (bench.registry).
MOVED_HOOKS = {"pretext_data": "Method.pretext_data_kind", "pretext_views": "PretextTask.sample_views",
               "pretext_step": "PretextTask.step", "pretext_param_groups": "PretextTask.param_groups",
               "on_pretext_step": "PretextTask.on_step", "on_pretext_epoch": "PretextTask.on_epoch",
               "pretext_reconstruction": "PretextTask.reconstruction",
               "pretext_encoder": "PretextTask.pretrained_encoder",
               "pretext_encoder_state": "PretextTask.encoder_state"}


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
    def build_pretext(self, stage: str = "vertebrae") -> PretextTask:
        """The pretext model of a stage ("public" or "vertebrae"): a `PretextTask`, whose forward(batch)
        returns {"loss": ..., other parts} and whose hooks the training loop calls
        (bench.methods.pretext); its encoder's tensors must map onto `finetune_encoder`."""
        raise NotImplementedError(f"method '{self.name}' has no pretext task")

    def pretext_data_kind(self, stage: str) -> str | None:
        """The kind of data the pretext of a stage reads: "volume", "video", "slices" or
        "segmentation" (bench.datasets.pretext); "volume" for every method with a pretext unless it
        says otherwise, None (no pretext on that stage) for the others."""
        return "volume" if self.has_pretext else None

    @property
    def has_pretext(self) -> bool:
        return type(self).build_pretext is not Method.build_pretext

    @classmethod
    def runs_without_a_file(cls, regime: str) -> bool:
        """Whether `regime` runs without `weights.public`: it pretrains nothing, or the method has a
        pretext task to build its stages with (suites with `runs: all` run only these)."""
        from bench.regimes import stages

        return not stages(regime) or cls.build_pretext is not Method.build_pretext

    def make_pretext(self, stage: str) -> PretextTask:
        """`build_pretext(stage)`, checked to be a PretextTask, with `model.grad_checkpointing` applied."""
        pretext = self.build_pretext(stage)
        if not isinstance(pretext, PretextTask):
            raise BenchError(f"method '{self.name}': build_pretext('{stage}') returned a {type(pretext).__name__}; "
                             "expected a bench.methods.pretext.PretextTask (an nn.Module with the pretext's hooks)")
        return self.checkpointed(pretext)

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
