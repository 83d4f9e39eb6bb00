"""The pre-infusion CAR reference normalised to the follow-up tube (issue 13, parts 2-4).

Synthetic values model what a detector does: a cell's signal (autofluorescence,
CAR reagent) is multiplied by the gain, electronic noise is not. A reference
acquired at another gain and used as acquired has the wrong tail; normalised by
the beads (a fluorescence standard in every tube) and with the noise that does
not scale made up, it counts no CAR+ cells where there are none.
"""
import numpy as np
import pytest

from gating.car import BeadLevel, CarReference, count_against_reference, normalise_reference
from gpu.logicle import logicle

TOP = 262144.0


def _negatives(rng, n, gain):
    """CAR-negative T cells in linear units: gain x autofluorescence, plus electronic noise."""
    return gain * 160.0 * rng.lognormal(0.0, 0.35, n) + rng.normal(0.0, 65.0, n)


def _positives(rng, n, gain):
    return gain * 1800.0 * rng.lognormal(0.0, 0.6, n) + _negatives(rng, n, gain)


def _beads(rng, n, gain):
    return gain * rng.normal(90000.0, 3600.0, n)


def _reference(rng, gain, with_beads=True):
    beads = BeadLevel.of(_beads(rng, 800, gain), TOP) if with_beads else None
    return CarReference(_negatives(rng, 5000, gain), beads, "pre-infusion tube")


def _follow_up(rng, n_positive, gain, n_negative=5000):
    values = np.concatenate([_negatives(rng, n_negative, gain), _positives(rng, n_positive, gain)])
    return logicle(rng.permutation(values), t=TOP), logicle(_beads(rng, 800, gain), t=TOP)


@pytest.mark.parametrize("reference_gain", [0.5, 0.7, 1.0, 1.4, 2.0])
def test_no_car_cells_counts_none_whatever_the_reference_gain(reference_gain):
    rng = np.random.default_rng(int(reference_gain * 10))
    false_positives = []
    for _ in range(5):
        values, beads = _follow_up(rng, 0, 1.0)
        positives, info = count_against_reference(values, _reference(rng, reference_gain), beads, TOP)
        false_positives.append(positives)
        assert info["normalisation"]["source"] == "beads"
        assert info["normalisation"]["gain_ratio"] == pytest.approx(1.0 / reference_gain, rel=0.02)
    # the 0.1 % tail of 5,000 negatives: ~5 expected above the counting cut, a count of a few at most
    assert np.mean(false_positives) < 6, false_positives
    assert max(false_positives) < 15, false_positives


@pytest.mark.parametrize("reference_gain", [0.5, 2.0])
def test_a_reference_used_as_acquired_would_report_false_persistence(reference_gain):
    """The control: without normalisation the same tubes read CAR+ cells (so the test above can fail)."""
    from gating.auto import reference_subtraction_count

    rng = np.random.default_rng(7)
    values, _ = _follow_up(rng, 0, 1.0)
    reference = logicle(_negatives(rng, 5000, reference_gain), t=TOP)
    # a reference with more gain than the follow-up is wider, one with less narrower: only the
    # narrower one (the follow-up at the higher gain) invents positives when used as acquired
    as_acquired, _ = reference_subtraction_count(values, reference, align=False)
    if reference_gain < 1:
        assert as_acquired > 50
    else:
        assert as_acquired < 15


def test_noise_that_does_not_scale_with_gain_is_made_up():
    rng = np.random.default_rng(3)
    reference = _reference(rng, 2.0)            # the follow-up at half the reference's gain
    follow_up = _negatives(rng, 5000, 1.0)
    median = float(np.median(follow_up))
    flank = median - float(np.quantile(follow_up, 0.158655))
    _, info = normalise_reference(reference, 0.5, (median, flank), 5000, TOP)
    # the electronic noise, 65 x sqrt(1 - 0.5^2) ~ 56 units, is what scaling took away
    assert info["replicates"] > 1 and 35 < info["added_noise_sd"] < 80, info
    _, info = normalise_reference(_reference(rng, 0.5), 2.0, (median, flank), 5000, TOP)
    # a reference at half the gain, mapped up, carries twice the noise: the follow-up is given the
    # difference instead (65 x sqrt(2^2 - 1) ~ 113 units), the reference is not touched
    assert info["added_noise_sd"] == 0.0 and info["replicates"] == 1
    assert 80 < info["sample_noise_sd"] < 150, info


