"""The accuracy harness on a reduced simulated set (benchmarks/accuracy.py runs the full one).

Targets checked here are the issue's: F1 >= 0.97 for lymphocytes, T and B
cells (B with >= 50 true events), the true B-cell count inside the 95%
interval in >= 93% of tubes, zero wrong eligible / not_eligible verdicts and
`indeterminate` only near the threshold; for CAR+ T (counted against each
subject's pre-infusion tube, acquired at a gain up to ±10% different) the
truth inside the interval in >= 93% of tubes, and, where CAR+ is >= 1% of
T cells, an F1 within reach of the best count-preserving cut (the ceiling
where CAR+ and CAR− overlap; see benchmarks/accuracy.py).

These targets are checked on the ideal conditions (the simulator's clean
defaults). The realistic conditions (photon-noise spreading, NKT cells,
CD45-negative debris, extreme compositions...) are measured, not held to a
target here: the tests below check that they draw what they name and that
the harness runs them and tabulates them per condition correctly.
"""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from cytometry.simulation.simulate import default_concentrations
from cytometry.simulation.validation import (CAR_REFERENCE_CONDITIONS, CONDITIONS, IDEAL_CONDITIONS, REALISTIC_CONDITIONS,
                                  TubeRecord, evaluate_tube, select_conditions, simulate_condition_set, summarize,
                                  summarize_by_condition, summarize_car)


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    out = tmp_path_factory.mktemp("accuracy")
    tubes = simulate_condition_set(out, n_samples=2 * len(IDEAL_CONDITIONS), seed=77, conditions=IDEAL_CONDITIONS)
    records = [evaluate_tube(path, condition, truth) for path, condition, truth in tubes]
    return records, summarize(records)


def test_every_tube_is_analysed(harness):
    records, _ = harness
    assert all(r.status == "ok" for r in records), [r.error for r in records if r.status != "ok"]
    assert {r.condition for r in records} == {c.name for c in IDEAL_CONDITIONS}


def test_f1_of_main_populations(harness):
    _, (populations, _) = harness
    for name in ("lymphocytes", "t_cells", "b_cells"):
        assert populations[name]["n_f1"] > 0
        assert populations[name]["min_f1"] >= 0.97, (name, populations[name])


def test_b_cell_intervals_hold_the_truth(harness):
    """95% intervals hold the true B-cell count as often as 95% intervals should.

    On 24 tubes a share of 93% cannot be told from 95%: sound 95% intervals
    miss 3 or more of them in 12% of seeds and 4 or more in 3%. So the test
    fails when more than 3 miss (coverage below ~87%). The 93% target itself is measured by
    ``benchmarks/accuracy.py`` over 240 tubes (README, Accuracy).
    """
    records, (populations, _) = harness
    entries = [r.populations["b_cells"] for r in records if "inside" in r.populations.get("b_cells", {})]
    misses = sum(not entry["inside"] for entry in entries)
    assert len(entries) >= 20 and misses <= 3, f"{misses} of {len(entries)} intervals miss the truth"


def test_no_wrong_verdict_and_indeterminate_only_near_threshold(harness):
    _, (_, confusion) = harness
    assert confusion.get(("eligible", "not_eligible"), 0) == 0
    assert confusion.get(("not_eligible", "eligible"), 0) == 0
    assert confusion.get(("indeterminate", "far from threshold"), 0) == 0
    assert confusion.get(("eligible", "eligible"), 0) > 0 and confusion.get(("not_eligible", "not_eligible"), 0) > 0


def test_car_intervals_hold_the_truth(harness):
    _, (populations, _) = harness
    assert populations["car_t"]["n"] >= 8
    assert populations["car_t"]["coverage"] >= 0.93, populations["car_t"]


def test_car_f1_close_to_the_best_count_preserving_cut(harness):
    _, (populations, _) = harness
    car = populations["car_t"]
    assert car["n_f1_1pct"] >= 2
    assert car["median_f1_1pct"] >= 0.90, car
    # the ideal cut knows the true count; the gate has to estimate it
    assert car["max_f1_gap_to_ideal_1pct"] <= 0.05, car


# ---------------------------------------------------------------------------
# realistic conditions: what they draw, and the per-condition table
# ---------------------------------------------------------------------------

