"""Accuracy against the simulator's truth: the harness behind every accuracy claim.

:func:`simulate_condition_set` writes a seeded, varied set of tubes (gains,
naming, lymphopenia, debris, tiny files, few beads, B-cell aplasia, CAR+
from 0.1% to 60% of T cells); :func:`evaluate_tube` gates and counts one tube
and compares it with its truth; :func:`summarize` turns the records into the
per-population table printed by ``benchmarks/accuracy.py`` and checked (on a
reduced set) by the tests.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gating import POPULATIONS

from .analysis import AnalysisOptions, analyze_gated, gate_file, t_cell_car_values, with_car_reference
from .simulate import POPULATION_LABELS as SIMULATED_POPULATIONS
from .simulate import default_concentrations, simulate_tube, write_tube

#: Which truth labels make up each reported population (the simulator's own
#: map, plus the beads; CAR+ CD4/CD8 sub-populations are not reported).
POPULATION_LABELS = {"beads": ("bead",),
                     **{name: labels for name, labels in SIMULATED_POPULATIONS.items() if name in POPULATIONS}}

ELIGIBILITY_THRESHOLD = 5.0


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


CONDITIONS = [
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


def simulate_condition_set(out_dir, n_samples=120, seed=2026, with_pre_infusion=True):
    """Write ``n_samples`` simulated tubes spread evenly over :data:`CONDITIONS`.

    With ``with_pre_infusion``, every CAR tube gets a companion pre-infusion
    tube of the same subject (``truth["pre_infusion_file"]``), the CAR-negative
    reference a trial's manifest links.

    Returns a list of ``(fcs_path, condition_name, truth)``. Seeded: the
    same arguments write the same files.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tubes = []
    for index in range(n_samples):
        condition = CONDITIONS[index % len(CONDITIONS)]
        overrides, acquisition = condition.draw(rng)
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
            pre = simulate_tube("car", seed=seed * 1000 + index + 500_000,
                                concentrations=default_concentrations("car", car_t=0.0, **before), **acquisition)
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


def evaluate_tube(path, condition, truth, options=None):
    """Gate and count one simulated tube and compare with its truth."""
    options = options or AnalysisOptions(beads_per_test=truth["beads_per_test"],
                                         sample_volume_ul=truth["sample_volume_ul"])
    if truth.get("pre_infusion_file"):
        reference = t_cell_car_values(gate_file(truth["pre_infusion_file"], options))
        options = with_car_reference(options, reference, "pre-infusion tube")
    record = TubeRecord(file=str(path), condition=condition, status="ok")
    labels = np.load(Path(path).parent / "truth" / f"{Path(path).stem}.labels.npy")
    names = truth["label_names"]
    try:
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
                         inside=bool(count["ci95"][0] <= true_value <= count["ci95"][1]),
                         relative_error=(abs(count["cells_per_ul"] - true_value) / true_value) if true_value else None)
        if population == "car_t":
            entry["f1_ideal_cut"] = _ideal_count_preserving_f1(gated, true_mask)
        record.populations[population] = entry
    if truth["panel"] == "tbnk" and result.get("eligibility"):
        record.eligibility_truth = concentrations["b_cells"] > ELIGIBILITY_THRESHOLD
        record.verdict = result["eligibility"]["verdict"]
        low, high = result["populations"]["b_cells"]["ci95"]
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
