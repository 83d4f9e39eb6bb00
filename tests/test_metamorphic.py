"""Metamorphic tests: properties of the whole pipeline that hold for any tube.

Each test transforms a tube at the FCS level (:mod:`cytometry.simulation.metamorphic`),
writes the result as a real FCS file, gates it again through the public API
(:func:`cytometry.analysis.gate_file`, or :func:`~cytometry.analysis.analyze_file`
for cells/µL) and compares the counts with what the transformation implies:

1. a detector's gain changed (spillover changed consistently) changes no count;
2. gated events of a population spiked into a tube raise its count by that many;
3. a tube diluted with a population-free tube scales the count linearly;
4. a random half of the events holds half of every count;
5. the order of events changes nothing at all, the order of channels nothing
   beyond noise.

They run on the two real instrument files in ``../shared/data/real/``
(skipped when absent) and on two simulated tubes with beads (TBNK and CAR).

Tolerance ("beyond noise") — one rule for every population, file and property
----------------------------------------------------------------------------
A count expected to be ``e`` events in a tube of ``N`` events may differ from
``e`` by at most ``max(5, 3·sqrt(N·p·(1 − p)))`` events, ``p = e / N``
(:func:`cytometry.simulation.metamorphic.count_tolerance`): three binomial standard
deviations, i.e. the change that re-drawing the same blood would make to the
count anyway. A transformation that moves a count by less leaves the result
inside its own counting noise; one that moves it by more changed the answer.
The 5-event floor is slack where the binomial SD vanishes (``p`` near 0 or 1),
a fifth of the 25-event LLOQ. ``N`` and ``e`` are stated per test; nothing is
tuned per file.

Where the gating is currently wrong (the real files gate T = B = 0, see
``../shared/data/real/README.md``), tests that need a gated population to
transform say so in their failure message rather than passing vacuously.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from cytometry.analysis import AnalysisOptions, analyze_file, gate_file
from cytometry.simulation.metamorphic import (
    append_events,
    count_tolerance,
    dilute_population,
    permute_channels,
    read_table,
    scale_detector_gain,
    select_events,
    shuffle_events,
    split_events,
    write_table,
)
from cytometry.preprocess import compensate
from cytometry.simulation.simulate import simulate_tube, write_tube
from gating import POPULATIONS

ROOT = Path(__file__).resolve().parents[1]
REAL_DATA = ROOT.parent / "shared" / "data" / "real"
REAL_FILES = {
    "facscanto_tbnk": REAL_DATA / "facscanto_tbnk_1.fcs",
    "flowsom_68983": REAL_DATA / "flowsom_68983" / "68983.fcs",
}
#: Simulated tubes: (panel, seed). 4 µL of blood gives ~20,000 events,
#: ~440 B cells and (CAR tube) ~180 CAR+ T cells, beads included.
SIMULATED = {"sim_tbnk": ("tbnk", 11), "sim_car": ("car", 12)}
SIMULATED_BLOOD_UL = 4.0
TUBES = tuple(REAL_FILES) + tuple(SIMULATED)
#: Tubes stained with a CAR reagent (what the tube holds, not what the gating finds):
#: the real files are a TBNK tube and a mouse lymphocyte panel.
CAR_TUBES = frozenset(name for name, (panel, _) in SIMULATED.items() if panel == "car")
#: Populations spiked in and diluted: the two the package counts for the trial, and T cells.
TRANSFORMED_POPULATIONS = ("b_cells", "t_cells", "car_t")

#: Stable population names compared by every test (those the tube's gating reports).
CHECKED_POPULATIONS = tuple(POPULATIONS) + ("beads",)
#: Fewer gated events than this (the usual LLOQ) and there is nothing to spike or dilute.
MIN_EVENTS_TO_TRANSFORM = 25
SEED = 2026


# ---------------------------------------------------------------------------
# Fixtures: each tube read and gated once per module, transformations memoised
# ---------------------------------------------------------------------------

@dataclass
class GatedTube:
    """One tube as written to disk and gated through :func:`gate_file`."""

    name: str
    path: Path
    table: object
    gated: object
    counts: dict = field(default_factory=dict)

    @property
    def n_events(self):
        return self.table.n_events

    def mask(self, population):
        return np.asarray(self.gated.gating.masks[population], dtype=bool)


def _counts(gated):
    """Events per checked population that the gating reports."""
    masks = gated.gating.masks
    return {name: int(np.asarray(masks[name]).sum()) for name in CHECKED_POPULATIONS if name in masks}


def _gate(name, path, table=None):
    gated = gate_file(path)
    table = table if table is not None else read_table(path)
    return GatedTube(name=name, path=Path(path), table=table, gated=gated, counts=_counts(gated))


class TubeStore:
    """Builds each tube (and each derived tube) on first use, then reuses it."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self._cache = {}

    def original(self, name):
        key = (name, "original")
        if key not in self._cache:
            if name in REAL_FILES:
                path = REAL_FILES[name]
                if not path.exists():
                    pytest.skip(f"real test file {path} not present beside the project")
            else:
                panel, seed = SIMULATED[name]
                tube = simulate_tube(panel, seed=seed, blood_volume_ul=SIMULATED_BLOOD_UL)
                path = write_tube(tube, self.folder / name / f"{name}.fcs")
            self._cache[key] = _gate(name, path)
        return self._cache[key]

    def derived(self, name, label, make_table):
        """Gate ``make_table(original)`` written as ``<name>_<label>.fcs`` (memoised)."""
        key = (name, label)
        if key not in self._cache:
            table = make_table(self.original(name))
            path = write_table(table, self.folder / name / f"{name}_{label}.fcs")
            self._cache[key] = _gate(f"{name}_{label}", path, table)
        return self._cache[key]

    def halves(self, name):
        """The tube split into two disjoint random halves, each gated: (indices, tube) × 2."""
        original = self.original(name)
        first, second = split_events(original.n_events, seed=SEED)
        return [(index, self.derived(name, f"half{k}", lambda tube, index=index: select_events(tube.table, index)))
                for k, index in enumerate((first, second), start=1)]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return TubeStore(tmp_path_factory.mktemp("metamorphic"))


