"""The pretraining regimes, declared once: their names, order and the stages each one runs.

A stage is one self-supervised pretraining run: "public" on the out-of-domain corpus (or the real
public checkpoint), "vertebrae" on the unlabelled vertebrae. Everything else (config validation,
the registry's check of a method's `regimes`, the suite's trial order, the report's row order)
reads this table.
"""
from __future__ import annotations

from bench.errors import BenchError, choices_hint

# name -> (pretraining stages in order, one-line meaning); the order is the report's row order
REGIMES: dict[str, tuple[tuple[str, ...], str]] = {
    "scratch": ((), "random initialisation"),
    "public": (("public",), "public weights (the embedded stand-in: the pretext on an out-of-domain corpus)"),
    "vertebrae": (("vertebrae",), "self-supervised pretraining on the unlabelled vertebrae, from random init"),
    "public_to_vertebrae": (("public", "vertebrae"), "public weights, then pretraining on the unlabelled vertebrae"),
}
NAMES: tuple[str, ...] = tuple(REGIMES)


def stages(regime: str) -> list[str]:
    """The pretraining stages of a regime, in order."""
    check(regime)
    return list(REGIMES[regime][0])


def check(regime: str, where: str = "") -> None:
    if regime not in REGIMES:
        raise BenchError(f"unknown regime '{regime}'{f' ({where})' if where else ''}; {choices_hint(regime, NAMES)}")


def order(regime: str) -> int:
    """Position in the report's rows (unknown names last)."""
    return NAMES.index(regime) if regime in REGIMES else len(NAMES)
