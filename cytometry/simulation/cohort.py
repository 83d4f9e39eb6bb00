"""A seeded simulated CAR-T cohort with known kinetics: FCS files, manifest and truth.

The oracle for the persistence claims (Cmax, Tmax, AUC(0-28 d), Clast/Tlast,
B-cell aplasia onset and recovery, TBNK/CAR T-cell agreement). Each subject
has CAR tubes on days 0 (pre-infusion), 4, 7, 10, 14, 21, 28, 56 and 84,
and TBNK tubes from the same blood on some of those days. The tubes are
made by :func:`cytometry.simulation.simulate.simulate_tube` and written by
:func:`cytometry.simulation.simulate.write_tube` (``truth/<file>.json`` beside each
file); the cohort adds ``manifest.csv`` (the column layout of the committed
sample set) and ``cohort_truth.json``.

Subjects (:data:`SUBJECTS`)
---------------------------
``fast``
    Fast expansion, peak on day 7; the CAR-T cells are gone by day 84
    (truly 0: a quantifiable value there would be false persistence).
    B-cell aplasia from day 4, ongoing.
``slow``
    Slow expansion, peak on day 21; aplasia from day 10 (B cells fall
    gradually), ongoing.
``persistence``
    Peak on day 10, then a long tail: 4 cells/uL on day 56 and ~1 cell/uL
    (0.75) on day 84. At 40 uL of blood acquired, 0.75 cells/uL is ~28
    singlet events among ~22,600 CAR-negative T cells (0.12 %): above the
    LOD, under that tube's LLOQ (~65 events, 1.7 cells/uL, set by the
    negatives expected above the counting cut): the right report is
    "< LLOQ, detected", and Tlast is day 56.
``incomplete_aplasia``
    B cells dip to ~2.5 cells/uL but never below the 1 cell/uL aplasia
    threshold: no aplasia.
``recovery``
    Aplasia from day 4, B cells back above 1 cell/uL on day 56.

Acquisition
-----------
:data:`DEFAULT_VOLUMES_UL`: 5-10 uL of blood around the peak, 20 uL on days
21-28, and the pre-infusion reference and the late visits (days 56, 84)
acquired deep - 40 uL, the whole 50 uL lyse-no-wash tube less its dead
volume (~80,000-160,000 events), as high-sensitivity CAR-T monitoring does.
An earlier version acquired 10-20 uL, so that the reference held ~1,700 T
cells: its tail of 5 events then made each late tube's LLOQ 2.6-6.8
cells/uL. Deeper still (the 1-5 million events of bulk-lysed
high-sensitivity tubes) needs more blood than one bead-counting tube holds
and a denominator counted elsewhere, which this cohort does not model.

Every post-infusion visit after lymphodepletion has the same blood
background (CAR-negative T, NK, monocytes, granulocytes: :data:`BACKGROUND`,
lymphopenic early, recovering later); the CAR+ and B-cell values are the
subject's own.

Instrument settings
-------------------
Follow-up tubes are acquired at the daily tracking settings: every
detector's gain drawn uniformly in 0.95-1.05. Each subject's pre-infusion
tube - the CAR-negative reference the analysis links through the manifest
(tube ``CAR``, study day <= 0) - was acquired at another setting: every
fluorescence detector's gain multiplied by one ratio drawn log-uniform in
0.5-2x per subject (``reference_gain_ratio`` in the truth).

Truth conventions
-----------------
``kinetics`` (per subject) is computed from the **true blood
concentrations** with :func:`cytometry.decisions.subjects.kinetics` itself, so every
convention is the analysis' own (Cmax/Tmax over quantifiable values, linear
trapezoid over the visits in [0, 28] days with below-LLOQ values as 0,
Clast/Tlast the last quantifiable value, aplasia = B cells < 1 cell/uL after
day 0). A true value counts as quantifiable when its **expected** singlet
events (concentration x blood volume acquired x singlet probability
``(1 - p) / (1 + p)`` of the simulator's coincidence rate ``p``) reach the
tube's LLOQ - the rule the analysis applies to the observed events
(:func:`tube_limits`: a CV of 20 % with the negatives expected above the
counting cut, never under 25 events), evaluated on the expected
CAR-negative T cells of the tube and of the subject's reference, so that
the truth does not depend on any measurement. This is the sponsor's
convention (Clast: the last concentration at or above the assay's LLOQ)
with the assay's own LLOQ; ``kinetics_lloq_25`` is the same with the
25-event counting floor in every tube (a diagnostic: no tube counted
against a reference reaches it).

``kinetics_tube`` is the same computed from what a perfect gate would count
in each tube (the simulator's singlet events over its singlet beads times
beads per test / sample volume; below LLOQ when those events are under the
rule's LLOQ on the tube's singlet T cells):
the difference from ``kinetics`` is the blood draw's counting noise, the
difference between ``kinetics_tube`` and a measurement is the analysis' own
error.

The cohort is designed so that counting noise cannot make the truth
ambiguous: :func:`check_unambiguous` refuses a subject in which any visit's
expected events lie so close to the tube's LLOQ (CAR+) or to the aplasia
threshold (B cells) that counting noise would put the observed events on the
other side with a probability above 1 %.

TBNK/CAR T-cell pairs
---------------------
TBNK tubes are drawn from the same blood (same T, B, NK, monocytes,
granulocytes; CAR+ T cells are CD3+ T cells there). One pair is made to
disagree on purpose: the ``incomplete_aplasia`` subject's day-28 TBNK tube
carries a transcription error in the manifest (40120 beads per test typed
for the lot's 50120), so its T cells/uL are 20 % low;
``crosscheck_expected_flag`` in the truth says which pairs should be flagged.

Command line::

    python -m cytometry.simulation.cohort OUT_DIR [--seed N] [--subjects fast,recovery]
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import stats

from cytometry.counts import detection_limits
from cytometry.decisions.subjects import AplasiaRule, kinetics
from cytometry.simulation.simulate import (_MANIFEST_COLUMNS, PANELS, _fmt_number, perfect_gate_count, simulate_tube,
                                           write_tube)
from gating.auto import MIN_REFERENCE_TAIL_EVENTS, REFERENCE_TAIL_SHARE

__all__ = ["SubjectSpec", "SUBJECTS", "BACKGROUND", "VISIT_DAYS", "make_cohort", "check_unambiguous",
           "visit_concentrations", "true_kinetics", "main"]

#: Visit days of the CAR tubes (day 0: pre-infusion, the CAR-negative reference).
VISIT_DAYS = (0, 4, 7, 10, 14, 21, 28, 56, 84)

#: Blood background by study day after lymphodepletion, cells/uL:
#: CAR-negative T, NK, monocytes, granulocytes, dead (7-AAD+) lymphocytes.
BACKGROUND = {
    0: (180.0, 40.0, 150.0, 1400.0, 12.0),
    4: (90.0, 25.0, 80.0, 500.0, 10.0),
    7: (140.0, 45.0, 160.0, 700.0, 12.0),
    10: (220.0, 80.0, 250.0, 1100.0, 14.0),
    14: (300.0, 110.0, 300.0, 1600.0, 14.0),
    21: (380.0, 140.0, 320.0, 2100.0, 14.0),
    28: (450.0, 150.0, 330.0, 2400.0, 14.0),
    56: (520.0, 160.0, 340.0, 2600.0, 14.0),
    84: (600.0, 170.0, 340.0, 2700.0, 14.0),
}

#: uL of blood acquired per CAR tube by study day (more where CAR+ T cells are rare). The
#: pre-infusion reference and the late visits are acquired deep, as high-sensitivity CAR-T
#: monitoring does: 40 of the tube's 50 uL (the whole tube less its dead volume; ~80,000-160,000
#: events), so that the reference holds ~7,000 CAR-negative T cells and a late visit ~20,000.
DEFAULT_VOLUMES_UL = {0: 40.0, 4: 10.0, 7: 10.0, 10: 5.0, 14: 5.0, 21: 20.0, 28: 20.0, 56: 40.0, 84: 40.0}
TBNK_VOLUME_UL = 10.0
SAMPLE_VOLUME_UL = 50.0
CAR_LOT = 48950.0    # beads per test of the CAR tubes' lot
TBNK_LOT = 50120.0   # beads per test of the TBNK tubes' lot
WRONG_TBNK_LOT = 40120.0  # 50120 with one digit mistyped, in the manifest of one TBNK tube
DOUBLET_RATE = 0.03
LLOQ_EVENTS = 25
MISCLASSIFICATION_LIMIT = 0.01
CAR_CD4_FRACTION = 0.4
CD4_FRACTION = 0.55
REFERENCE_GAIN_RANGE = (0.5, 2.0)
FOLLOW_UP_GAIN_RANGE = (0.95, 1.05)
_DAY0 = _dt.date(2026, 4, 6)


@dataclass(frozen=True)
class SubjectSpec:
    """One simulated subject: true CAR+ T and B cells/uL per visit.

    Attributes
    ----------
    profile : str
        Short name (``fast``, ``slow``...), used by ``--subjects``.
    subject_id : str
    description : str
    car_t : tuple of float
        True CAR+ T cells/uL on :data:`VISIT_DAYS` (day 0 must be 0).
    b_cells : tuple of float
        True CD19+ B cells/uL on :data:`VISIT_DAYS`.
    tbnk_days : tuple of int
        Visits that also have a TBNK tube from the same blood.
    volumes_ul : dict
        Per-day overrides of :data:`DEFAULT_VOLUMES_UL`.
    wrong_lot_days : tuple of int
        TBNK tubes whose manifest carries :data:`WRONG_TBNK_LOT` (a
        deliberate disagreement for the T-cell cross-check).
    """

    profile: str
    subject_id: str
    description: str
    car_t: tuple
    b_cells: tuple
    tbnk_days: tuple = (0, 14, 28, 84)
    volumes_ul: dict = field(default_factory=dict)
    wrong_lot_days: tuple = ()

    def volume(self, day):
        """uL of blood acquired in the CAR tube of ``day``."""
        return float(self.volumes_ul.get(day, DEFAULT_VOLUMES_UL[day]))


#: The cohort, in order (a subject's index seeds its tubes: a subset gives the same files).
SUBJECTS = (
    SubjectSpec("fast", "K01", "fast expansion (peak day 7), CAR-T gone by day 84; aplasia from day 4, ongoing",
                car_t=(0.0, 25.0, 300.0, 180.0, 80.0, 30.0, 15.0, 6.0, 0.0),
                b_cells=(45.0, 0.2, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.2)),
    SubjectSpec("slow", "K02", "slow expansion (peak day 21); aplasia from day 10, ongoing",
                car_t=(0.0, 1.0, 8.0, 20.0, 45.0, 70.0, 50.0, 15.0, 5.0),
                b_cells=(70.0, 12.0, 3.5, 0.2, 0.0, 0.0, 0.0, 0.1, 0.2),
                volumes_ul={10: 10.0, 14: 10.0}),
    SubjectSpec("persistence", "K03", "peak day 10, late persistence: 4/uL on day 56, ~1/uL (0.75) on day 84",
                car_t=(0.0, 8.0, 90.0, 140.0, 70.0, 30.0, 12.0, 4.0, 0.75),
                b_cells=(55.0, 0.3, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)),
    SubjectSpec("incomplete_aplasia", "K04", "peak day 10; incomplete B-cell aplasia (B never below 1/uL)",
                car_t=(0.0, 10.0, 60.0, 90.0, 50.0, 25.0, 12.0, 5.0, 3.0),
                b_cells=(90.0, 8.0, 3.5, 2.5, 3.0, 4.0, 6.0, 10.0, 15.0),
                volumes_ul={10: 10.0, 14: 10.0}, wrong_lot_days=(28,)),
    SubjectSpec("recovery", "K05", "peak day 10; aplasia from day 4, B cells back on day 56",
                car_t=(0.0, 15.0, 120.0, 200.0, 110.0, 40.0, 20.0, 6.0, 3.0),
                b_cells=(60.0, 0.2, 0.0, 0.0, 0.0, 0.0, 0.1, 4.0, 30.0)),
)


def singlet_probability(doublet_rate=DOUBLET_RATE):
    """Chance that a particle ends up as a singlet event, ``(1 - p) / (1 + p)``."""
    return (1.0 - doublet_rate) / (1.0 + doublet_rate)


def visit_concentrations(spec, day, panel="car"):
    """True cells/uL of one visit, in :func:`cytometry.simulation.simulate.simulate_tube`'s leaf keys.

    The TBNK tube is the same blood without the CAR reagent and viability dye:
    CAR+ T cells are ordinary CD3+ T cells there, and there are no dead cells
    (the simulator's TBNK tube has none).

    Examples
    --------
    >>> car = visit_concentrations(SUBJECTS[0], 7)
    >>> car["car_cd4_t"] + car["car_cd8_t"], car["b_cells"]
    (300.0, 0.0)
    >>> tbnk = visit_concentrations(SUBJECTS[0], 7, panel="tbnk")
    >>> tbnk["cd4_t"] + tbnk["cd8_t"] == car["cd4_t"] + car["cd8_t"]
    True
    """
    index = VISIT_DAYS.index(day)
    car, b = float(spec.car_t[index]), float(spec.b_cells[index])
    t_neg, nk, mono, gran, dead = BACKGROUND[day]
    car4 = car * CAR_CD4_FRACTION
    cd4 = t_neg * CD4_FRACTION + car4
    cd8 = t_neg * (1.0 - CD4_FRACTION) + (car - car4)
    conc = {"granulocytes": gran, "monocytes": mono, "cd4_t": cd4, "cd8_t": cd8, "b_cells": b, "nk_cells": nk}
    if panel == "car":
        conc.update(car_cd4_t=car4, car_cd8_t=car - car4, dead_cells=dead)
    return conc


def _poisson_other_side(expected, limit):
    """P(observed events fall on the other side of ``limit`` events than ``expected`` does)."""
    if expected >= limit:
        return float(stats.poisson.cdf(math.ceil(limit) - 1, expected))
    return float(stats.poisson.sf(math.ceil(limit) - 1, expected))


def tube_limits(negative_t_events, reference_t_events):
    """The analysis' LOD and LLOQ (events) of a CAR tube, from its CAR-negative T cells and the reference's.

    The rule :func:`cytometry.analysis` applies to a counted tube
    (:func:`cytometry.counts.detection_limits`), evaluated on known
    quantities instead of measured ones: the highest counting cut leaves
    ``k = max(0.1 % of the reference, 5)`` reference T cells above it
    (:data:`gating.auto.REFERENCE_TAIL_SHARE`,
    :data:`gating.auto.MIN_REFERENCE_TAIL_EVENTS`), so ``E = n_neg·k/(n_ref +
    1)`` negatives are expected above it, with variance ``E + E²/k``.

    Returns ``(lod, lloq, background_variance)``.

    Examples
    --------
    >>> lod, lloq, variance = tube_limits(22600, 6770)
    >>> round(lloq), round(variance)
    (64, 101)
    >>> tube_limits(0, 6770)[:2]
    (3, 25)
    """
    k = max(int(round(REFERENCE_TAIL_SHARE * reference_t_events)), MIN_REFERENCE_TAIL_EVENTS)
    background = negative_t_events * k / (reference_t_events + 1.0)
    variance = background + background ** 2 / k
    lod, lloq = detection_limits(background, variance)
    return lod, lloq, variance


def expected_limits(spec, day):
    """:func:`tube_limits` of a visit's CAR tube from the expected singlet events of its blood.

    Examples
    --------
    >>> lod, lloq, _ = expected_limits(SUBJECTS[2], 84)
    >>> lloq > 25
    True
    """
    singlet = singlet_probability()
    negatives = BACKGROUND[day][0] * spec.volume(day) * singlet
    reference = BACKGROUND[0][0] * spec.volume(0) * singlet
    return tube_limits(negatives, reference)


def check_unambiguous(spec, aplasia_threshold=1.0, limit=MISCLASSIFICATION_LIMIT):
    """Refuse a subject whose truth counting noise could turn over.

    For each CAR tube, the expected singlet CAR+ events must lie far enough
    from the tube's LLOQ (:func:`expected_limits`), and the expected B-cell
    events from the events at the aplasia threshold, that noise puts the
    observed count on the other side with probability at most ``limit``:
    Poisson noise for B cells, and for CAR+ cells Poisson noise plus the
    background's (normal approximation, the LLOQ's own terms).

    Raises
    ------
    ValueError
        One line naming the subject, visit and probability.

    Examples
    --------
    >>> for spec in SUBJECTS:
    ...     check_unambiguous(spec)
    >>> bad = SubjectSpec("x", "X1", "", car_t=(0, 2.5, 10, 10, 10, 10, 10, 10, 10), b_cells=(50,) + (0,) * 8)
    >>> check_unambiguous(bad)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: X1 day 4: CAR+ 2.5/uL in 10 uL is 23.5 expected events, ...% likely on the other side of ...
    """
    if len(spec.car_t) != len(VISIT_DAYS) or len(spec.b_cells) != len(VISIT_DAYS):
        raise ValueError(f"{spec.subject_id}: car_t and b_cells need one value per visit day {VISIT_DAYS}")
    if spec.car_t[0] != 0:
        raise ValueError(f"{spec.subject_id}: CAR+ T cells must be 0 on day 0 (pre-infusion reference)")
    singlet = singlet_probability()
    for day, car, b in zip(VISIT_DAYS, spec.car_t, spec.b_cells):
        volume = spec.volume(day)
        if car and day > 0:
            _, lloq, variance = expected_limits(spec, day)
            expected = car * volume * singlet
            p = float(stats.norm.sf(abs(expected - lloq) / math.sqrt(expected + variance)))
            if p > limit:
                raise ValueError(f"{spec.subject_id} day {day}: CAR+ {car:g}/uL in {volume:g} uL is "
                                 f"{expected:.1f} expected events, {p:.2%} likely on the other side of the "
                                 f"tube's LLOQ ({lloq:.1f} events); change the value or the volume")
        if b and day > 0:
            threshold_events = aplasia_threshold * volume * singlet
            expected = b * volume * singlet
            p = _poisson_other_side(expected, threshold_events)
            if p > limit:
                raise ValueError(f"{spec.subject_id} day {day}: B {b:g}/uL in {volume:g} uL is "
                                 f"{expected:.1f} expected events, {p:.2%} likely on the other side of the "
                                 f"aplasia threshold ({threshold_events:.1f} events); change the value or the volume")


def _true_point(day, car, b, volume, singlet, lloq_events):
    def entry(value, limit):
        events = value * volume * singlet
        return {"cells_per_ul": value, "below_lloq": events < limit, "events": events}

    return {"study_day": day, "status": "ok", "car_t": entry(car, lloq_events), "b_cells": entry(b, LLOQ_EVENTS)}


def true_kinetics(spec, lloq_events=None, aplasia=None):
    """The subject's true kinetics from its blood concentrations (see the module's conventions).

    ``lloq_events``: one LLOQ for every CAR tube (the counting floor of 25
    events, say) instead of each tube's own (:func:`expected_limits`).

    Examples
    --------
    >>> k = true_kinetics(SUBJECTS[0])
    >>> k["cmax"], k["tmax_day"], k["tlast_day"], k["aplasia_onset_day"], k["aplasia_recovery_day"]
    (300.0, 7, 56, 4, None)
    >>> true_kinetics(SUBJECTS[2])["tlast_day"], true_kinetics(SUBJECTS[2], lloq_events=25)["tlast_day"]
    (56, 84)
    >>> true_kinetics(SUBJECTS[3])["aplasia_onset_day"] is None
    True
    """
    singlet = singlet_probability()
    points = [_true_point(day, float(car), float(b), spec.volume(day), singlet,
                          expected_limits(spec, day)[1] if lloq_events is None else lloq_events)
              for day, car, b in zip(VISIT_DAYS, spec.car_t, spec.b_cells)]
    return kinetics(points, aplasia or AplasiaRule())


def _seed(seed, *parts):
    return int(np.random.SeedSequence([int(seed), *parts]).generate_state(1)[0])


def select_subjects(names=None):
    """The :data:`SUBJECTS` named by profile or subject ID (all when ``names`` is empty).

    Examples
    --------
    >>> [s.subject_id for s in select_subjects(["fast", "K05"])]
    ['K01', 'K05']
    """
    wanted = [n.strip() for n in (names or []) if n.strip()]
    if not wanted:
        return list(SUBJECTS)
    known = {s.profile: s for s in SUBJECTS} | {s.subject_id: s for s in SUBJECTS}
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise ValueError(f"unknown subject(s) {', '.join(unknown)}; choose from "
                         f"{', '.join(s.profile for s in SUBJECTS)} (or {', '.join(s.subject_id for s in SUBJECTS)})")
    return [s for s in SUBJECTS if s.profile in wanted or s.subject_id in wanted]


def make_cohort(out_dir, seed=2113, subjects=None):
    """Write the simulated cohort: FCS files, ``truth/``, ``manifest.csv`` and ``cohort_truth.json``.

    Parameters
    ----------
    out_dir : str or Path
    seed : int
        Seeds every tube and each subject's reference gain ratio; a subject's
        files do not depend on which other subjects are written.
    subjects : list of str, optional
        Profiles or subject IDs (default: all of :data:`SUBJECTS`).

    Returns
    -------
    dict
        The truth written to ``cohort_truth.json``: per subject the
        ``visits`` (CAR tubes: true and perfect-gate CAR+ T, B and T cells/uL,
        volumes, gains), ``tbnk`` tubes (true T cells/uL, manifest and true
        bead lot, ``crosscheck_expected_flag``), ``kinetics`` and
        ``kinetics_tube``.

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     truth = make_cohort(d, subjects=["fast"])
    ...     sorted(truth["subjects"]), truth["subjects"]["K01"]["kinetics"]["tmax_day"]
    (['K01'], 7)
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    specs = select_subjects(subjects)
    rows = []
    doc = {"generator": "cytometry.simulation.cohort", "seed": int(seed), "lloq_events": "per tube (tube_limits)",
           "aplasia_rule": AplasiaRule().as_dict(),
           "truth_conventions": ("kinetics: from the true blood concentrations, quantifiable when the expected "
                                 "singlet events reach the tube's LLOQ, the analysis' rule (tube_limits) on the "
                                 "expected CAR-negative T cells of the tube and of the reference; "
                                 f"kinetics_lloq_{LLOQ_EVENTS}: the same with the {LLOQ_EVENTS}-event counting "
                                 "floor for every tube; kinetics_tube: from the singlet events a perfect gate "
                                 "would count in each tube, against the rule on its singlet T cells"),
           "subjects": {}}
    lloq_rule = AplasiaRule()
    for spec in specs:
        check_unambiguous(spec)
        index = SUBJECTS.index(spec)
        rng = np.random.default_rng(_seed(seed, index, 999))
        ratio = float(np.exp(rng.uniform(*np.log(REFERENCE_GAIN_RANGE))))
        subject = {"profile": spec.profile, "description": spec.description,
                   "reference_gain_ratio": round(ratio, 4), "visits": [], "tbnk": []}
        tube_points = []
        for day in VISIT_DAYS:
            volume = spec.volume(day)
            date = _DAY0 + _dt.timedelta(days=day + 7 * index)
            opts = dict(blood_volume_ul=volume, beads_per_test=CAR_LOT, sample_volume_ul=SAMPLE_VOLUME_UL,
                        doublet_rate=DOUBLET_RATE, marker_style="space", detector_style="bd",
                        source=spec.subject_id, date=date, start_time="10:30:00")
            if day == 0:
                opts["gains"] = {dye: round(ratio, 4) for _, dye, _ in PANELS["car"]}
            else:
                opts["gain_range"] = FOLLOW_UP_GAIN_RANGE
            tube = simulate_tube("car", seed=_seed(seed, index, day, 1),
                                 concentrations=visit_concentrations(spec, day, "car"), **opts)
            name = f"{spec.subject_id}_day{day:03d}_CAR.fcs"
            write_tube(tube, out_dir / name)
            truth = tube.truth
            car_tube, car_events = perfect_gate_count(truth, "car_t")
            b_tube, b_events = perfect_gate_count(truth, "b_cells")
            t_tube, t_events = perfect_gate_count(truth, "t_cells")
            conc = truth["concentrations_per_ul"]
            expected_car = conc["car_t"] * volume * singlet_probability()
            if day == 0:
                reference_t_events = t_events
            expected_lloq = expected_limits(spec, day)[1]
            tube_lloq = tube_limits(t_events - car_events, reference_t_events)[1]
            subject["visits"].append({
                "study_day": day, "file": name, "tube": "CAR", "blood_volume_ul": volume,
                "car_t_per_ul": conc["car_t"], "b_cells_per_ul": conc["b_cells"], "t_cells_per_ul": conc["t_cells"],
                "car_t_expected_events": round(expected_car, 2), "car_t_lloq_events": round(expected_lloq, 2),
                "car_t_below_lloq": expected_car < expected_lloq, "tube_car_t_lloq_events": round(tube_lloq, 2),
                "tube_car_t_per_ul": car_tube, "tube_car_t_events": car_events,
                "tube_b_cells_per_ul": b_tube, "tube_b_cells_events": b_events,
                "tube_t_cells_per_ul": t_tube, "tube_t_cells_events": t_events,
                "bead_events_singlet": truth["bead_events_singlet"], "gains": truth["gains"]})
            tube_points.append({"study_day": day, "status": "ok",
                                "car_t": {"cells_per_ul": car_tube, "below_lloq": car_events < tube_lloq,
                                          "events": car_events},
                                "b_cells": {"cells_per_ul": b_tube, "below_lloq": b_events < LLOQ_EVENTS,
                                            "events": b_events}})
            visit = "pre-infusion" if day == 0 else f"D{day}"
            comment = (f"pre-infusion CAR-negative reference, detector gains x{ratio:.3g} of the follow-ups"
                       if day == 0 else f"post-infusion day {day}")
            rows.append((name, spec.subject_id, visit, day, "CAR", CAR_LOT, SAMPLE_VOLUME_UL, comment))
            if day in spec.tbnk_days:
                tbnk = simulate_tube("tbnk", seed=_seed(seed, index, day, 2),
                                     concentrations=visit_concentrations(spec, day, "tbnk"),
                                     **dict(opts, blood_volume_ul=TBNK_VOLUME_UL, beads_per_test=TBNK_LOT,
                                            gains=None, gain_range=FOLLOW_UP_GAIN_RANGE, start_time="10:50:00"))
                tname = f"{spec.subject_id}_day{day:03d}_TBNK.fcs"
                write_tube(tbnk, out_dir / tname)
                wrong = day in spec.wrong_lot_days
                lot = WRONG_TBNK_LOT if wrong else TBNK_LOT
                t_value, t_ev = perfect_gate_count(tbnk.truth, "t_cells")
                subject["tbnk"].append({
                    "study_day": day, "file": tname, "blood_volume_ul": TBNK_VOLUME_UL,
                    "t_cells_per_ul": tbnk.truth["concentrations_per_ul"]["t_cells"],
                    "tube_t_cells_per_ul": t_value, "tube_t_cells_events": t_ev,
                    "true_beads_per_test": TBNK_LOT, "manifest_beads_per_test": lot,
                    "crosscheck_expected_flag": wrong})
                tcomment = (f"same blood as {name}; manifest bead lot typed wrong ({lot:g}, true {TBNK_LOT:g})"
                            if wrong else f"same blood as {name}")
                rows.append((tname, spec.subject_id, visit, day, "TBNK", lot, SAMPLE_VOLUME_UL, tcomment))
        subject["kinetics"] = _kinetics_fields(true_kinetics(spec))
        subject[f"kinetics_lloq_{LLOQ_EVENTS}"] = _kinetics_fields(true_kinetics(spec, lloq_events=LLOQ_EVENTS))
        subject["kinetics_tube"] = _kinetics_fields(kinetics(tube_points, lloq_rule))
        doc["subjects"][spec.subject_id] = subject
    with open(out_dir / "manifest.csv", "w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(_MANIFEST_COLUMNS)
        for row in rows:
            writer.writerow([_fmt_number(x) for x in row])
    (out_dir / "cohort_truth.json").write_text(json.dumps(doc, indent=2) + "\n")
    return doc


KINETIC_FIELDS = ("cmax", "tmax_day", "auc_0_28", "clast", "tlast_day", "aplasia_onset_day",
                  "aplasia_recovery_day", "aplasia_ongoing")


def _kinetics_fields(k):
    return {key: k[key] for key in KINETIC_FIELDS}


#: Kinetic parameters compared with the truth: (key, label, kind); "value" within the
#: relative tolerance, "day" exactly.
COMPARED = (("cmax", "Cmax (cells/uL)", "value"), ("tmax_day", "Tmax (day)", "day"),
            ("auc_0_28", "AUC0-28 (cells/uL x d)", "value"), ("clast", "Clast (cells/uL)", "value"),
            ("tlast_day", "Tlast (day)", "day"), ("aplasia_onset_day", "aplasia onset (day)", "day"),
            ("aplasia_recovery_day", "aplasia recovery (day)", "day"))


def _relative_error(measured, true):
    if measured is None or true is None:
        return None
    if true == 0:
        return 0.0 if measured == 0 else float("inf")
    return (measured - true) / true


def _truth_at_tube_lloq(visits, timeline):
    """True kinetics with each visit quantifiable when its true value reaches the measured tube's LLOQ."""
    singlet = singlet_probability()
    points = []
    for v in visits:
        car = (timeline.get(v["study_day"]) or {}).get("car_t") or {}
        lloq = (car.get("lloq") or {}).get("cells_per_ul")
        value = v["car_t_per_ul"]
        below = value < lloq if lloq is not None else value * v["blood_volume_ul"] * singlet < LLOQ_EVENTS
        points.append({"study_day": v["study_day"], "status": "ok",
                       "car_t": {"cells_per_ul": value, "below_lloq": below, "events": value},
                       "b_cells": {"cells_per_ul": v["b_cells_per_ul"], "below_lloq": False, "events": 1}})
    return kinetics(points)


def compare_to_truth(truth, subjects, tolerance=0.2):
    """Measured kinetics (``cytometry persistence --json``) against the cohort's truth.

    Parameters
    ----------
    truth : dict
        ``cohort_truth.json`` (:func:`make_cohort`).
    subjects : list of dict
        The ``subjects`` of ``cytometry persistence --json``.
    tolerance : float
        Relative tolerance of Cmax, AUC and Clast; days must match exactly.

    Returns
    -------
    dict
        Subject ID -> ``parameters`` (key, label, true, perfect-gate, measured,
        relative error, passed, diagnostic), ``visits`` (true, perfect-gate and
        measured CAR+ T and B cells per CAR tube) and ``crosschecks`` (study
        day, expected flag, flagged, z, passed). A subject missing from the
        measurement fails every parameter. ``diagnostic`` rows:
        ``clast_at_tube_lloq`` and ``tlast_at_tube_lloq`` judge the true
        values against each measured tube's own reported LLOQ (cells/uL)
        instead of the truth's (they separate a wrong count from a wrong
        LLOQ); ``clast_at_25_events`` and ``tlast_at_25_events`` against
        the 25-event counting floor (``kinetics_lloq_25``).

    Examples
    --------
    >>> truth = {"subjects": {"K9": {"profile": "fast", "description": "", "reference_gain_ratio": 1.5,
    ...          "kinetics": {"cmax": 100.0, "tmax_day": 7}, "kinetics_tube": {"cmax": 98.0, "tmax_day": 7},
    ...          "visits": [], "tbnk": []}}}
    >>> rows = compare_to_truth(truth, [{"subject_id": "K9", "cmax": 85.0, "tmax_day": 7, "timeline": []}])
    >>> [(p["key"], p["passed"]) for p in rows["K9"]["parameters"][:2]]
    [('cmax', True), ('tmax_day', True)]
    """
    measured_by_id = {s["subject_id"]: s for s in subjects}
    out = {}
    for subject_id, t in truth["subjects"].items():
        m = measured_by_id.get(subject_id)
        params = []
        for key, label, kind in COMPARED:
            true, tube = t["kinetics"].get(key), t["kinetics_tube"].get(key)
            got = m.get(key) if m else None
            error = _relative_error(got, true) if kind == "value" else None
            if m is None:
                passed = False
            elif kind == "day" or true is None or got is None:
                passed = got == true
            else:
                passed = abs(error) <= tolerance
            params.append({"key": key, "label": label, "kind": kind, "true": true, "tube": tube, "measured": got,
                           "relative_error": error, "passed": bool(passed), "diagnostic": False})
        timeline = {p["study_day"]: p for p in (m or {}).get("timeline", [])}
        at_tube_lloq = _truth_at_tube_lloq(t["visits"], timeline)
        at_floor = t.get(f"kinetics_lloq_{LLOQ_EVENTS}") or {}
        diagnostics = [("clast_at_tube_lloq", "Clast, truth at tube LLOQ", "value", "clast", at_tube_lloq),
                       ("tlast_at_tube_lloq", "Tlast, truth at tube LLOQ", "day", "tlast_day", at_tube_lloq)]
        if at_floor:
            diagnostics += [(f"clast_at_{LLOQ_EVENTS}_events", f"Clast, truth at {LLOQ_EVENTS} events", "value",
                             "clast", at_floor),
                            (f"tlast_at_{LLOQ_EVENTS}_events", f"Tlast, truth at {LLOQ_EVENTS} events", "day",
                             "tlast_day", at_floor)]
        for key, label, kind, source, reference in diagnostics:
            true, got = reference.get(source), (m.get(source) if m else None)
            error = _relative_error(got, true) if kind == "value" else None
            passed = m is not None and (got == true if kind == "day" or true is None or got is None
                                        else abs(error) <= tolerance)
            params.append({"key": key, "label": label, "kind": kind, "true": true, "tube": None, "measured": got,
                           "relative_error": error, "passed": bool(passed), "diagnostic": True})
        visits = []
        for v in t["visits"]:
            point = timeline.get(v["study_day"]) or {}
            car, b = point.get("car_t"), point.get("b_cells")
            visits.append({"study_day": v["study_day"], "blood_volume_ul": v["blood_volume_ul"],
                           "car_t_true": v["car_t_per_ul"], "car_t_tube": v["tube_car_t_per_ul"],
                           "car_t_tube_events": v["tube_car_t_events"], "car_t": car,
                           "car_t_inside": bool(car and car["ci95"][0] <= v["car_t_per_ul"] <= car["ci95"][1]),
                           "b_cells_true": v["b_cells_per_ul"], "b_cells": b})
        crosschecks = []
        for tb in t["tbnk"]:
            checks = (timeline.get(tb["study_day"]) or {}).get("t_cell_crosscheck") or []
            check = next((c for c in checks if c.get("tbnk") and Path(c["tbnk"]["file"]).name == tb["file"]), None)
            compared, flagged = bool(check and check["compared"]), bool(check and check["flagged"])
            expected = tb["crosscheck_expected_flag"]
            crosschecks.append({"study_day": tb["study_day"], "file": tb["file"], "expected_flag": expected,
                                "compared": compared, "flagged": flagged, "z": check["z"] if check else None,
                                "difference_pct": check["difference_pct"] if check else None,
                                "passed": compared and flagged == expected})
        out[subject_id] = {"profile": t["profile"], "description": t["description"],
                           "reference_gain_ratio": t["reference_gain_ratio"], "found": m is not None,
                           "parameters": params, "visits": visits, "crosschecks": crosschecks}
    return out


def main(argv=None):
    """``python -m cytometry.simulation.cohort OUT_DIR [--seed N] [--subjects ...]``."""
    parser = argparse.ArgumentParser(prog="python -m cytometry.simulation.cohort",
                                     description="Write a simulated CAR-T cohort with known kinetics "
                                                 "(FCS files, manifest.csv, cohort_truth.json).")
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=2113)
    parser.add_argument("--subjects", default="",
                        help="comma-separated profiles or IDs: " + ", ".join(
                            f"{s.profile} ({s.subject_id})" for s in SUBJECTS) + " (default: all)")
    args = parser.parse_args(argv)
    try:
        doc = make_cohort(args.out_dir, seed=args.seed, subjects=args.subjects.split(","))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for subject_id, subject in doc["subjects"].items():
        k = subject["kinetics"]
        print(f"{subject_id} {subject['profile']:18s} reference gain x{subject['reference_gain_ratio']:<6g} "
              f"Cmax {k['cmax']:g} on day {k['tmax_day']}, AUC0-28 {k['auc_0_28']:.4g}, "
              f"Clast {k['clast']:g} on day {k['tlast_day']}, aplasia {k['aplasia_onset_day']}-"
              f"{k['aplasia_recovery_day']}")
    n = sum(len(s["visits"]) + len(s["tbnk"]) for s in doc["subjects"].values())
    print(f"{n} FCS files, manifest.csv and cohort_truth.json in {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