def _violations(observed, expected, total_events):
    """Lines describing each population whose count is beyond noise (see module docstring)."""
    lines = []
    for population, expect in expected.items():
        if population not in observed:
            lines.append(f"{population}: missing from the transformed tube's gating")
            continue
        tolerance = count_tolerance(expect, total_events)
        if abs(observed[population] - expect) > tolerance:
            lines.append(f"{population}: {observed[population]} events, expected {expect:.1f} "
                         f"± {tolerance:.1f} (N = {total_events})")
    return lines


def _skip_without_reagent(name, population):
    """Skip where the tube cannot hold the population (CAR+ T cells without a CAR reagent)."""
    if population == "car_t" and name not in CAR_TUBES:
        pytest.skip(f"{name} holds no CAR reagent")


def _require_population(tube, population):
    """The population's gated events; fails (not skips) when too few to transform."""
    if population not in tube.counts:
        pytest.fail(f"{tube.name}: the gating reports no {population!r} population")
    n = tube.counts[population]
    assert n >= MIN_EVENTS_TO_TRANSFORM, (
        f"{tube.name}: only {n} {population} events gated, fewer than {MIN_EVENTS_TO_TRANSFORM}: "
        f"nothing to spike in or dilute (the gating misses the population)")
    return n


# ---------------------------------------------------------------------------
# 0. The harness itself: a rewritten, untransformed file gates identically
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", TUBES)
def test_rewriting_a_file_unchanged_changes_no_event(store, name):
    """Reading and writing back through :mod:`cytometry.simulation.metamorphic` is exact.

    Every other test compares a rewritten file with the original, so the
    writer itself must change nothing: same raw values, same spillover, same
    masks event by event.
    """
    original = store.original(name)
    rewritten = store.derived(name, "rewritten", lambda tube: tube.table)
    assert np.array_equal(rewritten.gated.sample.events, original.gated.sample.events)
    assert rewritten.gated.sample.pnn == original.gated.sample.pnn
    assert rewritten.gated.sample.pns == original.gated.sample.pns
    assert rewritten.gated.sample.ranges == original.gated.sample.ranges
    if original.gated.spillover is not None:
        assert rewritten.gated.spillover.detectors == original.gated.spillover.detectors
        assert np.array_equal(rewritten.gated.spillover.matrix, original.gated.spillover.matrix)
    for population in original.gated.gating.masks:
        assert np.array_equal(rewritten.mask(population), original.mask(population)), population


