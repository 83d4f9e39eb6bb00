"""Accuracy against the simulator's truth: the harness behind every accuracy claim.

:func:`simulate_condition_set` writes a seeded, varied set of tubes over
:data:`CONDITIONS`: the :data:`IDEAL_CONDITIONS` on the simulator's clean
defaults (gains, naming, lymphopenia, debris, tiny files, few beads, B-cell
aplasia, CAR+ from 0.1% to 60% of T cells) and the
:data:`REALISTIC_CONDITIONS`, which switch on what real instruments and
patients do to a gate (photon-noise spillover spreading, NK continuum and
NKT cells, CD45-negative high-scatter debris, basophils and eosinophils,
dim-subset continua, lymphodepleted, neutropenic and other extreme blood
compositions). :func:`evaluate_tube` gates and counts one tube and compares
it with its truth; :func:`summarize` turns the records into the
per-population table and :func:`summarize_by_condition` into the
per-condition one printed by ``benchmarks/accuracy.py``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.stats import binom

from cytometry.analysis import (DEFAULT_MIN_BEAD_EVENTS, AnalysisOptions, analyze_gated, car_reference_of, gate_file,
                                with_car_reference)
from cytometry.simulation.simulate import POPULATION_LABELS as SIMULATED_POPULATIONS
from cytometry.simulation.simulate import default_concentrations, perfect_gate_count, simulate_tube, write_tube
from gating import POPULATIONS

#: Which truth labels make up each reported population (the simulator's own
#: map, plus the beads; CAR+ CD4/CD8 sub-populations are not reported).
POPULATION_LABELS = {"beads": ("bead",),
                     **{name: labels for name, labels in SIMULATED_POPULATIONS.items() if name in POPULATIONS}}

ELIGIBILITY_THRESHOLD = 5.0
#: Lymphosum (T + B + NK events / lymphocyte events) a reviewer accepts: 100 +/- 10 %.
LYMPHOSUM_TOLERANCE_PCT = 10.0


@dataclass
class Condition:
    """A named way of drawing a tube: panel, concentrations and acquisition."""

    name: str
    panel: str
    draw: object  # function(rng) -> (concentration overrides, simulate_tube keyword arguments)


def _log_uniform(rng, low, high):
    return float(np.exp(rng.uniform(np.log(low), np.log(high))))


def _styles(rng):
    return {"marker_style": str(rng.choice(["plain", "space", "dash"])),
            "detector_style": str(rng.choice(["bd", "fl", "attune"])),
            "shuffle_channels": bool(rng.integers(2)),
            "spill_keyword": str(rng.choice(["$SPILLOVER", "SPILL", "$COMP"]))}


def _car_fraction(low, high):
    def draw(rng):
        lymphocytes = float(rng.uniform(400, 1500))
        t_cells = lymphocytes * 0.75
        fraction = _log_uniform(rng, low, high)
        return ({"lymphocytes": lymphocytes, "b_cells": float(rng.choice([0.0, 0.0, 2.0, 30.0])),
                 "car_t": fraction * t_cells}, {"blood_volume_ul": float(rng.uniform(4, 8)), **_styles(rng)})
    return draw


#: Conditions on the simulator's clean defaults (the accuracy targets of
#: tests/test_accuracy_harness.py hold on these).
IDEAL_CONDITIONS = [
    Condition("typical", "tbnk", lambda rng: (
        {"b_cells": _log_uniform(rng, 0.5, 300), "lymphocytes": float(rng.uniform(800, 2500))},
        {"blood_volume_ul": float(rng.uniform(3, 6))})),
    Condition("gains_0.5-2x", "tbnk", lambda rng: (
        {"b_cells": _log_uniform(rng, 0.5, 300)},
        {"blood_volume_ul": float(rng.uniform(3, 6)), "gain_range": (0.5, 2.0)})),
    Condition("naming_order_spill", "tbnk", lambda rng: (
        {"b_cells": _log_uniform(rng, 0.5, 300)},
        {"blood_volume_ul": float(rng.uniform(3, 6)), **_styles(rng)})),
    Condition("near_threshold", "tbnk", lambda rng: (
        {"b_cells": float(rng.uniform(2.5, 10))},
        {"blood_volume_ul": float(rng.uniform(5, 12)), **_styles(rng)})),
    Condition("lymphopenia", "tbnk", lambda rng: (
        {"lymphocytes": 200.0, "b_cells": float(rng.uniform(0, 5)), "nk_cells": 30.0},
        {"blood_volume_ul": float(rng.uniform(5, 10))})),
    Condition("debris_60pct", "tbnk", lambda rng: (
        {"b_cells": _log_uniform(rng, 1, 200)},
        {"blood_volume_ul": float(rng.uniform(3, 5)), "debris_fraction": 0.6})),
    Condition("tiny_file_2000_events", "tbnk", lambda rng: (
        {"b_cells": _log_uniform(rng, 5, 200)},
        {"blood_volume_ul": 0.35})),
    Condition("few_beads", "tbnk", lambda rng: (
        {"b_cells": _log_uniform(rng, 1, 200)},
        {"blood_volume_ul": float(rng.uniform(3, 6)), "beads_per_test": 8000.0})),
    Condition("b_cell_aplasia", "car", lambda rng: (
        {"b_cells": 0.0, "car_t": _log_uniform(rng, 1, 100)},
        {"blood_volume_ul": float(rng.uniform(3, 6)), **_styles(rng)})),
    Condition("car_0.1-1pct", "car", _car_fraction(0.001, 0.01)),
    Condition("car_1-10pct", "car", _car_fraction(0.01, 0.10)),
    Condition("car_10-60pct", "car", _car_fraction(0.10, 0.60)),
]


# ---------------------------------------------------------------------------
# Less ideal tubes: what real instruments and patients do to a gate
# ---------------------------------------------------------------------------

def _acquired_blood_ul(rng, lymphocytes):
    """uL of blood a lab acquires: until ~2,500-3,500 lymphocytes (the usual stop
    rule), at least 3 uL and at most 12 uL (the acquisition time a lab allows)."""
    return float(np.clip(rng.uniform(2500, 3500) / max(lymphocytes, 1.0), 3.0, 12.0))


def _blood(rng, *, lymphocytes, monocytes, granulocytes, b_cells=None, basophils=0.0, eosinophils=0.0):
    """Concentration overrides for :func:`default_concentrations`.

    B cells log-uniform 0.5-300/uL (both sides of the eligibility threshold)
    unless given, at most 40 % of lymphocytes; NK cells 5-25 % of lymphocytes
    (adult reference range); T cells the rest.
    """
    if b_cells is None:
        b_cells = _log_uniform(rng, 0.5, 300)
    b_cells = min(float(b_cells), 0.4 * lymphocytes)
    return {"lymphocytes": float(lymphocytes), "b_cells": b_cells,
            "nk_cells": float(rng.uniform(0.05, 0.25)) * float(lymphocytes),
            "monocytes": float(monocytes), "granulocytes": float(granulocytes),
            "basophils": float(basophils), "eosinophils": float(eosinophils)}


def _normal_blood(rng, **overrides):
    """Adult reference ranges: lymphocytes 800-2,500, monocytes 200-800,
    granulocytes 1,800-6,000, basophils 20-100 /uL; eosinophils 2-8 % of the
    granulocytes (~50-400/uL) unless given."""
    kwargs = dict(lymphocytes=rng.uniform(800, 2500), monocytes=rng.uniform(200, 800),
                  granulocytes=rng.uniform(1800, 6000), basophils=rng.uniform(20, 100))
    eosinophil_share = rng.uniform(0.02, 0.08)
    kwargs.update(overrides)
    kwargs.setdefault("eosinophils", eosinophil_share * kwargs["granulocytes"])
    return _blood(rng, **kwargs)


def _lymphodepleted_blood(rng, b_cells=None):
    """Early after fludarabine/cyclophosphamide lymphodepletion: lymphocytes
    300-450/uL and 11-28 % of leukocytes, monocytes about as many as
    lymphocytes (0.7-1.3x), granulocytes 50-80 % of leukocytes."""
    lymphocytes = rng.uniform(300, 450)
    leukocytes = lymphocytes / rng.uniform(0.11, 0.28)
    basophils = rng.uniform(0.0, 0.01) * leukocytes
    granulocytes = np.clip(leukocytes - lymphocytes - rng.uniform(0.7, 1.3) * lymphocytes - basophils,
                           0.5 * leukocytes, 0.8 * leukocytes)
    monocytes = leukocytes - lymphocytes - granulocytes - basophils
    return _blood(rng, lymphocytes=lymphocytes, monocytes=monocytes, granulocytes=granulocytes,
                  b_cells=_log_uniform(rng, 0.3, 30) if b_cells is None else b_cells,
                  basophils=basophils, eosinophils=rng.uniform(0.0, 0.03) * granulocytes)


def _extreme_share_blood(rng):
    """Lymphocytes anywhere from 1 % to 70 % of 2,000-15,000 leukocytes/uL
    (log-uniform share: severe lymphopenia with neutrophilia up to a
    lymphocytosis), monocytes 3-12 % and basophils 0-1 %."""
    leukocytes = rng.uniform(2000, 15000)
    lymphocytes = _log_uniform(rng, 0.01, 0.70) * leukocytes
    monocytes = rng.uniform(0.03, 0.12) * leukocytes
    basophils = rng.uniform(0.0, 0.01) * leukocytes
    granulocytes = max(leukocytes - lymphocytes - monocytes - basophils, 0.05 * leukocytes)
    return _blood(rng, lymphocytes=lymphocytes, monocytes=monocytes, granulocytes=granulocytes,
                  basophils=basophils, eosinophils=rng.uniform(0.0, 0.06) * granulocytes)


def _eosinophilic_blood(rng):
    """Eosinophilia up to hypereosinophilia: 800-4,000 eosinophils/uL on top of
    1,800-5,000 neutrophils (eosinophils are counted in the granulocytes)."""
    eosinophils = rng.uniform(800, 4000)
    return _normal_blood(rng, eosinophils=eosinophils, granulocytes=eosinophils + rng.uniform(1800, 5000))


def _realistic_instrument(rng):
    """Every realism option of :func:`simulate_tube` at once, at realistic levels."""
    return {"photon_noise": True, "nk_continuum": True, "marker_continua": True,
            "nkt_fraction": float(rng.uniform(0.02, 0.08)),        # CD3+CD56+ ~2-8 % of T cells
            "rbc_ghost_fraction": float(rng.uniform(0.0, 0.4)),    # lyse-no-wash: up to ~40 % of events
            "gain_range": (0.8, 1.25)}


def _tbnk(blood_draw, **acquisition):
    """A TBNK condition: composition from ``blood_draw(rng)``, options from
    ``acquisition`` (values may be functions of rng)."""
    def draw(rng):
        overrides = blood_draw(rng)
        kwargs = {key: (value(rng) if callable(value) else value) for key, value in acquisition.items()}
        kwargs.setdefault("blood_volume_ul", _acquired_blood_ul(rng, overrides["lymphocytes"]))
        return overrides, kwargs
    return draw


def _realistic_tbnk(rng):
    # a mix of the compositions a trial's screening and follow-up tubes see
    kind = int(rng.integers(4))
    blood = (_normal_blood(rng) if kind == 0 else _lymphodepleted_blood(rng) if kind == 1
             else _extreme_share_blood(rng) if kind == 2
             else _normal_blood(rng, granulocytes=rng.uniform(100, 500)))
    return blood, {"blood_volume_ul": _acquired_blood_ul(rng, blood["lymphocytes"]),
                   **_realistic_instrument(rng), **_styles(rng)}


def _realistic_car(rng):
    # CAR-T follow-up: lymphodepleted or recovering blood, B-cell aplasia, CAR+ 1-30 % of T cells
    blood = (_lymphodepleted_blood(rng, b_cells=0.0) if rng.integers(2)
             else _normal_blood(rng, lymphocytes=rng.uniform(400, 1500), b_cells=0.0))
    t_cells = blood["lymphocytes"] - blood["b_cells"] - blood["nk_cells"]
    blood["car_t"] = _log_uniform(rng, 0.01, 0.30) * t_cells
    # the subject's pre-infusion reference tube is acquired with the same
    # options; instrument tracking keeps gains within ~10 % between visits
    return blood, {"blood_volume_ul": _acquired_blood_ul(rng, blood["lymphocytes"]),
                   **_realistic_instrument(rng), **_styles(rng), "gain_range": (0.9, 1.1)}


#: Conditions that switch on the simulator's realism options one at a time
#: (so a failure names its cause), then all together (``realistic_*``).
REALISTIC_CONDITIONS = [
    Condition("photon_spread", "tbnk", _tbnk(_normal_blood, photon_noise=True)),
    Condition("nk_continuum_nkt", "tbnk", _tbnk(
        _normal_blood, nk_continuum=True, nkt_fraction=lambda rng: float(rng.uniform(0.02, 0.08)))),
    Condition("rbc_ghosts_10-40pct", "tbnk", _tbnk(
        _normal_blood, rbc_ghost_fraction=lambda rng: float(rng.uniform(0.10, 0.40)))),
    Condition("basophils_eosinophils", "tbnk", _tbnk(
        lambda rng: _normal_blood(rng, basophils=rng.uniform(50, 200), eosinophils=rng.uniform(200, 700)))),
    Condition("marker_continua", "tbnk", _tbnk(_normal_blood, marker_continua=True)),
    Condition("lymphodepleted_early", "tbnk", _tbnk(_lymphodepleted_blood)),
    # severe neutropenia: granulocytes (absolute neutrophil count) < 500/uL
    Condition("neutropenia", "tbnk", _tbnk(lambda rng: _normal_blood(rng, granulocytes=rng.uniform(100, 500)))),
    # monocytosis: > 1,000 monocytes/uL (CMML-like, recovery after chemotherapy)
    Condition("monocytosis", "tbnk", _tbnk(lambda rng: _normal_blood(rng, monocytes=rng.uniform(1000, 3000)))),
    # eosinophilia up to hypereosinophilia (> 1,500/uL); eosinophils are part of the granulocytes
    Condition("eosinophilia", "tbnk", _tbnk(_eosinophilic_blood)),
    Condition("lymphocyte_share_1-70pct", "tbnk", _tbnk(_extreme_share_blood)),
    Condition("realistic_tbnk", "tbnk", _realistic_tbnk),
    Condition("realistic_car", "car", _realistic_car),
]



def _car_against_moved_reference(fraction_of_t=None, per_ul=None, photon_noise=False):
    """A CAR follow-up tube whose pre-infusion reference was acquired at 0.5–2x its gains.

    Each detector's reference gain is the follow-up's divided by its own
    log-uniform ratio in 0.5–2 (a changed instrument setting between the
    visits, not the ~10 % drift of tracked settings). CAR+ cells are
    ``fraction_of_t`` (a ``(low, high)`` log-uniform range of the T cells,
    a fifth of the tubes without any) or ``per_ul`` (a range in cells/µL).
    """
    def draw(rng):
        blood = (_lymphodepleted_blood(rng, b_cells=0.0) if rng.integers(2)
                 else _normal_blood(rng, lymphocytes=rng.uniform(400, 1500), b_cells=0.0))
        t_cells = blood["lymphocytes"] - blood["b_cells"] - blood["nk_cells"]
        if per_ul is not None:
            blood["car_t"] = 0.0 if rng.random() < 0.2 else _log_uniform(rng, *per_ul)
        else:
            blood["car_t"] = 0.0 if rng.random() < 0.2 else _log_uniform(rng, *fraction_of_t) * t_cells
        acquisition = {"blood_volume_ul": _acquired_blood_ul(rng, blood["lymphocytes"]), **_styles(rng),
                       "gain_range": (0.9, 1.1), "reference_gain_ratio": (0.5, 2.0)}
        if photon_noise:
            acquisition["photon_noise"] = True
        return blood, acquisition
    return draw


#: CAR tubes counted against a pre-infusion reference acquired at another
#: detector setting (0.5–2x): the ``car_reference`` group of the harness.
CAR_REFERENCE_CONDITIONS = [
    Condition("car_ref_gain_0-60pct", "car", _car_against_moved_reference(fraction_of_t=(0.0005, 0.60))),
    Condition("car_ref_gain_spread", "car", _car_against_moved_reference(fraction_of_t=(0.0005, 0.60),
                                                                          photon_noise=True)),
    Condition("car_ref_gain_0.05-1pct", "car", _car_against_moved_reference(fraction_of_t=(0.0005, 0.01),
                                                                             photon_noise=True)),
    # late visits: CAR+ cells gone or below 1 cell/uL (false persistence is the risk)
    Condition("car_ref_gain_absent", "car", _car_against_moved_reference(per_ul=(0.02, 1.0), photon_noise=True)),
]

#: The harness's default set: the ideal conditions and the less ideal ones.
CONDITIONS = IDEAL_CONDITIONS + REALISTIC_CONDITIONS + CAR_REFERENCE_CONDITIONS


def select_conditions(names=None):
    """Conditions by name, or by group (``"ideal"``, ``"realistic"``, ``"all"``).

    Parameters
    ----------
    names : str or list of str, optional
        Comma-separated string or list; default all :data:`CONDITIONS`.

    Returns
    -------
    list of Condition
        In :data:`CONDITIONS` order, without repeats.

    Examples
    --------
    >>> [c.name for c in select_conditions("typical,neutropenia")]
    ['typical', 'neutropenia']
    >>> len(select_conditions("realistic")) == len(REALISTIC_CONDITIONS)
    True
    """
    if names is None:
        return list(CONDITIONS)
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    groups = {"all": CONDITIONS, "ideal": IDEAL_CONDITIONS, "realistic": REALISTIC_CONDITIONS,
              "car_reference": CAR_REFERENCE_CONDITIONS}
    known = {c.name: c for c in CONDITIONS}
    chosen = set()
    for name in names:
        if name in groups:
            chosen.update(c.name for c in groups[name])
        elif name in known:
            chosen.add(name)
        else:
            raise ValueError(f"unknown condition {name!r}; choose from {sorted(known)} or {sorted(groups)}")
    if not chosen:
        raise ValueError("no condition selected")
    return [c for c in CONDITIONS if c.name in chosen]


def simulate_condition_set(out_dir, n_samples=120, seed=2026, with_pre_infusion=True, conditions=None):
    """Write ``n_samples`` simulated tubes spread evenly over the conditions.

    Parameters
    ----------
    out_dir : str or Path
        Folder for the FCS files and their ``truth/``.
    n_samples : int
        Tubes to write (not counting pre-infusion companions); tube ``i`` is
        of condition ``i mod len(conditions)``.
    seed : int
        The same arguments write the same files.
    with_pre_infusion : bool
        Every CAR tube gets a companion pre-infusion tube of the same subject
        (``truth["pre_infusion_file"]``), the CAR-negative reference a trial's
        manifest links, acquired with the same options.
    conditions : list of Condition or str, optional
        Default :data:`CONDITIONS`; a string goes through :func:`select_conditions`.

    Returns
    -------
    list of (Path, str, dict)
        ``(fcs_path, condition_name, truth)``.

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     tubes = simulate_condition_set(d, 2, conditions="neutropenia,realistic_tbnk")
    ...     [(p.name, name) for p, name, _ in tubes]
    [('000_neutropenia.fcs', 'neutropenia'), ('001_realistic_tbnk.fcs', 'realistic_tbnk')]
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if conditions is None or isinstance(conditions, str):
        conditions = select_conditions(conditions)
    rng = np.random.default_rng(seed)
    tubes = []
    for index in range(n_samples):
        condition = conditions[index % len(conditions)]
        overrides, acquisition = condition.draw(rng)
        reference_ratio = acquisition.pop("reference_gain_ratio", None)
        car_t = overrides.pop("car_t", None)
        concentrations = default_concentrations(condition.panel, car_t=car_t, **overrides) \
            if condition.panel == "car" else default_concentrations("tbnk", **overrides)
        if condition.panel == "car" and with_pre_infusion:
            # Detector gains drift a little between a subject's visits.
            acquisition.setdefault("gain_range", (0.9, 1.1))
        tube = simulate_tube(condition.panel, seed=seed * 1000 + index, concentrations=concentrations,
                             **acquisition)
        path = write_tube(tube, out_dir / f"{index:03d}_{condition.name}.fcs")
        truth = dict(tube.truth)
        if condition.panel == "car" and with_pre_infusion:
            # The same subject before infusion: no CAR+ cells, B cells not yet depleted.
            before = dict(overrides, b_cells=max(overrides.get("b_cells", 0.0), 30.0))
            pre_acquisition = dict(acquisition)
            if reference_ratio is not None:
                # each detector of the reference at the follow-up's gain / its own ratio
                pre_acquisition.pop("gain_range", None)
                pre_acquisition["gains"] = {dye: gain / _log_uniform(rng, *reference_ratio)
                                            for dye, gain in tube.truth["gains"].items()}
                truth["reference_gain_ratio"] = {dye: tube.truth["gains"][dye] / g
                                                 for dye, g in pre_acquisition["gains"].items()}
            pre = simulate_tube("car", seed=seed * 1000 + index + 500_000,
                                concentrations=default_concentrations("car", car_t=0.0, **before), **pre_acquisition)
            truth["pre_infusion_file"] = str(write_tube(pre, out_dir / f"{index:03d}_{condition.name}_pre.fcs"))
        tubes.append((path, condition.name, truth))
    return tubes


