"""The GPU check: run every test marked `gpu` within a time limit and write a Markdown summary.

    python tests/gpu/check.py [--out gpu_check.md] [--timeout 540] [--dry-run]

`--dry-run` (any machine) lists what would run and checks that the tests collect. Two-GPU data
parallel runs are not part of the check: `devices=N` is not built yet (see the README).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _collect() -> list[str]:
    done = subprocess.run([sys.executable, "-m", "pytest", str(HERE), "--collect-only", "-q", "-m", "gpu"],
                          capture_output=True, text=True, cwd=HERE.parents[1])
    if done.returncode not in (0, 5):
        sys.exit(f"gpu check: the tests do not collect:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return [line for line in done.stdout.splitlines() if "::" in line]


def _summary(rows: list[dict], outcome: str) -> str:
    lines = ["# GPU check", "", outcome, "", "| method | step | dtype | compile | peak GiB | estimate GiB | s | MFU |",
             "|---|---|---|---|---:|---:|---:|---:|"]
    for r in (r for r in rows if r["check"] == "step"):
        est = "-" if r.get("estimate_gib") is None else f"{r['estimate_gib']:.1f}"
        mfu = "-" if r.get("mfu") is None else f"{r['mfu']:.1%}"
        lines.append(f"| {r['method']} | {r['kind']} | {r['dtype']} | {r['compile']} | {r['peak_gib']:.2f} | {est} | "
                     f"{r['s']:.3f} | {mfu} |")
    for r in (r for r in rows if r["check"] == "two epochs"):
        losses = " -> ".join(f"{v:.4f}" for v in r["losses"])
        lines += ["", f"{r['method']}, two paper-preset epochs: training loss {losses}"]
    for r in (r for r in rows if r["check"] == "two gpus"):
        lines += ["", f"{r['method']} on two GPUs (devices=2): validation loss {r['losses']} against one GPU's "
                      f"{r['one']}"]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu_check.md")
    parser.add_argument("--timeout", type=int, default=540)
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args()
    tests = _collect()
    if args.dry_run:
        print(f"gpu check: {len(tests)} tests would run (within {args.timeout} s):")
        print("\n".join(f"  {t}" for t in tests))
        return 0
    import torch

    if not torch.cuda.is_available():
        sys.exit("gpu check: no CUDA device here (use --dry-run to list the checks)")
    results = Path(tempfile.mkdtemp()) / "rows.jsonl"
    env = {**os.environ, "BENCH_GPU_RESULTS": str(results), "RAY_AUTH_MODE": "disabled"}
    try:
        command = [sys.executable, "-m", "pytest", str(HERE), "-m", "gpu", "-q", "-p", "no:cacheprovider"]
        done = subprocess.run(command, env=env, cwd=HERE.parents[1], timeout=args.timeout, capture_output=True,
                              text=True)
        outcome = f"pytest exit {done.returncode}: {(done.stdout.strip().splitlines() or [''])[-1]}"
        tail = done.stdout[-3000:]
    except subprocess.TimeoutExpired:
        outcome, tail = f"stopped at the {args.timeout} s limit", ""
    rows = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
    text = _summary(rows, f"{torch.cuda.get_device_name()}, torch {torch.__version__}: {outcome}")
    Path(args.out).write_text(text + ("\n```\n" + tail + "\n```\n" if tail and "exit 0" not in outcome else ""))
    print(text)
    return 0 if "exit 0" in outcome else 1


if __name__ == "__main__":
    sys.exit(main())
