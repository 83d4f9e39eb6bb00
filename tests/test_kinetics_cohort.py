"""The simulated CAR-T cohort: a deterministic generator, kinetics within 20 % of its truth, the T-cell cross-check.

A three-subject part of the cohort (fast expansion with ongoing aplasia,
incomplete aplasia with the mistyped bead lot, B-cell recovery) goes through
the real command line, ``cytometry analyze --out STORE`` then ``cytometry
persistence --store STORE``; ``benchmarks/kinetics.py`` runs all five
subjects and prints the tables.
"""
import csv
import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest

from cytometry.simulation.cohort import (SUBJECTS, VISIT_DAYS, SubjectSpec, check_unambiguous, make_cohort,
                              select_subjects)
from cytometry.counts import bead_count
from cytometry.decisions.subjects import persistence, t_cell_crosscheck

SEED = 2113
PART = ("fast", "incomplete_aplasia", "recovery")


def _cli(*args):
    result = subprocess.run([sys.executable, "-m", "cytometry.outputs.cli", *map(str, args)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    base = tmp_path_factory.mktemp("cohort")
    folder, store = base / "cohort", base / "store"
    truth = make_cohort(folder, seed=SEED, subjects=list(PART))
    _cli("analyze", folder, "--manifest", folder / "manifest.csv", "--out", store, "--workers", 2)
    measured = json.loads(_cli("persistence", "--store", store, "--json"))["subjects"]
    return {"folder": folder, "store": store, "truth": truth, "measured": {s["subject_id"]: s for s in measured}}


def _digests(folder, prefix=""):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.glob(f"{prefix}*")) if p.is_file()}


def test_generator_is_deterministic_and_a_subject_does_not_depend_on_the_others(cohort, tmp_path):
    alone = tmp_path / "alone"
    truth = make_cohort(alone, seed=SEED, subjects=["recovery"])
    files = _digests(alone, "K05_")
    assert files and all(name.endswith(".fcs") for name in files)
    assert files == _digests(cohort["folder"], "K05_")
    assert _digests(alone / "truth", "K05_") == _digests(cohort["folder"] / "truth", "K05_")
    assert truth["subjects"]["K05"] == cohort["truth"]["subjects"]["K05"]
    other = tmp_path / "other_seed"
    make_cohort(other, seed=SEED + 1, subjects=["recovery"])
    changed = _digests(other, "K05_")
    assert changed.keys() == files.keys() and all(changed[k] != files[k] for k in files)


def test_truth_follows_the_subject_specs_and_the_acquisition_design(cohort):
    folder, truth = cohort["folder"], cohort["truth"]
    rows = list(csv.DictReader(open(folder / "manifest.csv")))
    assert [r["file"] for r in rows] == [p.name for p in sorted(folder.glob("*.fcs"))]
    for spec in select_subjects(PART):
        t = truth["subjects"][spec.subject_id]
        # Tmax and the aplasia days straight from the spec (every true peak is far above the LLOQ).
        assert t["kinetics"]["tmax_day"] == VISIT_DAYS[int(np.argmax(spec.car_t))]
        after = [(d, b) for d, b in zip(VISIT_DAYS, spec.b_cells) if d > 0]
        onset = next((d for d, b in after if b < 1.0), None)
        assert t["kinetics"]["aplasia_onset_day"] == onset
        if onset is not None:
            assert t["kinetics"]["aplasia_recovery_day"] == next((d for d, b in after if d > onset and b >= 1.0), None)
        # The pre-infusion reference at one other gain in every detector, 0.5-2x; follow-ups at 0.95-1.05.
        ratio = t["reference_gain_ratio"]
        assert 0.5 <= ratio <= 2.0
        day0 = json.loads((folder / "truth" / f"{spec.subject_id}_day000_CAR.json").read_text())
        assert set(day0["gains"].values()) == {ratio}
        for visit in t["visits"][1:]:
            assert all(0.95 <= g <= 1.05 for g in visit["gains"].values())
        # TBNK tubes: the same blood (same T cells/uL) and study day as a CAR tube.
        for tbnk in t["tbnk"]:
            car = next(v for v in t["visits"] if v["study_day"] == tbnk["study_day"])
            assert tbnk["t_cells_per_ul"] == pytest.approx(car["t_cells_per_ul"])
            row = next(r for r in rows if r["file"] == tbnk["file"])
            assert row["tube"] == "TBNK" and float(row["study_day"]) == tbnk["study_day"]
            wrong = float(row["beads_per_test"]) != tbnk["true_beads_per_test"]
            assert wrong == tbnk["crosscheck_expected_flag"] == (tbnk["study_day"] in spec.wrong_lot_days)
    assert sum(tb["crosscheck_expected_flag"] for s in truth["subjects"].values() for tb in s["tbnk"]) == 1


