"""Tests marked `gpu` run only where CUDA is available (`python tests/gpu/check.py` runs them all
and writes a Markdown summary); elsewhere they are skipped."""
import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="gpu: needs CUDA (run python tests/gpu/check.py on a GPU machine)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def gpu_results():
    """Rows the checks append ({"check", "method", "result", ...}); check.py collects them."""
    import json
    import os

    rows: list[dict] = []
    yield rows
    path = os.environ.get("BENCH_GPU_RESULTS")
    if path:
        with open(path, "a") as fh:
            for row in rows:
                fh.write(json.dumps(row) + "\n")
