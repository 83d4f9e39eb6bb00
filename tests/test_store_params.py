"""One parameter set per store: a second set is refused, --replace starts again, readers take one set."""
import csv
import json

import h5py
import pytest

from pathlib import Path

from cytometry.analysis import AnalysisOptions
from cytometry.batch.run import entry_params
from cytometry.loading.manifest import read_manifest
from cytometry.outputs.cli import main
from cytometry.batch.store import (ParameterSetMismatch, ResultStore, StoreError, parameter_set_hash, params_hash)
from cytometry.decisions.subjects import persistence, screening_decisions
from store_legacy import unsealed

SAMPLE_DIR = Path(__file__).resolve().parents[1] / "sample_fcs"
TUBES = ["S01_screening_TBNK.fcs", "S03_screening_TBNK.fcs", "S01_day000_CAR.fcs", "S01_day010_CAR.fcs",
         "S01_day014_CAR.fcs"]


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def analyze(capsys, sample_dir, store, *extra):
    return run_cli(capsys, "analyze", *(sample_dir / t for t in TUBES), "--manifest", sample_dir / "manifest.csv",
                   "--out", store, "--workers", 1, *extra)


def entry_attrs(store):
    out = {}
    for entry in ResultStore(store).entries():
        with h5py.File(entry, "r") as h5:
            out[entry.name] = {k: h5.attrs[k] for k in ("params_hash", "parameter_set", "file_name")}
    return out


@pytest.fixture(scope="module")
def default_store(sample_dir, tmp_path_factory):
    """A store of TUBES with the default parameters (written once; tests copy or only read it)."""
    store = tmp_path_factory.mktemp("default") / "store"
    code = main(["analyze", *(str(sample_dir / t) for t in TUBES), "--manifest", str(sample_dir / "manifest.csv"),
                 "--out", str(store), "--workers", "1", "--quiet"])
    assert code == 0
    return store


def test_car_tubes_with_their_own_entry_hash_share_the_store_set(default_store):
    attrs = entry_attrs(default_store)
    assert len(attrs) == len(TUBES)
    by_file = {a["file_name"]: a for a in attrs.values()}
    # The day-10 CAR tube is keyed with its pre-infusion reference; the reference tube itself is not ...
    assert by_file["S01_day010_CAR.fcs"]["params_hash"] != by_file["S01_day000_CAR.fcs"]["params_hash"]
    manifest = read_manifest(SAMPLE_DIR / "manifest.csv")
    reference_row = manifest.lookup(SAMPLE_DIR / "S01_day000_CAR.fcs")
    assert by_file["S01_day000_CAR.fcs"]["params_hash"] == entry_params(AnalysisOptions(), reference_row)
    # ... and both belong to the one set of the run, recorded in parameters.json.
    assert {a["parameter_set"] for a in attrs.values()} == {parameter_set_hash(AnalysisOptions())}
    record = json.loads((default_store / "parameters.json").read_text())
    assert record["parameter_set"] == parameter_set_hash(AnalysisOptions())
    assert record["options"]["lloq_events"] == 25


def test_a_second_parameter_set_is_refused_and_replace_starts_again(capsys, sample_dir, default_store, tmp_path):
    import shutil

    store = tmp_path / "store"
    shutil.copytree(default_store, store)
    before = sorted(p.name for p in ResultStore(store).entries())
    code, out, err = analyze(capsys, sample_dir, store, "--lloq-events", 10)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1
    assert "--replace" in err and "another --out folder" in err and str(store) in err
    assert sorted(p.name for p in ResultStore(store).entries()) == before  # nothing written, nothing lost

    # The same parameters again: nothing to do, not refused.
    code, out, err = analyze(capsys, sample_dir, store)
    assert code == 0, err

    code, out, err = analyze(capsys, sample_dir, store, "--lloq-events", 10, "--replace")
    assert code == 0, err
    wanted = parameter_set_hash(AnalysisOptions(lloq_events=10))
    attrs = entry_attrs(store)
    assert len(attrs) == len(TUBES) and {a["parameter_set"] for a in attrs.values()} == {wanted}
    assert not set(attrs) & set(before)
    name, results = ResultStore(store).one_parameter_set()
    assert name == wanted and all(r["counting"]["lloq_events"] == 10 for r in results)

    # Readers say which set they read.
    code, out, err = run_cli(capsys, "eligibility", "--store", store, "--json")
    assert code == 0 and json.loads(out)["parameter_set"] == wanted
    assert f"parameter set {wanted}, {len(TUBES)} samples" in err
    code, out, err = run_cli(capsys, "persistence", "--store", store, "--quiet")
    assert code == 0 and wanted not in err


