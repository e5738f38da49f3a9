"""Suites: named lists of runs, stored as small YAML files (bench/suites/*.yaml or any path).

    description: ...
    seeds: 3                      # default number of seeds (seeds=N overrides)
    runs: all                     # every registered method x every regime it runs without weights.public
    runs:                         # or explicit entries
      - {method: NAME, regimes: [..], variant: NAME, overrides: [key=value, ...]}
    train_fractions: [0.1, 1.0]   # optional: every run at each share of the training patients
    protocols: [finetune, linear] # optional: every run under each protocol (default: finetune)

On the command line, `seeds=N`, `train_fractions=0.1,0.5,1`, `protocols=finetune,knn` and
`methods=a,b` (keep only these methods' entries) override the file.
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
    _check_fields(suite, name)
    suite["name"] = label
    return suite


ENTRY_FIELDS = {"method": str, "regimes": list, "variant": str, "overrides": list}


def _check_fields(suite: dict[str, Any], name: str) -> None:
    """Every field of a suite file has the type the format above gives it, or one line says which."""
    known = {"description", "seeds", "runs", "train_fractions", "protocols", "explain"}
    unknown = sorted(set(suite) - known)
    if unknown:
        raise BenchError(f"suite '{name}': unknown field '{unknown[0]}'; {choices_hint(unknown[0], sorted(known))}")
    runs = suite["runs"]
    if runs != "all" and not isinstance(runs, list):
        raise BenchError(f"suite '{name}': 'runs' is {type(runs).__name__} {runs!r}; expected a list of entries "
                         f"or 'all'")
    for i, entry in enumerate(runs if isinstance(runs, list) else [], start=1):
        if not isinstance(entry, dict) or "method" not in entry:
            raise BenchError(f"suite '{name}': entry {i} is {entry!r}; expected a mapping with a method")
        for key, value in entry.items():
            if key not in ENTRY_FIELDS:
                raise BenchError(f"suite '{name}': entry {i} has unknown field '{key}'; "
                                 f"{choices_hint(str(key), list(ENTRY_FIELDS))}")
            wanted = ENTRY_FIELDS[key]
            if not isinstance(value, wanted) or (wanted is list and not all(isinstance(v, str) for v in value)):
                kind = "a string" if wanted is str else "a list of strings"
                raise BenchError(f"suite '{name}': entry {i} field '{key}' is {value!r}; expected {kind}")
    if "seeds" in suite:
        seeds_count(suite["seeds"], f"suite '{name}' field 'seeds'")


def seeds_count(value: Any, where: str = "seeds") -> int:
    """A number of seeds: a whole number >= 1."""
    try:
        n = int(str(value))
    except ValueError:
        n = 0
    if n < 1 or str(value).strip() != str(n):
        raise BenchError(f"bad value for {where}: {value!r}; expected a whole number >= 1")
    return n


def _number_list(value: Any, key: str) -> list[float]:
    items = value.split(",") if isinstance(value, str) else value
    try:
        numbers = [float(v) for v in items]
    except (TypeError, ValueError):
        raise BenchError(f"bad value for '{key}': {value!r}; expected numbers such as 0.1,0.5,1") from None
    bad = [v for v in numbers if not 0 < v <= 1]
    if bad or not numbers:
        raise BenchError(f"bad value for '{key}': {value!r}; expected fractions in (0, 1]")
    return numbers


def _protocols(value: Any) -> list[str]:
    from bench.protocols import PROTOCOLS

    items = [v.strip() for v in value.split(",")] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise BenchError(f"bad value for 'protocols': {value!r}; expected a list such as finetune,linear,knn")
    for item in items:
        if item not in PROTOCOLS:
            raise BenchError(f"bad value for 'protocols': unknown protocol '{item}'; "
                             f"{choices_hint(str(item), PROTOCOLS)}")
    return list(dict.fromkeys(items))


def expand(suite: dict[str, Any], seeds: int, methods: str = "", train_fractions: str = "",
           protocols: str = "") -> list[dict[str, str]]:
    """The override dicts of every run of the suite, seeds (and training fractions) included."""
    from bench.registry import get_method, list_methods

    if suite["runs"] == "all":
        entries = [{"method": m, "regimes": [r for r in get_method(m).regimes if get_method(m).runs_without_a_file(r)]}
                   for m in list_methods() if not m.startswith("_")]
    else:
        entries = suite["runs"]
    if methods:
        wanted = [m.strip() for m in methods.split(",") if m.strip()]
        known = {e.get("method") for e in entries if isinstance(e, dict)}
        for m in wanted:
            if m not in known:
                raise BenchError(f"methods: '{m}' is not in suite '{suite['name']}'; {choices_hint(m, sorted(known))}")
        entries = [e for e in entries if isinstance(e, dict) and e.get("method") in wanted]
    fractions = _number_list(train_fractions or suite.get("train_fractions", [1.0]),
                             "train_fractions")
    chosen = _protocols(protocols or suite.get("protocols", ["finetune"]))
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
            for fraction in fractions:
                for seed in range(seeds):
                    for name in chosen:
                        run = {"method": entry["method"], "regime": regime, "seed": str(seed),
                               "variant": entry.get("variant", ""), "protocol": name, **extra}
                        if fraction != 1.0:
                            run["train_fraction"] = f"{fraction:g}"
                        runs.append(run)
    return runs
