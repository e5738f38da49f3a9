"""`bench run suite=NAME`: every run of a suite as a Ray Tune trial, locally or on a cluster.

Each trial is one finetuning run (bench.run.execute). Its pretraining artifacts are built under a
file lock, so concurrent trials that need the same artifact wait for one another instead of
computing it twice. A trial whose run folder already holds a finished result with the same config
reports that result and does no work, and an unfinished run continues from its last epoch's
state (EpochStates), so `resume=true` continues an interrupted suite without redoing finished runs,
and the final store equals an uninterrupted one. Torch threads
per trial equal the CPUs Ray gives the trial, so concurrent trials do not oversubscribe the cores.
"""
from __future__ import annotations

import os
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.errors import BenchError

SUITE_KEYS = ("suite", "seeds", "resume", "out", "ray.address", "ray.cpus_per_trial", "ray.gpus_per_trial",
              "ray.gpus_per_run", "ray.max_concurrent", "methods", "train_fractions", "protocols", "explain",
              "explain.n")


def quiet_ray_env() -> None:
    """Before Ray is imported: no auth token file, no experiment banner (our callback reports
    progress), no log dedup, no default CSV/JSON/TensorBoard loggers."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")


@contextmanager
def ray_session(address: str | None) -> Iterator[None]:
    """Ray for one command: a local instance started and stopped here, or the cluster at `address`;
    an already initialised Ray (tests, notebooks) is used as it is."""
    quiet_ray_env()
    import ray

    started_here = not ray.is_initialized()
    if started_here:
        check_address(address)
        cache = os.environ.get("BENCH_CACHE")
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
                     configure_logging=True, runtime_env={"env_vars": {"BENCH_CACHE": cache}} if cache else None)
        except (ConnectionError, ValueError, RuntimeError, TimeoutError) as exc:
            first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
            raise BenchError(f"ray.address '{address}': cannot start or join Ray ({first[:200]})") from None
    try:
        yield
    finally:
        if started_here:
            ray.shutdown()


def check_address(address: str | None, timeout_s: float = 10.0) -> None:
    """A `ray.address` of HOST:PORT must answer a TCP connection within the timeout, checked before
    any work; else one line (ray.init itself retries an unreachable address for minutes)."""
    import socket

    if not address or address in ("auto", "local") or address.startswith("ray://"):
        return
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise BenchError(f"bad value for 'ray.address': '{address}'; expected auto or HOST:PORT")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as exc:
        raise BenchError(f"ray.address '{address}': nothing answers there within {timeout_s:g} s "
                         f"({exc.strerror or type(exc).__name__}); start the head with `ray start --head` "
                         f"or check the address") from None


def _trial(config: dict[str, Any]) -> None:
    """One finetuning run inside a Ray worker."""
    import json

    from omegaconf import OmegaConf
    from ray import tune

    from bench.run import execute, resolve_runs
    from bench.store import run_dir

    cfg = resolve_runs(dict(config["run"]))[0]
    folder = run_dir(cfg)
    done = folder / "metrics.json"
    wanted = OmegaConf.to_yaml(cfg, resolve=True)
    if done.exists() and (folder / "config.yaml").read_text() == wanted:
        skipped = True
    else:
        states = EpochStates(folder, wanted, config["invocation"], config["resume"])
        try:
            folder = execute(cfg, on_epoch=states.keep, resume=states.last(), command=config["command"])
            states.clear()
        finally:
            _release_memory()
        skipped = False
    test = json.loads((folder / "metrics.json").read_text())["test"]
    import ray

    tune.report({"auc": test["auc"] if test["auc"] is not None else float("nan"), "f1": test["f1"],
                 "folder": str(folder), "skipped": skipped, "node_id": ray.get_runtime_context().get_node_id()})


def _release_memory() -> None:
    """Hand a finished run's memory back to the OS before the reused worker takes the next trial."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass


class EpochStates:
    """The whole training state of a run's last epoch (model, optimiser, schedule, RNG states, best
    checkpoint so far), kept in `<out>/<suite>/_state/<run>.pt` and replaced atomically each epoch.

    A run continues from it when the file records the run's exact config and either this suite
    command wrote it (Ray retrying a failed trial) or the user asked for `resume=true`. The file is
    read with `weights_only=True`, so a results folder from elsewhere cannot run code; Ray's own
    experiment state (a pickle) is never restored."""

    def __init__(self, run_folder: Path, config_yaml: str, invocation: str, resume: bool) -> None:
        self.path = run_folder.parent / "_state" / f"{run_folder.name}.pt"
        self.config_yaml, self.invocation, self.resume = config_yaml, invocation, resume

    def keep(self, record: dict[str, Any], state: Any) -> None:
        import torch

        self.path.parent.mkdir(parents=True, exist_ok=True)
        staged = self.path.with_name(f".{self.path.name}.tmp")
        torch.save({"config": self.config_yaml, "invocation": self.invocation, "state": state()}, staged)
        staged.replace(self.path)

    def last(self) -> dict[str, Any] | None:
        import torch

        if not self.path.is_file():
            return None
        try:
            saved = torch.load(self.path, weights_only=True)
        except Exception as exc:  # a torn or foreign file: the run starts from epoch 0
            print(f"{self.path}: not a training state of this suite ({type(exc).__name__}); starting over",
                  file=sys.stderr)
            return None
        if not isinstance(saved, dict) or saved.get("config") != self.config_yaml:
            return None
        if self.resume or saved.get("invocation") == self.invocation:
            return saved["state"]
        return None

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


def _progress_callback(total: int):
    from ray import tune
    from tqdm.auto import tqdm

    class Progress(tune.Callback):
        """One line per finished run, and an overall bar."""

        def __init__(self) -> None:
            self.bar = tqdm(total=total, desc="suite", unit="run", file=sys.stderr, disable=None)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if "folder" not in result:  # a per-epoch checkpoint report, not the end of the run
                return
            run = trial.config["run"]
            extras = [run.get("protocol", "finetune"), run.get("variant"),
                      run.get("task") if run.get("task", "fracture") != "fracture" else "",
                      f"fraction {run['train_fraction']}" if run.get("train_fraction") else ""]
            tag = " ".join([run["method"], run["regime"], *filter(None, extras), f"seed {run['seed']}"])
            note = " (already done)" if result.get("skipped") else ""
            self.bar.write(f"{tag}: AUC {result['auc']:.3f} F1 {result['f1']:.3f}{note}", file=sys.stderr)
            self.bar.update()

        def on_trial_error(self, iteration, trials, trial, **info):
            self.bar.write(f"FAILED {trial.config['run']}: see {trial.local_path}", file=sys.stderr)

        def on_experiment_end(self, trials, **info):
            self.bar.close()

    return Progress()


def stage_order(regime: str) -> int:
    """Trials start in this order of regimes: first those that build a pretraining artifact from a
    corpus (one stage), then those that continue from such an artifact (the longest chains, started
    while the rest can still fill the other cores), last those with none."""
    from bench.regimes import REGIMES

    n = len(REGIMES[regime][0]) if regime in REGIMES else 0
    return {1: 0, 2: 1}.get(n, 2)


def schedule(runs: list[dict[str, str]]) -> list[dict[str, str]]:
    """The trial order. Concurrent trials that need the same artifact or the same features wait on
    its lock with their cores idle, so runs that share one are kept apart: `public_to_vertebrae` runs
    start after every `public` run, the frozen-feature protocols after the first one (which extracts
    the features they reuse) start after every other run, and the seeds and training fractions of one
    method (which share its artifacts) are far apart: the first seed of every method comes first."""
    from bench.protocols import PROTOCOLS

    frozen = [p for p in PROTOCOLS if p != "finetune" and any(r.get("protocol") == p for r in runs)]

    def key(run: dict[str, str]) -> tuple[int, float, bool, int, int]:
        protocol = run.get("protocol", "finetune")
        reuses = protocol in frozen[1:]
        return (int(run.get("seed", 0)), -float(run.get("train_fraction", 1)), reuses, stage_order(run["regime"]),
                list(PROTOCOLS).index(protocol))  # a method's protocols apart too

    return sorted(runs, key=key)


