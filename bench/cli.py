"""The `bench` command. Every user error is one line on stderr and exit status 2."""
from __future__ import annotations

import argparse
import re
import sys
import warnings
from pathlib import Path

from bench.errors import BenchError

# timm's import of its model zoo trips a torch deprecation notice on every run; a user's error must
# stay the one line the CLI promises
warnings.filterwarnings("ignore", message=r"`torch\.jit\.interface` is deprecated", category=FutureWarning)

LISTABLE = ("methods", "regimes", "datasets", "presets", "suites")


def _cmd_list(what: str) -> None:
    from bench.config import PRESETS
    from bench.regimes import REGIMES
    from bench.registry import DATASETS

    if what == "methods":
        from bench.catalogue import methods

        for row in methods():
            print(f"{row['name']:16s} regimes: {', '.join(row['regimes']):40s} {row['description']}")
    elif what == "regimes":
        for name, (_, meaning) in REGIMES.items():
            print(f"{name:20s} {meaning}")
    elif what == "datasets":
        for name in DATASETS.names():
            print(f"{name:16s} {getattr(DATASETS.get(name), 'description', '')}")
    elif what == "presets":
        for name in PRESETS:
            print(name)
    elif what == "suites":
        from bench.suites import list_suites, load_suite

        for name in list_suites():
            print(f"{name:16s} {load_suite(name).get('description', '')}")


def _cmd_run(args: list[str]) -> None:
    from bench.config import parse_overrides
    from bench.run import execute, resolve_runs

    overrides = parse_overrides(args)
    if "suite" in overrides:
        from bench.orchestrate import run_suite

        print(run_suite(overrides))
        return
    runs = resolve_runs(overrides)
    for cfg in runs:
        folder = execute(cfg)
        import json

        test = json.loads((folder / "metrics.json").read_text())["test"]
        grade_keys = ("macro_f1", "qwk", "sensitivity", "specificity", "auc")
        keys = grade_keys if cfg.task == "grade" else ("f1", "acc", "auc", "ap")
        shown = " ".join(f"{k}={test[k]:.3f}" if test[k] is not None else f"{k}=n/a" for k in keys)
        print(f"{cfg.method} {cfg.regime} seed {cfg.seed}: {shown} -> {folder}")


def _cmd_data(args: list[str]) -> None:
    from bench.config import parse_overrides

    commands = {"synth": _data_synth, "ingest": _data_ingest, "info": _data_info}
    if not args or args[0] not in commands:
        from bench.errors import choices_hint

        given = args[0] if args else ""
        raise BenchError(f"unknown data command '{given}'; {choices_hint(given, commands)}")
    if args[0] == "info":
        verify = "--verify" in args
        rest = [a for a in args[1:] if a != "--verify"]
        if len(rest) != 1:
            raise BenchError("usage: bench data info PATH [--verify]")
        return _data_info(rest[0], verify)
    commands[args[0]](parse_overrides(args[1:]))


def _data_synth(overrides: dict[str, str]) -> None:
    """Generate the synthetic benchmark of a preset: into the cache, or into out=DIR as a store."""

    from bench.config import compose
    from bench.datasets.loading import load_corpus, load_data, load_store, load_unlabelled, synthesize_store

    out = overrides.pop("out", "")
    overwrite = overrides.pop("overwrite", "false").lower() == "true"
    cfg = compose(overrides)
    if out:  # the labelled and unlabelled vertebrae as one store, readable with data=DIR
        data = load_store(synthesize_store(cfg, Path(out), overwrite), cfg)
    else:
        data = load_data(cfg)
    table = data.table
    grades = table.grade.value_counts().sort_index().to_dict()
    print(f"{out or data.name}: {len(table)} labelled vertebrae from {table.patient_id.nunique()} patients, "
          f"{int(table.label.sum())} fractured ({table.label.mean():.1%}; grades {grades}), "
          f"crops {data.images.shape[1:]}")
    if not out:
        unlabelled = load_unlabelled(cfg)
        patients = unlabelled.table.patient_id.nunique()
        print(f"unlabelled: {len(unlabelled.table)} vertebrae from {patients} other patients")
        for kind in ("body_ct", "video"):
            corpus = load_corpus(cfg, kind)
            print(f"{kind} corpus: {corpus.shape[0]} items of shape {corpus.shape[1:]} ({corpus.dtype})")