@dataclass
class TubeRecord:
    """One tube's comparison with its truth."""

    file: str
    condition: str
    status: str
    error: str | None = None
    gating_seconds: float = 0.0
    populations: dict = field(default_factory=dict)   # name → dict of truth/measured/F1/inside
    eligibility_truth: bool | None = None
    verdict: str | None = None
    near_threshold: bool | None = None
    #: (T + B + NK events) / lymphocyte events x 100 of the gates (TBNK tubes)
    lymphosum_pct: float | None = None
    #: a tube a reviewer would accept: enough singlet beads (the truth's), every
    #: marker and a sound acquisition (the simulator writes all markers, a steady
    #: flow and nothing saturated), so a ``qc_fail`` verdict on it is a false alarm
    good_tube: bool = True
    panel: str | None = None


def evaluate_tube(path, condition, truth, options=None):
    """Gate and count one simulated tube and compare it with its truth.

    Parameters
    ----------
    path : str or Path
        The FCS file; its labels are read from ``truth/<stem>.labels.npy``.
    condition : str
        Condition name, recorded.
    truth : dict
        The tube's truth (``pre_infusion_file`` links the CAR reference).
    options : AnalysisOptions, optional
        Default: the truth's bead lot and sample volume.

    Returns
    -------
    TubeRecord
        ``status`` ``"error"`` (with ``error``) when gating or counting
        raised, the reference tube's included: a failure is recorded, never
        hidden, and never stops a benchmark.

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     (path, name, truth), = simulate_condition_set(d, 1, conditions="typical")
    ...     evaluate_tube(path, name, truth).populations["b_cells"]["f1"] > 0.9
    True
    """
    options = options or AnalysisOptions(beads_per_test=truth["beads_per_test"],
                                         sample_volume_ul=truth["sample_volume_ul"])
    record = TubeRecord(file=str(path), condition=condition, status="ok",
                        good_tube=truth["bead_events_singlet"] >= DEFAULT_MIN_BEAD_EVENTS, panel=truth["panel"])
    labels = np.load(Path(path).parent / "truth" / f"{Path(path).stem}.labels.npy")
    names = truth["label_names"]
    try:
        if truth.get("pre_infusion_file"):
            reference = car_reference_of(gate_file(truth["pre_infusion_file"], options), "pre-infusion tube")
            options = with_car_reference(options, reference, "pre-infusion tube")
        start = time.perf_counter()
        gated = gate_file(path, options)
        record.gating_seconds = time.perf_counter() - start
        result = analyze_gated(gated, None, options)
    except Exception as exc:  # recorded, never hidden
        record.status, record.error = "error", f"{type(exc).__name__}: {exc}"
        return record
    concentrations = truth["concentrations_per_ul"]
    for population, label_names in POPULATION_LABELS.items():
        if population not in gated.gating.masks:
            continue
        true_mask = np.isin(labels, [names.index(n) for n in label_names if n in names])
        gated_mask = gated.gating.masks[population]
        true_positive = int((true_mask & gated_mask).sum())
        denominator = int(true_mask.sum() + gated_mask.sum())
        entry = {"true_events": int(true_mask.sum()), "events": int(gated_mask.sum()),
                 "f1": (2 * true_positive / denominator) if denominator else 1.0}
        count = result["populations"].get(population)
        if count is not None and population in concentrations:
            true_value = float(concentrations[population])
            entry.update(true_cells_per_ul=true_value, cells_per_ul=count["cells_per_ul"], ci95=count["ci95"],
                         below_lloq=count.get("below_lloq"),
                         inside=bool(count["ci95"][0] <= true_value <= count["ci95"][1]),
                         relative_error=(abs(count["cells_per_ul"] - true_value) / true_value) if true_value else None)
            if population in truth.get("singlet_events", {}) and truth["bead_events_singlet"]:
                # The measured count's distance to a perfect gate is the analysis' own
                # error; the perfect gate's to the blood's truth, the draw's counting noise.
                perfect, _ = perfect_gate_count(truth, population)
                signed = (count["cells_per_ul"] - perfect) / perfect if perfect else None
                entry.update(perfect_cells_per_ul=perfect,
                             perfect_relative_error=(abs(perfect - true_value) / true_value) if true_value else None,
                             signed_error_to_perfect=signed,
                             relative_error_to_perfect=abs(signed) if signed is not None else None)
        if population == "car_t":
            entry["f1_ideal_cut"] = _ideal_count_preserving_f1(gated, true_mask)
            gate = next((g for g in gated.gating.gates if g.name == population), None)
            if gate is not None and gate.extra.get("positive_level"):
                entry["positive_level"] = dict(gate.extra["positive_level"])
        record.populations[population] = entry
    masks = gated.gating.masks
    if truth["panel"] == "tbnk" and {"lymphocytes", "t_cells", "b_cells", "nk_cells"} <= set(masks):
        lymphocytes = int(masks["lymphocytes"].sum())
        if lymphocytes:
            parts = sum(int(masks[p].sum()) for p in ("t_cells", "b_cells", "nk_cells"))
            record.lymphosum_pct = 100.0 * parts / lymphocytes
    if truth["panel"] == "tbnk" and result.get("eligibility"):
        record.eligibility_truth = concentrations["b_cells"] > ELIGIBILITY_THRESHOLD
        record.verdict = result["eligibility"]["verdict"]
        b_count = result["populations"].get("b_cells") or {}
        if b_count.get("ci95"):
            low, high = b_count["ci95"]
            # "Near the threshold": the truth lies within one interval width of it.
            record.near_threshold = abs(concentrations["b_cells"] - ELIGIBILITY_THRESHOLD) <= (high - low)
    return record


