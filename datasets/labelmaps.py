"""Vertebra label maps, by NAME: integer ids differ between VerSe and TotalSegmentator versions.

Ids that are not vertebrae (organs, sacrum as a whole, ribs) are absent from the maps and ignored.
"""
from __future__ import annotations

from bench.errors import BenchError, choices_hint

VERTEBRAE: tuple[str, ...] = (
    tuple(f"C{i}" for i in range(1, 8)) + tuple(f"T{i}" for i in range(1, 14))
    + tuple(f"L{i}" for i in range(1, 7)) + ("S1",)
)  # cranio-caudal order; T13 and L6 are anatomical variants


def _verse() -> dict[int, str]:
    ids = {i: f"C{i}" for i in range(1, 8)}
    ids.update({7 + i: f"T{i}" for i in range(1, 13)})
    ids.update({19 + i: f"L{i}" for i in range(1, 7)})
    ids[28] = "T13"
    return ids


def _totalseg_v2() -> dict[int, str]:
    ids = {26: "S1"}
    ids.update({27 + (5 - i): f"L{i}" for i in range(1, 6)})  # 27 L5 ... 31 L1
    ids.update({32 + (12 - i): f"T{i}" for i in range(1, 13)})  # 32 T12 ... 43 T1
    ids.update({44 + (7 - i): f"C{i}" for i in range(1, 8)})  # 44 C7 ... 50 C1
    return ids


def _totalseg_v1() -> dict[int, str]:
    ids = {18 + (5 - i): f"L{i}" for i in range(1, 6)}  # 18 L5 ... 22 L1
    ids.update({23 + (12 - i): f"T{i}" for i in range(1, 13)})  # 23 T12 ... 34 T1
    ids.update({35 + (7 - i): f"C{i}" for i in range(1, 8)})  # 35 C7 ... 41 C1
    return ids


LABEL_MAPS: dict[str, dict[int, str]] = {
    "verse": _verse(),
    "totalseg_v1": _totalseg_v1(),
    "totalseg_v2": _totalseg_v2(),
}


def get_label_map(name: str) -> dict[int, str]:
    if name not in LABEL_MAPS:
        raise BenchError(f"unknown label map '{name}'; {choices_hint(name, LABEL_MAPS)}")
    return LABEL_MAPS[name]


def check_vertebra_name(name: str, where: str) -> str:
    if name not in VERTEBRAE:
        raise BenchError(f"{where}: unknown vertebra name '{name}'; expected one of C1-C7, T1-T13, L1-L6, S1")
    return name
