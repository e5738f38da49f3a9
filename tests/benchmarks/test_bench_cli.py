"""Cold start of `bench --help` and `bench list methods`: median of 5 fresh processes each."""
from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest


def _bench_script() -> str:
    """The console script of the environment running the tests (its bin/ need not be on PATH)."""
    beside = Path(sys.executable).parent / "bench"
    bench = str(beside) if beside.is_file() else shutil.which("bench")
    if bench is None:
        pytest.skip("the bench console script is not installed")
    return bench


def _median_start(*args: str, repeats: int = 5) -> float:
    bench = _bench_script()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run([bench, *args], check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def test_cli_cold_start(benchmark, report_lines):
    subprocess.run([_bench_script(), "list", "methods"], capture_output=True)  # writes the catalogue
    help_s = _median_start("--help")
    list_s = _median_start("list", "methods")
    report_lines.append(f"bench --help: {help_s:.2f} s, bench list methods: {list_s:.2f} s (median of 5; goal < 1 s)")
    benchmark.pedantic(lambda: None, rounds=1)
    assert list_s < 1.0 and help_s < 1.0