def _data_ingest(overrides: dict[str, str]) -> None:
    from bench.config import IngestConfig, structured
    from bench.datasets.ingest import IngestOptions
    from bench.datasets.ingest_many import find_cases, ingest

    cfg = structured(IngestConfig, overrides)
    labels = cfg.labels
    if cfg.masks and not cfg.rsna:
        raise BenchError("masks=FOLDER holds masks for the studies of rsna=FOLDER: it needs rsna=FOLDER")
    if cfg.grades and not cfg.verse:
        raise BenchError("grades=FILE is the VerSe'19 grades spreadsheet: it needs verse=FOLDER")
    if cfg.verse:
        from bench.datasets.verse import find_verse_cases, read_verse_grades

        if cfg.ct or cfg.mask or cfg.cases or (cfg.labels and cfg.grades):
            raise BenchError("verse=FOLDER finds its own cases and labels: drop ct=, mask=, cases= (and give "
                             "either labels= or grades=)")
        cfg.label_map = cfg.label_map or "verse"
        cases = find_verse_cases(cfg.verse)
        labels = read_verse_grades(cfg.grades) if cfg.grades else labels
    elif cfg.rsna:
        from bench.datasets.rsna import SEGMENTATION_LABEL_MAP, find_rsna_cases, read_rsna_labels

        if cfg.ct or cfg.mask or cfg.cases:
            raise BenchError("rsna=FOLDER finds its own cases and labels: drop ct=, mask=, cases=")
        cfg.label_map = cfg.label_map or SEGMENTATION_LABEL_MAP
        cases, without = find_rsna_cases(cfg.rsna, cfg.masks, cfg.masks_label_map)
        labels = labels or read_rsna_labels(cfg.rsna)
        if without:
            print(f"{len(without)} of {len(cases) + len(without)} studies have no mask (segmentations/ or masks=) "
                  f"and are not ingested, e.g. {without[0]}", file=sys.stderr)
    elif not cfg.label_map:
        raise BenchError("bench data ingest needs label_map=NAME (verse, totalseg_v1, totalseg_v2): "
                         "label ids differ between sources")
    else:
        cases = find_cases(cfg.ct, cfg.mask, cfg.cases, cfg.centroids, cfg.patient, cfg.mask_suffix)
    opts = IngestOptions(label_map=cfg.label_map, size=cfg.size, spacing=cfg.spacing,
                         max_missing=cfg.max_missing, min_volume_ml=cfg.min_volume_ml, dtype=cfg.dtype)
    path, summary = ingest(cases, opts, cfg.out, labels=labels, workers=cfg.workers,
                           overwrite=cfg.overwrite, progress=cfg.progress)
    print(f"{path}: {summary['crops']} crops from {summary['cases']} case(s), {summary['skipped']} skipped")
    for row in summary["skipped_rows"].itertuples():
        print(f"  skipped {row.patient_id} {row.vertebra}: {row.reason}")
    report = summary["labels_report"]
    if report.get("labels") is not None or "labelled" in report:
        print(f"  labels: {report['labelled']} labelled, {len(report['images_without_row'])} crops without a row, "
              f"{len(report['rows_without_image'])} rows without a crop, {len(report['duplicate_rows'])} duplicated")