# ---------------------------------------------------------------------------
# 1. Detector gain
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("gain", [0.5, 2.0])
@pytest.mark.parametrize("marker", ["CD45", "CD3", "CD19"])
@pytest.mark.parametrize("name", TUBES)
def test_detector_gain_changes_no_count(store, name, marker, gain):
    """Raw values of one detector × ``gain`` with ``S' = D⁻¹ S D`` change no count beyond noise.

    This is the same blood acquired at another detector voltage: after
    compensation the channel is exactly scaled by ``gain`` and every other
    channel is unchanged (checked first, on the events read back from the
    file, so the test measures the gating and not the transformation).
    Gains 0.5 and 2 are powers of two, so the float32 file holds the scaled
    values exactly. Tolerance: the module's rule with ``e`` = the original
    tube's count and ``N`` = its events (the same events in both files).
    """
    original = store.original(name)
    detector = original.gated.panel.markers[marker]
    scaled = store.derived(name, f"{detector}_x{gain:g}",
                           lambda tube: scale_detector_gain(tube.table, detector, gain))

    column = original.gated.sample.channel_index(detector)
    before = compensate(original.gated.sample.events, original.gated.sample.pnn, original.gated.spillover)
    after = compensate(scaled.gated.sample.events, scaled.gated.sample.pnn, scaled.gated.spillover)
    np.testing.assert_allclose(after[:, column], gain * before[:, column], rtol=1e-9, atol=1e-6)
    others = [i for i in range(before.shape[1]) if i != column]
    np.testing.assert_allclose(after[:, others], before[:, others], rtol=1e-9, atol=1e-6)

    problems = _violations(scaled.counts, original.counts, original.n_events)
    assert not problems, f"{name}, {marker} ({detector}) gain x{gain:g}:\n  " + "\n  ".join(problems)


# ---------------------------------------------------------------------------
# 2. Spike-in recovery
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("population", TRANSFORMED_POPULATIONS)
@pytest.mark.parametrize("name", TUBES)
def test_spiked_in_population_is_recovered(store, name, population):
    """Events of ``population`` gated in tube X, appended to tube Y, raise Y's counts by that many.

    X and Y are the two disjoint random halves of the same tube (the only
    way to have two tubes acquired with the same detectors, gains and
    spillover for a real file). Every population is checked, not only the
    spiked one: spiking B cells must raise lymphocytes and leukocytes by the
    same events as X's gating put there, and leave T cells alone. Expected
    count of population Q: Y's count + the spiked events X's gating put in Q;
    ``N`` = Y's events + the spiked events. The spiked events themselves must
    also be found in ``population`` (same rule, ``e`` = events spiked).
    """
    _skip_without_reagent(name, population)
    (_, recipient), (_, donor) = store.halves(name)
    n_spiked = _require_population(donor, population)
    spiked_rows = donor.mask(population)
    spiked = store.derived(name, f"half1_plus_{population}",
                           lambda tube: append_events(recipient.table, donor.table.events[spiked_rows]))

    expected = {q: recipient.counts[q] + int(donor.mask(q)[spiked_rows].sum())
                for q in recipient.counts if q in donor.counts}
    total = recipient.n_events + n_spiked
    problems = _violations(spiked.counts, expected, total)
    found = int(spiked.mask(population)[recipient.n_events:].sum())
    if abs(found - n_spiked) > count_tolerance(n_spiked, total):
        problems.append(f"of the {n_spiked} spiked {population} events, {found} gated as {population}")
    assert not problems, f"{name}, {n_spiked} {population} events spiked in:\n  " + "\n  ".join(problems)


# ---------------------------------------------------------------------------
# 3. Dilution linearity
# ---------------------------------------------------------------------------

#: 1:1, 1:3 and 1:9 dilutions, plus the undiluted tube and the population-free diluent.
DILUTION_FRACTIONS = (1.0, 1 / 2, 1 / 4, 1 / 10, 0.0)
MIN_R_SQUARED = 0.99


def _linear_fit(fractions, counts):
    """Least-squares ``count = intercept + slope · fraction``; returns (slope, intercept, R²)."""
    x = np.asarray(fractions, dtype=float)
    y = np.asarray(counts, dtype=float)
    slope, intercept = np.polyfit(x, y, 1)
    residual = float(((y - (intercept + slope * x)) ** 2).sum())
    total = float(((y - y.mean()) ** 2).sum())
    r_squared = 1.0 - residual / total if total > 0 else 0.0
    return float(slope), float(intercept), r_squared


