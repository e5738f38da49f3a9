"""Suites: named lists of runs, stored as small YAML files (bench/suites/*.yaml or any path).

    description: ...
    seeds: 3                      # default number of seeds (seeds=N overrides)
    runs: all                     # every registered method x every regime it supports
    runs:                         # or explicit entries
      - {method: NAME, regimes: [..], variant: NAME, overrides: [key=value, ...]}
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from bench.errors import BenchError, choices_hint


def list_suites() -> list[str]:
    return sorted(p.name.removesuffix(".yaml") for p in resources.files("bench").joinpath("suites").iterdir()
                  if p.name.endswith(".yaml"))


def load_suite(name: str) -> dict[str, Any]:
    if name.endswith((".yaml", ".yml")):
        path = Path(name)
        if not path.is_file():
            raise BenchError(f"suite file '{name}': no such file")
        text, label = path.read_text(), path.stem
    else:
        if name not in list_suites():
            raise BenchError(f"unknown suite '{name}'; {choices_hint(name, list_suites())}")
        text, label = resources.files("bench").joinpath("suites", f"{name}.yaml").read_text(), name
    try:
        suite = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise BenchError(f"suite '{name}': not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(suite, dict) or "runs" not in suite:
        raise BenchError(f"suite '{name}': expected a mapping with 'runs' (a list, or 'all')")
    suite["name"] = label
    return suite


def expand(suite: dict[str, Any], seeds: int) -> list[dict[str, str]]:
    """The override dicts of every run of the suite, seeds included."""
    from bench.registry import get_method, list_methods

    if suite["runs"] == "all":
        entries = [{"method": m, "regimes": list(get_method(m).regimes)} for m in list_methods()
                   if not m.startswith("_")]
    else:
        entries = suite["runs"]
    runs = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "method" not in entry:
            raise BenchError(f"suite '{suite['name']}': entry {i + 1} needs a method")
        method = get_method(entry["method"])
        for regime in entry.get("regimes") or list(method.regimes):
            if regime not in method.regimes:
                raise BenchError(f"suite '{suite['name']}': method '{entry['method']}' does not support regime "
                                 f"'{regime}'; {choices_hint(regime, method.regimes)}")
            extra = {}
            for item in entry.get("overrides", []):
                key, _, value = str(item).partition("=")
                extra[key] = value
            for seed in range(seeds):
                runs.append({"method": entry["method"], "regime": regime, "seed": str(seed),
                             "variant": entry.get("variant", ""), **extra})
    return runs