def _data_info(path: str, verify: bool = False) -> None:
    """A store's summary; `--verify` checks every crop against its checksum (open checks a sample)."""
    from bench.datasets.cropstore import open_store, verify_crops

    crops, manifest, meta = open_store(path)
    if verify:
        print(f"{path}: {verify_crops(Path(path), crops, manifest)} crops match their checksums")
    print(f"{path}: {len(crops)} crops of {meta['size']}^3 at {meta['spacing_mm']} mm ({meta['dtype']}, frame "
          f"{meta['frame']}) from {manifest.patient_id.nunique()} patients; "
          f"labelled {int((manifest.label >= 0).sum())}, "
          f"fractured {int((manifest.label == 1).sum())}, skipped {meta['skipped']}")


def _cmd_report(args: list[str]) -> None:
    """bench report [RUN_DIR ...] [out=DIR] [name=NAME] [bootstrap=N]"""

    from bench.config import parse_overrides

    dirs = [Path(a) for a in args if "=" not in a]
    opts = parse_overrides([a for a in args if "=" in a])
    unknown = set(opts) - {"out", "name", "bootstrap"}
    if unknown:
        from bench.errors import choices_hint

        key = sorted(unknown)[0]
        raise BenchError(f"unknown report key '{key}'; {choices_hint(key, ['out', 'name', 'bootstrap'])}")
    try:
        n_boot = int(opts.get("bootstrap", "300"))
    except ValueError:
        n_boot = -1
    if not 1 <= n_boot <= 100_000:
        raise BenchError(f"bad value for 'bootstrap': '{opts['bootstrap']}'; expected a whole number from 1 to 100000")
    dirs = dirs or [Path("runs")]
    safe = r"(?!\.{1,2}$)[A-Za-z0-9_.+=-]+"
    name = opts.get("name") or re.sub(r"[^A-Za-z0-9_.+=-]", "_", dirs[0].resolve().name if len(dirs) == 1 else "")
    name = name if "name" in opts or re.fullmatch(safe, name) else "report"
    if not re.fullmatch(safe, name):
        raise BenchError(f"bad value for 'name': '{name}'; expected one folder name inside reports/ (letters, digits, "
                         f"'_', '.', '+', '=', '-'; no '/' or '..')")
    out = Path(opts.get("out") or Path("reports") / name)
    from bench.reports.build import build_report

    print(build_report(dirs, out, name, n_boot))


