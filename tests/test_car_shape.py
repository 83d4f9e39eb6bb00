"""The CAR signal's shape carried from a subject's earlier visits to a later one (cytometry.decisions.car_shape)."""
import copy

import numpy as np
import pytest

from cytometry.decisions.car_shape import count_with_shape, pooled_shape, reread_with_shape
from cytometry.decisions.subjects import persistence

# A late visit's profile: the counts rise with the log-SD (a wider shape puts
# more positives below the cut); the tube alone prefers a wide shape.
PROFILE = {"log_sd": [0.5, 0.7, 0.9, 1.1, 1.3, 1.6], "positives": [120.0, 130.0, 150.0, 190.0, 260.0, 300.0],
           "positives_sd": [4.0, 5.0, 7.0, 12.0, 25.0, 35.0],
           "positives_above_cut": [118.0, 120.0, 122.0, 123.0, 124.0, 124.0], "nll": [30.0, 8.0, 1.0, 0.0, 2.0, 9.0]}


def _result(day, cells_per_ul, events, level=None, profile=None, file=None):
    extra = {"normalisation": {"count_sd_normalisation": 0.5}}
    if level is not None:
        extra["positive_level"] = {"median": 1800.0, "log_sd": level[0], "log_sd_se": level[1]}
    if profile is not None:
        extra["shape_profile"] = profile
    return {"file": file or f"S1_day{day:03d}_CAR.fcs", "subject_id": "S1", "study_day": day, "panel": "car",
            "status": "ok", "qc_flags": [],
            "populations": {"car_t": {"cells_per_ul": cells_per_ul, "ci95": [0.8 * cells_per_ul, 1.25 * cells_per_ul],
                                      "below_lloq": events < 25, "events": events, "reliable": True,
                                      "lod": {"events": 13.0}, "lloq": {"events": 33.0}}},
            "counting": {"method": "beads", "beads_per_test": 50000.0, "sample_volume_ul": 50.0},
            "beads": {"events": 10000},
            "gating": {"gates": [{"name": "car_t", "extra": extra}]}}


def test_a_single_earlier_visit_is_the_prior_with_its_own_error():
    prior = pooled_shape([(0.85, 0.05)])
    assert prior["log_sd"] == pytest.approx(0.85) and prior["sd"] == pytest.approx(0.05) and prior["tau"] == 0.0
    assert pooled_shape([]) is None and pooled_shape([(0.9, None)]) is None


def test_visits_that_disagree_widen_the_prior_beyond_their_errors():
    agreeing = pooled_shape([(0.88, 0.03), (0.90, 0.03), (0.89, 0.03)])
    drifting = pooled_shape([(0.70, 0.03), (0.90, 0.03), (1.10, 0.03)])
    assert agreeing["sd"] < 0.03                      # three agreeing visits: narrower than each
    assert drifting["tau"] > 0.1 and drifting["sd"] > 0.1


def test_the_count_follows_a_tight_prior_and_the_tube_alone_under_a_flat_one():
    tight = count_with_shape(PROFILE, 0.9, 0.005)
    assert tight["positives"] == pytest.approx(150.0, abs=2.0) and tight["log_sd"] == pytest.approx(0.9, abs=0.01)
    flat = count_with_shape(PROFILE, 0.9, 50.0)
    # a flat prior leaves the tube's own preference (the profile's minimum near 1.1)
    assert 170.0 < flat["positives"] < 215.0 and flat["shape_sd"] > tight["shape_sd"]


def test_a_visit_whose_own_shape_differs_keeps_its_own_count():
    result = _result(56, 5.0, 190, level=(1.6, 0.05), profile=PROFILE)
    entry = dict(result["populations"]["car_t"])
    new, why = reread_with_shape(result, entry, {"log_sd": 0.9, "sd": 0.03, "tau": 0.0, "visits": 3})
    assert new is None and "differs" in why
    new, why = reread_with_shape(result, entry, {"log_sd": 1.5, "sd": 0.05, "tau": 0.0, "visits": 3})
    assert why is None and new["shape"]["prior_log_sd"] == 1.5


def test_a_tube_without_a_profile_or_beads_is_not_re_read():
    result = _result(84, 0.1, 2)
    assert reread_with_shape(result, result["populations"]["car_t"], pooled_shape([(0.9, 0.03)]))[0] is None
    volumetric = _result(56, 5.0, 190, profile=PROFILE)
    volumetric["counting"]["method"] = "volumetric"
    assert reread_with_shape(volumetric, volumetric["populations"]["car_t"], pooled_shape([(0.9, 0.03)]))[1] == \
        "not bead-counted"


def _series():
    return [_result(7, 90.0, 900, level=(0.90, 0.04), profile=PROFILE),
            _result(14, 60.0, 600, level=(0.86, 0.05), profile=PROFILE),
            _result(56, 5.0, 190, level=(1.10, 0.14), profile=PROFILE)]


