"""The results store: one folder per finetuning run, written so that it is never half there.

A run's files are written into a hidden staging folder next to the final one, which then replaces
the final folder by rename; an older result of the same run stays intact until that moment.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import DictConfig, OmegaConf

FILES = ("config.yaml", "metrics.json", "predictions.parquet", "env.json")
MODEL_FILE = "model.safetensors"  # the selected weights of a finetuning run (save_model=true)


def normal_mode(path: Path, mode: int = 0o777) -> None:
    """mkdtemp/mkstemp make 0700 folders and 0600 files; give `path` the mode a plain mkdir or
    open would (`mode` less the umask): 0o777 for folders, 0o666 for files."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, mode & ~umask)


def run_dir(cfg: DictConfig) -> Path:
    """<out>/<suite>/<method>-<regime>[-<protocol>][-<variant>][-grade][-frac<f>]-s<seed>: finetuning
    the default task on all training patients keeps the plain name; other protocols, tasks and
    fractions never overwrite it."""
    parts = [cfg.method, cfg.regime]
    if cfg.protocol != "finetune":
        parts.append(cfg.protocol)
    if cfg.variant:
        parts.append(cfg.variant)
    if cfg.task != "fracture":
        parts.append(cfg.task)
    if cfg.train_fraction < 1:
        parts.append(f"frac{cfg.train_fraction:g}")
    return Path(cfg.out) / cfg.suite / f"{'-'.join(parts)}-s{cfg.seed}"


def _clean(obj: Any) -> Any:
    """JSON has no NaN: undefined metrics are stored as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return _clean(obj.item())
    return obj


def dumps(obj: Any) -> str:
    return json.dumps(_clean(obj), indent=2, allow_nan=False) + "\n"


def write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        normal_mode(Path(tmp), 0o666)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def naming(path: str | Path) -> Iterator[None]:
    """A write whose OSError names no file (numpy's "N requested and M written" on a full disk) is
    raised again naming `path`, so the one error line says where."""
    try:
        yield
    except OSError as exc:
        if getattr(exc, "filename", None):
            raise
        raise OSError(exc.errno or 28, exc.strerror or str(exc).splitlines()[0][:200], str(path)) from None


def write_run(target: Path, cfg: DictConfig, metrics: dict[str, Any], predictions: pd.DataFrame,
              env: dict[str, Any], model_state: dict[str, Any] | None = None) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{target.name}.staging-", dir=target.parent))
    normal_mode(stage)
    try:
        (stage / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        (stage / "metrics.json").write_text(dumps(metrics))
        predictions.to_parquet(stage / "predictions.parquet", index=False)
        (stage / "env.json").write_text(dumps(env))
        if model_state is not None:
            from safetensors import SafetensorError
            from safetensors.torch import save_file

            try:
                save_file({k: v.detach().cpu().contiguous().clone() for k, v in model_state.items()},
                          str(stage / MODEL_FILE), metadata={"method": str(cfg.method), "regime": str(cfg.regime)})
            except SafetensorError as exc:  # a full or read-only disk: safetensors says so without a file name
                raise OSError(28 if "space" in str(exc).lower() else 5, str(exc).splitlines()[0][:200],
                              str(target / MODEL_FILE)) from None
        replace_folder(stage, target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return target


def replace_folder(stage: Path, target: Path) -> None:
    """Put a finished staging folder in `target`'s place by renames; an older `target` stays whole
    until the moment it is replaced."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.rename(target, old)
    os.rename(stage, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_run(folder: Path) -> dict[str, Any]:
    return {
        "metrics": json.loads((folder / "metrics.json").read_text()),
        "env": json.loads((folder / "env.json").read_text()),
        "predictions": pd.read_parquet(folder / "predictions.parquet"),
    }
