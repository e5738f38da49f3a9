"""`bench weights`: each method's published checkpoint, its download, and a load check without training.

`bench weights list` prints, per method with public weights, the published file, where it comes
from (hf://REPO/FILE@REVISION or a URL), its sha256 where published, its licence, what data trained
it, its key layout and whether it is downloaded. `bench weights fetch [methods=a,b]` downloads the
published files into the cache (through huggingface_hub for hf:// sources: HF_ENDPOINT, HF_HUB_OFFLINE
and HF_TOKEN apply), sha-checked where a sha256 is published; `weights.public=published` then finds
them there. `bench weights check FILE method=NAME [preset=paper]` builds the method's encoder at the
preset's architecture (the published one at `paper`), reads the file as a run would (weights_only or
safetensors), maps its keys and loads it with the same all-or-nothing rule, then prints the load
report: matched, ignored (outside the encoder), and the time it took.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from bench.errors import BenchError, choices_hint


def _published() -> dict[str, Any]:
    """Method name -> its WeightsSpec, for every registered method that has public weights."""
    from bench.registry import get_method, list_methods

    specs = {name: getattr(get_method(name), "public_weights", None) for name in list_methods()}
    return {name: spec for name, spec in specs.items() if spec is not None and not name.startswith("_")}


def _cache(overrides: dict[str, str]) -> Path:
    from bench.config import compose
    from bench.datasets.loading import cache_root

    return cache_root(compose({k: v for k, v in overrides.items() if k in ("cache_dir",)})) / "weights"


def cached_file(spec: Any, cache: Path, weights_dir: str = "") -> Path | None:
    """The published file of `spec` where a run would find it without a download, or None."""
    from bench.weights import find_downloaded, parse_hf, url_target

    if not spec.source:
        return None
    found = find_downloaded(spec.source, weights_dir)
    if found is not None:
        return found
    if spec.source.startswith("hf://"):
        from huggingface_hub import try_to_load_from_cache

        repo, file, revision = parse_hf(spec.source)
        hit = try_to_load_from_cache(repo, file, cache_dir=str(cache / "hf"), revision=revision)
        return Path(hit) if isinstance(hit, str) else None
    target = url_target(spec.source, spec.sha256, cache)
    return target if target.is_file() else None


def weights_table(overrides: dict[str, str] | None = None) -> list[dict[str, Any]]:
    overrides = overrides or {}
    cache = _cache(overrides)
    rows = []
    for name, spec in _published().items():
        local = cached_file(spec, cache, overrides.get("weights.dir", ""))
        rows.append({"method": name, "file": spec.filename,
                     "source": spec.source or f"(no download address published: {spec.url or 'see the method'}; "
                                              "pass the file as weights.public=PATH)",
                     "sha256": spec.sha256 or "(none published)", "licence": spec.licence or "(not stated here)",
                     "trained_on": spec.trained_on or "(not stated here)", "layout": spec.layout,
                     "cached": str(local) if local else False})
    return rows


def fetch_published(overrides: dict[str, str]) -> list[str]:
    """Download the published files of `methods=` (default: every method that has a download address)."""
    from bench.weights import fetch

    unknown = set(overrides) - {"methods", "cache_dir", "weights.dir"}
    if unknown:
        raise BenchError(f"bench weights fetch: unknown key(s) {', '.join(sorted(unknown))}; expected methods=, "
                         "cache_dir= or weights.dir=")
    published = _published()
    wanted = [m.strip() for m in overrides.get("methods", "").split(",") if m.strip()]
    for name in wanted:
        if name not in published:
            raise BenchError(f"bench weights fetch: method '{name}' has no public weights; "
                             f"{choices_hint(name, sorted(published))}")
        if not published[name].source:
            raise BenchError(f"bench weights fetch: method '{name}' publishes no download address "
                             f"({published[name].url or published[name].filename}); download it by hand and pass "
                             "weights.public=PATH")
    names = wanted or [n for n, spec in published.items() if spec.source]
    cache, lines = _cache(overrides), []
    for name in names:
        spec = published[name]
        path = fetch(spec.source, spec.sha256, cache, overrides.get("weights.dir", ""))
        lines.append(f"{name}: {spec.source} -> {path}" + (" (sha256 checked)" if spec.sha256 else ""))
    return lines


def check(path: str, overrides: dict[str, str]) -> dict[str, Any]:
    """The load report of `path` into `method`'s encoder at the preset's architecture."""
    from bench.config import compose
    from bench.registry import create_method, get_method
    from bench.transfer import PUBLIC, initialise

    if "method" not in overrides:
        raise BenchError("bench weights check FILE method=NAME: method= is missing")
    unknown = set(overrides) - {"method", "preset", "cache_dir"} - {k for k in overrides
                                                                     if k.startswith(("model.", "weights."))}
    if unknown:
        raise BenchError(f"bench weights check: unknown key(s) {', '.join(sorted(unknown))}; expected method=, "
                         f"preset=, cache_dir=, model.* or weights.*")
    cls = get_method(overrides["method"])
    if getattr(cls, "public_weights", None) is None:
        raise BenchError(f"method '{cls.name}' has no public weights to check")
    t0 = time.perf_counter()
    cfg = compose({"preset": "paper", **overrides, "regime": "public", "weights.public": path}, cls)
    method = create_method(cls.name, cfg)
    model = method.build_model()
    report = initialise(method, cfg, model, PUBLIC)
    summary = report["load_report"]
    return {"method": cls.name, "preset": cfg.preset, "file": report["init"], "matched": summary["matched"],
            "encoder_tensors": len(method.finetune_encoder(model).state_dict()),
            "ignored_outside_encoder": summary["ignored_outside_encoder"], "seconds": time.perf_counter() - t0}


def weights_command(args: list[str]) -> str:
    from bench.config import parse_overrides

    if not args or args[0] not in ("list", "fetch", "check"):
        raise BenchError("bench weights: expected 'list', 'fetch [methods=a,b]' or 'check FILE method=NAME'")
    if args[0] in ("list", "fetch"):
        stray = [a for a in args[1:] if "=" not in a]
        if stray:
            raise BenchError(f"bench weights {args[0]}: unexpected argument '{stray[0]}'; expected key=value")
        overrides = parse_overrides(args[1:])
        if args[0] == "fetch":
            return "\n".join(fetch_published(overrides))
        return "\n".join(json.dumps(row) for row in weights_table(overrides))
    files = [a for a in args[1:] if "=" not in a]
    if len(files) != 1:
        raise BenchError("bench weights check: expected one FILE and method=NAME")
    r = check(files[0], parse_overrides([a for a in args[1:] if "=" in a]))
    return (f"{r['method']} ({r['preset']}): {r['matched']} of {r['encoder_tensors']} encoder tensors loaded from "
            f"{r['file']}; {r['ignored_outside_encoder']} tensors outside the encoder ignored; {r['seconds']:.1f} s")
