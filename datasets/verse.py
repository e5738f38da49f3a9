"""The VerSe'19 / '20 releases as published, and the VerSe'19 fracture grades.

Layout (anjany/verse, README and `utils/data_utilities.py`; VerSe'20 on OSF): a BIDS-like tree
    rawdata/sub-<id>/sub-<id>[_split-<series>][_dir-<orient>]_ct.nii.gz
    derivatives/sub-<id>/sub-<id>[...]_seg-vert_msk.nii.gz      (VerSe ids: 1-7 C, 8-19 T, 20-25 L, 28 T13)
    derivatives/sub-<id>/sub-<id>[...]_seg-subreg_ctd.json      (centroids in voxel coordinates)
Files are paired by their common prefix; a subject whose spine was scanned in several series
(`split-...`) stays one patient, and a vertebra seen by two of its series is kept once, from the
series that holds more of it.

Grades: the VerSe'19 fracture grading (Löffler et al., Radiology: AI 2020, supplementary
spreadsheet), one row per scan, `verse_ID` (the number of `sub-verseNNN`) and one Genant grade
column per level, `<level>_fx-g` (0 none, 1-3 mild to severe; blank: not assessed). This column
layout is the one community parsers of the spreadsheet read; the original file could not be
obtained here, so the reader checks the columns it needs and names what it did not find.
"""
from __future__ import annotations

import re
import zipfile
from pathlib import Path

import pandas as pd

from bench.datasets.ingest import Case
from bench.datasets.labelmaps import check_vertebra_name
from bench.errors import BenchError

CT_SUFFIX = "_ct.nii.gz"
MASK_SUFFIX = "_seg-vert_msk.nii.gz"
CENTROID_SUFFIX = "_seg-subreg_ctd.json"
GRADE_COLUMN = re.compile(r"^(C[1-7]|T1[0-3]|T[1-9]|L[1-6])_fx-g$")


def find_verse_cases(root: str | Path) -> list[Case]:
    """One case per CT under `root/rawdata`, with its mask (required) and centroid file (if any)."""
    root = Path(root)
    raw, derived = root / "rawdata", root / "derivatives"
    if not raw.is_dir() or not derived.is_dir():
        raise BenchError(f"verse '{root}': expected the folders rawdata/ and derivatives/ of a VerSe release")
    cts = sorted(raw.glob(f"sub-*/**/*{CT_SUFFIX}"))
    if not cts:
        raise BenchError(f"verse '{root}': no rawdata/sub-*/*{CT_SUFFIX} files")
    cases, unpaired = [], []
    for ct in cts:
        subject = ct.relative_to(raw).parts[0]
        prefix = ct.name[: -len(CT_SUFFIX)]
        masks = sorted((derived / subject).glob(f"**/{prefix}{MASK_SUFFIX}"))
        if not masks:
            unpaired.append(str(ct.relative_to(root)))
            continue
        centroids = sorted((derived / subject).glob(f"**/{prefix}{CENTROID_SUFFIX}"))
        series = prefix.removeprefix(subject).strip("_") or "main"
        cases.append(Case(str(ct), str(masks[0]), subject, str(centroids[0]) if centroids else None, series))
    if unpaired:
        raise BenchError(f"verse '{root}': {len(unpaired)} CT(s) without a derivatives/.../*{MASK_SUFFIX}, e.g. "
                         f"{unpaired[0]}")
    return cases


def _read_table(path: Path) -> pd.DataFrame:
    if path.suffix.lower() in (".xlsx", ".xls"):
        try:
            return pd.read_excel(path)
        except (ValueError, OSError, KeyError, EOFError, zipfile.BadZipFile) as exc:  # a bad or truncated workbook
            raise BenchError(f"grades '{path}': not a readable spreadsheet ({type(exc).__name__}: {exc})") from None
    try:
        return pd.read_csv(path)
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError) as exc:
        raise BenchError(f"grades '{path}': not a readable CSV ({type(exc).__name__}: {exc})") from None


def read_verse_grades(path: str | Path) -> pd.DataFrame:
    """patient_id (sub-verseNNN), vertebra, fracture (grade >= 1) and grade, one row per graded level."""
    path = Path(path)
    if not path.is_file():
        raise BenchError(f"grades '{path}': no such file")
    table = _read_table(path)
    levels = {c: GRADE_COLUMN.match(str(c)).group(1) for c in table.columns if GRADE_COLUMN.match(str(c))}
    if "verse_ID" not in table.columns or not levels:
        raise BenchError(f"grades '{path}': expected a column verse_ID and per-level columns such as L1_fx-g; "
                         f"found {', '.join(map(str, table.columns[:8]))}")
    rows = []
    for line, (_, record) in enumerate(table.iterrows(), start=2):
        raw_id = str(record["verse_ID"]).strip()
        number = raw_id.removeprefix("sub-").removeprefix("verse")
        if not re.fullmatch(r"\d+(\.0*)?", number):
            raise BenchError(f"grades '{path}' row {line}: verse_ID '{raw_id}'; expected a number such as 4 or 004")
        patient = f"sub-verse{int(float(number)):03d}"
        for column, level in levels.items():
            value = record[column]
            if pd.isna(value) or str(value).strip() == "":
                continue  # not assessed
            if str(value).strip() not in ("0", "1", "2", "3", "0.0", "1.0", "2.0", "3.0"):
                raise BenchError(f"grades '{path}' row {line}, column {column}: '{value}'; expected a Genant grade "
                                 f"0-3 or blank")
            grade = int(float(value))
            check_vertebra_name(level, f"grades '{path}' column {column}")
            rows.append({"patient_id": patient, "vertebra": level, "fracture": int(grade >= 1), "grade": grade})
    if not rows:
        raise BenchError(f"grades '{path}': no graded level in any row")
    return pd.DataFrame(rows)