def _ideal_count_preserving_f1(gated, true_mask):
    """F1 of the best CAR cut that keeps the count right, known only to the truth.

    The T cells' brightest *k* CAR events, *k* the true CAR+ events among
    them. A count-unbiased 1-D gate cannot beat this: where CAR+ and CAR−
    overlap, the F1 ceiling of any gate whose count is right lies here, so
    the harness reports it beside the gate's own F1.
    """
    parent = gated.gating.masks["t_cells"]
    values = gated.data[parent, gated.channels["CAR"]]
    truth_in_parent = true_mask[parent]
    k = int(truth_in_parent.sum())
    if k == 0:
        return 1.0 if not true_mask.any() else 0.0
    brightest = np.argsort(values)[::-1][:k]
    true_positive = int(truth_in_parent[brightest].sum())
    return 2 * true_positive / (k + int(true_mask.sum()))


def summarize(records, min_events_for_f1=50):
    """Per-population accuracy and the eligibility confusion matrix.

    Returns
    -------
    populations : dict
        name → ``n``, ``median_rel_error``, ``p95_rel_error``, ``coverage``
        (fraction of intervals holding the truth), ``median_f1`` and
        ``min_f1`` over tubes with at least ``min_events_for_f1`` true events.
    confusion : dict
        ``(truth, verdict)`` → count, truth in {"eligible", "not_eligible"};
        also ``("indeterminate", "near threshold" | "far from threshold")``.
    """
    populations = {}
    for name in POPULATION_LABELS:
        entries = [r.populations[name] for r in records if r.status == "ok" and name in r.populations]
        if not entries:
            continue
        errors = [e["relative_error"] for e in entries if e.get("relative_error") is not None]
        inside = [e["inside"] for e in entries if "inside" in e]
        f1 = [e["f1"] for e in entries if e["true_events"] >= min_events_for_f1]
        populations[name] = {
            "n": len(entries),
            "median_rel_error": float(np.median(errors)) if errors else None,
            "p95_rel_error": float(np.percentile(errors, 95)) if errors else None,
            "coverage": float(np.mean(inside)) if inside else None,
            "median_f1": float(np.median(f1)) if f1 else None,
            "min_f1": float(np.min(f1)) if f1 else None,
            "n_f1": len(f1),
        }
    car_share, car_ideal = [], []
    for r in records:
        if r.status == "ok" and "car_t" in r.populations and r.populations["t_cells"]["true_events"]:
            entry = r.populations["car_t"]
            # the same event floor as every F1 above: F1 of a handful of events is noise
            if entry["true_events"] >= max(0.01 * r.populations["t_cells"]["true_events"], min_events_for_f1):
                car_share.append(entry["f1"])
                car_ideal.append(entry["f1_ideal_cut"])
    if car_share:
        car_share, car_ideal = np.array(car_share), np.array(car_ideal)
        populations["car_t"].update({
            "median_f1_1pct": float(np.median(car_share)), "min_f1_1pct": float(np.min(car_share)),
            "n_f1_1pct": len(car_share), "share_f1_1pct_ge_0.90": float(np.mean(car_share >= 0.90)),
            # the same, for the ideal count-preserving cut (the ceiling)
            "median_ideal_f1_1pct": float(np.median(car_ideal)),
            "share_ideal_f1_1pct_ge_0.90": float(np.mean(car_ideal >= 0.90)),
            "median_f1_gap_to_ideal_1pct": float(np.median(car_ideal - car_share)),
            "max_f1_gap_to_ideal_1pct": float(np.max(car_ideal - car_share))})
    confusion = {}
    for r in records:
        if r.eligibility_truth is None:
            continue
        key = ("eligible" if r.eligibility_truth else "not_eligible", r.verdict)
        confusion[key] = confusion.get(key, 0) + 1
        if r.verdict == "indeterminate":
            key = ("indeterminate", "near threshold" if r.near_threshold else "far from threshold")
            confusion[key] = confusion.get(key, 0) + 1
    return populations, confusion