def test_a_wider_reference_no_longer_under_counts():
    """A reference at half the follow-up's gain: mapped up, its noise is doubled and its tail too wide."""
    rng = np.random.default_rng(21)
    counts = []
    for _ in range(4):
        values, beads = _follow_up(rng, 150, 1.0, n_negative=20000)
        positives, info = count_against_reference(values, _reference(rng, 0.5), beads, TOP)
        assert info["sample_noise_sd"] > 0
        counts.append(positives)
    # 150 CAR+ among 20,000 negatives (0.75 %): no longer read low by the negatives the wide tail invents
    assert abs(np.mean(counts) - 150) < 15, counts


def test_positives_with_a_long_dim_side_are_extrapolated_through_the_negatives_spread():
    """Spreading widens every cell's value, CAR+ cells' too: their dim side is the negatives' spread."""
    from gating.auto import reference_subtraction_count
    from gpu.logicle import logicle_inverse

    rng = np.random.default_rng(8)
    spread = lambda n: rng.normal(0.0, 300.0, n)           # wide compensated negatives (spillover spreading)
    reference = logicle(160.0 + spread(6000), t=TOP)
    values = logicle(np.concatenate([160.0 + spread(4000), 1800.0 * rng.lognormal(0.0, 0.8, 600) + spread(600)]),
                     t=TOP)
    scale = (lambda v: logicle(np.asarray(v, dtype=np.float64), t=TOP),
             lambda v: logicle_inverse(np.asarray(v, dtype=np.float64), t=TOP))
    convolved, info = reference_subtraction_count(values, reference, align=False, scale=scale)
    gaussian, _ = reference_subtraction_count(values, reference, align=False)
    assert info["positive_share_above_cut"] < 0.9                   # a good part of them lies below the cut
    assert abs(convolved - 600) < 2.6 * np.sqrt(600 + info["count_sd"] ** 2), (convolved, info)
    assert gaussian < convolved                 # a Gaussian on the display scale misses the dim side


@pytest.mark.parametrize("n_positive", [100, 600, 3000])
@pytest.mark.parametrize("reference_gain", [0.5, 2.0])
def test_car_cells_are_counted_against_a_moved_reference(n_positive, reference_gain):
    rng = np.random.default_rng(n_positive + int(10 * reference_gain))
    z_scores = []
    for _ in range(4):
        values, beads = _follow_up(rng, n_positive, 1.0)
        positives, info = count_against_reference(values, _reference(rng, reference_gain), beads, TOP)
        z_scores.append((positives - n_positive) / np.sqrt(n_positive + info["count_sd"] ** 2))
    assert np.all(np.abs(z_scores) < 2.6), z_scores
    assert abs(np.mean(z_scores)) < 1.3, z_scores


def test_saturated_or_missing_beads_fall_back_to_the_negative_t_cells():
    rng = np.random.default_rng(5)
    saturated = BeadLevel.of(np.minimum(_beads(rng, 800, 3.0), 0.97 * TOP), TOP)
    assert saturated.saturated and "saturated" in saturated.problem()
    assert BeadLevel.of(_beads(rng, 10, 1.0), TOP).problem() == "10 beads < 25"
    # negatives well clear of zero (no electronic noise to speak of): their level is a gain
    reference = CarReference(2.0 * 400.0 * rng.lognormal(0, 0.3, 5000), saturated, "pre")
    values = logicle(400.0 * rng.lognormal(0, 0.3, 5000), t=TOP)
    positives, info = count_against_reference(values, reference, None, TOP)
    assert info["normalisation"]["source"] == "CAR-negative T cells"
    assert info["normalisation"]["gain_ratio"] == pytest.approx(0.5, rel=0.03)
    assert "saturated" in info["normalisation"]["bead_problem"]
    assert positives < 15


