"""What a pretext task reads, by one name (`Method.pretext_data_kind(stage)`):

- "volume": (1, S, S, S) crops in [0, 1]: body-CT patches on the `public` stage, the unlabelled
  vertebrae on the `vertebrae` stage; random flips along every axis;
- "video": (3, T, V, V) clips of the out-of-domain video corpus in [0, 1]; random horizontal flip
  (`public` stage only);
- "slices": the unlabelled vertebrae as slice-view clips (3, T, H, W), as the video methods see
  vertebrae (`vertebrae` stage only);
- "segmentation": body-CT patches (1, S, S, S) with their organ label maps (S, S, S), the same random
  flips on both, for supervised pretraining stand-ins (`public` stage only).

`pretrain.crop_size` smaller than the run's crop takes one random sub-crop of that edge from each
sample, at the same voxel spacing (volume and segmentation kinds; both arrays of a segmentation
sample alike), for methods whose encoder takes any input size (`Method.pretext_any_size`).

A pretext's `sample_views` (optional, bench.methods.pretext) turns each sample into the views it
compares (two augmented crops, multi-crop), with a generator seeded per (seed, epoch, index), so
the views are the same whatever the DataLoader's worker layout (`WithViews`).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Dataset

from bench.config import pretext_crop_size
from bench.datasets.torch_data import SliceViewDataset, load_crop
from bench.errors import BenchError, choices_hint

KINDS = ("volume", "video", "slices", "segmentation")


def public_corpora(kind: str | None) -> tuple[str, ...]:
    """The out-of-domain corpora (bench.datasets.loading.load_corpus) a public pretext of `kind` reads:
    the first is its images, a second its labels."""
    return {"video": ("video",), "segmentation": ("body_ct", "body_ct_organs")}.get(str(kind), ("body_ct",))
Views = Callable[[torch.Tensor, np.random.Generator], Any]


def random_subcrop(arrays: tuple[np.ndarray, ...], edge: int | None,
                   rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """The same random `edge`^3 window of each (S, S, S) array; the arrays unchanged when `edge` is None
    or not smaller than them."""
    shape = arrays[0].shape
    if edge is None or all(n <= edge for n in shape):
        return arrays
    start = [int(rng.integers(0, n - edge + 1)) if n > edge else 0 for n in shape]
    window = tuple(slice(s, s + edge) for s in start)
    return tuple(a[window] for a in arrays)


class VolumeCorpus(Dataset):
    """(1, S, S, S) crops or patches in [0, 1] (random `edge`^3 sub-crops when given), random flips along
    every axis (pretext augmentation)."""

    def __init__(self, images: np.ndarray, rows: np.ndarray, size: int, seed: int, edge: int | None = None) -> None:
        self.images, self.rows, self.size, self.seed, self.epoch = images, rows, size, seed, 0
        self.edge = edge

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> torch.Tensor:
        x = load_crop(self.images, self.rows[index], self.size)
        rng = np.random.default_rng([self.seed, self.epoch, index, 2])
        (x,) = random_subcrop((x,), self.edge, np.random.default_rng([self.seed, self.epoch, index, 6]))
        for axis in range(3):
            if rng.random() < 0.5:
                x = np.flip(x, axis)
        return torch.from_numpy(np.ascontiguousarray(x)[None])


class OrganCorpus(Dataset):
    """((1, S, S, S) patch in [0, 1], (S, S, S) int64 organ labels), the same random flips (and
    `edge`^3 sub-crop, when given) on both."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, seed: int, edge: int | None = None) -> None:
        if images.shape != labels.shape:
            raise BenchError(f"organ corpus: {images.shape} patches but {labels.shape} label maps")
        self.images, self.labels, self.seed, self.epoch, self.edge = images, labels, seed, 0, edge

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = load_crop(self.images, index, None), np.asarray(self.labels[index])
        rng = np.random.default_rng([self.seed, self.epoch, index, 2])
        x, y = random_subcrop((x, y), self.edge, np.random.default_rng([self.seed, self.epoch, index, 6]))
        for axis in range(3):
            if rng.random() < 0.5:
                x, y = np.flip(x, axis), np.flip(y, axis)
        return torch.from_numpy(np.ascontiguousarray(x)[None]), torch.from_numpy(y.astype(np.int64))