def _cmd_cost(args: list[str]) -> None:
    """`bench cost [methods=a,b] [mfu=0.3] [batch=2] [gpu=A40|H100|GiB] [out=FILE.md] [model.KEY=VALUE ...]`:
    one paper-preset step of every method (with the given config keys, e.g. model.grad_checkpointing=true),
    FLOPs, memory and projected GPU time per epoch, as a Markdown table; with gpu=, whether each
    method fits that GPU and the micro-batch and checkpointing that make it fit."""
    from bench.cost import fit_markdown, fits, gpu_gib, markdown, method_cost, projections
    from bench.errors import choices_hint
    from bench.registry import list_methods

    opts = dict(a.split("=", 1) for a in args if "=" in a)
    overrides = {k: v for k, v in opts.items() if "." in k}  # config keys of the methods, checked by their configs
    stray = [a for a in args if "=" not in a] + sorted(set(opts) - set(overrides) - {"methods", "mfu", "out",
                                                                                    "preset", "batch", "gpu"})
    if stray:
        raise BenchError(f"unknown cost argument '{stray[0]}'; "
                         f"{choices_hint(stray[0], ['methods=', 'mfu=', 'out=', 'preset=', 'batch=', 'gpu='])}")
    gpu = opts.get("gpu")
    if gpu is not None:
        gpu_gib(gpu)  # a bad value fails before any step runs
    names = [m for m in list_methods() if not m.startswith("_")]
    chosen = opts["methods"].split(",") if opts.get("methods") else names
    for name in chosen:
        if name not in names:
            raise BenchError(f"unknown method '{name}' in methods=; {choices_hint(name, names)}")
    try:
        mfu = float(opts.get("mfu", "0.3"))
    except ValueError:
        mfu = -1.0
    if not 0 < mfu <= 1:
        raise BenchError(f"bad value for 'mfu': '{opts.get('mfu')}'; expected a fraction in (0, 1]")
    batch = opts.get("batch", "2")
    if not batch.isdigit() or int(batch) < 1:
        raise BenchError(f"bad value for 'batch': '{batch}'; expected a whole number >= 1")
    rows = []
    for name in chosen:
        try:
            rows.append(method_cost(name, opts.get("preset", "paper"), int(batch), overrides,
                                    checkpointed=gpu is not None))
        except RuntimeError as exc:  # a step that cannot run at this preset is the finding, not a crash
            preset = opts.get("preset", "paper")
            raise BenchError(f"method '{name}' at preset {preset}: {str(exc).splitlines()[0]}") from None
        print(f"{name}: {rows[-1]['finetune_cpu_s']:.1f} s per finetuning step on this CPU", file=sys.stderr)
    table = projections(rows, mfu)
    text = markdown(table, mfu)
    if gpu is not None:
        text += "\n\n" + fit_markdown(fits(table, gpu), gpu)
    if opts.get("out"):
        from bench.store import write_text_atomic

        write_text_atomic(Path(opts["out"]), text + "\n")
    print(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench", description="Benchmark pretraining methods for 3D CT.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_list = sub.add_parser("list", help="list methods, regimes, datasets or presets")
    p_list.add_argument("what", nargs="?", default="methods", choices=LISTABLE)
    p_run = sub.add_parser("run", help="run method=NAME [regime=NAME] [key=value ...]")
    p_run.add_argument("overrides", nargs="*", metavar="key=value")
    p_tune = sub.add_parser("tune", help="tune method=NAME regime=NAME [samples=N] [metric=val_auc] [key=value ...]")
    p_tune.add_argument("overrides", nargs="*", metavar="key=value")
    p_report = sub.add_parser("report", help="report [RUN_DIR ...] [out=DIR] [name=NAME] [bootstrap=N]")
    p_report.add_argument("args", nargs="*")
    p_explain = sub.add_parser("explain", help="explain RUN_DIR... [n=3]: attribution maps and localisation scores")
    p_explain.add_argument("args", nargs="*")
    p_cost = sub.add_parser("cost", help="cost [methods=a,b] [mfu=0.3] [batch=2] [gpu=A40|H100|GiB] [out=FILE.md]: "
                                         "paper-preset steps, "
                                         "FLOPs, projected GPU time and memory")
    p_cost.add_argument("args", nargs="*")
    p_weights = sub.add_parser("weights", help="weights list | weights fetch [methods=a,b] | weights check FILE "
                                               "method=NAME [preset=paper]: published checkpoints, their download, "
                                               "and a load report without training")
    p_weights.add_argument("args", nargs="*")
    p_data = sub.add_parser("data", help="data synth|ingest [key=value ...] | data info PATH")
    p_data.add_argument("args", nargs="*")
    p_data.add_argument("--verify", action="store_true", help="data info: check every crop against its checksum")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "list":
            _cmd_list(args.what)
        elif args.command == "run":
            _cmd_run(args.overrides)
        elif args.command == "tune":
            from bench.config import parse_overrides
            from bench.tune import run_tune

            print(run_tune(parse_overrides(args.overrides)))
        elif args.command == "data":
            _cmd_data(args.args + (["--verify"] if args.verify else []))
        elif args.command == "report":
            _cmd_report(args.args)
        elif args.command == "cost":
            _cmd_cost(args.args)
        elif args.command == "weights":
            from bench.weights_cli import weights_command

            print(weights_command(args.args))
        elif args.command == "explain":
            from bench.explain import explain_command

            for folder in explain_command(args.args):
                print(folder)
    except BenchError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a read-only or full disk, a path that cannot exist: the file and the reason
        where = f" '{exc.filename}'" if getattr(exc, "filename", None) else ""
        print(f"bench: error: cannot read or write{where}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
