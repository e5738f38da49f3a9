"""Concurrent builders of one shared artifact: the lock makes the second wait and reuse."""
import multiprocessing as mp
import time

from bench.locks import locked


def _build(path, log):
    with locked(path):
        if not path.exists():
            with open(log, "a") as fh:
                fh.write("built\n")
            time.sleep(0.5)  # long enough for the other process to be waiting
            path.write_text("artifact")


def test_two_processes_build_once(tmp_path):
    path, log = tmp_path / "artifact", tmp_path / "log"
    procs = [mp.get_context("spawn").Process(target=_build, args=(path, log)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert path.read_text() == "artifact" and log.read_text() == "built\n"