class VideoCorpus(Dataset):
    """(3, T, H, W) clips in [0, 1] from uint8 (N, T, H, W, 3) videos, random horizontal flip."""

    def __init__(self, clips: np.ndarray, seed: int) -> None:
        self.clips, self.seed, self.epoch = clips, seed, 0

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, index: int) -> torch.Tensor:
        x = np.asarray(self.clips[index], dtype=np.float32) / 255.0  # (T, H, W, 3)
        if np.random.default_rng([self.seed, self.epoch, index, 3]).random() < 0.5:
            x = x[:, :, ::-1]
        return torch.from_numpy(np.ascontiguousarray(x.transpose(3, 0, 1, 2)))


class SliceCorpus(SliceViewDataset):
    """Unlabelled vertebrae as slice-view clips (3, T, H, W), without labels."""

    def __getitem__(self, index: int) -> torch.Tensor:
        return super().__getitem__(index)[0]


class WithViews(Dataset):
    """A pretext dataset whose samples pass through the method's `views(sample, rng)`."""

    def __init__(self, inner: Dataset, views: Views, seed: int) -> None:
        self.inner, self.views, self.seed = inner, views, seed

    @property
    def epoch(self) -> int:
        return self.inner.epoch

    @epoch.setter
    def epoch(self, value: int) -> None:
        self.inner.epoch = value

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, index: int) -> Any:
        return self.views(self.inner[index], np.random.default_rng([self.seed, self.epoch, index, 5]))


def corpus_frame_size(cfg: DictConfig) -> int:
    """Frame edge of the out-of-domain video corpus (what the `public` video pretext sees)."""
    return int(cfg.synthetic.video_size)


def pretext_dataset(method: Any, cfg: DictConfig, stage: str, seed: int,
                    edge: int | None = None) -> tuple[Dataset, dict[str, Any]]:
    """The dataset of a pretraining stage and what identifies it (part of the artifact's hash);
    `edge`: the pretext's crop edge (`pretrain.crop_size`, resolved), by default read from `cfg`."""
    from bench.datasets.loading import load_corpus, load_unlabelled, synthetic_spec

    kind = method.pretext_data_kind(stage)
    if kind not in KINDS:
        raise BenchError(f"method '{method.name}': pretext_data_kind('{stage}') returned {kind!r}; "
                         f"{choices_hint(str(kind), KINDS)}")
    edge = pretext_crop_size(cfg) if edge is None else edge
    if edge != cfg.crop_size and (kind not in ("volume", "segmentation") or not method.pretext_any_size):
        raise BenchError(f"bad value for 'pretrain.crop_size': {cfg.pretrain.crop_size}; method '{method.name}' "
                         f"pretrains on the run's crop ({cfg.crop_size}) only (its encoder or its '{kind}' pretext "
                         "data is tied to the input size); expected 0")
    edge_spec = {"pretext_crop_size": edge} if edge != cfg.crop_size else {}
    if stage == "public":
        if cfg.data != "synthetic" and not cfg.weights.public:
            raise BenchError(f"regime public on data '{cfg.data}' needs weights.public=PATH_OR_URL "
                             "(the embedded public corpus belongs to data=synthetic)")
        if kind == "slices":
            raise BenchError(f"method '{method.name}': the public stage reads 'volume', 'video' or 'segmentation', "
                             "not 'slices'")
        corpora = public_corpora(kind)
        corpus = corpora[-1]
        items = load_corpus(cfg, corpora[0])
        spec = {"corpus": corpus, "n": len(items), "synthetic": synthetic_spec(cfg), "crop_size": cfg.crop_size,
                **edge_spec}
        if kind == "video":
            dataset = VideoCorpus(items, seed)
        elif kind == "segmentation":
            dataset = OrganCorpus(items, load_corpus(cfg, corpora[1]), seed, edge)
        else:
            dataset = VolumeCorpus(items, np.arange(len(items)), cfg.crop_size, seed, edge)
    else:
        if kind in ("video", "segmentation"):
            raise BenchError(f"method '{method.name}': the vertebrae stage reads 'volume' or 'slices', not '{kind}'")
        data = load_unlabelled(cfg)
        spec = {"corpus": "unlabelled_vertebrae", "name": data.name, "fingerprint": data.fingerprint(),
                "crop_size": cfg.crop_size, **edge_spec}
        if kind == "slices":
            v = cfg.views
            frame_size = method.view_options().get("frame_size", v.frame_size)
            spec.update(views=OmegaConf.to_container(v), view_options=method.view_options())
            dataset = SliceCorpus(data.images, data.crop_indices, np.zeros(len(data.table)), cfg.crop_size,
                                  augment=True, seed=seed, axis=v.axis, frames=v.frames, frame_size=frame_size,
                                  channels=v.channels)
        else:
            dataset = VolumeCorpus(data.images, data.crop_indices, cfg.crop_size, seed, edge)
    return dataset, spec
