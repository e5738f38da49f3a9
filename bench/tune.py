"""`bench tune method=X [regime=R] [samples=N] [metric=val_auc] [key=value ...]`: hyperparameter
search with ASHA on Ray Tune.

The search space is the method's (`Method.search_space`, plain data so that a plugin declares it
without importing Ray). Every trial finetunes on the training split and reports its validation
metrics after each epoch; ASHA stops unpromising trials at the rungs. Selection sees validation
only: the trials never evaluate the test split, so tuning cannot leak it. The result is
`<out>/tune/<method>-<regime>/tune.json` (every trial's sampled values and last validation
metrics) and the `bench run` line of the best trial.
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

from bench.errors import BenchError, choices_hint

TUNE_KEYS = ("samples", "metric", "grace_epochs", "out", "ray.address", "ray.cpus_per_trial", "ray.max_concurrent")
METRICS = ("val_auc", "val_f1", "val_ap", "val_loss", "val_macro_f1", "val_qwk")


def to_domain(spec: Any):
    """("loguniform", lo, hi) | ("uniform", lo, hi) | ("choice", [..]) -> a Ray Tune domain."""
    from ray import tune

    kind, *args = spec
    if kind == "loguniform":
        return tune.loguniform(*args)
    if kind == "uniform":
        return tune.uniform(*args)
    if kind == "choice":
        return tune.choice(list(args[0]))
    raise BenchError(f"search space entry {spec!r}: expected loguniform, uniform or choice")


def _trial(config: dict[str, Any]) -> None:
    from ray import tune

    from bench.finetune import finetune
    from bench.run import prepare, resolve_runs

    overrides = {**config["base"], **{k: str(v) for k, v in config["space"].items()}}
    cfg = resolve_runs(overrides)[0]
    method, data, model, _ = prepare(cfg)

    def report(entry: dict[str, Any], state: Any) -> None:
        tune.report({k: (float("nan") if v is None else v) for k, v in entry.items()
                     if isinstance(v, (int, float)) or v is None})

    finetune(method, data, cfg, model, on_epoch=report, evaluate_test=False)


def run_tune(overrides: dict[str, str]) -> Path:
    from bench.orchestrate import ray_session
    from bench.registry import create_method
    from bench.run import resolve_runs
    from bench.store import dumps, write_text_atomic

    if "method" not in overrides or "regime" not in overrides:
        raise BenchError("bench tune needs method=NAME and regime=NAME (see `bench list methods`)")
    metric = overrides.get("metric", "val_auc")
    if metric not in METRICS:
        raise BenchError(f"bad value for 'metric': '{metric}'; {choices_hint(metric, METRICS)}")
    from bench.orchestrate import _number, check_address

    check_address(overrides.get("ray.address") or None)
    samples = int(_number(overrides, "samples", "8", minimum=1, whole=True))
    grace = int(_number(overrides, "grace_epochs", "1", minimum=1, whole=True))
    cpus = _number(overrides, "ray.cpus_per_trial", "1", minimum=0.01)
    max_conc = int(_number(overrides, "ray.max_concurrent", "0", minimum=0, whole=True)) or None
    base = {k: v for k, v in overrides.items() if k not in TUNE_KEYS}
    base.update(threads=str(max(1, int(cpus))), progress="false")
    base.setdefault("device", "cpu")
    runs = resolve_runs(dict(base))
    cfg = runs[0]
    method = create_method(cfg.method, cfg)
    space_spec = method.search_space()
    clash = sorted(set(space_spec) & set(overrides))
    if clash:
        raise BenchError(f"'{clash[0]}' is searched by bench tune; drop it from the command line")
    for key in space_spec:  # every searched key must be a valid config key of this method
        resolve_runs({**base, key: str(_example(space_spec[key]))})
    out = Path(overrides.get("out", "runs")).resolve() / "tune" / f"{cfg.method}-{cfg.regime}"
    mode = "min" if metric == "val_loss" else "max"

    with ray_session(overrides.get("ray.address") or None):
        from ray import tune
        from ray.tune.schedulers import ASHAScheduler

        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=cfg.epochs, grace_period=grace,
                                  reduction_factor=2)
        tuner = tune.Tuner(
            tune.with_resources(_trial, {"cpu": cpus}),
            param_space={"base": base, "space": {k: to_domain(v) for k, v in space_spec.items()}},
            tune_config=tune.TuneConfig(metric=metric, mode=mode, scheduler=scheduler, num_samples=samples,
                                        max_concurrent_trials=max_conc),
            run_config=tune.RunConfig(name="tune", storage_path=str(out / "_ray"), verbose=0),
        )
        t0 = time.perf_counter()
        results = tuner.fit()
        wall = time.perf_counter() - t0
    trials = []
    for r in results:
        m = r.metrics or {}
        trials.append({"values": r.config["space"], "epochs": m.get("training_iteration"),
                       **{k: m.get(k) for k in METRICS if k in m}, "error": str(r.error) if r.error else None})
    finished = [t for t in trials if t.get(metric) is not None and not math.isnan(t[metric])]
    if not finished:
        raise BenchError(f"bench tune: no trial reported {metric}; see {out / '_ray'}")
    best = (max if mode == "max" else min)(finished, key=lambda t: t[metric])
    command = "bench run " + " ".join([f"{k}={v}" for k, v in overrides.items() if k not in TUNE_KEYS] +
                                      [f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k,
                                       v in best["values"].items()])
    write_text_atomic(out / "tune.json", dumps({"method": cfg.method, "regime": cfg.regime, "metric": metric,
                                                "mode": mode, "samples": samples, "max_epochs": cfg.epochs,
                                                "wall_s": wall, "space": {k: list(v) for k, v in space_spec.items()},
                                                "trials": trials, "best": best, "command": command}))
    stopped = sum(1 for t in trials if (t["epochs"] or 0) < cfg.epochs)
    print(f"tune {cfg.method} {cfg.regime}: {len(trials)} trials ({stopped} stopped early by ASHA) in {wall:.0f} s; "
          f"best {metric} {best[metric]:.3f}", file=sys.stderr)
    print(f"  {command}", file=sys.stderr)
    return out / "tune.json"


def _example(spec: Any) -> Any:
    kind, *args = spec
    return args[0][0] if kind == "choice" else args[0]
