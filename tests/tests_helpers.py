"""Helpers shared by several test modules (not fixtures)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`bench ARGS` in a fresh process, as a user would run it."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "bench.cli", *args], capture_output=True, text=True, env=full_env,
        cwd=cwd, timeout=600,
    )


def python_in(cwd: Path, code: str, env: dict[str, str] | None = None) -> str:
    """Run `python -c code` in `cwd` (outside the repository) and return its stdout."""
    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True,
                         env={**os.environ, **(env or {})}, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


def encoder_init(method, cfg, model):
    """The run chain's pretraining and encoder-initialisation steps for an already built classifier."""
    from bench.pretrain import run_plan
    from bench.transfer import initialise_encoder

    return initialise_encoder(method, cfg, model, run_plan(method, cfg))
