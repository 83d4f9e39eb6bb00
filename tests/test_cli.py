"""The command line as a user runs it: the committed samples, bad files, exit codes."""
import csv
import json
import shutil
import subprocess
import sys

import pytest

from cytometry.outputs.cli import main
from cytometry.simulation.simulate import simulate_tube, write_tube


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def sample_json(sample_dir):
    """The committed run, analysed once for the module (JSON document)."""
    result = subprocess.run([sys.executable, "-m", "cytometry.outputs.cli", "analyze", str(sample_dir),
                             "--manifest", str(sample_dir / "manifest.csv"), "--json"],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_json_contract_on_committed_samples(sample_json, sample_dir):
    samples = sample_json["samples"]
    manifest = list(csv.DictReader(open(sample_dir / "manifest.csv")))
    assert len(samples) == len(manifest)
    for s in samples:
        for key in ("file", "sha256", "status", "panel", "subject_id", "study_day", "populations", "beads",
                    "eligibility", "qc_flags", "software_version"):
            assert key in s
        assert s["status"] == "ok" and len(s["sha256"]) == 64
        b = s["populations"]["b_cells"]
        assert set(b) >= {"events", "cells_per_ul", "ci95", "below_lloq"}
        assert b["ci95"][0] <= b["cells_per_ul"] <= b["ci95"][1]
        assert s["beads"]["events"] > 1000 and s["beads"]["beads_per_test"] > 0
        if s["panel"] == "car":
            assert "car_t" in s["populations"] and s["eligibility"] is None  # not a screening visit
            assert "nk_cells" not in s["populations"]  # the CAR tube has no CD16/56
        else:
            assert "car_t" not in s["populations"]
            assert s["eligibility"]["criterion"] == "CD19+ B cells > 5 cells/uL"
    by_file = {s["file"].split("/")[-1]: s for s in samples}
    assert by_file["S01_day010_CAR.fcs"]["study_day"] == 10
    assert by_file["S01_screening_TBNK.fcs"]["subject_id"] == "S01"
    # Unknown manifest columns are kept.
    assert "comment" in by_file["S01_screening_TBNK.fcs"]["manifest_extra"]


def test_table_output_has_a_row_per_sample(capsys, sample_dir):
    code, out, err = run_cli(capsys, "analyze", sample_dir, "--manifest", sample_dir / "manifest.csv")
    assert code == 0, err
    for name in ("S01_screening_TBNK.fcs", "S03_screening_TBNK.fcs", "S01_day028_CAR.fcs"):
        assert name in out
    assert "eligible" in out and "indeterminate" in out
    assert "14 samples, 14 ok, 0 failed" in out


def _no_cd19_tube(path):
    tube = simulate_tube("tbnk", seed=5, blood_volume_ul=1.0)
    tube.pns = ["CD20" if p == "CD19" else p for p in tube.pns]
    return write_tube(tube, path)


def test_bad_files_are_reported_and_the_batch_goes_on(capsys, sample_dir, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for name in ("S01_screening_TBNK.fcs", "S02_screening_TBNK.fcs"):
        shutil.copy(sample_dir / name, run_dir / name)
    (run_dir / "empty.fcs").write_bytes(b"")
    good = (sample_dir / "S05_screening_TBNK.fcs").read_bytes()
    (run_dir / "truncated.fcs").write_bytes(good[: len(good) // 3])
    (run_dir / "notes.fcs").write_text("subject,day\nS01,7\n")
    _no_cd19_tube(run_dir / "no_cd19.fcs")

    code, out, err = run_cli(capsys, "analyze", run_dir, "--json", "--beads-per-test", 50120,
                             "--sample-volume-ul", 50)
    assert code == 1
    samples = {s["file"].split("/")[-1]: s for s in json.loads(out)["samples"]}
    assert samples["S01_screening_TBNK.fcs"]["status"] == "ok"
    assert samples["S02_screening_TBNK.fcs"]["status"] == "ok"
    expected = {"empty.fcs": "empty", "truncated.fcs": "truncated", "notes.fcs": "not an FCS file",
                "no_cd19.fcs": "CD19 not found"}
    for name, problem in expected.items():
        sample = samples[name]
        assert sample["status"] == "error"
        assert problem in sample["error"] and "\n" not in sample["error"]
        assert sample["eligibility"]["verdict"] == "qc_fail"
    # One line on stderr per bad file, naming it, and no traceback.
    lines = err.strip().splitlines()
    assert len(lines) == 4 and all(line.startswith("error: ") for line in lines)
    assert "Traceback" not in err
    assert any("no_cd19.fcs" in line and "CD20" in line for line in lines)


def test_missing_bead_constants_give_events_without_cells_per_ul(capsys, sample_dir):
    """No counting constants: no guessed cells/uL, but the gated populations are still reported."""
    code, out, err = run_cli(capsys, "analyze", sample_dir / "S01_screening_TBNK.fcs", "--json")
    assert code == 0
    sample = json.loads(out)["samples"][0]
    assert sample["status"] == "ok"
    b_cells = sample["populations"]["b_cells"]
    assert b_cells["cells_per_ul"] is None and "beads per test" in b_cells["count_reason"]
    assert b_cells["events"] > 100 and b_cells["parent"] == "lymphocytes"
    assert 0 < sample["populations"]["t_cells"]["pct_of_parent"] < 100
    assert sample["eligibility"]["verdict"] == "qc_fail"
    assert any("no count possible" in reason for reason in sample["eligibility"]["reasons"])
    assert any(f["code"] == "no_counting_method" for f in sample["flags"])


def test_command_line_constants_override_manifest(capsys, sample_dir):
    code, out, _ = run_cli(capsys, "analyze", sample_dir / "S01_screening_TBNK.fcs", "--json",
                           "--manifest", sample_dir / "manifest.csv", "--beads-per-test", 100240)
    assert code == 0
    doubled = json.loads(out)["samples"][0]
    code, out, _ = run_cli(capsys, "analyze", sample_dir / "S01_screening_TBNK.fcs", "--json",
                           "--manifest", sample_dir / "manifest.csv")
    base = json.loads(out)["samples"][0]
    assert doubled["beads"]["beads_per_test"] == 100240
    assert doubled["populations"]["b_cells"]["cells_per_ul"] == pytest.approx(
        2 * base["populations"]["b_cells"]["cells_per_ul"], rel=1e-3)


def test_supplied_compensation_matrix_is_used(capsys, sample_dir, tmp_path):
    from cytometry.loading.fcs import read_fcs

    path = sample_dir / "S01_screening_TBNK.fcs"
    spill = read_fcs(path).spillover
    matrix_csv = tmp_path / "comp.csv"
    with open(matrix_csv, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(spill.detectors)
        writer.writerows(spill.matrix.tolist())
    args = ["analyze", path, "--json", "--manifest", sample_dir / "manifest.csv"]
    code, out, _ = run_cli(capsys, *args, "--compensation", matrix_csv)
    supplied = json.loads(out)["samples"][0]
    code, out, _ = run_cli(capsys, *args)
    from_file = json.loads(out)["samples"][0]
    assert supplied["compensation"]["source"] == str(matrix_csv)
    assert from_file["compensation"]["source"] == "$SPILLOVER"
    assert supplied["populations"] == from_file["populations"]


def test_uncompensated_file_is_flagged_and_fails_qc(capsys, tmp_path):
    tube = simulate_tube("tbnk", seed=8, blood_volume_ul=2.0)
    tube.metadata = {k: v for k, v in tube.metadata.items() if "SPILL" not in k.upper()}
    path = write_tube(tube, tmp_path / "nocomp.fcs")
    code, out, _ = run_cli(capsys, "analyze", path, "--json", "--beads-per-test", 50000, "--sample-volume-ul", 50)
    sample = json.loads(out)["samples"][0]
    assert any("not compensated" in flag for flag in sample["qc_flags"])
    assert sample["eligibility"]["verdict"] == "qc_fail"


def test_inspect_json(capsys, sample_dir):
    code, out, _ = run_cli(capsys, "inspect", sample_dir / "S03_screening_TBNK.fcs", "--json")
    assert code == 0
    info = json.loads(out)
    assert set(info) >= {"file", "sha256", "fcs_version", "events", "channels", "spillover", "keywords"}
    assert info["spillover"] is True and info["fcs_version"] == "3.1"
    assert all(set(c) >= {"name", "marker", "range"} for c in info["channels"])
    assert info["panel"]["markers"]["CD19"] in [c["name"] for c in info["channels"]]
    assert info["events"] > 1000


def test_inspect_text_and_bad_file(capsys, sample_dir, tmp_path):
    code, out, _ = run_cli(capsys, "inspect", sample_dir / "S01_day010_CAR.fcs")
    assert code == 0 and "CAR" in out and "$VOL" in out
    bad = tmp_path / "bad.fcs"
    bad.write_text("not fcs")
    code, out, err = run_cli(capsys, "inspect", bad)
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and "bad.fcs" in err and "not an FCS file" in err


@pytest.mark.parametrize("args,needle", [
    ([], "usage"),
    (["analyze"], "usage"),
    (["analyze", "sample_fcs", "--manifest", "missing.csv"], "manifest not found"),
    (["analyze", "sample_fcs", "--compensation", "nope.csv"], "--compensation file not found"),
    (["analyze", "sample_fcs", "--device", "tpu"], "invalid choice"),
])
def test_usage_errors_exit_2(capsys, args, needle):
    code, out, err = run_cli(capsys, *args)
    assert code == 2
    assert needle in err


def test_console_script_installed():
    from pathlib import Path

    beside_python = Path(sys.executable).with_name("cytometry")
    exe = str(beside_python) if beside_python.exists() else shutil.which("cytometry")
    if exe is None:
        pytest.skip("package not installed as a console script in this environment")
    result = subprocess.run([exe, "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and "cytometry" in result.stdout


def test_unexpected_failure_is_one_sample_error(capsys, sample_dir, monkeypatch):
    """A bug in one sample's gating is reported for that sample; the others still come back."""
    from cytometry import analysis

    real = analysis.auto_gate
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise ZeroDivisionError("boom")
        return real(*args, **kwargs)

    monkeypatch.setattr(analysis, "auto_gate", flaky)
    # --workers 1: the patched function lives in this process.
    code, out, err = run_cli(capsys, "analyze", sample_dir / "S01_screening_TBNK.fcs",
                             sample_dir / "S02_screening_TBNK.fcs", "--json", "--manifest",
                             sample_dir / "manifest.csv", "--workers", "1")
    assert code == 1
    first, second = json.loads(out)["samples"]
    assert first["status"] == "error" and "unexpected ZeroDivisionError" in first["error"]
    assert second["status"] == "ok"
    assert "Traceback" not in err


def test_debug_shows_the_traceback(capsys, tmp_path):
    bad = tmp_path / "bad.fcs"
    bad.write_text("not fcs")
    with pytest.raises(Exception):
        main(["analyze", str(bad), "--beads-per-test", "50000", "--sample-volume-ul", "50", "--debug"])


def test_plots_and_gatingml_written_per_sample(capsys, sample_dir, tmp_path):
    code, out, err = run_cli(capsys, "analyze", sample_dir / "S01_screening_TBNK.fcs", sample_dir / "S01_day010_CAR.fcs",
                             "--manifest", sample_dir / "manifest.csv", "--json",
                             "--plots", tmp_path / "plots", "--gatingml", tmp_path / "gml")
    assert code == 0, err
    samples = json.loads(out)["samples"]
    for sample in samples:
        png = tmp_path / "plots" / (sample["file"].split("/")[-1].replace(".fcs", ".gating.png"))
        xml = tmp_path / "gml" / (sample["file"].split("/")[-1].replace(".fcs", ".gating.xml"))
        assert sample["gating_figure"] == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert sample["gatingml"] == str(xml) and "Gating-ML" in xml.read_text()