def test_ambiguous_designs_are_refused():
    for spec in SUBJECTS:
        check_unambiguous(spec)
    near_threshold = SubjectSpec("x", "X1", "", car_t=(0.0,) + (50.0,) * 8,
                                 b_cells=(40.0, 1.1) + (0.0,) * 7)   # 10 uL: 10.4 expected events vs 9.4
    with pytest.raises(ValueError, match="X1 day 4: B 1.1/uL"):
        check_unambiguous(near_threshold)
    with pytest.raises(ValueError, match="unknown subject"):
        select_subjects(["nobody"])


def test_the_truth_is_quantifiable_at_the_assays_own_lloq():
    """Clast/Tlast as a sponsor reports them: the last value at or above the assay's LLOQ for that tube."""
    from cytometry.simulation.cohort import DEFAULT_VOLUMES_UL, true_kinetics

    persistence_spec = next(s for s in SUBJECTS if s.profile == "persistence")
    # 0.75 cells/uL in 40 uL (~28 events among ~22,600 CAR-negative T cells): detected, not quantifiable
    assert true_kinetics(persistence_spec)["tlast_day"] == 56
    assert true_kinetics(persistence_spec, lloq_events=25)["tlast_day"] == 84   # the bare counting floor
    # the pre-infusion reference is acquired deep enough that its tail rests on more than the 5-event floor
    assert DEFAULT_VOLUMES_UL[0] * 180.0 * 0.94 > 5000


def test_the_truths_lloq_is_the_one_the_analysis_reports(cohort):
    """The truth's per-tube LLOQ, from known cells, and the analysis', from the tube: the same rule."""
    ratios = []
    for subject_id, t in cohort["truth"]["subjects"].items():
        timeline = {p["study_day"]: p for p in cohort["measured"][subject_id]["timeline"]}
        for visit in t["visits"]:
            if visit["study_day"] > 0:
                ratios.append(timeline[visit["study_day"]]["car_t"]["lloq"]["events"] / visit["car_t_lloq_events"])
    assert 0.8 < min(ratios) and max(ratios) < 1.25, ratios


def test_tbnk_tubes_are_not_kinetics_points(cohort):
    for subject_id, t in cohort["truth"]["subjects"].items():
        timeline = cohort["measured"][subject_id]["timeline"]
        assert [p["study_day"] for p in timeline] == list(VISIT_DAYS)
        assert all(p["file"].endswith("_CAR.fcs") for p in timeline)


@pytest.mark.parametrize("subject_id", ["K01", "K04", "K05"])
def test_cmax_tmax_auc_within_20_percent_of_the_truth(cohort, subject_id):
    true, got = cohort["truth"]["subjects"][subject_id]["kinetics"], cohort["measured"][subject_id]
    assert got["tmax_day"] == true["tmax_day"]
    assert abs(got["cmax"] - true["cmax"]) <= 0.2 * true["cmax"], (got["cmax"], true["cmax"])
    assert abs(got["auc_0_28"] - true["auc_0_28"]) <= 0.2 * true["auc_0_28"], (got["auc_0_28"], true["auc_0_28"])


@pytest.mark.parametrize("subject_id", ["K01", "K04", "K05"])
def test_aplasia_onset_and_recovery_days(cohort, subject_id):
    true, got = cohort["truth"]["subjects"][subject_id]["kinetics"], cohort["measured"][subject_id]
    assert (got["aplasia_onset_day"], got["aplasia_recovery_day"], got["aplasia_ongoing"]) == \
        (true["aplasia_onset_day"], true["aplasia_recovery_day"], true["aplasia_ongoing"])


def test_crosscheck_flags_the_mistyped_bead_lot_and_nothing_else(cohort):
    for subject_id, t in cohort["truth"]["subjects"].items():
        timeline = {p["study_day"]: p for p in cohort["measured"][subject_id]["timeline"]}
        for tbnk in t["tbnk"]:
            checks = timeline[tbnk["study_day"]]["t_cell_crosscheck"]
            assert len(checks) == 1 and checks[0]["tbnk"]["file"].endswith(tbnk["file"]) and checks[0]["compared"]
            assert checks[0]["flagged"] == tbnk["crosscheck_expected_flag"], (subject_id, tbnk["study_day"], checks[0])
        flagged = [tb["study_day"] for tb in t["tbnk"] if tb["crosscheck_expected_flag"]]
        assert cohort["measured"][subject_id]["t_cell_crosscheck"]["flagged_days"] == flagged