def run_suite(overrides: dict[str, str]) -> Path:
    from bench.explain import explained_per_kind
    from bench.run import resolve_runs
    from bench.suites import expand, load_suite, seeds_count

    suite = load_suite(overrides["suite"])
    seeds = seeds_count(overrides["seeds"], "'seeds'") if "seeds" in overrides else int(suite.get("seeds", 1))
    resume = _flag(overrides.get("resume", False), "resume")
    explain = _flag(overrides.get("explain", suite.get("explain", False)), "explain")
    explain_n = explained_per_kind(str(overrides.get("explain.n", "3")), "explain.n")
    out = Path(overrides.get("out", "runs")).resolve()
    cpus = _number(overrides, "ray.cpus_per_trial", "1", minimum=0.01)
    gpus = _number(overrides, "ray.gpus_per_trial", "0", minimum=0.0)
    per_run = int(_number(overrides, "ray.gpus_per_run", "0", minimum=0.0, whole=True))
    max_conc = int(_number(overrides, "ray.max_concurrent", "0", minimum=0.0, whole=True)) or None
    address = overrides.get("ray.address") or None
    check_address(address)
    common = {k: v for k, v in overrides.items() if k not in SUITE_KEYS}
    common.update(out=str(out), suite=suite["name"], threads=str(max(1, int(cpus))), progress="false")
    common.update(data_parallel(per_run, common))
    if per_run == 1:
        gpus = max(gpus, 1.0)
    if gpus == 0:
        common.setdefault("device", "cpu")
    runs = schedule([{**common, **r} for r in expand(suite, seeds, overrides.get("methods", ""),
                                                     overrides.get("train_fractions", ""),
                                                     overrides.get("protocols", ""))])
    configs = [cfg for r in runs for cfg in resolve_runs(dict(r))]  # every config is checked before any work
    check_gpus(configs, address)
    from bench.prepare import prepare_data

    kinds, seconds = prepare_data(configs)
    if kinds:
        print(f"data ready ({', '.join(kinds)}) in {seconds:.0f} s", file=sys.stderr)

    quiet_ray_env()
    from ray import tune

    storage = out / suite["name"] / "_ray"
    trainable = tune.with_resources(_trial, {"cpu": cpus, "gpu": gpus})
    param_space = {"run": tune.grid_search(runs), "resume": resume, "invocation": uuid.uuid4().hex,
                   "command": list(sys.argv)}  # the user's command line, recorded in each run's env.json
    t0 = time.perf_counter()
    with ray_session(address):
        check_gpus(configs, address)
        tuner = tune.Tuner(
            trainable, param_space=param_space,
            tune_config=tune.TuneConfig(max_concurrent_trials=max_conc, reuse_actors=True),
            run_config=tune.RunConfig(name="suite", storage_path=str(storage), verbose=0,
                                      failure_config=tune.FailureConfig(max_failures=1),
                                      callbacks=[_progress_callback(len(runs))]),
        )
        results = tuner.fit()
    return _finish(suite["name"], seeds, out, runs, results, time.perf_counter() - t0, explain, explain_n)


def data_parallel(per_run: int, common: dict[str, str]) -> dict[str, str]:
    """The run keys of `ray.gpus_per_run=N`, N >= 2: each run's training stages data-parallel on N
    workers (`devices=N`), on GPUs unless the command says device=cpu (then N CPU workers, gloo). The
    trial itself holds `ray.cpus_per_trial` CPUs and `ray.gpus_per_trial` GPUs (0: it evaluates on
    its CPUs while its workers hold the GPUs). N = 1 is one GPU for the trial itself."""
    if per_run < 2:
        return {}
    if "devices" in common and str(common["devices"]) != str(per_run):
        raise BenchError(f"ray.gpus_per_run={per_run} and devices={common['devices']} disagree; give one of them")
    return {"devices": str(per_run), "device": common.get("device", "cuda")}


def check_gpus(configs: list[Any], address: str | None) -> None:
    """Runs whose data-parallel workers take GPUs need that many in the Ray cluster (the Ray this command
    joins, or this machine's GPUs for a Ray it starts); one line, before any trial waits on GPUs that
    will never come."""
    wanted = max((int(c.devices) for c in configs if c.devices > 1 and c.device != "cpu"), default=0)
    if not wanted:
        return
    quiet_ray_env()
    import ray
    import torch

    if ray.is_initialized():
        have = ray.cluster_resources().get("GPU", 0)
    elif address is None:
        have = torch.cuda.device_count()
    else:
        return  # checked again once the cluster is joined
    if have < wanted:
        raise BenchError(f"ray.gpus_per_run={wanted}: the Ray cluster has {have:g} GPUs; add device=cpu to run "
                         f"each run's {wanted} workers on CPUs (gloo)")


