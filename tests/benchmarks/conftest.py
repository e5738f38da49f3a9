"""Benchmarks run only when asked: `pytest tests/benchmarks --benchmark-enable`.

They measure against a baseline in the same process (our loader against a plain copy of the same
bytes, our ingestion against a naive MONAI pipeline) and print the ratio, since absolute times on
shared machines are noisy.
"""
import pytest


def pytest_collection_modifyitems(config, items):
    if config.getoption("benchmark_enable", default=False):
        return
    skip = pytest.mark.skip(reason="benchmark: run with --benchmark-enable")
    for item in items:
        if "benchmarks" in str(item.fspath):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def report_lines():
    lines: list[str] = []
    yield lines
    if lines:
        print("\n" + "\n".join(lines))
