"""Reviewer checks: lymphosum, stop rule, saturation, interrupted flow."""
import json

import numpy as np

from gating.flags import Flag

from cytometry.analysis import AnalysisOptions, analyze_file, gate_file
from cytometry.decisions.qc import QcRules, review
from cytometry.simulation.simulate import simulate_tube, write_tube

OPTIONS = AnalysisOptions(beads_per_test=50000, sample_volume_ul=50)


def test_clean_tube_has_no_failing_flag(sample_dir):
    flags = review(gate_file(sample_dir / "S01_screening_TBNK.fcs"))
    assert all(isinstance(flag, Flag) for flag in flags)
    assert not [flag for flag in flags if flag.fails]


def test_lymphosum_outside_tolerance_fails(sample_dir):
    gated = gate_file(sample_dir / "S01_screening_TBNK.fcs")
    gated.gating.masks["nk_cells"] = np.zeros_like(gated.gating.masks["nk_cells"])
    gated.gating.masks["b_cells"] = np.zeros_like(gated.gating.masks["b_cells"])
    lymphosum = [flag for flag in review(gated) if flag.code == "lymphosum"]
    assert len(lymphosum) == 1 and lymphosum[0].fails and lymphosum[0].population == "lymphocytes"
    assert "outside 100 ± 10%" in lymphosum[0].message


def test_stop_rule_is_a_flag_not_a_failure(sample_dir):
    stop = [flag for flag in review(gate_file(sample_dir / "S01_day010_CAR.fcs")) if flag.code == "stop_rule"]
    assert len(stop) == 1 and stop[0].severity == "warning" and "acquisition stop rule" in stop[0].message


def test_saturation_and_clog_are_flagged(tmp_path):
    tube = simulate_tube("tbnk", seed=21, blood_volume_ul=3.0)
    fsc = tube.pnn.index("FSC-A")
    time = tube.pnn.index("Time")
    tube.events[::20, fsc] = 262143.0  # 5% saturated
    # A clog: nothing acquired for the middle third of the run.
    t = tube.events[:, time]
    later = t > np.median(t)
    tube.events[later, time] = t[later] + 0.5 * np.ptp(t)
    path = write_tube(tube, tmp_path / "clogged.fcs")
    result = analyze_file(path, options=OPTIONS)
    assert result["status"] == "ok"
    assert any(f.startswith("acquisition:") and "top of scale" in f for f in result["qc_flags"])
    assert any(f.startswith("flow:") and "clog" in f for f in result["qc_flags"])
    assert result["qc_rules"]["min_lymphocyte_events"] == QcRules().min_lymphocyte_events
    json.dumps(result)  # the whole result stays JSON-serialisable


def test_run_checks_lists_every_check_and_review_is_its_flags(sample_dir):
    from cytometry.analysis import gate_file
    from cytometry.decisions.qc import run_checks

    for name in ("S05_screening_TBNK.fcs", "S01_day007_CAR.fcs"):
        gated = gate_file(sample_dir / name)
        ran = run_checks(gated)
        assert [c.check for c in ran] == ["stop_rule", "lymphosum", "cd4_cd8_sum", "saturated_events",
                                          "flow_interrupted"]
        assert all(c.outcome in ("pass", "flag", "fail", "not_applicable") for c in ran)
        assert [str(f) for f in review(gated)] == [str(c.flag) for c in ran if c.flag is not None]
        assert all((c.flag is None) == (c.outcome in ("pass", "not_applicable")) for c in ran)
    stop_rule = run_checks(gate_file(sample_dir / "S05_screening_TBNK.fcs"))[0]
    assert stop_rule.outcome == "flag" and stop_rule.measured.split()[0] == "2275"
