"""Benchmarks run only when asked: `pytest tests/benchmarks --benchmark-enable`. The paper preset's
steps of every method (`bench cost`'s measurement: tens of minutes on two cores, more memory than a
laptop has for VoCo's pretext) run apart: `pytest tests/benchmarks --benchmark-enable -m paper_preset`.

They measure against a baseline in the same process (our loader against a plain copy of the same
bytes, our ingestion against a naive MONAI pipeline) and print the ratio, since absolute times on
shared machines are noisy.
"""
import pytest


def pytest_collection_modifyitems(config, items):
    if not config.getoption("benchmark_enable", default=False):
        skip = pytest.mark.skip(reason="benchmark: run with --benchmark-enable")
        for item in items:
            if "benchmarks" in str(item.fspath):
                item.add_marker(skip)
        return
    if "paper_preset" not in (config.getoption("markexpr", default="") or ""):
        skip = pytest.mark.skip(reason="every method's paper-preset step: run with -m paper_preset")
        for item in items:
            if item.get_closest_marker("paper_preset"):
                item.add_marker(skip)


@pytest.fixture(scope="session")
def report_lines():
    lines: list[str] = []
    yield lines
    if lines:
        print("\n" + "\n".join(lines))
