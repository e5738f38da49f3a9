"""A VerSe release as published, and the VerSe'19 grades spreadsheet, in one command."""
import pandas as pd
import pytest

from bench.cli import main
from bench.datasets.verse import find_verse_cases, read_verse_grades
from bench.errors import BenchError
from tests_helpers import GRADED_LEVELS, VERSE_GRADES, make_verse_tree, write_verse_grades


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return make_verse_tree(tmp_path_factory.mktemp("verse"))


def test_cases_are_paired_by_prefix_and_splits_stay_one_patient(release):
    cases = find_verse_cases(release)
    found = [(c.patient_id, c.series, bool(c.centroids)) for c in cases]
    assert found == [("sub-verse004", "main", True), ("sub-verse501", "dir-ax", False),
                     ("sub-verse502", "split-verse601", False), ("sub-verse502", "split-verse602", False)]
    assert all(c.mask.endswith("_seg-vert_msk.nii.gz") and "/derivatives/" in c.mask for c in cases)


@pytest.mark.parametrize("suffix", [".xlsx", ".csv"])
def test_grades_spreadsheet_row_by_row(tmp_path, suffix):
    table = read_verse_grades(write_verse_grades(tmp_path / f"grades{suffix}"))
    expected = [(f"sub-verse{vid:03d}", level, int(g >= 1), g)
                for vid, _, grades in VERSE_GRADES for level, g in zip(GRADED_LEVELS, grades) if g is not None]
    assert list(table[["patient_id", "vertebra", "fracture", "grade"]].itertuples(index=False, name=None)) == expected


def test_bad_grades_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("verse_ID,L1_fx-g\n4,5\n")
    with pytest.raises(Exception, match=r"row 2, column L1_fx-g: '5'; expected a Genant grade 0-3"):
        read_verse_grades(bad)
    other = tmp_path / "other.csv"
    other.write_text("id,grade\n4,1\n")
    with pytest.raises(Exception, match="expected a column verse_ID and per-level columns"):
        read_verse_grades(other)
    odd_id = tmp_path / "odd.csv"
    odd_id.write_text("verse_ID,L1_fx-g\n4.x,1\n")
    with pytest.raises(BenchError, match=r"row 2: verse_ID '4.x'; expected a number"):
        read_verse_grades(odd_id)
    workbook = write_verse_grades(tmp_path / "grades.xlsx")
    truncated = tmp_path / "truncated.xlsx"
    truncated.write_bytes(workbook.read_bytes()[:300])
    with pytest.raises(BenchError, match="not a readable spreadsheet"):
        read_verse_grades(truncated)


def test_one_command_ingests_the_release_with_its_grades(release, tmp_path, capsys):
    grades = write_verse_grades(tmp_path / "grades.xlsx")
    out = tmp_path / "store"
    assert main(["data", "ingest", f"verse={release}", f"grades={grades}", f"out={out}", "progress=false",
                 "workers=2"]) == 0
    manifest = pd.read_parquet(out / "manifest.parquet")
    got = {(r.patient_id, r.vertebra): (r.label, r.grade) for r in manifest.itertuples()}
    assert sorted(got) == sorted([("sub-verse004", v) for v in ("T9", "T10", "T11", "T12", "L1", "L2", "L3", "L4",
                                                                "L5")]
                                 + [("sub-verse501", v) for v in ("T12", "L1", "L2", "L3", "L4", "L5")]
                                 + [("sub-verse502", "L3")])
    truth = {(f"sub-verse{vid:03d}", level): g for vid, _, grades in VERSE_GRADES
             for level, g in zip(GRADED_LEVELS, grades)}
    for key, (label, grade) in got.items():
        g = truth.get(key)
        assert (label, grade) == ((-1, -1) if g is None else (int(g >= 1), g)), key  # not assessed: unlabelled
    assert set(manifest.loc[manifest.patient_id == "sub-verse004", "centroid_source"]) == {"json"}  # its ctd file
    kept = manifest[manifest.patient_id == "sub-verse502"].iloc[0]
    assert kept.series == "split-verse601"  # L3 from the series that holds more of it
    skipped = pd.read_csv(out / "skipped.csv")
    assert "also in series split-verse601, which holds more of it" in set(skipped["reason"])
    assert "sub-verse502 L3: also in series split-verse601" in capsys.readouterr().out


def test_verse_folder_errors_are_one_line(tmp_path, capsys):
    assert main(["data", "ingest", f"verse={tmp_path}", f"out={tmp_path / 's'}", "progress=false"]) == 2
    assert "expected the folders rawdata/ and derivatives/" in capsys.readouterr().err
    assert main(["data", "ingest", f"grades={tmp_path / 'g.xlsx'}", "label_map=verse", f"out={tmp_path / 's'}"]) == 2
    assert "grades=FILE is the VerSe'19 grades spreadsheet: it needs verse=FOLDER" in capsys.readouterr().err
