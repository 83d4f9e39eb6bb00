"""CAR+ counted against a CAR-negative reference (the subject's pre-infusion tube).

Synthetic marker values on the transformed scale: negatives as a skewed
(gamma) bump, positives a Gaussian whose lower tail runs into them, the
reference drawn from the negatives' law with a gain offset. The truth is the
number of positives drawn.
"""
import numpy as np
import pytest

from gating.auto import GatingParams, balanced_positive_threshold, reference_subtraction_count


def _negatives(rng, size, shift=0.0):
    # right-skewed like compensated negatives on a logicle scale
    return 0.16 + shift + rng.gamma(9.0, 0.012, size)


def _tube(rng, n_negative, n_positive, shift):
    values = np.concatenate([_negatives(rng, n_negative, shift), rng.normal(0.50, 0.09, n_positive)])
    return rng.permutation(values), _negatives(rng, int(rng.integers(1500, 6000)))


@pytest.mark.parametrize("n_positive", [0, 8, 40, 150, 600, 3000])
def test_count_is_unbiased_and_its_interval_holds_the_truth(n_positive):
    rng = np.random.default_rng(n_positive)
    z_scores = []
    for _ in range(100):
        values, reference = _tube(rng, 4000, n_positive, shift=float(rng.uniform(-0.015, 0.015)))
        estimate, info = reference_subtraction_count(values, reference)
        # the Poisson noise of the positives themselves plus the estimate's own
        sd = np.sqrt(max(n_positive, 1) + info["count_sd"] ** 2)
        z_scores.append((estimate - n_positive) / sd)
    z_scores = np.array(z_scores)
    assert np.mean(np.abs(z_scores) <= 1.96) >= 0.9, z_scores.round(2)
    assert abs(z_scores.mean()) < 0.5, z_scores.mean()


def test_gain_offset_between_tubes_is_found():
    rng = np.random.default_rng(3)
    values, reference = _tube(rng, 5000, 300, shift=0.012)
    _, info = reference_subtraction_count(values, reference)
    assert info["reference_shift"] == pytest.approx(0.012, abs=0.004)


def test_a_reference_at_another_gain_is_normalised_by_the_beads(tmp_path):
    from cytometry.analysis import AnalysisOptions, analyze_gated, car_reference_of, gate_file, with_car_reference
    from cytometry.simulation.simulate import default_concentrations, simulate_tube, write_tube

    def reference(gain):
        tube = simulate_tube("car", seed=21, concentrations=default_concentrations("car", car_t=0.0),
                             blood_volume_ul=4.0, gain_range=(gain, gain))
        return car_reference_of(gate_file(write_tube(tube, tmp_path / f"pre_{gain}.fcs")), f"gain {gain}")

    tube = simulate_tube("car", seed=22, concentrations=default_concentrations("car", car_t=80.0),
                         blood_volume_ul=4.0, gain_range=(1.0, 1.0))
    sample = write_tube(tube, tmp_path / "day10.fcs")
    counts = {}
    for gain in (1.05, 2.0):
        options = with_car_reference(AnalysisOptions(beads_per_test=tube.truth["beads_per_test"],
                                                     sample_volume_ul=tube.truth["sample_volume_ul"]), reference(gain))
        result = analyze_gated(gate_file(sample, options), None, options)
        normalisation = result["car_threshold"]["normalisation"]
        assert normalisation["source"] == "beads"
        assert normalisation["gain_ratio"] == pytest.approx(1.0 / gain, rel=0.05)
        counts[gain] = result["populations"]["car_t"]
        low, high = counts[gain]["ci95"]
        assert low <= tube.truth["concentrations_per_ul"]["car_t"] <= high, counts[gain]
    # the same tube: the two references give counts within each other's intervals
    assert counts[2.0]["ci95"][0] <= counts[1.05]["cells_per_ul"] <= counts[2.0]["ci95"][1]


def test_without_positives_almost_nothing_is_gated():
    rng = np.random.default_rng(5)
    values, reference = _tube(rng, 6000, 0, shift=0.0)
    cut, info = balanced_positive_threshold(values, GatingParams(), reference=reference)
    assert (values >= cut).sum() <= 10
    assert info["positive_events"] <= 10


