"""Counting method chosen per sample: beads, volumetric ($VOL), dual-platform (CBC)."""
import json

import pytest

from cytometry.analysis import AnalysisOptions, analyze_file
from cytometry.outputs.cli import main


def test_beads_are_the_default(sample_dir):
    result = analyze_file(sample_dir / "S05_screening_TBNK.fcs",
                          options=AnalysisOptions(beads_per_test=50120, sample_volume_ul=50, dilution_factor=10.4))
    assert result["counting"]["method"] == "beads"


def test_volumetric_from_vol_agrees_with_beads(sample_dir):
    truth = json.loads((sample_dir / "truth" / "S05_screening_TBNK.json").read_text())
    result = analyze_file(sample_dir / "S05_screening_TBNK.fcs",
                          options=AnalysisOptions(dilution_factor=truth["dilution_factor"]))
    assert result["status"] == "ok", result["error"]
    assert result["counting"]["method"] == "volumetric"
    assert result["counting"]["vol_nl"] == pytest.approx(truth["vol_nl"])
    b = result["populations"]["b_cells"]
    assert b["method"] == "volumetric"
    # The simulator's $VOL is the volume whose particles were acquired: the true value lies inside.
    assert b["ci95"][0] <= truth["concentrations_per_ul"]["b_cells"] <= b["ci95"][1]


def test_dual_platform_uses_the_cbc(sample_dir):
    truth = json.loads((sample_dir / "truth" / "S01_screening_TBNK.json").read_text())
    lymphocytes = truth["concentrations_per_ul"]["lymphocytes"]
    result = analyze_file(sample_dir / "S01_screening_TBNK.fcs",
                          options=AnalysisOptions(lymphocytes_per_ul=lymphocytes, method="dual-platform"))
    assert result["counting"]["method"] == "dual-platform"
    b = result["populations"]["b_cells"]
    assert "taken as exact" in b["method"]
    assert b["ci95"][0] <= truth["concentrations_per_ul"]["b_cells"] <= b["ci95"][1]
    assert result["populations"]["lymphocytes"]["cells_per_ul"] == pytest.approx(lymphocytes)


def test_no_method_possible_reports_events_and_the_reason(sample_dir):
    result = analyze_file(sample_dir / "S04_screening_TBNK.fcs")  # S04 has no $VOL
    assert result["status"] == "ok" and result["counting"]["method"] is None
    for name, entry in result["populations"].items():
        assert entry["cells_per_ul"] is None and "beads per test" in entry["count_reason"], name
        assert entry["events"] >= 0
    assert result["populations"]["lymphocytes"]["events"] > 1000
    assert result["eligibility"]["verdict"] == "qc_fail"


def test_requested_method_without_its_inputs_is_a_clear_error(sample_dir):
    result = analyze_file(sample_dir / "S04_screening_TBNK.fcs", options=AnalysisOptions(method="volumetric"))
    assert result["status"] == "error" and "volumetric requested" in result["error"]


def test_cli_method_option(capsys, sample_dir):
    code = main(["analyze", str(sample_dir / "S05_screening_TBNK.fcs"), "--json", "--method", "volumetric",
                 "--dilution-factor", "10.4"])
    out = capsys.readouterr().out
    assert code == 0
    assert json.loads(out)["samples"][0]["counting"]["method"] == "volumetric"


def test_lod_flag(sample_dir):
    result = analyze_file(sample_dir / "S01_day028_CAR.fcs",
                          options=AnalysisOptions(beads_per_test=48950, sample_volume_ul=50))
    b = result["populations"]["b_cells"]
    assert b["events"] < 3 and b["below_lod"] is True and b["below_lloq"] is True
    assert any(f.startswith("b_cells:") and "not detected" in f for f in result["qc_flags"])
