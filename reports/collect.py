"""Read the results store into one table: a row per finetuning run."""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from bench.errors import BenchError

GRADE_METRICS = ("macro_f1", "qwk", "grade_acc", "recall_g0", "recall_g1", "recall_g2", "recall_g3")
TABLE2_SWITCHES = ("video_pretraining", "vertebra_pretraining", "multi_view", "pe_cropping", "format_adaptation")


def find_runs(roots: list[Path]) -> list[Path]:
    folders = []
    for root in roots:
        if not root.exists():
            raise BenchError(f"run folder '{root}' does not exist")
        if (root / "metrics.json").is_file():
            folders.append(root)
        else:
            folders += sorted(p.parent for p in root.rglob("metrics.json") if not p.parent.name.startswith("."))
    return folders


def variant_of(config: dict[str, Any]) -> str:
    """Table 2 variant name ("full", "no_pe_cropping", ...) from the switches a run turned off."""
    model = config.get("model") or {}
    if not all(k in model for k in TABLE2_SWITCHES) or config.get("method") != "video_ct_mae":
        return ""
    off = [k for k in TABLE2_SWITCHES if model.get(k) is False]
    order = ["video_pretraining", "vertebra_pretraining", "multi_view", "pe_cropping", "format_adaptation"]
    return "_".join(f"no_{k}" for k in sorted(off, key=order.index)) if off else "full"


def geometry_of(metrics: dict[str, Any], config: dict[str, Any]) -> str:
    """The input a run's model saw, as "48^3 at 2.00 mm": the report compares cells of one geometry only."""
    seen = (metrics.get("data") or {}).get("input") or {}
    size = seen.get("crop_size", config.get("crop_size"))
    spacing = seen.get("spacing_mm")
    text = f"{size}^3"
    try:
        return text + ("" if spacing is None or spacing != spacing else f" at {float(spacing):.2f} mm")
    except (TypeError, ValueError):
        return text


def load_runs(roots: list[Path]) -> pd.DataFrame:
    rows = []
    for folder in find_runs(roots):
        try:
            metrics = json.loads((folder / "metrics.json").read_text())
            config = yaml.safe_load((folder / "config.yaml").read_text())
            env = json.loads((folder / "env.json").read_text())
            broken = _broken(folder, metrics, config, env)
        except (OSError, ValueError, yaml.YAMLError) as exc:
            broken = f"unreadable ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        if broken:  # one broken folder must not take the whole report down
            print(f"bench report: skipping run '{folder}': {broken}", file=sys.stderr)
            continue
        test = metrics.get("test", {})
        init = metrics.get("pretraining", {})
        rows.append({
            "folder": str(folder), "method": config["method"], "regime": config["regime"], "seed": config["seed"],
            "suite": config.get("suite", ""), "preset": config.get("preset", ""),
            "variant": variant_of(config) or str(config.get("variant") or ""), "identity": cell_identity(config),
            "task": config.get("task", "fracture"), "train_fraction": float(config.get("train_fraction", 1.0)),
            "protocol": config.get("protocol", "finetune"),
            "val_auc": metrics.get("val", {}).get("auc"), "val_n": metrics.get("val", {}).get("n"),
            "val_n_positive": metrics.get("val", {}).get("n_positive"), "n_test_positive": test.get("n_positive"),
            **{k: test.get(k) for k in ("f1", "acc", "auc", "ap", "sensitivity", "specificity", "balanced_acc")},
            **{k: test.get(k) for k in GRADE_METRICS},
            "n_test": test.get("n"), "s_per_epoch": metrics.get("cost", {}).get("s_per_epoch"),
            "train_s": metrics.get("cost", {}).get("train_s"), "pretrain_s": init.get("pretrain_s"),
            "n_params": metrics.get("cost", {}).get("n_params"), "epochs": metrics.get("epochs", []),
            "pretrain_curve": init.get("pretrain_curve"), "artifact": init.get("artifact"),
            "fingerprint": metrics.get("data", {}).get("fingerprint", ""), "data": metrics.get("data", {}).get("name",
                                                                                                               ""),
            "commit": (env.get("git") or {}).get("commit"), "torch": env.get("versions", {}).get("torch"),
            "cpu": env.get("hardware", {}).get("cpu"), "cuda": env.get("hardware", {}).get("cuda_devices"),
            "started": env.get("started"), "config_text": (folder / "config.yaml").read_text(),
            "geometry": geometry_of(metrics, config),
            "pretrain_seed": init.get("pretrain_seed"), "pretrain_pinned": bool(init.get("pretrain_seed_pinned")),
            "weights": weights_of(init),
        })
    if not rows:
        raise BenchError(f"no runs (metrics.json) under {', '.join(map(str, roots))}")
    return split_cells(pd.DataFrame(rows))


