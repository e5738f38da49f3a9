"""How far a reader travels following `cfg` through one run.

From `bench/run.py:execute` on, every project function that takes a `cfg` argument is listed in the
order it is first entered; consecutive ones in one file are one stop, and a return is a stop in a
file the path had already left. Measured on `mae3d` in `vertebrae` at `tiny` from an empty cache
(pretraining, transfer, finetuning, storage). The goal: at most 5 returns.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from tests_helpers import REPO

PROJECT = tuple(str(REPO / d) + os.sep for d in ("bench", "methods", "datasets", "reports"))


def cfg_path(argv: list[str]) -> tuple[list[tuple[str, list[str]]], int]:
    """The stops (file, functions) of `bench ARGV` and the number of returns."""
    from bench.cli import main

    seen, order, active = set(), [], [False]

    def profile(frame, event, arg):
        if event != "call":
            return
        code = frame.f_code
        path = os.path.realpath(code.co_filename)
        if code.co_name == "execute" and path.endswith(os.path.join("bench", "run.py")):
            active[0] = True
        arguments = code.co_varnames[:code.co_argcount + code.co_kwonlyargcount]
        if active[0] and path.startswith(PROJECT) and "cfg" in arguments and code not in seen:
            seen.add(code)
            order.append((os.path.relpath(path, REPO), code.co_name))

    sys.setprofile(profile)
    try:
        assert main(argv) == 0
    finally:
        sys.setprofile(None)
    stops: list[tuple[str, list[str]]] = []
    left: set[str] = set()
    returns = 0
    for path, name in order:
        if stops and stops[-1][0] == path:
            stops[-1][1].append(name)
            continue
        returns += path in left
        if stops:
            left.add(stops[-1][0])
        stops.append((path, [name]))
    return stops, returns


def test_following_cfg_through_one_run_returns_to_a_file_at_most_5_times(tmp_path: Path, monkeypatch, report_lines):
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "cache"))
    stops, returns = cfg_path(["run", "method=mae3d", "regime=vertebrae", "preset=tiny", "progress=false",
                               f"out={tmp_path / 'runs'}"])
    report_lines += [f"cfg path: {path}: {', '.join(names)}" for path, names in stops]
    report_lines.append(f"cfg path: {len(stops)} stops in {len({p for p, _ in stops})} files, {returns} returns")
    assert returns <= 5