def _number(overrides: dict[str, str], key: str, default: str, minimum: float, whole: bool = False) -> float:
    """A numeric `ray.*` key, checked before Ray starts."""
    text = str(overrides.get(key, default))
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value >= minimum or (whole and not value.is_integer()):
        kind = "a whole number" if whole else "a number"
        raise BenchError(f"bad value for '{key}': {text!r}; expected {kind} >= {minimum:g}")
    return value


def _flag(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "false"):
        return str(value).lower() == "true"
    raise BenchError(f"bad value for '{key}': {value!r}; expected true or false")


def _explain_finished(folders: list[str], n: int) -> list[str]:
    """`explain=true`: the finished finetuning runs explained one after the other (bench.explain).
    A run that cannot be explained is one line, and the others are still explained and reported."""
    from bench.explain import explain_run

    failed = []
    for folder in folders:
        path = Path(folder)
        if not (path / "model.safetensors").is_file():  # probes, or runs with save_model=false
            continue
        try:
            explain_run(path, n)
        except Exception as exc:  # noqa: BLE001 - one run's failure must not cost the suite its report
            line = f"explain {path.name}: {error_line(exc)}"
            print(line, file=sys.stderr)
            failed.append(line)
    return failed


def error_line(error: BaseException) -> str:
    """One line for a failed trial: the BenchError the run raised, or the exception's type and first line."""
    cause = getattr(error, "cause", None) or error
    if isinstance(cause, BenchError):
        return str(cause)
    first = next((line for line in str(cause).splitlines() if line.strip()), "")
    return f"{type(cause).__name__}: {first}"[:300]


def _finish(name: str, seeds: int, out: Path, runs: list, results: Any, wall_s: float, explain: bool = False,
            explain_n: int = 3) -> Path:
    """suite.json, the report (failed runs are cells marked "failed"), and an error when any run failed."""
    from bench.reports.build import build_report
    from bench.reports.efficiency import efficiency_rows, measure_machine, stage_compute
    from bench.store import dumps, write_text_atomic

    errors = [r for r in results if r.error]
    summary = [{"run": r.config["run"], "folder": r.metrics.get("folder"), "node_id": r.metrics.get("node_id"),
                "skipped": r.metrics.get("skipped"), "auc": r.metrics.get("auc"),
                "error": error_line(r.error) if r.error else None}
               for r in results]
    finished = [r["folder"] for r in summary if r["folder"] and not r["error"]]
    compute = stage_compute(finished)
    threads = [t for c in compute.values() for t in c["threads"]]
    machine = measure_machine(sorted(threads)[len(threads) // 2] if threads else 1)
    write_text_atomic(out / name / "suite.json", dumps({"suite": name, "seeds": seeds, "wall_s": wall_s,
                                                        "machine": machine,
                                                        "compute": efficiency_rows(compute, machine),
                                                        "runs": summary}))
    print(f"suite {name}: {len(runs) - len(errors)} of {len(runs)} runs finished in {wall_s:.0f} s", file=sys.stderr)
    report, unexplained = None, []
    if explain:
        unexplained = _explain_finished([r["folder"] for r in summary if r["folder"] and not r["error"]], explain_n)
    if len(errors) < len(runs):
        target = out.parent / "reports" / name if out.name == "runs" else out / "reports" / name
        report = build_report([out / name], target, name)
    if errors:
        where = f"; report: {report}" if report else ""
        raise BenchError(f"suite {name}: {len(errors)} of {len(runs)} run(s) failed, e.g. "
                         f"{error_line(errors[0].error)}{where}; fix and rerun with resume=true")
    if unexplained:
        raise BenchError(f"suite {name}: {len(unexplained)} run(s) could not be explained, e.g. {unexplained[0]}; "
                         f"report: {report}")
    assert report is not None
    return report