def test_api_refuses_a_second_set(sample_dir, default_store, tmp_path):
    import shutil

    from cytometry.batch.run import run_batch
    from cytometry.loading.manifest import read_manifest

    store = tmp_path / "store"
    shutil.copytree(default_store, store)
    manifest = read_manifest(sample_dir / "manifest.csv")
    files = [sample_dir / t for t in TUBES]
    with pytest.raises(ParameterSetMismatch, match="--replace"):
        run_batch(files, manifest, AnalysisOptions(min_bead_events=500), store=store, progress=False)
    again = run_batch(files, manifest, store=store, progress=False)
    assert all(r.get("skipped") for r in again)




def _legacy_copy(store, target, duplicate_as=None):
    """``store`` as an older version wrote it: no parameters.json, no parameter_set attributes, no seal.

    ``duplicate_as``: also a second entry of each file under that parameter hash (two sets mixed).
    """
    import shutil

    shutil.copytree(store, target)
    (target / "parameters.json").unlink()
    for entry in ResultStore(target).entries():
        unsealed(entry)  # older versions wrote no seal (and their entries are read unverified)
        with h5py.File(entry, "a") as h5:
            del h5.attrs["parameter_set"]
        if duplicate_as:
            sha = entry.stem.rsplit("-", 1)[0]
            shutil.copy(entry, entry.with_name(f"{sha}-{duplicate_as}.h5"))
    return target


def test_old_store_with_one_set_is_read_and_with_several_refused(capsys, default_store, tmp_path):
    one = _legacy_copy(default_store, tmp_path / "one")
    name, results = ResultStore(one).one_parameter_set()
    assert name == "unrecorded" and len(results) == len(TUBES)
    mixed = _legacy_copy(default_store, tmp_path / "mixed", duplicate_as="0123456789abcdef")
    assert len(ResultStore(mixed).entries()) == 2 * len(TUBES)
    with pytest.raises(StoreError, match="--replace"):
        ResultStore(mixed).one_parameter_set()
    for command in (["persistence", "--store", mixed], ["eligibility", "--store", mixed],
                    ["report", mixed, "--out", tmp_path / "qc", "--no-thumbnails"]):
        code, out, err = run_cli(capsys, *command)
        assert code == 2 and "several parameter sets" in err and "Traceback" not in err
    assert not (tmp_path / "qc" / "report.html").exists()


def test_subject_tables_never_double_a_visit(default_store):
    _, results = ResultStore(default_store).one_parameter_set()
    # The same tubes again (another parameter set's copy, or the same file under another name).
    twice = results + [dict(r, file=r["file"].replace(".fcs", "_copy.fcs")) for r in results]
    subject = next(s for s in persistence(twice) if s["subject_id"] == "S01")
    days = [p["study_day"] for p in subject["timeline"]]
    assert days == sorted(set(days)) == [0, 10, 14]
    assert subject["auc_0_28"] == next(s for s in persistence(results) if s["subject_id"] == "S01")["auc_0_28"]
    for row in screening_decisions(twice):
        assert len(row["tubes"]) == 1
        assert not any("superseded" in reason for reason in row["reasons"])
    # Two different tubes of one visit give one point, naming the other.
    day10 = next(r for r in results if r["file"].endswith("S01_day010_CAR.fcs"))
    other = dict(day10, sha256="f" * 64, file=day10["file"].replace("day010", "day010b"))
    subject = next(s for s in persistence(results + [other]) if s["subject_id"] == "S01")
    assert [p["study_day"] for p in subject["timeline"]] == [0, 10, 14]
    point = next(p for p in subject["timeline"] if p["study_day"] == 10)
    assert point["file"].endswith("S01_day010b_CAR.fcs") and point["other_tubes"] == ["S01_day010_CAR.fcs"]


