"""What `bench list methods` prints, without importing torch: a small cache of the registry.

Listing methods needs only their names, regimes and descriptions, but the method modules import
torch, MONAI and timm, which takes seconds. The catalogue is written once from the real registry
and read back while nothing it depends on has changed: the package version, the files of the
built-in methods, and every `bench.methods` entry point with the files of its package (by path,
size and modification time). Any change rebuilds it from the registry.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any


def _cache_file(fingerprint: str) -> Path:
    root = os.environ.get("BENCH_CACHE") or Path.home() / ".cache" / "vertebench"
    return Path(root) / "catalogue" / f"methods-{fingerprint}.json"


def _package_files(module: str) -> list[Path]:
    """The source files of a module's top-level package, found without importing it."""
    try:
        spec = importlib.util.find_spec(module.split(".")[0] if "." not in module else module)
    except (ImportError, ValueError):
        return []
    if spec is None:
        return []
    if spec.submodule_search_locations:
        return sorted(p for loc in spec.submodule_search_locations for p in Path(loc).rglob("*.py"))
    return [Path(spec.origin)] if spec.origin else []


def fingerprint(group: str, builtin: str) -> str:
    from bench import __version__

    parts: list[Any] = [__version__]
    sources = _package_files(builtin)
    for ep in sorted(entry_points(group=group), key=lambda e: (e.name, e.value)):
        dist = getattr(ep, "dist", None)
        parts.append([ep.name, ep.value, getattr(dist, "version", None)])
        sources += _package_files(ep.value.split(":")[0].split(".")[0])
    for path in sources:
        try:
            st = path.stat()
        except OSError:
            continue
        parts.append([str(path), st.st_size, st.st_mtime_ns])
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:20]


def methods() -> list[dict[str, Any]]:
    """name, regimes, description of every registered method, from the cache when it is current."""
    from bench.registry import METHODS

    key = fingerprint("bench.methods", "bench.methods")
    path = _cache_file(key)
    if not METHODS.loaded:  # a registry already in memory may hold methods registered at run time
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            pass
    rows = [{"name": n, "regimes": list(METHODS.get(n).regimes), "description": METHODS.get(n).description}
            for n in METHODS.names()]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(rows))
        os.replace(tmp, path)
    except OSError:  # a read-only cache only costs the next listing its speed
        pass
    return rows