def test_anchors_that_disagree_widen_the_interval():
    rng = np.random.default_rng(8)
    # the beads say the gain doubled (another bead lot, twice as bright); the cells say it did not
    reference = CarReference(2.0 * 400.0 * rng.lognormal(0, 0.3, 5000) / 2.0,
                             BeadLevel.of(_beads(rng, 800, 0.5), TOP), "pre")
    values = np.concatenate([400.0 * rng.lognormal(0, 0.3, 5000), 4000.0 * rng.lognormal(0, 0.5, 150)
                             + 400.0 * rng.lognormal(0, 0.3, 150)])
    positives, info = count_against_reference(logicle(values, t=TOP), reference, logicle(_beads(rng, 800, 1.0), t=TOP),
                                              TOP)
    normalisation = info["normalisation"]
    assert normalisation["bead_ratio"] == pytest.approx(2.0, rel=0.03)
    assert normalisation["negative_ratio"] == pytest.approx(1.0, rel=0.05)
    alternative = normalisation["alternative"]["positive_events"]
    assert normalisation["count_sd_normalisation"] == pytest.approx(abs(alternative - positives) / 2, abs=0.01)


def test_neither_anchor_usable_is_flagged_and_widened():
    rng = np.random.default_rng(9)
    # no beads recorded, negatives dominated by noise around zero: no gain can be measured
    reference = CarReference(rng.normal(0, 120, 5000), None, "pre")
    values = logicle(np.concatenate([rng.normal(0, 60, 5000), 3000 * rng.lognormal(0, 0.4, 300)]), t=TOP)
    positives, info = count_against_reference(values, reference, None, TOP)
    codes = [code for code, _ in info["flags"]]
    assert codes == ["reference_not_normalised"]
    assert info["normalisation"]["gain_ratio"] == pytest.approx(0.5, rel=0.1)   # the spreads' ratio
    assert info["normalisation"]["count_sd_normalisation"] >= 0
    assert abs(positives - 300) < 3 * np.sqrt(300 + info["count_sd"] ** 2)


# --------------------------------------------------------------------------- through the files


def _car_series(tmp_path, reference_gain, days_and_car, seed):
    from cytometry.simulation.simulate import PANELS, default_concentrations, simulate_tube, write_tube

    dyes = [dye for _, dye, _ in PANELS["car"]]
    pre = simulate_tube("car", seed=seed, concentrations=default_concentrations("car", car_t=0.0, b_cells=30.0),
                        blood_volume_ul=6.0, photon_noise=True, gains={d: reference_gain for d in dyes})
    tubes = [(0, write_tube(pre, tmp_path / f"day000_{reference_gain}.fcs"), 0.0, pre.truth)]
    for day, car in days_and_car:
        tube = simulate_tube("car", seed=seed + day, photon_noise=True, blood_volume_ul=6.0, gain_range=(0.95, 1.05),
                             concentrations=default_concentrations("car", car_t=car, b_cells=0.0))
        tubes.append((day, write_tube(tube, tmp_path / f"day{day:03d}_{reference_gain}.fcs"), car, tube.truth))
    return tubes


@pytest.mark.parametrize("reference_gain", [0.5, 2.0])
def test_no_false_persistence_after_the_car_cells_are_gone(tmp_path, reference_gain):
    """A series whose CAR+ cells fall to 0 after day 28, the reference at 0.5x and 2x the gain."""
    from cytometry.analysis import AnalysisOptions, analyze_gated, car_reference_of, gate_file, with_car_reference

    series = _car_series(tmp_path, reference_gain, [(14, 150.0), (28, 20.0), (56, 0.0), (84, 0.0)],
                         seed=40 + int(reference_gain))
    (_, pre_path, _, truth), *visits = series
    options = AnalysisOptions(beads_per_test=truth["beads_per_test"], sample_volume_ul=truth["sample_volume_ul"])
    options = with_car_reference(options, car_reference_of(gate_file(pre_path, options), "pre-infusion tube"))
    for day, path, car, _ in visits:
        result = analyze_gated(gate_file(path, options), None, options)
        count = result["populations"]["car_t"]
        normalisation = result["car_threshold"]["normalisation"]
        assert normalisation["source"] == "beads"
        assert normalisation["gain_ratio"] == pytest.approx(1.0 / reference_gain, rel=0.1)
        assert count["lloq"]["events"] >= 25 and count["lloq"]["cells_per_ul"] > 0
        assert count["lod"]["events"] <= count["lloq"]["events"]
        if car == 0.0:
            assert count["below_lloq"], (day, count)
            assert count["ci95"][0] == 0.0
        else:
            assert count["ci95"][0] <= car <= count["ci95"][1], (day, car, count)


