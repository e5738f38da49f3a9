"""An exclusive file lock, so that concurrent runs (Ray trials) build a shared artifact once; and
how long this process has waited on such locks (the time a trial idles while another builds what
it needs), which each run records."""
from __future__ import annotations

import fcntl
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_waited = [0.0]


def waited_s() -> float:
    """Seconds this process has spent waiting for locks held by others, so far."""
    return _waited[0]


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `path`'s sibling .lock file: others wait, then find the result."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as fh:
        start = time.perf_counter()
        fcntl.flock(fh, fcntl.LOCK_EX)
        _waited[0] += time.perf_counter() - start
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
