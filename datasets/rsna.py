"""The RSNA 2022 Cervical Spine Fracture Detection data (Kaggle) as published.

Layout (competition data page; `train.csv` columns as read by the public notebooks and by
SSL3D_classification's RSNA data module):
    train_images/<StudyInstanceUID>/<n>.dcm        one DICOM series per study
    train.csv                                      StudyInstanceUID, patient_overall, C1, ..., C7 (0/1)
    segmentations/<StudyInstanceUID>.nii           for 87 studies: 1-7 C1-C7, 8-19 T1-T12
The series are read by position along the slice normal (some studies store their slices in
reverse order), and each mask must lie on its series' grid (the ingestion checks it, since the
segmentations' geometry is a known pitfall). Studies without a segmentation take a mask from a
folder the user names (`<StudyInstanceUID>.nii[.gz]`, for example TotalSegmentator outputs, with
their own label map); studies with neither are listed as not ingested.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from bench.datasets.dicom import is_dicom_series
from bench.datasets.ingest import Case
from bench.datasets.labelmaps import get_label_map
from bench.errors import BenchError

LEVELS = tuple(f"C{i}" for i in range(1, 8))
SEGMENTATION_LABEL_MAP = "verse"  # 1-7 C1-C7 and 8-19 T1-T12 are VerSe's ids


def _mask_in(folder: Path | None, uid: str) -> Path | None:
    if folder is None:
        return None
    return next((folder / f"{uid}{s}" for s in (".nii.gz", ".nii") if (folder / f"{uid}{s}").is_file()), None)


def find_rsna_cases(root: str | Path, masks: str = "", masks_label_map: str = "totalseg_v2"
                    ) -> tuple[list[Case], list[str]]:
    """The studies of `root/train_images` that have a mask, and the UIDs of those that have none."""
    root = Path(root)
    images = root / "train_images"
    if not images.is_dir():
        raise BenchError(f"rsna '{root}': expected the folder train_images/ of the RSNA 2022 competition data")
    extra = Path(masks) if masks else None
    if extra is not None:
        if not extra.is_dir():
            raise BenchError(f"masks '{masks}': no such folder")
        get_label_map(masks_label_map)
    cases, without = [], []
    for study in sorted(p for p in images.iterdir() if p.is_dir()):
        if not is_dicom_series(study):
            raise BenchError(f"rsna '{root}': study folder '{study.name}' holds no DICOM files")
        own = _mask_in(root / "segmentations", study.name)
        if own is not None:
            cases.append(Case(str(study), str(own), study.name, label_map=SEGMENTATION_LABEL_MAP))
        elif (given := _mask_in(extra, study.name)) is not None:
            cases.append(Case(str(study), str(given), study.name, label_map=masks_label_map))
        else:
            without.append(study.name)
    if not cases:
        raise BenchError(f"rsna '{root}': no study has a mask (segmentations/<UID>.nii, or masks=FOLDER with "
                         f"<UID>.nii.gz); {len(without)} studies without one")
    return cases, without


def read_rsna_labels(root: str | Path) -> pd.DataFrame:
    """patient_id (StudyInstanceUID), vertebra, fracture: one row per study and level C1-C7."""
    path = Path(root) / "train.csv"
    if not path.is_file():
        raise BenchError(f"rsna '{root}': no train.csv (StudyInstanceUID, patient_overall, C1..C7)")
    try:
        table = pd.read_csv(path, dtype={"StudyInstanceUID": str})
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError) as exc:
        raise BenchError(f"'{path}': not a readable CSV ({type(exc).__name__}: {exc})") from None
    missing = [c for c in ("StudyInstanceUID", *LEVELS) if c not in table.columns]
    if missing:
        raise BenchError(f"'{path}': missing column(s) {', '.join(missing)}; expected StudyInstanceUID, "
                         f"patient_overall, C1..C7")
    long = table.melt(id_vars="StudyInstanceUID", value_vars=list(LEVELS), var_name="vertebra", value_name="fracture")
    bad = long[~long["fracture"].isin([0, 1])]
    if len(bad):
        r = bad.iloc[0]
        raise BenchError(f"'{path}': study {r.StudyInstanceUID} column {r.vertebra} holds '{r.fracture}'; "
                         f"expected 0 or 1")
    long = long.rename(columns={"StudyInstanceUID": "patient_id"})
    long["fracture"] = long["fracture"].astype(int)
    return long.sort_values(["patient_id", "vertebra"], kind="stable").reset_index(drop=True)