# Keys that say where and how a run executed, or which seed it drew; two runs that differ only in
# these are seeds of one cell. Anything else (a learning rate, a pinned pretraining seed, the data)
# makes another cell.
EXECUTION_KEYS = ("seed", "out", "suite", "progress", "threads", "num_workers", "cache_dir", "device", "compile",
                  "channels_last", "deterministic", "save_model")
CELL_KEYS = ("method", "regime", "variant", "protocol", "task", "train_fraction", "geometry")


def weights_of(init: dict[str, Any]) -> str:
    """What a run's public stage was: the real file (by its hash), the embedded stand-in, or "" when
    its regime has no public stage."""
    if "public" not in (init.get("plan") or []):
        return ""
    digest = init.get("public_file_sha256")
    return f"real file, sha256 {digest[:12]}" if digest else "embedded stand-in"


def cell_identity(config: dict[str, Any]) -> str:
    """A digest of a run's config without its seed and execution keys (and the folder real weights
    were found in): what makes it a cell."""
    what = {k: v for k, v in config.items() if k not in EXECUTION_KEYS}
    if isinstance(what.get("weights"), dict):
        what["weights"] = {k: v for k, v in what["weights"].items() if k != "dir"}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:10]


def split_cells(runs: pd.DataFrame) -> pd.DataFrame:
    """Runs that would share a cell but whose configs differ in more than the seed become separate
    cells: each gets its config digest in its variant ("cfg 1a2b3c"), so no cell averages them."""
    runs = runs.copy()
    for _, group in runs.groupby(list(CELL_KEYS), sort=False):
        if group["identity"].nunique() > 1:
            runs.loc[group.index, "variant"] = [f"{v} cfg {i[:6]}".strip()
                                                for v, i in zip(group.variant, group.identity)]
    return runs


def _broken(folder: Path, metrics: Any, config: Any, env: Any) -> str:
    """Why a run folder cannot enter a report, or "" when it can."""
    if not isinstance(config, dict) or not {"method", "regime", "seed"} <= set(config):
        return "config.yaml is empty or lacks method, regime and seed"
    if not isinstance(metrics, dict) or not isinstance(metrics.get("test"), dict):
        return "metrics.json has no test metrics"
    if not isinstance(env, dict):
        return "env.json is not a mapping"
    if not (folder / "predictions.parquet").is_file():
        return "predictions.parquet is missing"
    try:
        import pyarrow.parquet as pq

        columns = set(pq.read_schema(folder / "predictions.parquet").names)
    except Exception as exc:  # noqa: BLE001 (pyarrow raises several kinds for a file that is not parquet)
        return f"predictions.parquet is unreadable ({type(exc).__name__})"
    lacking = {"patient_id", "vertebra", "label", "score", "prediction"} - columns
    if lacking:
        return f"predictions.parquet lacks column(s) {', '.join(sorted(lacking))}"
    for split in ("test", "val"):
        values = metrics.get(split) or {}
        if not isinstance(values, dict):
            return f"metrics.json '{split}' is not a mapping"
        wrong = [k for k, v in values.items() if v is not None and not isinstance(v, (int, float))
                 and k in ("f1", "acc", "auc", "ap", "n", "n_positive", "sensitivity", "specificity")]
        if wrong:
            return f"metrics.json '{split}.{wrong[0]}' is {values[wrong[0]]!r}, expected a number or null"
    return ""


def load_failures(roots: list[Path]) -> list[dict[str, Any]]:
    """Failed runs of the suites under `roots` (from each suite's suite.json): run keys and error."""
    out = []
    for root in roots:
        for path in [root / "suite.json", *root.glob("*/suite.json")]:
            if not path.is_file():
                continue
            try:
                summary = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            for run in summary.get("runs", []):
                if run.get("error"):
                    spec = run.get("run", {})
                    first = next((line for line in str(run["error"]).splitlines() if line.strip()), "")
                    out.append({"method": spec.get("method", "?"), "regime": spec.get("regime", "?"),
                                "protocol": spec.get("protocol", "finetune"), "variant": spec.get("variant", ""),
                                "seed": spec.get("seed", "?"), "error": first[:300]})
    return out
