"""Many cases into one crop store: case discovery, parallel ingestion, the labels join."""
from __future__ import annotations

import hashlib
import os
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from bench.datasets.cropstore import StoreWriter
from bench.datasets.dicom import is_dicom_series
from bench.datasets.ingest import FRAME, Case, IngestOptions, ingest_case
from bench.datasets.labelmaps import check_vertebra_name
from bench.envinfo import now
from bench.errors import BenchError

NIFTI_SUFFIXES = (".nii.gz", ".nii")


def _stem(path: Path) -> str:
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def find_cases(ct: str = "", mask: str = "", cases: str = "", centroids: str = "", patient: str = "",
               mask_suffix: str = "") -> list[Case]:
    """Cases from ct=FILE mask=FILE, ct=DIR mask=DIR (NIfTIs paired by file name, the mask's name with
    `mask_suffix` before its extension: CTSpine1K-style `X.nii.gz` + `X_seg.nii.gz`), ct=DICOM_SERIES_DIR
    mask=FILE, or cases=CSV (whose ct column may name DICOM series folders too)."""
    if cases:
        path = Path(cases)
        if not path.is_file():
            raise BenchError(f"cases '{cases}': no such file")
        table = pd.read_csv(path, dtype=str)
        missing = {"ct", "mask", "patient_id"} - set(table.columns)
        if missing:
            raise BenchError(f"cases '{cases}': missing column(s) {', '.join(sorted(missing))}; expected ct, mask, "
                             f"patient_id[, centroids]")
        resolve = lambda p: str(p if Path(p).is_absolute() else path.parent / p)  # noqa: E731
        return [Case(resolve(r.ct), resolve(r.mask), r.patient_id,
                     resolve(r.centroids) if "centroids" in table and isinstance(r.centroids, str) else None)
                for r in table.itertuples()]
    if not ct or not mask:
        raise BenchError("bench data ingest needs ct=PATH and mask=PATH (files or folders), or cases=CSV")
    ct_path, mask_path = Path(ct), Path(mask)
    if is_dicom_series(ct_path) and not mask_path.is_dir():  # one CT given as a DICOM series
        return [Case(ct, mask, patient or ct_path.name, centroids or None)]
    if ct_path.is_dir() != mask_path.is_dir():
        raise BenchError(f"ct '{ct}' and mask '{mask}' must both be files or both be folders")
    if ct_path.is_dir():
        cts = sorted(p for p in ct_path.iterdir() if p.name.endswith(NIFTI_SUFFIXES))
        pairs = [(p, mask_path / p.name.replace(_stem(p), _stem(p) + mask_suffix, 1)) for p in cts]
        unpaired = [str(m) for _, m in pairs if not m.exists()]
        if unpaired:
            raise BenchError(f"mask folder '{mask}' lacks {len(unpaired)} file(s) named as in '{ct}', e.g. "
                             f"{unpaired[0]}")
        if not pairs:
            raise BenchError(f"ct folder '{ct}' holds no .nii or .nii.gz files")
        return [Case(str(c), str(m), _stem(c)) for c, m in pairs]
    return [Case(ct, mask, patient or _stem(ct_path), centroids or None)]


def read_labels(path: str) -> pd.DataFrame:
    """patient_id, vertebra, fracture (0/1)[, grade 0-3], validated row by row."""
    p = Path(path)
    if not p.is_file():
        raise BenchError(f"labels '{path}': no such file")
    try:
        table = pd.read_csv(p, dtype={"patient_id": str, "vertebra": str})
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise BenchError(f"labels '{path}': not a readable CSV ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else 'empty'}); expected patient_id, vertebra, "
                         f"fracture[, grade]") from None
    missing = {"patient_id", "vertebra", "fracture"} - set(table.columns)
    if missing:
        raise BenchError(f"labels '{path}': missing column(s) {', '.join(sorted(missing))}; expected patient_id, "
                         f"vertebra, fracture[, grade]")
    for row, name in enumerate(table["vertebra"], start=2):
        check_vertebra_name(str(name), f"labels '{path}' line {row}")
    if not table["fracture"].isin([0, 1]).all():
        bad = table.loc[~table["fracture"].isin([0, 1]), "fracture"].iloc[0]
        raise BenchError(f"labels '{path}': column fracture holds '{bad}'; expected 0 or 1")
    if "grade" in table:
        if not table["grade"].isin([0, 1, 2, 3]).all():
            bad = table.loc[~table["grade"].isin([0, 1, 2, 3]), "grade"].iloc[0]
            raise BenchError(f"labels '{path}': column grade holds '{bad}'; expected 0, 1, 2 or 3")
        clash = table[(table["grade"] > 0) != (table["fracture"] == 1)]
        if len(clash):
            r = clash.iloc[0]
            raise BenchError(f"labels '{path}': {r.patient_id} {r.vertebra} has fracture={r.fracture} but "
                             f"grade={r.grade}")
    return table