def test_persistence_command_prints_and_writes_the_crosscheck(cohort, tmp_path):
    text = _cli("persistence", "--store", cohort["store"], "--csv", tmp_path / "timeline.csv")
    lines = [line for line in text.splitlines() if line.startswith("  T-cell cross-check day 28: TBNK K04_day028")]
    assert lines and "DISAGREE beyond counting noise" in lines[0]
    assert sum("DISAGREE" in line for line in text.splitlines() if line.startswith("  T-cell cross-check")) == 1
    rows = list(csv.DictReader(open(tmp_path / "timeline.csv")))
    flags = {(r["subject_id"], r["study_day"]): r["t_cell_crosscheck_flagged"] for r in rows}
    assert flags[("K04", "28")] == "True" and flags[("K05", "28")] == "False" and flags[("K05", "7")] == ""


def _tube(panel, day, t_events, bead_events, beads_per_test, subject="S1"):
    count = bead_count(t_events, bead_events, beads_per_test, 50.0).as_dict()
    pops = {"t_cells": count}
    if panel == "car":
        pops["car_t"] = bead_count(300, bead_events, beads_per_test, 50.0).as_dict()
    return {"file": f"{subject}_{panel}_{day}.fcs", "subject_id": subject, "study_day": day, "panel": panel,
            "populations": pops, "beads": {"events": bead_events}, "qc_flags": []}


@pytest.mark.parametrize("t_per_ul, volumes", [(400.0, (10.0, 10.0)), (40.0, (2.0, 3.0))])
def test_crosscheck_false_alarm_rate_is_that_of_counting_noise(t_per_ul, volumes):
    """Agreeing pairs (same blood, Poisson counts only) are flagged at about alpha = 0.001, not more."""
    rng = np.random.default_rng(5)
    n, flagged = 4000, 0
    beads_per_ul = 1000.0  # 50,000 beads in 50 uL
    for _ in range(n):
        tubes = [(rng.poisson(t_per_ul * v), rng.poisson(beads_per_ul * v)) for v in volumes]
        check = t_cell_crosscheck(_tube("tbnk", 7, *tubes[0], 50000.0), _tube("car", 7, *tubes[1], 50000.0))
        assert check["compared"]
        flagged += check["flagged"]
    # Binomial(4000, 0.001): 4 expected; more than 15 has probability < 1e-5.
    assert flagged <= 15


def test_crosscheck_catches_a_wrong_bead_constant_at_the_cohorts_counts():
    rng = np.random.default_rng(6)
    caught = 0
    for _ in range(500):
        tbnk = _tube("tbnk", 28, rng.poisson(450.0 * 9.4), rng.poisson(1000.0 * 9.4), 40120.0)  # lot is 50120
        car = _tube("car", 28, rng.poisson(450.0 * 9.4), rng.poisson(979.0 * 9.4), 48950.0)
        caught += t_cell_crosscheck(tbnk, car)["flagged"]
    assert caught >= 490  # z ~ -7 expected: the power is essentially 1


def test_crosscheck_pairs_by_subject_and_day_and_skips_unusable_counts():
    car = _tube("car", 14, 3000, 9000, 48950.0)
    same_day_other_subject = _tube("tbnk", 14, 2000, 9000, 48950.0, subject="S2")
    other_day = _tube("tbnk", 21, 2000, 9000, 48950.0)
    too_few = _tube("tbnk", 14, 12, 9000, 48950.0)
    rows = persistence([car, same_day_other_subject, other_day, too_few])
    assert [r["subject_id"] for r in rows] == ["S1"]
    (check,) = rows[0]["timeline"][0]["t_cell_crosscheck"]
    assert not check["compared"] and not check["flagged"] and "12 T-cell events" in check["reason"]
    assert rows[0]["t_cell_crosscheck"] == {"rule": check["rule"], "alpha": 0.001, "pairs": 0, "flagged_days": []}
    rows = persistence([car, _tube("tbnk", 14, 2400, 9000, 48950.0)])
    (check,) = rows[0]["timeline"][0]["t_cell_crosscheck"]
    assert check["flagged"] and check["difference_pct"] == pytest.approx(-20.0)
    assert any("T-cell cross-check day 14" in f for f in rows[0]["timeline"][0]["qc_flags"])
