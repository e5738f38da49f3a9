"""Run configuration: one typed OmegaConf tree per run.

A run's config is composed in a fixed order, each layer overriding the one before:
  1. the defaults of `RunConfig` (this file), with the method's own `Params` dataclass as `model`;
  2. the preset file `bench/presets/<preset>.yaml` (sizes and schedules for tiny/small/paper);
  3. the method's own per-preset overrides (`Method.presets[preset]`);
  4. the user's `key=value` overrides.
Every layer is validated against the dataclasses, so a typo or a bad value fails before any work,
with one line naming the key and what is valid there.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import re
import sys
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Literal, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from bench.errors import BenchError, choices_hint
from bench.protocols import PROTOCOLS

PRESETS: tuple[str, ...] = ("tiny", "small", "paper")
ProtocolName = Literal[tuple(PROTOCOLS)]  # the protocols' names, declared once (bench.protocols)


@dataclass
class SyntheticConfig:
    """Knobs of the embedded synthetic vertebra benchmark (see bench.datasets.synthetic)."""

    n_patients: int = 120  # the training cohort (with n_val/test_patients 0: all three, split 60/20/20)
    n_val_patients: int = 0  # a validation cohort of its own; 0: 20 % of n_patients
    n_test_patients: int = 0  # a test cohort of its own; 0: 20 % of n_patients
    min_vertebrae: int = 4  # consecutive vertebrae per patient
    max_vertebrae: int = 8
    fracture_rate: float = 0.15  # fraction of fractured vertebrae, as in the paper (940 / 6245)
    fov_mm: float = 96.0  # physical edge of a crop; voxel spacing = fov_mm / crop_size
    noise_hu: float = 25.0  # typical CT noise sigma; each scan draws around it
    difficulty: float = 0.5  # 0 easy .. 1 hard: subtler fractures, more fracture-like normal variation
    seed: int = 0  # the data seed, separate from the run seed so every run sees the same data
    n_unlabelled_patients: int = 200  # unlabelled pretraining vertebrae, from disjoint patients
    n_body_ct: int = 512  # out-of-domain body-CT patches (embedded `public` regime of CT methods)
    n_videos: int = 512  # out-of-domain video clips (embedded `public` regime of video methods)
    video_frames: int = 16
    video_size: int = 112  # frame edge of the video corpus (Kinetics clips are 224 at the paper preset)


@dataclass
class ViewsConfig:
    """Slice views for methods with input_format "slices" (see bench.datasets.views)."""

    axis: Literal["sagittal", "coronal", "axial"] = "sagittal"
    frames: int = 16
    frame_size: int = 0  # 0: the crop size; larger: zero-pad frames (the format ablation, 224 in the paper)
    multi_view: bool = True  # evaluation averages the logits of every shift
    channels: int = 3


@dataclass
class OptimConfig:
    """The optimisation of a training stage: the same fields for finetuning (the top-level keys)
    and pretraining (`pretrain.*`), built into the loop's schedule in one place
    (`bench.loop.Schedule.of`)."""

    epochs: int = 20
    batch_size: int = 16  # the global batch: one optimiser step
    # > 0: each batch runs in accumulated chunks of this many samples; the step is the whole batch's
    # (exactly, for networks without BatchNorm: a BatchNorm layer normalises each chunk by its own statistics);
    # "auto": the largest chunk that fits the GPU, from a probe step (the whole batch on CPU)
    micro_batch: Any = 0
    lr: float = 1e-3
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adam and adamw (PyTorch's defaults)
    warmup_epochs: float = 1.0
    grad_clip: float = 0.0  # 0 disables clipping


@dataclass
class PretrainConfig(OptimConfig):
    """The self-supervised stage (see bench.pretrain). The same loop and optimiser keys as
    finetuning (bench.loop), with MAE's AdamW betas by default. Its seed follows the run's, so the
    seeds of a cell vary pretraining too (one artifact per seed); `pretrain.seed=N` pins one artifact
    that every seed shares."""

    epochs: int = 10
    batch_size: int = 8
    min_lr: float = 1.0e-5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    seed: Optional[int] = None  # noqa: UP045 (OmegaConf reads Optional)  # None: the run's seed; N pins it
    # Edge of the pretext's crops, at the run's voxel spacing; 0: the run's crop_size. A smaller edge
    # takes random sub-crops of the pretraining data, for encoders that take any input size
    # (`Method.pretext_any_size`); the finetuned and probed geometry stays the run's.
    crop_size: int = 0
    # Crop store(s), comma-separated, that the `vertebrae` stage pretrains on; "": the unlabelled crops
    # of the run's own data.
    data: str = ""


@dataclass
class WeightsConfig:
    """Real public weights: a path, a URL (http, https, file) or hf://OWNER/NAME/FILE[@REVISION];
    "published": the method's own published file (`bench weights list`), or the embedded stand-in
    where it publishes none; "" uses the embedded stand-in."""

    public: str = ""
    sha256: str = ""  # expected sha256; "" uses the method's published one, if any
    dir: str = ""  # a folder of files already downloaded under their published names (no download then)


@dataclass
class ProbeConfig:
    """The frozen-feature protocols (see bench.probes)."""

    c_grid: list[float] = field(default_factory=lambda: [0.001, 0.01, 0.1, 1.0, 10.0])  # linear: C on val AUC
    max_iter: int = 2000
    knn_k: int = 20
    knn_temperature: float = 0.07
    knn_balanced: bool = True  # each class's votes divided by its share of the bank (rare classes can win)


@dataclass
class RunConfig(OptimConfig):
    """One finetuning run: a method in a regime on a data set with a seed. The finetuning's
    optimisation keys (`lr`, `epochs`, ...) are OptimConfig's, at the top level."""

    method: str = ""
    regime: Optional[str] = None  # noqa: UP045 (OmegaConf's structured configs read Optional)  # None: every regime
    preset: Literal["tiny", "small", "paper"] = "small"
    seed: int = 0
    data: str = "synthetic"  # a registered data set name or the path of a crop store
    splits: str = ""  # patient_id,split CSV; default: the data's own splits file, made once
    out: str = "runs"
    suite: str = "single"
    variant: str = ""  # names a configuration inside a suite (e.g. a Table 2 ablation); part of the run folder
    cache_dir: str = ""  # "" -> $BENCH_CACHE or ~/.cache/vertebench
    crop_size: int = 48  # edge of the cubic crop the model sees, in voxels
    task: Literal["fracture", "grade"] = "fracture"  # binary fracture, or Genant grade 0-3 (4 classes)
    train_fraction: float = 1.0  # share of the training PATIENTS used (nested subsets per seed)
    protocol: ProtocolName = "finetune"  # how the initialised encoder is evaluated (bench.protocols)
    select: Literal["val_f1", "val_auc", "val_loss"] = "val_f1"  # finetune: which epoch's checkpoint is kept

    # finetuning (its optimisation keys: OptimConfig)
    eval_batch_size: int = 32
    layer_decay: float = 1.0  # finetune: lr x layer_decay^depth-from-the-top per layer group (BEiT/MAE); 1: off
    label_smoothing: float = 0.0  # finetune: cross-entropy label smoothing
    head_init: Literal["random", "linear_probe"] = "random"  # finetune: linear_probe starts from the probe (LP-FT)
    augment: bool = True  # random left-right flips in training
    save_model: bool = True  # finetune: keep the selected weights as model.safetensors in the run folder
    threshold: float = 0.5  # on the softmax fracture probability

    # execution
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # > 1: the training stages (pretraining and finetuning) run data-parallel on this many workers
    # (GPUs, or CPU processes with gloo) through Ray Train; the global batch stays batch_size (bench.parallel)
    devices: int = 1
    amp: bool = False
    amp_dtype: Literal["auto", "bf16", "fp16"] = "auto"  # auto: fp16 on CUDA; bf16 on a CPU with native bf16, else fp32
    compile: bool = False
    channels_last: bool = True  # channels_last_3d memory format for the conv nets that declare it
    num_workers: int = 0
    threads: int = 0  # torch intra-op threads; 0 keeps torch's default
    deterministic: bool = True
    progress: bool = True

    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    views: ViewsConfig = field(default_factory=ViewsConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    weights: WeightsConfig = field(default_factory=WeightsConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    model: Any = field(default_factory=dict)  # replaced by the method's Params dataclass


# Keys that were renamed: the old name still works, with one line that names the new one.
RENAMED_KEYS = {"pretrain_data": "pretrain.data"}
_said_renamed: set[str] = set()


def renamed_keys(overrides: dict[str, str], where: str = "command line") -> dict[str, str]:
    """`overrides` with every old key name replaced by its new one (said once per process on stderr)."""
    out = dict(overrides)
    for old, new in RENAMED_KEYS.items():
        if old not in out:
            continue
        if new in out:
            raise BenchError(f"{where}: '{old}' and '{new}' both given; '{old}' is the old name of '{new}'")
        if old not in _said_renamed:
            _said_renamed.add(old)
            print(f"bench: '{old}' is deprecated; use '{new}'", file=sys.stderr)
        out[new] = out.pop(old)
    return out


def parse_overrides(args: list[str]) -> dict[str, str]:
    """`["a.b=1", "c=x"]` -> {"a.b": "1", "c": "x"}, rejecting anything not `key=value`."""
    out: dict[str, str] = {}
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep or not key or key != key.strip():
            raise BenchError(f"bad argument '{arg}': expected key=value (for example seed=1)")
        if key in out:
            raise BenchError(f"key '{key}' given twice ({key}={out[key]} and {arg})")
        out[key] = value
    return out


def _merge(base: DictConfig, layer: Any, where: str) -> DictConfig:
    """Merge `layer` into `base`, turning OmegaConf's errors into one BenchError line."""
    try:
        empties: list[str] = []
        if isinstance(layer, dict) and layer and all(isinstance(v, str) for v in layer.values()):
            empties = [k for k, v in layer.items() if v == ""]  # `key=` means "", not None
            layer = OmegaConf.from_dotlist([f"{k}={v}" for k, v in layer.items() if v != ""])
        merged = OmegaConf.merge(base, layer)
        for key in empties:
            OmegaConf.update(merged, key, "", merge=True)
        return merged  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        raise BenchError(_explain(exc, base, where)) from None


def _explain(exc: OmegaConfBaseException, base: DictConfig, where: str) -> str:
    key = getattr(exc, "full_key", None) or "?"
    first = str(exc).splitlines()[0]
    if isinstance(exc, ConfigKeyError):
        parent_key, _, leaf = key.rpartition(".")
        parent = OmegaConf.select(base, parent_key) if parent_key else base
        valid = [
            f"{parent_key}.{k}" if parent_key else k
            for k in (parent.keys() if isinstance(parent, DictConfig) else [])
        ]
        nested = _nested_matches(base, leaf)
        if nested:
            return f"unknown config key '{key}' ({where}); did you mean {' or '.join(repr(k) for k in nested)}?"
        return f"unknown config key '{key}' ({where}); {choices_hint(key, valid)}"
    if isinstance(exc, ValidationError) and "Cannot convert 'DictConfig'" in first:  # `method.x=...` on a plain key
        sub = first.split("'{'", 1)[-1].split("'", 1)[0]
        nested = _nested_matches(base, sub) if sub else []
        hint = f"; did you mean {' or '.join(repr(k) for k in nested)}?" if nested else ""
        return f"'{key}' ({where}) is a single value, it has no sub-keys{hint}"
    if isinstance(exc, ValidationError) and "is not a ListConfig" in first:  # `probe.c_grid=abc`
        return f"bad value for '{key}' ({where}): expected a list, for example {key}=[0.01,0.1,1]"
    if isinstance(exc, ValidationError):
        node_type = _field_type(base, key)
        expected = f"; expected {node_type}" if node_type and "expected" not in first else ""
        return f"bad value for '{key}' ({where}): {first}{expected}"
    return f"config error at '{key}' ({where}): {first}"


def _nested_matches(base: DictConfig, leaf: str) -> list[str]:
    """Full names of the nested keys whose last part is `leaf` (`pe_cropping` -> `model.pe_cropping`)."""
    found = []

    def walk(node: DictConfig, prefix: str) -> None:
        for k in node.keys():
            child = node._get_node(k)  # noqa: SLF001  (no public accessor that avoids resolving values)
            if isinstance(child, DictConfig):
                walk(child, f"{prefix}{k}.")
            elif k == leaf and prefix:
                found.append(f"{prefix}{k}")

    walk(base, "")
    return found


def _field_type(base: DictConfig, key: str) -> str:
    try:
        node = base._get_node(key)  # noqa: SLF001  (OmegaConf has no public accessor for types)
    except Exception:
        return ""
    typ = getattr(node, "_metadata", None)
    typ = getattr(typ, "ref_type", None)
    return getattr(typ, "__name__", str(typ)) if typ is not None else ""


def _preset_layer(preset: str) -> DictConfig:
    text = resources.files("bench").joinpath("presets", f"{preset}.yaml").read_text()
    return OmegaConf.create(text)


@functools.cache
def with_harness_keys(params: type) -> type:
    """A method's `model.*` schema with the keys the harness reads for every method:
    `grad_checkpointing` (bench.checkpointing)."""
    names = {f.name for f in dataclasses.fields(params)}
    if "grad_checkpointing" in names:
        return params
    return dataclasses.make_dataclass(params.__name__, [("grad_checkpointing", bool, False)], bases=(params,))


def compose(overrides: dict[str, str], method_cls: Any | None = None) -> DictConfig:
    """The fully resolved, validated config of one run (regime may still be None)."""
    preset = overrides.get("preset", "small")
    if preset not in PRESETS:
        raise BenchError(f"unknown preset '{preset}'; {choices_hint(preset, PRESETS)}")
    cfg: DictConfig = OmegaConf.structured(RunConfig)
    if method_cls is not None:
        OmegaConf.set_struct(cfg, False)
        cfg.model = OmegaConf.structured(with_harness_keys(method_cls.Params))
        OmegaConf.set_struct(cfg, True)
    cfg = _merge(cfg, _preset_layer(preset), f"preset {preset}")
    if method_cls is not None:
        method_layer = method_cls.presets.get(preset, {})
        cfg = _merge(cfg, OmegaConf.create(method_layer), f"method {method_cls.name}, preset {preset}")
    cfg = _merge(cfg, renamed_keys(overrides), "command line")
    if method_cls is not None and cfg.weights.public == PUBLISHED:
        spec = getattr(method_cls, "public_weights", None)
        cfg.weights.public = spec.source if spec is not None else ""  # the address, so the run records it
    validate(cfg)
    return cfg


PUBLISHED = "published"  # weights.public: each method's published file


_POSITIVE = ("devices", "epochs", "batch_size", "eval_batch_size", "crop_size", "synthetic.n_patients",
             "pretrain.epochs", "pretrain.batch_size", "pretrain.lr", "probe.knn_k", "probe.knn_temperature",
             "probe.max_iter", "synthetic.min_vertebrae", "synthetic.fov_mm", "views.frames", "views.channels",
             "synthetic.video_size")
_NON_NEGATIVE = ("pretrain.crop_size", "lr", "min_lr", "weight_decay",
                 "warmup_epochs", "grad_clip", "num_workers", "threads",
                 "pretrain.min_lr", "pretrain.weight_decay", "pretrain.warmup_epochs", "pretrain.grad_clip",
                 "synthetic.noise_hu", "synthetic.n_unlabelled_patients", "synthetic.n_body_ct",
                 "synthetic.n_videos", "synthetic.n_val_patients", "synthetic.n_test_patients")
_UNIT_OPEN = ("synthetic.fracture_rate", "threshold")
_SAFE_NAME = re.compile(r"(?!\.{1,2}$)[A-Za-z0-9_.+=-]+")  # one path component, never '.' or '..'



MAX_SEED = 2**32 - 1  # numpy's and torch's generators both take it


def validate(cfg: DictConfig) -> None:
    """Range checks that types alone cannot express."""
    for key in ("seed", "pretrain.seed", "synthetic.seed"):
        value = OmegaConf.select(cfg, key)
        if value is not None and not 0 <= value <= MAX_SEED:
            raise BenchError(f"bad value for '{key}': {value}; expected a whole number from 0 to {MAX_SEED}")
    for key in ("betas", "pretrain.betas"):
        betas = list(OmegaConf.select(cfg, key))
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise BenchError(f"bad value for '{key}': {betas}; expected two numbers in [0, 1), e.g. {key}=[0.9,0.999]")
    for key in ("micro_batch", "pretrain.micro_batch"):
        value = OmegaConf.select(cfg, key)
        if value != "auto" and not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
            raise BenchError(f"bad value for '{key}': {value!r}; expected a whole number >= 0 (0: whole batches) "
                             "or auto")
    for key in _POSITIVE:
        if OmegaConf.select(cfg, key) <= 0:
            raise BenchError(f"bad value for '{key}': {OmegaConf.select(cfg, key)}; expected > 0")
    for key in _NON_NEGATIVE:
        if OmegaConf.select(cfg, key) < 0:
            raise BenchError(f"bad value for '{key}': {OmegaConf.select(cfg, key)}; expected >= 0")
    for key in _UNIT_OPEN:
        if not 0 < OmegaConf.select(cfg, key) < 1:
            raise BenchError(f"bad value for '{key}': {OmegaConf.select(cfg, key)}; expected in (0, 1)")
    if not cfg.probe.c_grid or any(c <= 0 for c in cfg.probe.c_grid):
        raise BenchError(f"bad value for 'probe.c_grid': {list(cfg.probe.c_grid)}; expected positive numbers")
    if cfg.variant and not _SAFE_NAME.fullmatch(cfg.variant):
        raise BenchError(f"bad value for 'variant': '{cfg.variant}'; expected letters, digits, '_', '.', '+', '=' "
                         f"or '-' (it names a folder inside out=; no '/' or '..')")
    if not _SAFE_NAME.fullmatch(str(cfg.suite)):
        raise BenchError(f"bad value for 'suite': '{cfg.suite}'; expected letters, digits, '_', '.', '+', '=' or '-'")
    if not 0 < cfg.layer_decay <= 1:
        raise BenchError(f"bad value for 'layer_decay': {cfg.layer_decay}; expected in (0, 1] (1 disables it)")
    if not 0 <= cfg.label_smoothing < 1:
        raise BenchError(f"bad value for 'label_smoothing': {cfg.label_smoothing}; expected in [0, 1)")
    if not 0 < cfg.train_fraction <= 1:
        raise BenchError(f"bad value for 'train_fraction': {cfg.train_fraction}; expected in (0, 1]")
    if not 0 <= cfg.synthetic.difficulty <= 1:
        raise BenchError(f"bad value for 'synthetic.difficulty': {cfg.synthetic.difficulty}; expected in [0, 1]")
    if cfg.pretrain.crop_size > cfg.crop_size:
        raise BenchError(f"bad value for 'pretrain.crop_size': {cfg.pretrain.crop_size}; expected 0 (the run's crop) "
                         f"or at most crop_size ({cfg.crop_size}): the pretext takes sub-crops of the run's crops")
    if cfg.views.frames + 2 > cfg.crop_size:
        raise BenchError(f"bad value for 'views.frames': {cfg.views.frames}; expected <= crop_size - 2 "
                         f"({cfg.crop_size - 2})")
    if (cfg.synthetic.n_val_patients == 0) != (cfg.synthetic.n_test_patients == 0):
        raise BenchError(f"bad value for 'synthetic.n_val_patients' / 'synthetic.n_test_patients': "
                         f"{cfg.synthetic.n_val_patients} / {cfg.synthetic.n_test_patients}; expected both > 0 "
                         f"(cohorts of their own) or both 0 (a 60/20/20 split of synthetic.n_patients)")
    if cfg.synthetic.max_vertebrae < cfg.synthetic.min_vertebrae:
        raise BenchError(
            f"bad value for 'synthetic.max_vertebrae': {cfg.synthetic.max_vertebrae}; expected >= "
            f"synthetic.min_vertebrae ({cfg.synthetic.min_vertebrae})"
        )


def pretext_crop_size(cfg: DictConfig) -> int:
    """The edge of the run's pretext crops: `pretrain.crop_size` when set, else the run's crop."""
    return int(cfg.pretrain.crop_size or cfg.crop_size)


def pretrain_seed(cfg: DictConfig) -> int:
    """The seed of the run's pretraining stages: `pretrain.seed` when pinned, else the run's seed."""
    return int(cfg.seed if cfg.pretrain.seed is None else cfg.pretrain.seed)


def config_hash(node: Any, length: int = 12) -> str:
    """A short stable hash of a config (sub)tree, for naming cached artifacts."""
    container = OmegaConf.to_container(node, resolve=True) if isinstance(node, (DictConfig, ListConfig)) else node
    blob = json.dumps(container, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


@dataclass
class IngestConfig:
    """Keys of `bench data ingest` (see bench.datasets.ingest for their meaning)."""

    ct: str = ""
    mask: str = ""
    centroids: str = ""  # VerSe centroid JSON for a single case
    cases: str = ""  # CSV: ct, mask, patient_id[, centroids]
    patient: str = ""  # patient id of a single case (default: the CT's file name)
    mask_suffix: str = ""  # ct=DIR mask=DIR: a mask is named as its CT plus this before the extension
    labels: str = ""  # CSV: patient_id, vertebra, fracture[, grade]
    verse: str = ""  # a VerSe release folder (rawdata/, derivatives/): every case in it
    grades: str = ""  # the VerSe'19 fracture grades spreadsheet (.xlsx or .csv)
    rsna: str = ""  # the RSNA 2022 cervical spine data folder (train_images/, train.csv, segmentations/)
    masks: str = ""  # rsna: masks for studies without a segmentation, <StudyInstanceUID>.nii[.gz]
    masks_label_map: str = "totalseg_v2"  # the label map of the masks= folder
    label_map: str = ""  # verse | totalseg_v1 | totalseg_v2
    out: str = "crops"
    size: int = 96
    spacing: float = 1.0
    max_missing: float = 0.4
    min_volume_ml: float = 1.0
    dtype: Literal["int16", "float16"] = "int16"
    workers: int = 0  # 0: one per core
    overwrite: bool = False
    progress: bool = True


def structured(schema: type, overrides: dict[str, str], where: str = "command line") -> DictConfig:
    """A dataclass schema filled from `key=value` overrides, with one-line errors."""
    return _merge(OmegaConf.structured(schema), overrides, where)