def test_persistence_re_reads_later_visits_with_the_earlier_shape_and_keeps_their_own_count():
    subject, = persistence(_series())
    by_day = {p["study_day"]: p for p in subject["timeline"]}
    assert "own" not in by_day[7]["car_t"]                 # nothing before the first visit
    late = by_day[56]["car_t"]
    assert late["own"]["events"] == 190 and late["shape"]["prior_days"] == [7, 14]
    # the earlier visits' narrower shape puts fewer positives below the cut than this tube alone chose
    assert late["events"] < 190 and late["ci95"][0] <= late["cells_per_ul"] <= late["ci95"][1]
    assert any("log-SD of days 7, 14" in flag for flag in by_day[56]["qc_flags"])
    own, = persistence(_series(), carry_shape=False)
    assert all("own" not in p["car_t"] for p in own["timeline"])


def test_a_visit_added_later_never_changes_an_earlier_visit():
    """Metamorphic: a reported visit stays what it was when a later visit arrives."""
    before, = persistence(_series())
    after, = persistence(_series() + [_result(84, 4.0, 150, level=(0.88, 0.1), profile=copy.deepcopy(PROFILE))])
    old = {p["study_day"]: p["car_t"] for p in before["timeline"]}
    new = {p["study_day"]: p["car_t"] for p in after["timeline"]}
    for day in (7, 14, 56):
        assert new[day] == old[day]
    assert new[84]["shape"]["prior_days"] == [7, 14, 56]


def test_the_shape_profile_comes_with_the_count_and_is_centred_on_the_tube_s_own_fit():
    from gating.auto import SHAPE_PROFILE_LOG_SDS, reference_subtraction_count
    from gpu.logicle import logicle, logicle_inverse

    top = 262144.0
    rng = np.random.default_rng(11)
    spread = lambda n: rng.normal(0.0, 300.0, n)
    reference = logicle(160.0 + spread(6000), t=top)
    values = logicle(np.concatenate([160.0 + spread(20000), 1800.0 * rng.lognormal(0.0, 0.9, 400) + spread(400)]),
                     t=top)
    scale = (lambda v: logicle(np.asarray(v, dtype=np.float64), t=top),
             lambda v: logicle_inverse(np.asarray(v, dtype=np.float64), t=top))
    positives, info = reference_subtraction_count(values, reference, align=False, scale=scale,
                                                  shape_profile=SHAPE_PROFILE_LOG_SDS)
    profile = info["shape_profile"]
    assert profile["log_sd"] == list(SHAPE_PROFILE_LOG_SDS) and min(profile["nll"]) == 0.0
    assert all(np.diff(profile["positives"][:8]) > 0)       # a wider shape: more positives below the cut
    # the profile's best point lies next to the free fit's log-SD, and its count next to the free count
    best = int(np.argmin(profile["nll"]))
    assert abs(np.log(profile["log_sd"][best] / info["positive_level"]["log_sd"])) < 0.25
    flat = count_with_shape(profile, info["positive_level"]["log_sd"], 10.0)
    assert flat["positives"] == pytest.approx(positives, rel=0.15)
    # without a profile asked for, none is computed
    _, plain = reference_subtraction_count(values, reference, align=False, scale=scale)
    assert "shape_profile" not in plain


def test_a_simulated_series_carries_its_shape_to_the_late_visit(tmp_path):
    """Through the files: a subject's peak visits measure the shape a late, low visit is read with."""
    from cytometry.analysis import AnalysisOptions, analyze_gated, car_reference_of, gate_file, with_car_reference
    from cytometry.simulation.simulate import default_concentrations, simulate_tube, write_tube

    pre = simulate_tube("car", seed=71, photon_noise=True, blood_volume_ul=8.0,
                        concentrations=default_concentrations("car", car_t=0.0, b_cells=30.0))
    pre_path = write_tube(pre, tmp_path / "S1_day000_CAR.fcs")
    options = AnalysisOptions(beads_per_test=pre.truth["beads_per_test"], sample_volume_ul=pre.truth["sample_volume_ul"])
    options = with_car_reference(options, car_reference_of(gate_file(pre_path, options), "pre-infusion tube"))
    results, truth = [], {}
    for day, car in ((10, 150.0), (21, 40.0), (56, 4.0)):
        tube = simulate_tube("car", seed=71 + day, photon_noise=True, blood_volume_ul=8.0 if day < 56 else 30.0,
                             gain_range=(0.95, 1.05), concentrations=default_concentrations("car", car_t=car, b_cells=0.0))
        path = write_tube(tube, tmp_path / f"S1_day{day:03d}_CAR.fcs")
        result = analyze_gated(gate_file(path, options), None, options)
        result.update(file=str(path), subject_id="S1", study_day=day)
        results.append(result)
        truth[day] = car
    subject, = persistence(results)
    late = next(p for p in subject["timeline"] if p["study_day"] == 56)["car_t"]
    assert late["shape"]["prior_days"] == [10, 21] and late["own"]["cells_per_ul"] > 0
    assert late["ci95"][0] <= truth[56] <= late["ci95"][1], late
    peak = next(p for p in subject["timeline"] if p["study_day"] == 10)["car_t"]
    assert "own" not in peak and peak["ci95"][0] <= truth[10] <= peak["ci95"][1]


def test_a_visit_whose_gate_failed_its_checks_lends_no_shape():
    series = _series()
    series[0]["populations"]["car_t"]["reliable"] = False      # day 7: no kinetics point, no shape
    subject, = persistence(series)
    late = next(p for p in subject["timeline"] if p["study_day"] == 56)["car_t"]
    assert late["shape"]["prior_days"] == [14]
