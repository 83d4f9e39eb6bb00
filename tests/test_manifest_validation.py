"""The manifest is checked before any file is analysed: every fault in one message naming its row, exit 2."""
import csv
import shutil

import pytest

from cytometry.analysis import AnalysisOptions
from cytometry.batch.run import run_batch
from cytometry.outputs.cli import main
from cytometry.loading.manifest import ManifestError, read_manifest, suggest_column, validate_manifest


@pytest.fixture(scope="module")
def run_dir(sample_dir, tmp_path_factory):
    """A copy of the committed samples (FCS files only; each test writes its own manifest beside them)."""
    folder = tmp_path_factory.mktemp("run")
    for path in sample_dir.glob("*.fcs"):
        shutil.copy(path, folder / path.name)
    return folder


@pytest.fixture(scope="module")
def rows(sample_dir):
    with open(sample_dir / "manifest.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def write_manifest(folder, rows, name="manifest.csv", rename=None):
    """``rows`` (dicts) as a manifest in ``folder``; ``rename`` maps header names to misspelt ones."""
    rename = rename or {}
    header = list(rows[0])
    path = folder / name
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow([rename.get(column, column) for column in header])
        for row in rows:
            writer.writerow([row[column] for column in header])
    return path


def changed(rows, name, **values):
    return [dict(row, **values) if row["file"] == name else dict(row) for row in rows]


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def refused(capsys, run_dir, manifest, tmp_path, *extra):
    """Run analyze with ``manifest``; assert exit 2, one message, nothing analysed; return the message."""
    store = tmp_path / "store"
    code, out, err = run_cli(capsys, "analyze", run_dir, "--manifest", manifest, "--out", store, "--workers", 1,
                             *extra)
    assert code == 2, err
    assert out == ""  # no table: nothing was analysed
    assert err.count("cytometry: error:") == 1 and "Traceback" not in err
    assert not store.exists()
    return err


def test_the_committed_manifest_is_valid(run_dir, rows):
    manifest = read_manifest(write_manifest(run_dir, rows, "ok.csv"))
    assert validate_manifest(manifest, manifest.files(), [run_dir]) == []


def test_misspelt_column_is_named_with_the_known_one(capsys, run_dir, rows, tmp_path):
    manifest = write_manifest(run_dir, rows, "misspelt.csv", rename={"study_day": "studyday"})
    err = refused(capsys, run_dir, manifest, tmp_path)
    assert "unknown column 'studyday' — did you mean study_day?" in err
    # Without a study_day the CAR tubes cannot be linked to their reference: said once, with the rows.
    car_rows = [str(i) for i, row in enumerate(rows, start=2) if row["tube"] == "CAR"]
    assert f"CAR tubes without a study_day (their pre-infusion reference cannot be linked) on rows " \
           f"{', '.join(car_rows)}" in err


def test_columns_far_from_any_known_one_are_kept(rows):
    assert suggest_column("comment") is None and suggest_column("operator") is None
    assert suggest_column("Beads per test") == "beads_per_test" and suggest_column("subject") == "subject_id"


def test_listed_but_missing_file_names_its_row(capsys, run_dir, rows, tmp_path):
    bad = changed(rows, "S02_screening_TBNK.fcs", file="S02_screning_TBNK.fcs")
    err = refused(capsys, run_dir, write_manifest(run_dir, bad, "missing.csv"), tmp_path)
    row = 2 + [r["file"] for r in bad].index("S02_screning_TBNK.fcs")
    assert f"row {row} (S02_screning_TBNK.fcs): file not found" in err
    # ... and the real file, now unlisted, is not analysed without its row.
    assert "not listed in the manifest" in err and "S02_screening_TBNK.fcs" in err


def test_unlisted_file_is_refused_unless_allowed(capsys, run_dir, rows, tmp_path):
    folder = tmp_path / "two"
    folder.mkdir()
    for name in ("S01_screening_TBNK.fcs", "S03_screening_TBNK.fcs"):
        shutil.copy(run_dir / name, folder / name)
    manifest = write_manifest(folder, [r for r in rows if r["file"] == "S01_screening_TBNK.fcs"])
    err = refused(capsys, folder, manifest, tmp_path)
    assert "not listed in the manifest (add rows, or --allow-unlisted):" in err and "S03_screening_TBNK.fcs" in err
    # A file named on the command line is checked the same way.
    code, _, err = run_cli(capsys, "analyze", folder / "S03_screening_TBNK.fcs", "--manifest", manifest)
    assert code == 2 and "S03_screening_TBNK.fcs" in err
    code, out, err = run_cli(capsys, "analyze", folder, "--manifest", manifest, "--allow-unlisted", "--workers", 1,
                             "--json")
    assert code == 0, err
    assert "S03_screening_TBNK.fcs" in out and '"subject_id": "S01"' in out


@pytest.mark.parametrize("column,value,needle", [
    ("study_day", "day 4", "study_day is not a number: 'day 4'"),
    ("beads_per_test", "0", "beads_per_test must be > 0 (got 0)"),
    ("beads_per_test", "-50120", "beads_per_test must be > 0 (got -50120)"),
    ("sample_volume_ul", "fifty", "sample_volume_ul is not a number: 'fifty'"),
    ("sample_volume_ul", "-50", "sample_volume_ul must be > 0 (got -50)"),
    ("beads_per_test", "nan", "beads_per_test is not a finite number"),
])
def test_bad_values_name_their_row(capsys, run_dir, rows, tmp_path, column, value, needle):
    bad = changed(rows, "S04_screening_TBNK.fcs", **{column: value})
    err = refused(capsys, run_dir, write_manifest(run_dir, bad, f"bad_{column}.csv"), tmp_path)
    row = 2 + [r["file"] for r in rows].index("S04_screening_TBNK.fcs")
    assert f"row {row} (S04_screening_TBNK.fcs): {needle}" in err


def test_other_counting_columns_are_checked(run_dir, rows):
    extra = [dict(row, dilution_factor="", lymphocytes_per_ul="", lymphocytes_cv="", counting_method="")
             for row in rows]
    extra[0].update(lymphocytes_cv="5", counting_method="flow")
    extra[1].update(dilution_factor="0")
    manifest = read_manifest(write_manifest(run_dir, extra, "counting.csv"))
    problems = validate_manifest(manifest, manifest.files())
    assert "row 2 (S01_screening_TBNK.fcs): lymphocytes_cv must be a fraction in [0, 1) such as 0.05 (got 5)" \
           in problems
    assert any(p.startswith("row 2 (S01_screening_TBNK.fcs): counting_method 'flow' is not one of") for p in problems)
    assert "row 3 (S02_screening_TBNK.fcs): dilution_factor must be > 0 (got 0)" in problems
    assert len(problems) == 3


def test_missing_bead_constants_are_one_line_listing_the_rows(capsys, run_dir, rows, tmp_path):
    bad = changed(changed(rows, "S03_screening_TBNK.fcs", beads_per_test=""), "S01_day007_CAR.fcs",
                  beads_per_test="", sample_volume_ul="")
    err = refused(capsys, run_dir, write_manifest(run_dir, bad, "beads.csv"), tmp_path)
    files = [r["file"] for r in rows]
    s03, day7 = 2 + files.index("S03_screening_TBNK.fcs"), 2 + files.index("S01_day007_CAR.fcs")
    assert err.count("no bead constants") == 1
    assert f"on rows {s03} (beads_per_test), {day7} (beads_per_test/sample_volume_ul)" in err
    # Command-line constants, or another counting method's inputs, make them unnecessary.
    manifest = read_manifest(run_dir / "beads.csv")
    assert validate_manifest(manifest, options=AnalysisOptions(beads_per_test=50120, sample_volume_ul=50)) == []
    with_analyser = [dict(r, lymphocytes_per_ul="1500") for r in bad]
    manifest = read_manifest(write_manifest(run_dir, with_analyser, "analyser.csv"))
    assert validate_manifest(manifest) == []


def test_car_tube_without_study_day(capsys, run_dir, rows, tmp_path):
    bad = changed(rows, "S01_day010_CAR.fcs", study_day="")
    err = refused(capsys, run_dir, write_manifest(run_dir, bad, "car_day.csv"), tmp_path)
    row = 2 + [r["file"] for r in rows].index("S01_day010_CAR.fcs")
    assert f"CAR tubes without a study_day (their pre-infusion reference cannot be linked) on rows {row}\n" in err + "\n"


def test_every_problem_in_one_message(capsys, run_dir, rows, tmp_path):
    bad = changed(rows, "S05_screening_TBNK.fcs", beads_per_test="abc")
    bad = changed(bad, "S01_day021_CAR.fcs", sample_volume_ul="0")
    bad.append(dict(bad[0]))  # S01_screening_TBNK.fcs a second time
    manifest = write_manifest(run_dir, bad, "many.csv", rename={"subject_id": "subjectid"})
    err = refused(capsys, run_dir, manifest, tmp_path)
    files = [r["file"] for r in rows]
    assert f"{manifest}: 5 problems, nothing analysed:" in err
    for needle in ("unknown column 'subjectid' — did you mean subject_id?",
                   f"row {2 + files.index('S05_screening_TBNK.fcs')} (S05_screening_TBNK.fcs): beads_per_test is not "
                   "a number: 'abc'",
                   f"row {2 + files.index('S01_day021_CAR.fcs')} (S01_day021_CAR.fcs): sample_volume_ul must be > 0",
                   f"row {len(bad) + 1}: lists S01_screening_TBNK.fcs a second time (first on row 2)",
                   "CAR tubes without a subject_id"):
        assert needle in err
    assert len(err.strip().splitlines()) == 6  # the heading and one line per problem


@pytest.mark.parametrize("command", ["eligibility", "persistence"])
def test_subject_commands_check_the_manifest_too(capsys, run_dir, rows, tmp_path, command):
    manifest = write_manifest(run_dir, rows, "subject_cmd.csv", rename={"visit": "vist"})
    code, out, err = run_cli(capsys, command, run_dir, "--manifest", manifest)
    assert code == 2 and out == ""
    assert "unknown column 'vist' — did you mean visit?" in err


def test_run_batch_refuses_a_bad_manifest(run_dir, rows, tmp_path):
    bad = changed(rows, "S02_screening_TBNK.fcs", study_day="x")
    manifest = read_manifest(write_manifest(run_dir, bad, "api.csv"))
    with pytest.raises(ManifestError, match=r"row 3 \(S02_screening_TBNK.fcs\): study_day is not a number"):
        run_batch(manifest.files(), manifest, store=tmp_path / "store", progress=False)
    assert not (tmp_path / "store").exists()