def _population_summary(entries, min_events_for_f1):
    errors = [e["relative_error"] for e in entries if e.get("relative_error") is not None]
    inside = [e["inside"] for e in entries if "inside" in e]
    f1 = [e["f1"] for e in entries if e["true_events"] >= min_events_for_f1]
    return {"n": len(entries),
            "median_rel_error": float(np.median(errors)) if errors else None,
            "coverage": float(np.mean(inside)) if inside else None,
            "median_f1": float(np.median(f1)) if f1 else None,
            "n_f1": len(f1)}


def wrong_verdict(record):
    """True for an ``eligible`` / ``not_eligible`` verdict that contradicts the truth.

    Examples
    --------
    >>> wrong_verdict(TubeRecord("x.fcs", "typical", "ok", eligibility_truth=True, verdict="not_eligible"))
    True
    >>> wrong_verdict(TubeRecord("x.fcs", "typical", "ok", eligibility_truth=True, verdict="indeterminate"))
    False
    """
    if record.eligibility_truth is None:
        return False
    return record.verdict == ("not_eligible" if record.eligibility_truth else "eligible")


def quantile_interval(values, quantile=0.95, confidence=0.95):
    """A distribution-free confidence interval for a quantile: two order statistics of ``values``.

    The number of values below the true ``quantile`` is Binomial(n,
    ``quantile``); the interval runs from the ``l``-th to the ``u``-th
    smallest value, ``l`` and ``u`` the binomial's ``(1 − confidence)/2``
    tails. With too few values a bound does not exist and is ``None``: 34
    tubes cannot bound a 95th percentile from above (the next tube may be
    the worst), which a single p95 figure hides.

    Examples
    --------
    >>> quantile_interval(np.arange(1.0, 201.0))     # the 95th percentile of 200 values: ranks 184-197
    (184.0, 197.0)
    >>> quantile_interval(np.arange(1.0, 35.0))[1] is None
    True
    """
    ordered = np.sort(np.asarray(values, dtype=np.float64))
    n = ordered.size
    if n == 0:
        return None, None
    tail = (1.0 - confidence) / 2.0
    # 1-based ranks, B ~ Binomial(n, quantile) the values below it: the
    # largest l with P(B < l) <= tail, the smallest u with P(B >= u) <= tail
    below = np.arange(n + 1)
    low_rank = int(np.sum(binom.cdf(below, n, quantile) <= tail))
    high_rank = n + 2 - int(np.sum(binom.sf(below, n, quantile) <= tail))
    low = float(ordered[low_rank - 1]) if low_rank >= 1 else None
    high = float(ordered[high_rank - 1]) if high_rank <= n else None
    return low, high