@pytest.mark.parametrize("population", TRANSFORMED_POPULATIONS)
@pytest.mark.parametrize("name", TUBES)
def test_dilution_with_population_free_tube_is_linear(store, name, population):
    """Mixing a tube with the same tube minus ``population`` scales the count linearly.

    The diluent is the tube with its gated ``population`` removed, so mixing
    at fraction f keeps every other event's concentration and keeps a random
    f of the population's events (:func:`dilute_population`). Fractions 1,
    1/2, 1/4, 1/10 (1:1, 1:3, 1:9) and 0 (the diluent alone: "absent" must
    read ≈ 0, not a split of the negatives). Asserts R² ≥ 0.99 of count vs.
    fraction and, with the module's rule (``e`` = the undiluted count, ``N``
    = the tube's events), a fitted slope equal to the undiluted count.
    """
    _skip_without_reagent(name, population)
    original = store.original(name)
    n_population = _require_population(original, population)
    mask = original.mask(population)
    counts = []
    for k, fraction in enumerate(DILUTION_FRACTIONS):
        if fraction == 1.0:
            counts.append(n_population)
            continue
        diluted = store.derived(name, f"{population}_dilution{k}",
                                lambda tube, fraction=fraction, k=k: dilute_population(
                                    tube.table, mask, fraction, seed=SEED + k))
        if population not in diluted.counts:
            pytest.fail(f"{name}: {population} missing from the gating at fraction {fraction:g}")
        counts.append(diluted.counts[population])
    slope, intercept, r_squared = _linear_fit(DILUTION_FRACTIONS, counts)
    table = ", ".join(f"f={f:g}: {c}" for f, c in zip(DILUTION_FRACTIONS, counts))
    assert r_squared >= MIN_R_SQUARED, f"{name} {population}: R² {r_squared:.4f} < {MIN_R_SQUARED} ({table})"
    tolerance = count_tolerance(n_population, original.n_events)
    assert abs(slope - n_population) <= tolerance, (
        f"{name} {population}: slope {slope:.1f}, expected {n_population} ± {tolerance:.1f} ({table})")


@pytest.mark.parametrize("name", tuple(SIMULATED))
def test_dilution_of_cells_in_bead_tube_scales_cells_per_ul(store, name):
    """In a bead-counted tube, diluting the cells (not the beads) scales every cells/µL.

    The blood is diluted before it meets the beads: all gated bead events
    are kept and a random fraction f of every other event. B and T cells/µL
    from :func:`analyze_file` must be linear in f with R² ≥ 0.99 and a slope
    equal to the undiluted cells/µL within the module's rule (applied to
    the events and converted with the undiluted cells per event). Only the
    simulated tubes hold beads (the real files have none, see their README).
    f = 0 is left out: a tube of beads alone has no leukocytes to gate.
    """
    original = store.original(name)
    beads = original.mask("beads")
    assert beads.sum() >= 1000, f"{name}: {int(beads.sum())} bead events gated, too few to count against"
    # The bead lot constants only scale every cells/µL; take the simulated tube's own.
    truth = json.loads((original.path.parent / "truth" / f"{original.path.stem}.json").read_text())
    options = AnalysisOptions(beads_per_test=truth["beads_per_test"], sample_volume_ul=truth["sample_volume_ul"])
    fractions = (1.0, 1 / 2, 1 / 4, 1 / 10)
    per_ul = {"b_cells": [], "t_cells": []}
    undiluted_events = {}
    for k, fraction in enumerate(fractions):
        if fraction == 1.0:
            path = original.path
        else:
            table = dilute_population(original.table, ~beads, fraction, seed=SEED + k, keep_mask=beads)
            path = write_table(table, original.path.with_name(f"{name}_cells_dilution{k}.fcs"))
        result = analyze_file(path, options=options)
        assert result["status"] == "ok", f"{name} f={fraction:g}: {result.get('error')}"
        for population in per_ul:
            per_ul[population].append(result["populations"][population]["cells_per_ul"])
            if fraction == 1.0:
                undiluted_events[population] = result["populations"][population]["events"]
    problems = []
    for population, values in per_ul.items():
        slope, _, r_squared = _linear_fit(fractions, values)
        table = ", ".join(f"f={f:g}: {v:.1f}/uL" for f, v in zip(fractions, values))
        n = undiluted_events[population]
        assert n >= MIN_EVENTS_TO_TRANSFORM, f"{name}: only {n} {population} events in the undiluted tube"
        per_event = values[0] / n
        tolerance = count_tolerance(n, original.n_events) * per_event
        if r_squared < MIN_R_SQUARED:
            problems.append(f"{population}: R² {r_squared:.4f} < {MIN_R_SQUARED} ({table})")
        if abs(slope - values[0]) > tolerance:
            problems.append(f"{population}: slope {slope:.1f}/uL, expected {values[0]:.1f} ± {tolerance:.1f} ({table})")
    assert not problems, f"{name}:\n  " + "\n  ".join(problems)


# ---------------------------------------------------------------------------
# 4. Subsampling
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", TUBES)
def test_random_half_of_events_holds_half_of_every_count(store, name):
    """Each of two disjoint random halves holds ``n · N_half / N`` of every count, within noise.

    The expected count is the whole tube's count times the fraction of
    events kept; ``N`` is the half's events. The rule's binomial SD is that
    of drawing the half's events from the blood; the actual hypergeometric
    split of a fixed tube varies by about 1/√2 of it, which leaves room for
    the gate borders moving with half the events.
    """
    original = store.original(name)
    problems = []
    for k, (index, half) in enumerate(store.halves(name), start=1):
        kept = len(index) / original.n_events
        expected = {q: n * kept for q, n in original.counts.items()}
        problems += [f"half {k}: {line}" for line in _violations(half.counts, expected, half.n_events)]
    assert not problems, f"{name}:\n  " + "\n  ".join(problems)


# ---------------------------------------------------------------------------
# 5. Event order and channel order
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", TUBES)
def test_event_order_changes_no_event(store, name):
    """Shuffling the events changes no event's populations: asserted exactly.

    Exact, not within noise: an FCS file's events are a set acquired from
    the blood, and a file re-exported sorted, merged or reversed is the same
    sample. Every step is a per-event computation (compensation, transform)
    or a function of the set of values (histograms, quantiles, mixture fits
    on binned densities), so the only legitimate difference is last-bit
    rounding (of the compensation product, of order-dependent sums), ~1e-13
    logicle units, which moves an event across a gate only if it lies within
    1e-13 of the border: practically never. A
    gating that draws a seeded subsample by event index, or initialises a
    clustering from "the first k events", would pass a within-noise test and
    still give a different count for the same blood: this test catches it.
    """
    original = store.original(name)
    shuffled_table, order = shuffle_events(original.table, seed=SEED)
    shuffled = store.derived(name, "shuffled_events", lambda tube: shuffled_table)
    back = np.argsort(order)  # shuffled row back[i] is original row i
    # The compensated, transformed events are the same rows (BLAS may round a
    # few rows' compensation product differently by position, ~1e-13), so any
    # difference below is the gating's, not the reader's or the transform's.
    assert np.array_equal(shuffled.gated.sample.events[back], original.gated.sample.events)
    np.testing.assert_allclose(shuffled.gated.data[back], original.gated.data, rtol=1e-12, atol=1e-9)
    for population in original.gated.gating.masks:
        assert population in shuffled.gated.gating.masks, f"{name}: {population} missing after shuffling"
        moved = np.flatnonzero(shuffled.mask(population)[back] != original.mask(population))
        assert moved.size == 0, (f"{name}: {moved.size} events change {population} membership when the "
                                 f"events are stored in another order (count {original.counts.get(population)})")


@pytest.mark.parametrize("name", TUBES)
def test_channel_order_changes_nothing_beyond_noise(store, name):
    """Channels written in another order ($PnN, $PnS, $PnR and SPILL kept consistent) change nothing.

    Markers are found by name and the spillover matrix is over named
    detectors (here also listed in another order), so a gating that reads
    channels by position would fail by whole populations. Counts and the
    number of events that change membership are both held to the module's
    rule (``e`` = the original count, ``N`` = the tube's events): a solve in
    another detector order may change compensated values in the last bit,
    so exact identity is not promised, but no more than noise may move.
    """
    original = store.original(name)
    rng = np.random.default_rng(SEED)
    n_channels = len(original.table.pnn)
    order = rng.permutation(n_channels)
    while np.array_equal(order, np.arange(n_channels)):
        order = rng.permutation(n_channels)
    spill_order = None
    if original.table.spillover is not None:
        spill_order = rng.permutation(len(original.table.spillover.detectors))
    permuted = store.derived(name, "permuted_channels",
                             lambda tube: permute_channels(tube.table, order, spill_order))
    assert permuted.gated.sample.pnn == [original.table.pnn[i] for i in order]

    problems = _violations(permuted.counts, original.counts, original.n_events)
    for population, n in original.counts.items():
        if population not in permuted.counts:
            continue
        changed = int((permuted.mask(population) != original.mask(population)).sum())
        tolerance = count_tolerance(n, original.n_events)
        if changed > tolerance:
            problems.append(f"{population}: {changed} events change membership (tolerance {tolerance:.1f})")
    assert not problems, f"{name}, channels in order {order.tolist()}:\n  " + "\n  ".join(problems)