def _draws(name, n=200, seed=5):
    condition, = select_conditions(name)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        overrides, acquisition = condition.draw(rng)
        overrides = dict(overrides)
        car_t = overrides.pop("car_t", None)
        concentrations = (default_concentrations("car", car_t=car_t, **overrides) if condition.panel == "car"
                          else default_concentrations("tbnk", **overrides))
        out.append((concentrations, acquisition))
    return out


def test_condition_set_holds_ideal_and_realistic_conditions():
    names = [c.name for c in CONDITIONS]
    assert len(names) == len(set(names))
    assert CONDITIONS == IDEAL_CONDITIONS + REALISTIC_CONDITIONS + CAR_REFERENCE_CONDITIONS
    assert len(REALISTIC_CONDITIONS) >= 10
    assert [c.name for c in select_conditions("car_reference")] == [c.name for c in CAR_REFERENCE_CONDITIONS]
    assert [c.name for c in select_conditions("ideal")] == [c.name for c in IDEAL_CONDITIONS]
    assert [c.name for c in select_conditions(["neutropenia", "typical"])] == ["typical", "neutropenia"]
    with pytest.raises(ValueError, match="unknown condition"):
        select_conditions("no_such_condition")


def test_lymphodepleted_composition():
    for c, _ in _draws("lymphodepleted_early"):
        share = c["lymphocytes"] / c["leukocytes"]
        assert 300 <= c["lymphocytes"] <= 450 and 0.11 <= share <= 0.28 + 1e-9
        assert 0.5 - 1e-9 <= c["granulocytes"] / c["leukocytes"] <= 0.8 + 1e-9
        assert 0.5 <= c["monocytes"] / c["lymphocytes"] <= 1.3 + 1e-9      # about as many as lymphocytes


def test_extreme_compositions():
    assert all(c["granulocytes"] < 500 for c, _ in _draws("neutropenia"))
    assert all(c["monocytes"] > 1000 for c, _ in _draws("monocytosis"))
    eosinophilia = _draws("eosinophilia")
    assert all(800 <= c["eosinophils"] < c["granulocytes"] for c, _ in eosinophilia)
    shares = [c["lymphocytes"] / c["leukocytes"] for c, _ in _draws("lymphocyte_share_1-70pct")]
    assert min(shares) < 0.02 and max(shares) > 0.5 and all(0.009 < x < 0.71 for x in shares)
    assert all(c["basophils"] >= 50 and c["eosinophils"] >= 200 for c, _ in _draws("basophils_eosinophils"))


def test_realistic_conditions_switch_on_their_options():
    expected = {"photon_spread": "photon_noise", "nk_continuum_nkt": "nk_continuum",
                "rbc_ghosts_10-40pct": "rbc_ghost_fraction", "marker_continua": "marker_continua"}
    for name, option in expected.items():
        assert all(a.get(option) for _, a in _draws(name, n=20)), name
    assert all(0.02 <= a["nkt_fraction"] <= 0.08 for _, a in _draws("nk_continuum_nkt", n=50))
    assert all(0.1 <= a["rbc_ghost_fraction"] <= 0.4 for _, a in _draws("rbc_ghosts_10-40pct", n=50))
    for name in ("realistic_tbnk", "realistic_car"):
        for _, a in _draws(name, n=20):
            assert a["photon_noise"] and a["nk_continuum"] and a["marker_continua"] and a["nkt_fraction"] > 0
    for c, a in _draws("realistic_car", n=50):
        assert c["b_cells"] == 0 and c["car_t"] > 0 and a["gain_range"] == (0.9, 1.1)


@pytest.fixture(scope="module")
def realistic_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("realistic")
    tubes = simulate_condition_set(out, n_samples=len(REALISTIC_CONDITIONS), seed=78,
                                   conditions=REALISTIC_CONDITIONS)
    return tubes, [evaluate_tube(path, condition, truth) for path, condition, truth in tubes]


def test_realistic_tubes_carry_their_truth(realistic_run):
    tubes, _ = realistic_run
    truths = {name: json.loads((path.parent / "truth" / f"{path.stem}.json").read_text())
              for path, name, _ in tubes}
    assert truths["photon_spread"]["realism"]["photon_noise"]
    assert truths["nk_continuum_nkt"]["singlet_events"]["nkt_cells"] > 0
    assert truths["rbc_ghosts_10-40pct"]["label_counts"]["rbc_ghost"] > 0
    assert truths["eosinophilia"]["singlet_events"]["eosinophils"] > 0
    assert truths["realistic_car"]["panel"] == "car"
    car_truth, = [truth for _, name, truth in tubes if name == "realistic_car"]
    pre = Path(car_truth["pre_infusion_file"])      # the subject's reference, acquired with the same options
    pre_truth = json.loads((pre.parent / "truth" / f"{pre.stem}.json").read_text())
    assert pre_truth["realism"] == {**truths["realistic_car"]["realism"],
                                    "photoelectrons_per_unit": pre_truth["realism"]["photoelectrons_per_unit"]}
    assert pre_truth["concentrations_per_ul"]["car_t"] == 0


def test_realistic_conditions_are_tabulated(realistic_run):
    _, records = realistic_run
    for r in records:   # analysed or, if the gating raised, recorded with the reason
        assert r.status == "ok" or (r.status == "error" and r.error)
    table = summarize_by_condition(records)
    assert list(table) == [c.name for c in REALISTIC_CONDITIONS]
    by_name = {r.condition: r for r in records}
    for name, row in table.items():
        assert row["n"] == 1
        record = by_name[name]
        if record.panel == "tbnk" and record.status == "ok":
            assert row["n_lymphosum"] == (record.lymphosum_pct is not None)
            assert row["n_good"] == int(record.good_tube)
    assert table["realistic_car"]["n_verdicts"] == 0 and table["realistic_car"]["lymphosum_ok"] is None


def test_summarize_by_condition_arithmetic():
    def record(condition, **kw):
        kw.setdefault("panel", "tbnk")
        return TubeRecord(f"{condition}.fcs", condition, kw.pop("status", "ok"), **kw)

    b = {"true_events": 100, "events": 100, "f1": 0.9, "true_cells_per_ul": 10.0, "cells_per_ul": 12.0,
         "ci95": [9.0, 14.0], "inside": True, "relative_error": 0.2}
    records = [
        record("a", eligibility_truth=True, verdict="eligible", lymphosum_pct=95.0, populations={"b_cells": b}),
        record("a", eligibility_truth=True, verdict="not_eligible", lymphosum_pct=120.0),      # wrong verdict
        record("a", eligibility_truth=False, verdict="qc_fail", lymphosum_pct=101.0),          # false qc_fail
        record("a", eligibility_truth=False, verdict="qc_fail", good_tube=False),              # too few beads
        record("a", status="error", error="ValueError: boom"),                                 # raised
        record("car", panel="car", lymphosum_pct=None),
    ]
    table = summarize_by_condition(records)
    a = table["a"]
    assert a["n"] == 5 and a["n_failed"] == 1 and a["errors"] == ["ValueError: boom"]
    assert a["lymphosum_ok"] == pytest.approx(2 / 3) and a["n_lymphosum"] == 3
    # good TBNK tubes: three with verdicts and the one that raised; qc_fail or no verdict in two
    assert a["n_good"] == 4 and a["qc_fail_among_good"] == pytest.approx(2 / 4)
    assert a["wrong_verdicts"] == 1 and a["n_verdicts"] == 4
    assert a["b_cells"]["median_rel_error"] == pytest.approx(0.2) and a["b_cells"]["coverage"] == 1.0
    assert a["b_cells"]["median_f1"] == pytest.approx(0.9) and a["lymphocytes"]["n"] == 0
    assert table["car"]["n_good"] == 0 and table["car"]["qc_fail_among_good"] is None


def test_evaluate_tube_records_a_failing_reference(tmp_path):
    (path, name, truth), = simulate_condition_set(tmp_path, 1, seed=3, conditions="car_1-10pct")
    truth = dict(truth, pre_infusion_file=str(tmp_path / "missing_pre.fcs"))
    record = evaluate_tube(path, name, truth)
    assert record.status == "error" and record.error and record.panel == "car"


def test_accuracy_script_prints_the_condition_table(capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import accuracy
    finally:
        sys.path.pop(0)
    accuracy.main(["--samples", "2", "--conditions", "neutropenia,photon_spread", "--seed", "4"])
    out = capsys.readouterr().out
    assert "Accuracy per condition" in out and "lymphosum" in out
    lines = [line for line in out.splitlines() if line.startswith(("neutropenia", "photon_spread"))]
    assert len(lines) == 2 and any(line.startswith("photon_spread*") for line in lines)   # * = realistic
    accuracy.main(["--list-conditions"])
    listed = capsys.readouterr().out.split()
    assert all(c.name in listed for c in CONDITIONS)


def test_accuracy_script_pools_several_seeds(capsys, tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import accuracy
    finally:
        sys.path.pop(0)
    accuracy.main(["--samples", "1", "--conditions", "neutropenia", "--seed", "4,5", "--keep", str(tmp_path)])
    out = capsys.readouterr().out
    assert "2 simulated tubes over 1 conditions (seeds 4, 5)" in out
    assert any(line.split()[:2] == ["neutropenia", "2"] for line in out.splitlines())
    # each seed its own draw, kept apart (the file names are the same)
    first, second = (sorted((tmp_path / f"seed{s}").glob("*.fcs")) for s in (4, 5))
    assert [p.name for p in first] == [p.name for p in second]
    assert first[0].read_bytes() != second[0].read_bytes()
    with pytest.raises(SystemExit):
        accuracy.main(["--seed", "4,4"])
    assert "repeated" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        accuracy.main(["--seed", "4,x"])
    assert "integers separated by commas" in capsys.readouterr().err


def test_car_reference_conditions_acquire_the_reference_at_another_gain(tmp_path):
    tubes = simulate_condition_set(tmp_path, n_samples=len(CAR_REFERENCE_CONDITIONS), seed=5,
                                   conditions=CAR_REFERENCE_CONDITIONS)
    ratios = [r for _, _, truth in tubes for r in truth["reference_gain_ratio"].values()]
    assert len(ratios) == 7 * len(tubes) and all(0.5 <= r <= 2.0 for r in ratios)
    assert max(ratios) / min(ratios) > 1.5          # drawn per detector over the range, not a fixed drift
    for path, _, truth in tubes:
        assert Path(truth["pre_infusion_file"]).is_file() and truth["concentrations_per_ul"].get("car_t") is not None


def test_car_summary_separates_the_draws_counting_noise_from_the_analysis_error(tmp_path):
    # A perfect gate (singlet CAR+ events over singlet beads) is off the blood's truth by the
    # draw's counting noise alone; the harness reports that floor and the count's distance to it.
    (path, name, truth), = simulate_condition_set(tmp_path, 1, seed=3, conditions="car_ref_gain_0-60pct")
    truth["concentrations_per_ul"]["car_t"] = max(truth["concentrations_per_ul"]["car_t"], 1.0)
    entry = evaluate_tube(path, name, truth).populations["car_t"]
    perfect = truth["singlet_events"]["car_t"] / truth["bead_events_singlet"] * truth["beads_per_test"] \
        / truth["sample_volume_ul"]
    assert entry["perfect_cells_per_ul"] == pytest.approx(perfect)
    true_value = truth["concentrations_per_ul"]["car_t"]
    assert entry["perfect_relative_error"] == pytest.approx(abs(perfect - true_value) / true_value)
    if perfect:
        assert entry["relative_error_to_perfect"] == pytest.approx(abs(entry["cells_per_ul"] - perfect) / perfect)
        assert entry["signed_error_to_perfect"] == pytest.approx((entry["cells_per_ul"] - perfect) / perfect)

    def record(true_events, measured, perfect_value):
        return TubeRecord("a.fcs", "car_x", "ok", panel="car", populations={"car_t": {
            "true_events": true_events, "true_cells_per_ul": 100.0, "cells_per_ul": measured, "inside": True,
            "below_lloq": False, "relative_error": abs(measured - 100.0) / 100.0,
            "perfect_cells_per_ul": perfect_value, "perfect_relative_error": abs(perfect_value - 100.0) / 100.0,
            "relative_error_to_perfect": abs(measured - perfect_value) / perfect_value,
            "signed_error_to_perfect": (measured - perfect_value) / perfect_value}})
    table = summarize_car([record(400, 110.0, 110.0), record(400, 90.0, 100.0), record(50, 10.0, 100.0)])["all"]
    assert table["n_error"] == 2                                   # the 50-event tube is left out
    assert table["p95_perfect_rel_error"] == pytest.approx(np.percentile([0.10, 0.0], 95))
    assert table["median_rel_error_to_perfect"] == pytest.approx(0.05)
    # the low levels' bias: the 50-event tube's signed error against its perfect gate (-90%)
    assert table["n_low"] == 1 and table["low_level_bias"] == pytest.approx(-0.9)


def test_summarize_car_relates_the_error_to_the_fitted_shape():
    """The shape summary: the fitted log-SDs' median and scatter, the fit's SE, and r with the signed error."""
    def record(log_sd, measured, se=0.05):
        return TubeRecord("a.fcs", "car_x", "ok", panel="car", populations={"car_t": {
            "true_events": 400, "true_cells_per_ul": 100.0, "cells_per_ul": measured, "inside": True,
            "below_lloq": False, "relative_error": abs(measured - 100.0) / 100.0,
            "perfect_cells_per_ul": 100.0, "perfect_relative_error": 0.0,
            "relative_error_to_perfect": abs(measured - 100.0) / 100.0,
            "signed_error_to_perfect": (measured - 100.0) / 100.0,
            "positive_level": {"median": 1800.0, "log_sd": log_sd, "log_sd_se": se}}})
    # a wider fitted shape extrapolates more positives below the cut: the error follows it
    rows = [record(0.8, 85.0), record(0.9, 100.0), record(1.0, 112.0), record(0.85, 95.0, se=0.07)]
    table = summarize_car(rows)["all"]
    assert table["n_shape"] == 4
    assert table["shape_log_sd"] == pytest.approx(0.875)
    assert table["shape_log_sd_scatter"] == pytest.approx(np.std([0.8, 0.9, 1.0, 0.85], ddof=1))
    assert table["shape_log_sd_se"] == pytest.approx(0.05)
    assert table["shape_error_correlation"] > 0.95
    # without fitted shapes (too few positives above the cut) nothing is claimed
    bare = summarize_car([TubeRecord("b.fcs", "car_x", "ok", panel="car", populations={"car_t": {
        "true_events": 400, "true_cells_per_ul": 100.0, "cells_per_ul": 90.0, "inside": True,
        "below_lloq": False, "relative_error": 0.1}})])["all"]
    assert bare["n_shape"] == 0 and bare["shape_error_correlation"] is None and bare["shape_log_sd"] is None


def test_the_p95_interval_holds_the_true_95th_percentile_and_says_when_it_cannot_be_bounded():
    """Order statistics of the tubes' errors: >= 95 % coverage; too few tubes give no upper bound."""
    from scipy.stats import norm

    from cytometry.simulation.validation import quantile_interval

    rng = np.random.default_rng(11)
    true_p95 = norm.ppf(0.95)
    for n in (134, 300, 800):
        held = []
        for _ in range(800):
            low, high = quantile_interval(rng.standard_normal(n))
            held.append(low <= true_p95 <= high)
        # the binomial's discreteness makes it conservative, never below 95 % beyond simulation noise
        assert np.mean(held) >= 0.95 - 2 * np.sqrt(0.95 * 0.05 / 800), (n, np.mean(held))
    # 0.95^60 > 2.5 %: even 60 tubes cannot bound a p95 from above (all 60 may lie below it)
    assert quantile_interval(rng.standard_normal(60))[1] is None
    low, high = quantile_interval(np.arange(34.0))
    assert high is None and low is not None and low < np.percentile(np.arange(34.0), 95)
    # summarize_car carries it for the p95 it reports
    def record(measured):
        return TubeRecord("a.fcs", "car_x", "ok", panel="car", populations={"car_t": {
            "true_events": 400, "true_cells_per_ul": 100.0, "cells_per_ul": measured, "inside": True,
            "below_lloq": False, "relative_error": abs(measured - 100.0) / 100.0}})
    table = summarize_car([record(100.0 + k) for k in range(200)])["all"]
    low, high = table["p95_rel_error_interval"]
    assert low <= table["p95_rel_error"] <= high and (low, high) == quantile_interval([k / 100.0 for k in range(200)])
