"""`bench weights`: what each method's published checkpoint is, and a load check without training.

`bench weights list` prints, per method with public weights, the published file, where it comes
from and its key layout. `bench weights check FILE method=NAME [preset=paper]` builds the method's
encoder at the preset's architecture (the published one at `paper`), reads the file as a run would
(weights_only or safetensors), maps its keys and loads it with the same all-or-nothing rule, then
prints the load report: matched, ignored (outside the encoder), and the time it took.
"""
from __future__ import annotations

import json
import time
from typing import Any

from bench.errors import BenchError


def weights_table() -> list[dict[str, Any]]:
    from bench.registry import get_method, list_methods

    rows = []
    for name in list_methods():
        spec = getattr(get_method(name), "public_weights", None)
        if spec is None or name.startswith("_"):
            continue
        rows.append({"method": name, "file": spec.filename, "source": spec.url or "(no URL published: download it "
                     "and pass weights.public=PATH)", "sha256": spec.sha256 or "(none published)",
                     "layout": spec.layout})
    return rows


def check(path: str, overrides: dict[str, str]) -> dict[str, Any]:
    """The load report of `path` into `method`'s encoder at the preset's architecture."""
    from bench.config import compose
    from bench.registry import create_method, get_method
    from bench.transfer import load_public

    if "method" not in overrides:
        raise BenchError("bench weights check FILE method=NAME: method= is missing")
    unknown = set(overrides) - {"method", "preset"} - {k for k in overrides if k.startswith(("model.", "weights."))}
    if unknown:
        raise BenchError(f"bench weights check: unknown key(s) {', '.join(sorted(unknown))}; expected method=, "
                         f"preset=, model.* or weights.*")
    cls = get_method(overrides["method"])
    if getattr(cls, "public_weights", None) is None:
        raise BenchError(f"method '{cls.name}' has no public weights to check")
    t0 = time.perf_counter()
    cfg = compose({"preset": "paper", **overrides, "regime": "public", "weights.public": path}, cls)
    method = create_method(cls.name, cfg)
    model = method.build_model()
    report = load_public(method, cfg, method.finetune_encoder(model))
    summary = report["load_report"]
    return {"method": cls.name, "preset": cfg.preset, "file": report["init"], "matched": summary["matched"],
            "encoder_tensors": len(method.finetune_encoder(model).state_dict()),
            "ignored_outside_encoder": summary["ignored_outside_encoder"], "seconds": time.perf_counter() - t0}


def weights_command(args: list[str]) -> str:
    from bench.config import parse_overrides

    if not args or args[0] not in ("list", "check"):
        raise BenchError("bench weights: expected 'list' or 'check FILE method=NAME'")
    if args[0] == "list":
        return "\n".join(json.dumps(row) for row in weights_table())
    files = [a for a in args[1:] if "=" not in a]
    if len(files) != 1:
        raise BenchError("bench weights check: expected one FILE and method=NAME")
    r = check(files[0], parse_overrides([a for a in args[1:] if "=" in a]))
    return (f"{r['method']} ({r['preset']}): {r['matched']} of {r['encoder_tensors']} encoder tensors loaded from "
            f"{r['file']}; {r['ignored_outside_encoder']} tensors outside the encoder ignored; {r['seconds']:.1f} s")