def test_a_count_the_default_lloq_would_quantify_says_why_this_tube_s_is_higher(sample_dir):
    """S01 day 28 (committed): 2.5 uL of blood, a pre-infusion tube of ~500 T cells against ~1,000 here."""
    from cytometry.analysis import AnalysisOptions, analyze_gated, car_reference_of, gate_file, with_car_reference

    options = AnalysisOptions(beads_per_test=48950, sample_volume_ul=50)
    options = with_car_reference(options, car_reference_of(gate_file(sample_dir / "S01_day000_CAR.fcs", options),
                                                           "pre-infusion tube S01_day000_CAR.fcs"))
    result = analyze_gated(gate_file(sample_dir / "S01_day028_CAR.fcs", options), None, options)
    count = result["populations"]["car_t"]
    lod, lloq = count["lod"]["events"], count["lloq"]["events"]
    assert options.lloq_events < lloq and options.lod_events < lod < lloq
    # the LLOQ is the count whose CV, background noise included, is 20 %
    gate = next(g for g in result["gating"]["gates"] if g["name"] == "car_t")
    background = gate["extra"]["expected_negatives_above_cut"]
    variance = background + background ** 2 / gate["extra"]["reference_tail_events"]
    assert (lloq + variance) / lloq ** 2 == pytest.approx(0.04, rel=0.01)
    # ~50 true CAR+ events, of which the default 25-event LLOQ would quantify the count: this tube's does not
    assert options.lloq_events <= count["events"] < lloq and count["below_lloq"]
    raised = [f for f in result["flags"] if f["code"] == "lloq_raised"]
    assert len(raised) == 1 and "reference T cells" in raised[0]["message"]
    # cells/uL of the limits follow the tube's own events-to-cells/uL factor
    per_event = count["cells_per_ul"] / count["events"]
    assert count["lloq"]["cells_per_ul"] == pytest.approx(lloq * per_event, rel=1e-3)


def test_the_fitted_car_signal_and_its_standard_error_match_the_scatter_over_tubes():
    """The positives' log-SD (gain-free) is recorded with an SE that says how far it scatters from tube to tube."""
    from gating.auto import reference_subtraction_count
    from gpu.logicle import logicle_inverse

    scale = (lambda v: logicle(np.asarray(v, dtype=np.float64), t=TOP),
             lambda v: logicle_inverse(np.asarray(v, dtype=np.float64), t=TOP))
    fitted, reported = [], []
    for seed in range(12):
        rng = np.random.default_rng(100 + seed)
        spread = lambda n: rng.normal(0.0, 300.0, n)
        reference = logicle(160.0 + spread(6000), t=TOP)
        values = logicle(np.concatenate([160.0 + spread(4000), 1800.0 * rng.lognormal(0.0, 0.8, 300) + spread(300)]),
                         t=TOP)
        _, info = reference_subtraction_count(values, reference, align=False, scale=scale)
        level = info["positive_level"]
        fitted.append(level["log_sd"])
        reported.append(level["log_sd_se"])
        assert 1800.0 / 2 < level["median"] < 1800.0 * 2
    scatter, typical_se = np.std(fitted, ddof=1), np.median(reported)
    assert abs(np.mean(fitted) - 0.8) < 3 * typical_se / np.sqrt(len(fitted)) + 0.02, fitted
    assert typical_se / 2 < scatter < typical_se * 2, (scatter, typical_se)


def test_a_net_car_count_below_its_lod_has_an_interval_from_zero(tmp_path):
    """'Not detected' and an interval excluding zero would contradict each other: late visits, CAR+ gone or < 1/uL."""
    from cytometry.analysis import AnalysisOptions, analyze_gated, car_reference_of, gate_file, with_car_reference
    from cytometry.simulation.validation import simulate_condition_set

    counted = []
    for path, _, truth in simulate_condition_set(tmp_path, 4, seed=6, conditions="car_ref_gain_absent"):
        options = AnalysisOptions(beads_per_test=truth["beads_per_test"], sample_volume_ul=truth["sample_volume_ul"])
        options = with_car_reference(options, car_reference_of(gate_file(truth["pre_infusion_file"], options), "pre"))
        count = analyze_gated(gate_file(path, options), None, options)["populations"]["car_t"]
        assert count["below_lod"] == (count["events"] < count["lod"]["events"])
        if count["below_lod"]:
            assert count["ci95"][0] == 0.0 and count["ci95"][1] > 0.0, count
            assert count["below_lloq"]
        counted.append(count["events"])
    # not only empty tubes: a few net events (whose Poisson interval alone would exclude zero) are among them
    assert max(counted) >= 3, counted