def summarize_car(records, min_events_for_error=100, absent_below_per_ul=1.0, low_level_events=13):
    """CAR+ accuracy of the tubes counted against a pre-infusion reference, per condition and overall.

    Parameters
    ----------
    records : list of TubeRecord
        Only CAR tubes with a CAR+ truth are used.
    min_events_for_error : int
        Relative errors only over tubes with at least this many true CAR+ events.
    absent_below_per_ul : float
        Tubes whose true CAR+ is below this many cells/µL must read "below
        LLOQ": one that does not is a false persistence.
    low_level_events : int
        The low levels' bias is taken over tubes from this many true CAR+
        events (a published flow assay's LOD is ~13) up to ``min_events_for_error``.

    Returns
    -------
    dict
        condition (and ``"all"``) -> ``n``, ``coverage`` (95 % intervals
        holding the truth), ``median_rel_error`` and ``p95_rel_error`` (over
        ``n_error`` tubes with enough events), ``p95_rel_error_interval`` (a
        95 % interval for that p95, :func:`quantile_interval`: ``None`` for
        a bound too few tubes cannot give), ``p95_perfect_rel_error`` (the
        same for a perfect gate: the blood draw's counting noise, a floor no
        analysis goes below), ``median_rel_error_to_perfect`` and
        ``p95_rel_error_to_perfect`` (the count against the perfect gate: the
        analysis' own error), ``low_level_bias`` and ``low_level_bias_se``
        (mean signed error against the perfect gate, and its standard error,
        over the ``n_low`` tubes with ``low_level_events`` to
        ``min_events_for_error`` true CAR+ events: a bias at low levels),
        ``n_absent`` (tubes below
        ``absent_below_per_ul``) and ``false_persistence`` (of those, the
        ones reported at or above the LLOQ); over the ``n_shape`` tubes with
        enough events whose positives' shape was fitted: ``shape_log_sd``
        (median fitted log-SD of the CAR signal), ``shape_log_sd_scatter``
        (its SD across tubes), ``shape_log_sd_se`` (median SE the fit
        reported) and ``shape_error_correlation`` (Pearson r of the signed
        error against the perfect gate with the fitted log-SD: how much of
        the error the shape's estimate explains).

    Examples
    --------
    >>> r = TubeRecord("a.fcs", "car_x", "ok", panel="car", populations={"car_t": {
    ...     "true_events": 400, "true_cells_per_ul": 50.0, "cells_per_ul": 47.0, "inside": True, "below_lloq": False,
    ...     "relative_error": 0.06}})
    >>> s = summarize_car([r])["all"]
    >>> s["n"], s["coverage"], round(s["median_rel_error"], 2), s["false_persistence"]
    (1, 1.0, 0.06, 0)
    """
    groups = {}
    for r in records:
        entry = r.populations.get("car_t")
        if r.status != "ok" or r.panel != "car" or not entry or "inside" not in entry:
            continue
        for key in (r.condition, "all"):
            groups.setdefault(key, []).append(entry)
    table = {}
    for key, entries in groups.items():
        enough = [e for e in entries
                  if e["true_events"] >= min_events_for_error and e.get("relative_error") is not None]
        errors = [e["relative_error"] for e in enough]
        floor = [e["perfect_relative_error"] for e in enough if e.get("perfect_relative_error") is not None]
        own = [e["relative_error_to_perfect"] for e in enough if e.get("relative_error_to_perfect") is not None]
        absent = [e for e in entries if e["true_cells_per_ul"] < absent_below_per_ul]
        # low levels: from the published LOD (~13 events) to where errors are tabulated
        low = [e["signed_error_to_perfect"] for e in entries
               if low_level_events <= e["true_events"] < min_events_for_error
               and e.get("signed_error_to_perfect") is not None]
        shaped = [e for e in enough if e.get("positive_level") and e.get("signed_error_to_perfect") is not None]
        log_sds = np.array([e["positive_level"]["log_sd"] for e in shaped])
        shape_errors = np.array([e["signed_error_to_perfect"] for e in shaped])
        reported_se = [e["positive_level"]["log_sd_se"] for e in shaped if e["positive_level"].get("log_sd_se")]
        correlation = (float(np.corrcoef(shape_errors, log_sds)[0, 1])
                       if len(shaped) > 2 and np.std(log_sds) > 0 and np.std(shape_errors) > 0 else None)
        table[key] = {"n": len(entries), "coverage": float(np.mean([e["inside"] for e in entries])),
                      "n_error": len(errors),
                      "median_rel_error": float(np.median(errors)) if errors else None,
                      "p95_rel_error": float(np.percentile(errors, 95)) if errors else None,
                      "p95_rel_error_interval": quantile_interval(errors),
                      "p95_perfect_rel_error": float(np.percentile(floor, 95)) if floor else None,
                      "median_rel_error_to_perfect": float(np.median(own)) if own else None,
                      "p95_rel_error_to_perfect": float(np.percentile(own, 95)) if own else None,
                      "n_low": len(low),
                      "low_level_bias": float(np.mean(low)) if low else None,
                      "low_level_bias_se": float(np.std(low, ddof=1) / np.sqrt(len(low))) if len(low) > 1 else None,
                      "n_absent": len(absent),
                      "false_persistence": sum(1 for e in absent if e.get("below_lloq") is False),
                      "n_shape": len(shaped),
                      "shape_log_sd": float(np.median(log_sds)) if len(shaped) else None,
                      "shape_log_sd_scatter": float(np.std(log_sds, ddof=1)) if len(shaped) > 1 else None,
                      "shape_log_sd_se": float(np.median(reported_se)) if reported_se else None,
                      "shape_error_correlation": correlation}
    if "all" in table:
        table["all"] = table.pop("all")
    return table


