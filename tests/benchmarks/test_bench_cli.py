"""Cold start of `bench --help` and `bench list methods`: median of 5 fresh processes each."""
from __future__ import annotations

import shutil
import statistics
import subprocess
import time

import pytest


def _median_start(*args: str, repeats: int = 5) -> float:
    bench = shutil.which("bench")
    if bench is None:
        pytest.skip("the bench console script is not installed")
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run([bench, *args], check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def test_cli_cold_start(benchmark, report_lines):
    subprocess.run([shutil.which("bench") or "bench", "list", "methods"], capture_output=True)  # writes the catalogue
    help_s = _median_start("--help")
    list_s = _median_start("list", "methods")
    report_lines.append(f"bench --help: {help_s:.2f} s, bench list methods: {list_s:.2f} s (median of 5; goal < 1 s)")
    benchmark.pedantic(lambda: None, rounds=1)
    assert list_s < 1.0 and help_s < 1.0