def test_cut_leaves_exactly_the_estimate_above_it():
    rng = np.random.default_rng(9)
    values, reference = _tube(rng, 4000, 500, shift=-0.008)
    cut, info = balanced_positive_threshold(values, GatingParams(), reference=reference)
    assert int((values >= cut).sum()) == round(info["positive_events"])
    assert info["method"].startswith("cut leaving above it the positives counted against the reference")
    for key in ("reference_shift", "counting_cut", "expected_negatives_above_cut", "count_sd"):
        assert key in info


def test_gate_f1_matches_the_ideal_count_preserving_cut():
    rng = np.random.default_rng(11)
    negatives = _negatives(rng, 4000, 0.01)
    positives = rng.normal(0.50, 0.09, 400)
    values = np.concatenate([negatives, positives])
    is_positive = np.arange(values.size) >= negatives.size
    cut, _ = balanced_positive_threshold(values, GatingParams(), reference=_negatives(rng, 3000))
    gated = values >= cut
    f1 = 2 * (gated & is_positive).sum() / (gated.sum() + is_positive.sum())
    brightest = np.argsort(values)[::-1][:is_positive.sum()]
    ideal = 2 * is_positive[brightest].sum() / (2 * is_positive.sum())
    assert f1 >= ideal - 0.03, (f1, ideal)



def _analyze_day10(sample_dir, tmp_path, capsys, pre_infusion_tube=None):
    """S01's day-10 CAR tube through the CLI; the manifest links ``pre_infusion_tube`` as day 0."""
    import csv
    import json

    from cytometry.outputs.cli import main

    rows = list(csv.DictReader(open(sample_dir / "manifest.csv", newline="")))
    kept = []
    for row in rows:
        if row["file"] == "S01_day010_CAR.fcs" or (row["file"] == "S01_day000_CAR.fcs" and pre_infusion_tube):
            path = sample_dir / row["file"] if row["file"] == "S01_day010_CAR.fcs" else pre_infusion_tube
            kept.append(dict(row, file=str(path)))
    manifest = tmp_path / "manifest.csv"
    with open(manifest, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(kept)
    main(["analyze", str(sample_dir / "S01_day010_CAR.fcs"), "--manifest", str(manifest), "--json"])
    document = json.loads(capsys.readouterr().out)
    return document["samples"][0] if isinstance(document, dict) and "samples" in document else document[0]


def test_pre_infusion_tube_from_the_manifest_is_the_reference(sample_dir, tmp_path, capsys):
    import json

    result = _analyze_day10(sample_dir, tmp_path, capsys, sample_dir / "S01_day000_CAR.fcs")
    truth = json.loads((sample_dir / "truth" / "S01_day010_CAR.json").read_text())
    assert "S01_day000_CAR.fcs" in result["car_threshold"]["source"]
    assert result["car_threshold"]["method"].startswith("cut leaving above it the positives counted")
    low, high = result["populations"]["car_t"]["ci95"]
    assert low <= truth["concentrations_per_ul"]["car_t"] <= high
    assert not any("own negative mode" in flag for flag in result["qc_flags"])


def test_without_a_reference_the_result_says_so(sample_dir, tmp_path, capsys):
    result = _analyze_day10(sample_dir, tmp_path, capsys)
    assert result["car_threshold"]["source"] == "negative mode of the same sample"
    assert any(flag.startswith("car_t: no pre-infusion CAR tube linked") for flag in result["qc_flags"])


def test_an_unreadable_reference_is_named_in_the_flags(sample_dir, tmp_path, capsys):
    broken = tmp_path / "S01_day000_CAR.fcs"
    broken.write_bytes(b"FCS3.1 not really")
    result = _analyze_day10(sample_dir, tmp_path, capsys, broken)
    assert result["car_threshold"]["source"] == "negative mode of the same sample"
    flag = next(f for f in result["qc_flags"] if "own negative mode" in f)
    assert "S01_day000_CAR.fcs unusable" in flag, flag