def summarize_by_condition(records, min_events_for_f1=50, populations=("b_cells", "lymphocytes", "car_t")):
    """Accuracy per condition: what a reviewer would see on each kind of tube.

    Parameters
    ----------
    records : list of TubeRecord
    min_events_for_f1 : int
        F1 only over tubes with at least this many true events of the population.
    populations : tuple of str
        Populations summarised per condition.

    Returns
    -------
    dict
        condition -> ``n`` (tubes), ``n_failed`` (analysis raised), ``errors``
        (first messages), per population ``median_rel_error``, ``coverage``
        (intervals holding the truth), ``median_f1``, ``n_f1``;
        ``lymphosum_ok`` (share of TBNK tubes with lymphosum within 100 +/-
        10 %, ``None`` without TBNK tubes), ``n_good`` and
        ``qc_fail_among_good`` (share of good tubes - enough beads, all
        markers, sound acquisition - whose verdict is ``qc_fail``),
        ``wrong_verdicts`` (eligible/not_eligible contradicting the truth) and
        ``n_verdicts``. Conditions in the order first seen.

    Examples
    --------
    >>> r = TubeRecord("a.fcs", "typical", "ok", eligibility_truth=True, verdict="qc_fail", lymphosum_pct=97.0,
    ...                panel="tbnk")
    >>> s = summarize_by_condition([r])["typical"]
    >>> s["n"], s["lymphosum_ok"], s["qc_fail_among_good"], s["wrong_verdicts"]
    (1, 1.0, 1.0, 0)
    """
    by_condition = {}
    for r in records:
        by_condition.setdefault(r.condition, []).append(r)
    table = {}
    for condition, rs in by_condition.items():
        ok = [r for r in rs if r.status == "ok"]
        row = {"n": len(rs), "n_failed": len(rs) - len(ok), "errors": [r.error for r in rs if r.error][:3]}
        for name in populations:
            row[name] = _population_summary([r.populations[name] for r in ok if name in r.populations],
                                            min_events_for_f1)
        lymphosums = [r.lymphosum_pct for r in ok if r.lymphosum_pct is not None]
        row["lymphosum_ok"] = (float(np.mean([abs(x - 100.0) <= LYMPHOSUM_TOLERANCE_PCT for x in lymphosums]))
                               if lymphosums else None)
        row["n_lymphosum"] = len(lymphosums)
        # eligibility is judged on TBNK tubes; a good one whose analysis raised
        # got no verdict at all, which counts as a qc failure
        judged = [r for r in rs if r.good_tube and r.panel == "tbnk"
                  and (r.status != "ok" or r.eligibility_truth is not None)]
        row["n_good"] = len(judged)
        row["qc_fail_among_good"] = (float(np.mean([r.status != "ok" or r.verdict == "qc_fail" for r in judged]))
                                     if judged else None)
        verdicts = [r for r in ok if r.eligibility_truth is not None]
        row["n_verdicts"] = len(verdicts)
        row["wrong_verdicts"] = sum(wrong_verdict(r) for r in verdicts)
        table[condition] = row
    return table