def test_a_car_count_without_a_reference_below_its_lloq_is_not_a_detection(tmp_path):
    """The sample's own negative mode sets the cut; no model counts the negatives above it, so a few events are no
    detection (a pre-infusion tube read on its own, or a follow-up whose manifest links no reference)."""
    from cytometry.analysis import AnalysisOptions, analyze_gated, gate_file
    from cytometry.simulation.simulate import default_concentrations, simulate_tube, write_tube

    few = []
    for seed in range(6):
        tube = simulate_tube("car", seed=seed, photon_noise=True, blood_volume_ul=6.0,
                             concentrations=default_concentrations("car", car_t=(0.4, 4.0)[seed % 2], b_cells=0.0))
        options = AnalysisOptions(beads_per_test=tube.truth["beads_per_test"],
                                  sample_volume_ul=tube.truth["sample_volume_ul"])
        result = analyze_gated(gate_file(write_tube(tube, tmp_path / f"s{seed}.fcs"), options), None, options)
        assert "negative mode" in result["car_threshold"]["source"]
        count = result["populations"]["car_t"]
        # no estimate of the negatives above the cut: nothing short of the LLOQ is a detection
        assert count["lod"]["events"] == count["lloq"]["events"] >= options.lloq_events
        assert count["below_lod"] == (count["events"] < count["lod"]["events"])
        if count["below_lod"]:
            assert count["ci95"][0] == 0.0 and count["ci95"][1] > 0.0, count
        if options.lod_events <= count["events"] < count["lod"]["events"]:
            few.append(count["events"])
    # not only empty tubes: counts at or above the zero-background LOD (3 events) are among them
    assert few, "no tube had a count between the zero-background LOD and the LLOQ"


def test_without_a_reference_the_cut_choice_widens_the_car_interval(tmp_path):
    """Spillover spreading makes CAR+ cells a continuum with the negatives: without a reference the count moves
    with the cut, so the negatives' tail cut is counted too, the interval reaches it and the gate says so; with
    no CAR+ cells the two cuts agree and nothing is flagged."""
    from cytometry.analysis import AnalysisOptions, analyze_gated, gate_file
    from cytometry.simulation.simulate import default_concentrations, simulate_tube, write_tube

    flagged = 0
    for seed, car_t in enumerate((0.0, 0.0, 40.0, 150.0, 40.0, 150.0)):
        tube = simulate_tube("car", seed=seed, photon_noise=True, blood_volume_ul=6.0,
                             concentrations=default_concentrations("car", car_t=car_t, b_cells=0.0))
        options = AnalysisOptions(beads_per_test=tube.truth["beads_per_test"],
                                  sample_volume_ul=tube.truth["sample_volume_ul"])
        gated = gate_file(write_tube(tube, tmp_path / f"s{seed}.fcs"), options)
        result = analyze_gated(gated, None, options)
        gate = next(g for g in gated.gating.gates if g.name == "car_t")
        count = result["populations"]["car_t"]
        codes = [f["code"] for f in result["flags"] if f["population"] == "car_t"]
        if car_t == 0.0:
            assert "car_cut_uncertain" not in codes and count["events"] <= 3, (count, codes)
            continue
        assert "car_cut_uncertain" in codes, codes
        flagged += 1
        other_events = gate.extra["alternative_cut"]["events"]
        assert abs(other_events - count["events"]) > 1.96 * np.sqrt(count["events"])
        per_event = count["cells_per_ul"] / count["events"]
        # the interval reaches (about: 0.98 of the way) as far as the other cut's count
        reach = other_events + 0.05 * abs(count["events"] - other_events)
        assert count["ci95"][0] <= reach * per_event <= count["ci95"][1], (count, other_events)
    assert flagged == 4