def join_labels(manifest: pd.DataFrame, labels: pd.DataFrame | None) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Attach label/grade by (patient_id, vertebra NAME); unlabelled crops get label -1."""
    manifest = manifest.copy()
    if labels is None:
        manifest["label"], manifest["grade"] = -1, -1
        return manifest, {"labels": None}
    key = ["patient_id", "vertebra"]
    dup_mask = labels.duplicated(key, keep=False)
    duplicates = labels[dup_mask]
    conflicting = duplicates.groupby(key).filter(lambda g: len(g.drop_duplicates()) > 1)
    if len(conflicting):
        r = conflicting.iloc[0]
        raise BenchError(f"labels: conflicting duplicate rows for {r.patient_id} {r.vertebra}")
    labels = labels.drop_duplicates(key)
    merged = manifest.merge(labels, on=key, how="left", indicator=True)
    merged["label"] = merged["fracture"].fillna(-1).astype(int)
    merged["grade"] = merged["grade"].fillna(-1).astype(int) if "grade" in merged else -1
    no_row = merged[merged["_merge"] == "left_only"]
    images = set(zip(manifest.patient_id, manifest.vertebra))
    no_image = [f"{p}:{v}" for p, v in zip(labels.patient_id, labels.vertebra) if (p, v) not in images]
    report = {
        "labelled": int((merged["label"] >= 0).sum()),
        "images_without_row": [f"{p}:{v}" for p, v in zip(no_row.patient_id, no_row.vertebra)],
        "rows_without_image": no_image,
        "duplicate_rows": [f"{p}:{v}" for p, v in duplicates[key].drop_duplicates().itertuples(index=False)],
    }
    return merged.drop(columns=["fracture", "_merge"]), report


def _one_row_per_vertebra(manifest: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray | None, pd.DataFrame]:
    """A vertebra seen by two series of one patient is kept from the series with less of it outside
    the scan (the first on a tie); the other rows become skipped rows. Two cases without `series`
    that share a patient id and a vertebra are an error: the id names two CTs."""
    key = ["patient_id", "vertebra"]
    dup = manifest.duplicated(key, keep=False)
    if not dup.any():
        return manifest, None, pd.DataFrame()
    if "series" not in manifest or manifest.loc[dup, "series"].isna().any():
        r = manifest[dup].iloc[0]
        raise BenchError(f"vertebra {r.vertebra} of patient {r.patient_id} appears in two cases; patient ids must "
                         f"name one CT each")
    best = manifest.assign(_row=range(len(manifest))).sort_values(["missing_fraction", "_row"], kind="stable")
    kept_rows = np.sort(best.drop_duplicates(key)["_row"].to_numpy())
    keep = np.zeros(len(manifest), bool)
    keep[kept_rows] = True
    chosen = manifest[keep].set_index(key)["series"]
    dropped = manifest[~keep]
    also_seen = dropped.assign(reason=[f"also in series {chosen.loc[(p, v)]}, which holds more of it"
                                       for p, v in zip(dropped.patient_id, dropped.vertebra)])
    return manifest[keep].reset_index(drop=True), keep, also_seen[[*key, "source", "series", "reason"]]


def _same_content(a: str | Path, b: str | Path) -> bool:
    """Two files (or DICOM folders: never) with the same bytes, compared by size first."""
    a, b = Path(a), Path(b)
    if not (a.is_file() and b.is_file()) or a.stat().st_size != b.stat().st_size:
        return False
    from bench.weights import sha256_of

    return sha256_of(a) == sha256_of(b)


def _check_inputs(cases: list[Case], out: str, labels: str) -> None:
    """Refuse inputs that the store would replace, and a CT given as its own mask."""
    target = Path(out).resolve()
    for case in cases:
        if Path(case.ct).resolve() == Path(case.mask).resolve():
            raise BenchError(f"ct and mask are the same path '{case.ct}'; expected a CT and its vertebra mask")
        if _same_content(case.ct, case.mask):
            raise BenchError(f"mask '{case.mask}' has the same content as the CT '{case.ct}'; expected its vertebra "
                             f"mask (an integer label image)")
        for given in (case.ct, case.mask, case.centroids, labels):
            if given and target in (Path(given).resolve(), *Path(given).resolve().parents):
                raise BenchError(f"out '{out}' holds the input '{given}'; writing the store there would replace it, "
                                 f"choose another out=")


def mask_chunk(chunk: str | Path) -> str:
    """Where a case's ground-truth masks wait next to its crops until the store is assembled."""
    return str(chunk).removesuffix(".npy") + ".mask.npy"


