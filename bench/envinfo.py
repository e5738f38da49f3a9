"""What a run ran on: versions, hardware, source commit, times. Stored as env.json."""
from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

PACKAGES = ("vertebench", "torch", "torchvision", "monai", "timm", "numpy", "pandas", "pyarrow",
            "scikit-learn", "scipy", "omegaconf", "nibabel", "ray")


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        return round(pages * size / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def _git(*args: str) -> str | None:
    src = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", *args], cwd=src, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def environment() -> dict[str, Any]:
    import torch

    cuda = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "versions": _versions(),
        "hardware": {
            "platform": platform.platform(),
            "cpu": _cpu_model(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "memory_gib": _memory_gib(),
            "cuda_devices": cuda,
            "cuda_version": torch.version.cuda,
        },
        "git": {"commit": _git("rev-parse", "HEAD"), "dirty": bool(dirty) if dirty is not None else None},
        "host": socket.gethostname(),
        "argv": sys.argv,
    }
