"""Helpers shared by several test modules (not fixtures)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def python_in(cwd: Path, code: str, env: dict[str, str] | None = None) -> str:
    """Run `python -c code` in `cwd` (outside the repository) and return its stdout."""
    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True,
                         env={**os.environ, **(env or {})}, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout
