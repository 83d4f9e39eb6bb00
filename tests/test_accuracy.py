"""Accuracy against the simulator's truth (the project's oracle)."""
import json
from pathlib import Path

import numpy as np
import pytest

from cytometry.analysis import AnalysisOptions, analyze_file
from cytometry.loading.manifest import read_manifest
from cytometry.simulation.simulate import default_concentrations, simulate_tube, write_tube

THRESHOLD = 5.0


def truth_for(fcs_path):
    path = Path(fcs_path)
    return json.loads((path.parent / "truth" / f"{path.stem}.json").read_text())


def contradicts(verdict, true_value):
    """A definite verdict on the wrong side of the threshold."""
    return (verdict == "eligible" and true_value <= THRESHOLD) or (verdict == "not_eligible" and true_value > THRESHOLD)


@pytest.fixture(scope="module")
def committed_results(sample_dir):
    manifest = read_manifest(sample_dir / "manifest.csv")
    return [(row, analyze_file(row.path, row)) for row in manifest.rows]


def test_committed_samples_b_cells_inside_interval(committed_results):
    inside = []
    for row, result in committed_results:
        assert result["status"] == "ok", result["error"]
        truth = truth_for(row.path)["concentrations_per_ul"]["b_cells"]
        low, high = result["populations"]["b_cells"]["ci95"]
        inside.append(low <= truth <= high)
    assert np.mean(inside) >= 0.90, f"{sum(inside)} of {len(inside)} intervals hold the true B-cell count"


def test_committed_verdicts_never_contradict_truth(committed_results):
    verdicts = {}
    for row, result in committed_results:
        if result["eligibility"] is None:
            continue
        truth = truth_for(row.path)["concentrations_per_ul"]["b_cells"]
        verdicts[row.file] = result["eligibility"]["verdict"]
        assert not contradicts(result["eligibility"]["verdict"], truth), (row.file, truth, result["eligibility"])
    # The set was built to exercise all three outcomes.
    assert set(verdicts.values()) == {"eligible", "not_eligible", "indeterminate"}


def _varied_set(tmp_dir, n=20):
    """Screening tubes across B-cell levels, naming styles, channel orders and gains (seeded)."""
    rng = np.random.default_rng(20261124)
    levels = [0.0, 0.5, 2.0, 3.5, 4.5, 5.5, 7.0, 9.0, 12.0, 20.0, 35.0, 60.0, 90.0, 150.0]
    tubes = []
    for i in range(n):
        b_cells = float(levels[i % len(levels)])
        tube = simulate_tube(
            "tbnk", seed=1000 + i,
            concentrations=default_concentrations("tbnk", b_cells=b_cells,
                                                  lymphocytes=float(rng.uniform(500, 2000))),
            blood_volume_ul=float(rng.uniform(3.0, 6.0)),
            marker_style=["plain", "space", "dash"][i % 3],
            detector_style=["bd", "fl", "attune"][(i // 3) % 3],
            shuffle_channels=bool(i % 2), gain_range=(0.7, 1.4),
            spill_keyword=["$SPILLOVER", "SPILL", "$COMP"][i % 3],
        )
        tubes.append((write_tube(tube, tmp_dir / f"tube{i:02d}.fcs"), tube.truth))
    return tubes


def test_varied_simulated_tubes(tmp_path):
    results = []
    for path, truth in _varied_set(tmp_path):
        options = AnalysisOptions(beads_per_test=truth["beads_per_test"], sample_volume_ul=truth["sample_volume_ul"])
        result = analyze_file(path, options=options)
        assert result["status"] == "ok", result["error"]
        results.append((result, truth))
    inside, events_error = [], []
    for result, truth in results:
        b = result["populations"]["b_cells"]
        true_value = truth["concentrations_per_ul"]["b_cells"]
        inside.append(b["ci95"][0] <= true_value <= b["ci95"][1])
        assert not contradicts(result["eligibility"]["verdict"], true_value)
        true_events = truth["singlet_events"]["b_cells"]
        if true_value == 0:
            assert b["events"] <= 2, "a tube without B cells must read ~0, not the nearest blob"
        if true_events >= 50:
            events_error.append(abs(b["events"] - true_events) / true_events)
    # 95% intervals: with 20 tubes, 3 misses or more would be very unlikely (P < 2%) if they hold.
    assert sum(inside) >= 17, f"{sum(inside)} of {len(inside)} intervals hold the truth"
    # Where B cells are plentiful, the gate finds the true events to within 5%.
    assert max(events_error) < 0.05
