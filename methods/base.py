"""The small interface every method implements.

A method says which regimes it supports, what input it takes, how to build its encoder and its
classifier head, and which config keys it owns (`Params`, validated by OmegaConf like every other
key). The engine does the rest: data, optimisation, checkpoint selection, evaluation and storage.
Later stages (self-supervised pretraining, public weights) attach through `pretraining` and
`public_weights`, which stay None for methods that have neither.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from omegaconf import DictConfig
from torch import nn


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
    input_format: ClassVar[str] = "volume"  # (B, 1, D, H, W) HU scaled to [0, 1]
    description: ClassVar[str] = ""
    Params: ClassVar[type] = NoParams
    presets: ClassVar[dict[str, dict[str, Any]]] = {}  # preset -> config overrides
    pretext_input: ClassVar[str | None] = None  # "volume" or "video": what the pretext task consumes
    public_weights: ClassVar[Any] = None  # bench.weights.WeightsSpec of the real public checkpoint
    channels_last: ClassVar[bool] = False  # 3D conv nets: run in channels_last_3d (see bench.engine)

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.params = cfg.model

    def build_encoder(self) -> tuple[nn.Module, int]:
        """The encoder, mapping an input batch to (B, F) features, and F."""
        raise NotImplementedError

    def build_head(self, in_features: int, num_classes: int) -> nn.Module:
        """The classifier head on the encoder's features; a linear layer unless overridden."""
        return nn.Linear(in_features, num_classes)

    def build_model(self, num_classes: int = 2) -> Classifier:
        encoder, features = self.build_encoder()
        return Classifier(encoder, self.build_head(features, num_classes))

    # Self-supervised pretraining (methods with a pretext task override these)
    def build_pretext(self) -> nn.Module:
        """A module whose forward(batch) returns {"loss": ..., other parts} and whose encoder (see
        `pretext_encoder`) has the same state-dict layout as `finetune_encoder(build_model())`."""
        raise NotImplementedError(f"method '{self.name}' has no pretext task")

    def pretext_encoder(self, pretext: nn.Module) -> nn.Module:
        """The part of the pretext model that public weights initialise."""
        return pretext.encoder

    def pretext_encoder_state(self, pretext: nn.Module) -> dict[str, torch.Tensor]:
        """The tensors a finetuning run takes from a pretrained pretext model."""
        return self.pretext_encoder(pretext).state_dict()

    def finetune_encoder(self, model: Classifier) -> nn.Module:
        return model.encoder

    def pretraining_plan(self, regime: str) -> list[str]:
        """The pretraining stages a regime runs, in order ("public": the out-of-domain corpus,
        "vertebrae": the unlabelled vertebrae). Methods with ablation switches override this."""
        return {"scratch": [], "public": ["public"], "vertebrae": ["vertebrae"],
                "public_to_vertebrae": ["public", "vertebrae"]}[regime]

    def build_pretext_for(self, stage: str) -> nn.Module:
        """The pretext model of a stage; video methods pretrain on videos at another frame size."""
        return self.build_pretext()

    def artifact_key(self, stage: str) -> dict[str, Any]:
        """What identifies this method's pretext model in a stage: artifacts with equal keys are
        shared (e.g. by two methods that pretrain the same network on the same videos)."""
        from omegaconf import OmegaConf

        return {"family": self.name, "model": OmegaConf.to_container(self.params, resolve=True)}

    def pretext_data(self, stage: str) -> str:
        """What the pretext task of a stage reads: "volume" (body-CT patches, unlabelled vertebra
        crops), "video" (the video corpus) or "slices" (unlabelled vertebrae as slice-view clips)."""
        if self.pretext_input == "video":
            return "video" if stage == "public" else "slices"
        return "volume"

    # Finetuning hooks (the engine's defaults suit most methods)
    def training_loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: nn.Module) -> torch.Tensor:
        """The loss of one training batch (called under autocast); class-weighted CE by default."""
        return loss_fn(model(x).float(), y)

    def train_batch_sampler(self, labels: Any, batch_size: int, seed: int) -> Any:
        """A batch sampler for training (with an `epoch` attribute), or None for shuffled batches."""
        return None

    def search_space(self) -> dict[str, tuple]:
        """What `bench tune` searches: config key -> ("loguniform"|"uniform", lo, hi) or
        ("choice", [values]). Plain data, so a plugin declares it without importing Ray."""
        return {"lr": ("loguniform", 1e-5, 3e-3), "weight_decay": ("loguniform", 1e-4, 0.3)}

    def view_options(self) -> dict[str, Any]:
        """Overrides of the slice-view options (frame_size, multi_view) for "slices" methods."""
        return {}

    def transfer(self, state: dict[str, torch.Tensor], target: nn.Module) -> dict[str, torch.Tensor]:
        """Adapt tensors from one stage's model to another's (e.g. position-embedding cropping)."""
        return state