def _work(index: int, case: Case, opts: IngestOptions, chunk: str) -> tuple[int, list, list, int]:
    masks: list[np.ndarray] = []
    crops, rows, skipped = ingest_case(case, opts, masks)
    from bench.store import naming

    with naming(chunk):
        np.save(chunk, crops)
        np.save(mask_chunk(chunk), np.stack(masks) if masks else np.empty((0,) + crops.shape[1:], np.uint8))
    return index, rows, skipped, len(crops)


def case_digest(case: Case) -> str:
    """A digest of a case's input bytes (CT file or DICOM folder, mask, centroids) and identity."""
    h = hashlib.blake2b(f"{case.patient_id}|{case.series}|{case.label_map}".encode(), digest_size=16)
    for given in (case.ct, case.mask, case.centroids):
        path = Path(given) if given else None
        files = sorted(p for p in path.iterdir() if p.is_file()) if path and path.is_dir() else [path]
        for file in files:
            if file is not None and file.is_file():
                h.update(file.name.encode())
                with open(file, "rb") as handle:
                    h.update(hashlib.file_digest(handle, "blake2b").digest())
    return h.hexdigest()


def ingest(cases: list[Case], opts: IngestOptions, out: str, labels: str | pd.DataFrame = "", workers: int = 0,
           overwrite: bool = False, progress: bool = True) -> tuple[Path, dict[str, Any]]:
    """Ingest every case into the store at `out`; returns its path and a summary. `labels` is a
    labels CSV, or a table already read from a data set's own label file. An interrupted
    ingestion into the same `out=` with the same options continues where it stopped. Two ingestions
    into one `out=` take turns (a lock named after it in the temp folder, so a refused ingestion leaves
    nothing beside `out=`): the second finds the first's store and stops."""
    import tempfile

    from bench.locks import locked

    opts.validate()
    name = hashlib.sha256(str(Path(out).resolve()).encode()).hexdigest()[:24]
    with locked(Path(tempfile.gettempdir()) / "vertebench-locks" / f"ingest-{name}"):
        return _ingest(cases, opts, out, labels, workers, overwrite, progress)


def _ingest(cases: list[Case], opts: IngestOptions, out: str, labels: str | pd.DataFrame, workers: int,
            overwrite: bool, progress: bool) -> tuple[Path, dict[str, Any]]:
    if isinstance(labels, pd.DataFrame):
        label_table, labels = labels, ""
    else:
        label_table = read_labels(labels) if labels else None
    _check_inputs(cases, out, labels)
    writer = StoreWriter(out, overwrite=overwrite, plan={"options": asdict(opts)})
    try:
        digests = [case_digest(c) for c in cases]
        results: dict[int, tuple[list, list, int]] = {}
        for i, digest in enumerate(digests):
            record = writer.finished_chunk(i, digest)
            if record is not None:
                results[i] = (record["rows"], record["skipped"], record["n"])
        if results:
            print(f"resuming an interrupted ingestion: {len(results)} of {len(cases)} case(s) already done",
                  file=sys.stderr)
        todo = [i for i in range(len(cases)) if i not in results]
        workers = max(1, min(workers or os.cpu_count() or 1, len(todo)))
        bar = tqdm(total=len(cases), initial=len(results), desc="ingest", unit="case", disable=not progress)

        def done(i: int, rows: list, skipped: list, n: int) -> None:
            record = writer.finish_chunk(i, {"digest": digests[i], "rows": rows, "skipped": skipped, "n": n})
            results[i] = (record["rows"], record["skipped"], n)  # as a resumed run will read them
            bar.update()

        if workers <= 1:
            for i in todo:
                done(*_work(i, cases[i], opts, str(writer.chunk_path(i))))
        else:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                futures = [pool.submit(_work, i, cases[i], opts, str(writer.chunk_path(i))) for i in todo]
                for fut in as_completed(futures):
                    done(*fut.result())
        bar.close()
        order = sorted(results)
        rows = [r for i in order for r in results[i][0]]
        skipped = pd.DataFrame([s for i in order for s in results[i][1]])
        if not rows:
            raise BenchError(f"no vertebra could be cropped from {len(cases)} case(s); {len(skipped)} skipped")
        manifest, keep, also_seen = _one_row_per_vertebra(pd.DataFrame(rows))
        skipped = pd.concat([skipped, also_seen], ignore_index=True)
        manifest, report = join_labels(manifest, label_table)
        manifest["split"] = ""
        manifest["spacing"] = opts.spacing
        meta = {
            "frame": FRAME, "size": opts.size, "spacing_mm": opts.spacing, "dtype": opts.dtype,
            "options": asdict(opts), "cases": len(cases), "crops": len(manifest),
            "skipped": len(skipped), "labels_report": report, "created": now(),
        }
        path = writer.commit(order, manifest, meta, skipped, (opts.size,) * 3, opts.dtype, keep)
    except KeyboardInterrupt:  # finished cases stay staged: the same command continues from them
        raise
    except BaseException:
        writer.abort()
        raise
    return path, {**meta, "skipped_rows": skipped}