def test_analyze_csv_writes_one_row_per_sample(capsys, sample_dir, default_store, tmp_path):
    code, out, err = analyze(capsys, sample_dir, default_store, "--csv", tmp_path / "samples.csv", "--json")
    assert code == 0, err
    samples = {s["file"].split("/")[-1]: s for s in json.loads(out)["samples"]}
    with open(tmp_path / "samples.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["file"] for r in rows] == TUBES
    for row in rows:
        sample = samples[row["file"]]
        b = sample["populations"]["b_cells"]
        assert float(row["b_cells_per_ul"]) == pytest.approx(b["cells_per_ul"])
        assert float(row["b_cells_ci95_low_per_ul"]) == pytest.approx(b["ci95"][0])
        assert int(row["bead_events"]) == sample["beads"]["events"]
        assert row["subject_id"] == sample["subject_id"] and row["study_day"] == str(sample["study_day"])
        if sample["panel"] == "car":
            assert float(row["car_t_ci95_high_per_ul"]) == pytest.approx(sample["populations"]["car_t"]["ci95"][1])
            assert row["eligibility"] == ""
        else:
            assert row["car_t_per_ul"] == "" and row["eligibility"] == sample["eligibility"]["verdict"]
        assert row["flags"] == " | ".join(sample["qc_flags"])


def test_csv_cells_are_formula_safe(capsys, sample_dir, tmp_path):
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("file,subject_id,visit,study_day,tube,beads_per_test,sample_volume_ul\n"
                        f"{sample_dir / 'S03_screening_TBNK.fcs'},=cmd(),screening,-14,TBNK,50120,50\n")
    code, _, err = run_cli(capsys, "analyze", sample_dir / "S03_screening_TBNK.fcs", "--manifest", manifest,
                           "--csv", tmp_path / "s.csv")
    assert code == 0, err
    rows = list(csv.DictReader(open(tmp_path / "s.csv", newline="")))
    assert rows[0]["subject_id"] == "'=cmd()"


def test_verbose_logs_on_stderr_and_quiet_keeps_stdout(capsys, sample_dir, default_store):
    code, quiet_out, quiet_err = analyze(capsys, sample_dir, default_store, "--quiet")
    assert code == 0 and quiet_err == ""
    code, verbose_out, verbose_err = analyze(capsys, sample_dir, default_store, "--verbose")
    assert code == 0
    assert "INFO cytometry.batch.run:" in verbose_err and "0 to analyse" in verbose_err
    code, plain_out, plain_err = analyze(capsys, sample_dir, default_store)
    assert "INFO" not in plain_err
    assert quiet_out == verbose_out == plain_out and "samples" in plain_out


@pytest.mark.parametrize("command", ["analyze", "eligibility", "persistence", "report", "inspect"])
def test_every_help_has_an_example(capsys, command):
    code, out, _ = run_cli(capsys, command, "--help")
    assert code == 0
    out = " ".join(out.split())  # wrapping depends on the terminal's width
    assert "example" in out and f"cytometry {command} " in out.split("example", 1)[1]
    if command == "analyze":
        assert "(default: 25)" in out and "(default: 1000)" in out


def test_parameter_set_ignores_only_the_car_reference():
    import numpy as np

    from cytometry.analysis import with_car_reference

    base = AnalysisOptions()
    car = with_car_reference(base, np.linspace(0.0, 1.0, 500), "pre-infusion tube x.fcs")
    assert params_hash(car) != params_hash(base)
    assert parameter_set_hash(car) == parameter_set_hash(base)
    for changed in (AnalysisOptions(lloq_events=10), AnalysisOptions(beads_per_test=1.0),
                    AnalysisOptions(min_bead_events=10)):
        assert parameter_set_hash(changed) != parameter_set_hash(base)


def test_a_manifest_edit_analyses_again_and_the_latest_run_is_served(capsys, sample_dir, tmp_path):
    """A corrected bead lot must never return the stale count (the manifest row is part of the entry key)."""
    run = tmp_path / "run"
    run.mkdir()
    for tube in TUBES[:2]:
        (run / tube).symlink_to(sample_dir / tube)
    rows = list(csv.DictReader(open(sample_dir / "manifest.csv", newline="")))
    rows = [r for r in rows if r["file"] in TUBES[:2]]

    def write_manifest(beads_factor):
        with open(run / "manifest.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            for r in rows:
                writer.writerow({**r, "beads_per_test": str(float(r["beads_per_test"]) * beads_factor)})

    def b_cells(store):
        code, out, _ = run_cli(capsys, "eligibility", "--store", store, "--json")
        subjects = json.loads(out)["subjects"]
        assert sorted(s["subject_id"] for s in subjects) == ["S01", "S03"]  # one row per subject, never doubled
        return {s["subject_id"]: s["value"] for s in subjects}

    store = tmp_path / "store"
    write_manifest(1.0)
    assert run_cli(capsys, "analyze", run, "--manifest", run / "manifest.csv", "--out", store)[0] == 0
    first = b_cells(store)
    write_manifest(2.0)  # the lab corrects the bead lot: twice the beads per test
    code, out, _ = run_cli(capsys, "analyze", run, "--manifest", run / "manifest.csv", "--out", store, "--json")
    assert code == 0
    assert not any(r.get("skipped") for r in json.loads(out)["samples"])  # analysed again, not read back
    second = b_cells(store)
    for subject in first:
        assert second[subject] == pytest.approx(2 * first[subject], rel=1e-3)
    write_manifest(1.0)  # reverted: analysed again (the store keeps one entry per file), the first values back
    code, out, _ = run_cli(capsys, "analyze", run, "--manifest", run / "manifest.csv", "--out", store, "--json")
    assert code == 0 and not any(r.get("skipped") for r in json.loads(out)["samples"])
    assert b_cells(store) == first
    assert len(ResultStore(store).entries()) == 2
