"""One sample from file to counts: load → panel → compensate → transform → gate → count.

:func:`analyze_file` is a pure function of the file and the options (the
same file gives the same result on every run and worker), and never raises
for a bad file: it returns a result with ``status: "error"`` and a one-line
message instead, so a batch always goes on.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from cytometry._version import __version__
from cytometry.counts import (DEFAULT_LLOQ_EVENTS, DEFAULT_LOD_EVENTS, LLOQ_CV, bead_count, detection_limits,
                              dual_platform_count, volumetric_count)
from cytometry.decisions.eligibility import EligibilityRule, decide
from cytometry.decisions.qc import QcRules, run_checks, saturated_events
from cytometry.loading.fcs import FcsError, file_sha256, read_fcs
from cytometry.loading.panel import PanelError, _gather, available_panels, read_panel_file, resolve_panel
from cytometry.loading.reviewed_gates import (ReviewedGatesError, evaluate_reviewed_gates, read_gate_mapping,
                                              read_reviewed_gates)
from cytometry.outputs.formatting import format_sig
from cytometry.preprocess import LOGICLE_DEFAULTS, compensate, logicle, read_compensation_csv
from gating import GatingParams, GatingResult, auto_gate
from gating.car import BeadLevel, CarReference
from gating.flags import Flag, unreliable_populations
from gating.gatingml import export_gatingml
from gating.panels import PanelDefinitionError
from gpu.logicle import logicle_inverse

#: A common acceptance rule for single-platform bead counting.
DEFAULT_MIN_BEAD_EVENTS = 1000


@dataclass
class AnalysisOptions:
    """Everything besides the file that decides a result (recorded with it).

    Attributes
    ----------
    beads_per_test, sample_volume_ul : float or None
        Override the manifest; without them (and without another counting
        method's inputs) a sample is an error: no guessed default in a
        clinical count.
    dilution_factor : float or None
        Stained sample / blood volume, for volumetric counting from ``$VOL``.
    lymphocytes_per_ul : float or None
        Haematology analyser's lymphocyte count, for dual-platform counting.
    method : {"auto", "beads", "volumetric", "dual-platform"} or None
        ``auto`` (default): beads, else volumetric, else dual-platform.
    lod_events : int
        Fewer events than this: "not detected" (3: P(0 | 3 expected) ≈ 5%).
    compensation : str or None
        Path of a spillover CSV to use instead of the file's matrix.
    panel_file : str or None
        Marker → channel overrides (see :func:`cytometry.loading.panel.read_panel_file`).
    panel_dirs : tuple of str
        Extra folders (or files) of panel definitions (see :mod:`gating.panels`).
    device : str or None
        ``auto``, ``cpu`` or ``gpu`` for the gating kernels.
    lloq_events, min_bead_events : int
    rule : EligibilityRule
    gating : GatingParams
    qc : QcRules
        Limits of the reviewer's checks (lymphosum, CD4+CD8, stop rule…).
    """

    beads_per_test: float | None = None
    sample_volume_ul: float | None = None
    dilution_factor: float | None = None
    lymphocytes_per_ul: float | None = None
    method: str | None = None
    compensation: str | None = None
    panel_file: str | None = None
    panel_dirs: tuple = ()
    device: str | None = None
    lloq_events: int = DEFAULT_LLOQ_EVENTS
    lod_events: int = DEFAULT_LOD_EVENTS
    min_bead_events: int = DEFAULT_MIN_BEAD_EVENTS
    rule: EligibilityRule = field(default_factory=EligibilityRule)
    gating: GatingParams = field(default_factory=GatingParams)
    qc: QcRules = field(default_factory=QcRules)

    def as_dict(self):
        return asdict(self)




class SampleError(Exception):
    """A problem that stops one sample (one line; the batch goes on)."""


def is_screening(visit):
    """Whether a manifest ``visit`` names a screening visit (unknown counts as screening)."""
    return (not visit) or visit.strip().lower().startswith("screen")


def prepare_events(sample, panel, spillover, *, in_place=False):
    """Compensated, transformed events and the marker/scatter → column map.

    Fluorescence channels are compensated with ``spillover`` (when given)
    and logicle-transformed with T = ``$PnR``; scatter channels are divided
    by their range so they lie in 0–1 whatever the instrument.

    The events keep their dtype (float32 from
    :func:`cytometry.loading.fcs.read_fcs`) and are compensated and
    transformed in place, a block at a time: in one working copy, with
    ``sample.events`` left raw, or with ``in_place=True`` in the raw array
    itself, which the sample then releases
    (:meth:`~cytometry.loading.fcs.FcsSample.release_events`): one
    n_events × n_channels array in memory instead of two.

    Examples
    --------
    >>> from cytometry.loading.fcs import read_fcs
    >>> from cytometry.loading.panel import resolve_panel
    >>> sample = read_fcs("sample_fcs/S01_screening_TBNK.fcs")
    >>> panel = resolve_panel(sample.pnn, sample.pns)
    >>> copied, _ = prepare_events(sample, panel, sample.spillover)
    >>> data, channels = prepare_events(sample, panel, sample.spillover, in_place=True)
    >>> data.dtype, bool((data == copied).all()), sample.events is None
    (dtype('float32'), True, True)
    """
    dtype = np.result_type(sample.events.dtype, np.float32)
    if in_place and sample.events.dtype == dtype and sample.events.flags.writeable:
        data = sample.release_events()
    else:
        data = np.array(sample.events, dtype=dtype, copy=True)
        if in_place:
            sample.release_events()
    if spillover is not None:
        compensate(data, sample.pnn, spillover, out=data)
    channels = {}
    scaled = set()
    for key, name in panel.scatter.items():
        index = sample.channel_index(name)
        if key != "Time" and index not in scaled:  # once per column: the scaling is in place
            data[:, index] /= sample.channel_top(index)
            scaled.add(index)
    by_top = {}
    for marker, name in panel.markers.items():
        index = sample.channel_index(name)
        channels[marker] = index
        if index not in scaled:  # a column named as scatter too is scatter (as it was before in-place)
            by_top.setdefault(sample.channel_top(index), []).append(index)
    for top, indices in by_top.items():
        logicle(data, indices, top=top, out=data)
    for key, name in panel.scatter.items():
        channels[key] = sample.channel_index(name)
    return data, channels


def _gate_count_sd(gating, population):
    """The gate's own count uncertainty, in events (0 if none).

    ``count_sd`` where the gate estimated it (CAR+ counted against a
    reference); else √(2·overlap) from the events expected on the wrong side
    of a cut between overlapping populations (each side a Poisson number).
    """
    gate = next((g for g in gating.gates if g.name == population), None)
    if gate is None:
        return 0.0
    if gate.extra.get("count_sd") is not None:
        return float(gate.extra["count_sd"])
    return float(np.sqrt(2.0 * float(gate.extra.get("expected_misclassified", 0.0) or 0.0)))


def _gate_upper_events(gating, population):
    """The most events the gate's population may hold (its count's upper bound before noise), or 0."""
    gate = next((g for g in gating.gates if g.name == population), None)
    return float(gate.extra.get("upper_positive_events") or 0.0) if gate is not None else 0.0


def _background_events(gating, population):
    """Negatives a population's gate expects above its cut (a net count's background; 0 without one)."""
    gate = next((g for g in gating.gates if g.name == population), None)
    if gate is None or gate.extra.get("expected_negatives_above_cut") is None:
        return 0.0
    return float(gate.extra.get("limit_expected_negatives", gate.extra["expected_negatives_above_cut"]))


def _limits(gating, population, options):
    """LOD and LLOQ (events) of a population in this tube: the options' floors, raised by a gate's background.

    A CAR+ count is net of the negatives expected above its cut (estimated
    from the reference's tail of ``k`` events): its background variance is
    ``E + E²/k`` (:func:`cytometry.counts.detection_limits`). A CAR+ count
    without a reference has no estimate of ``E``: its LOD is its LLOQ.
    """

    gate = next((g for g in gating.gates if g.name == population), None)
    background, variance = 0.0, 0.0
    if gate is not None and gate.extra.get("expected_negatives_above_cut") is not None:
        # The highest counting cut's background where the count chose a lower one
        # (a lower cut serves a large population; the limits are about small ones).
        background = float(gate.extra.get("limit_expected_negatives", gate.extra["expected_negatives_above_cut"]))
        tail = float(gate.extra.get("limit_reference_tail_events", gate.extra.get("reference_tail_events")) or 0.0)
        variance = background + (background ** 2 / tail if tail > 0 else 0.0)
    lod, lloq = detection_limits(background, variance, lod_events=options.lod_events, lloq_events=options.lloq_events)
    if population == "car_t" and (gate is None or gate.extra.get("expected_negatives_above_cut") is None):
        # A CAR cut without a reference (the sample's own negative mode):
        # how many negatives its tail puts above the cut is not estimated
        # (real negatives are skewed; a mirrored or Gaussian tail under-
        # states it), so the LOD's "none expected" does not hold. Nothing
        # short of a quantifiable count is called detected.
        lod = lloq
    return lod, lloq


def _per_ul(count_for, events):
    """cells/µL that ``events`` events of this tube stand for (rounded to 4 decimals)."""
    exact = count_for(max(int(round(events)), 0))
    per_event = exact.cells_per_ul / exact.events if exact.events else None
    if per_event is None:
        exact = count_for(1)
        per_event = exact.cells_per_ul
    return round(float(per_event * events), 4)


def widen_for_overlap(count, count_sd, count_for, upper_events=None):
    """Add the gate's own uncertainty to a count's interval.

    Where a positive population overlaps its negatives (CAR+), the number of
    gated events is itself an estimate with a standard deviation of
    ``count_sd`` events beyond counting noise (negatives above the cut,
    positives below it). The interval becomes the exact interval of the
    counting method at events ∓ 1.96·``count_sd``.

    Parameters
    ----------
    count : Count
    count_sd : float
        Standard deviation of the gated event number, in events.
    count_for : callable(events) -> Count
        The counting method (beads, volumetric or dual-platform).
    upper_events : float, optional
        The most events the population may hold (positives too few to
        extrapolate below the cut): the upper end reaches its interval.

    Examples
    --------
    >>> from cytometry.counts import bead_count
    >>> count_for = lambda events: bead_count(events, 5000, 50000, 50.0)
    >>> plain = count_for(300)
    >>> wide = widen_for_overlap(plain, 6.0, count_for)
    >>> wide.ci95[0] < plain.ci95[0] and wide.ci95[1] > plain.ci95[1], wide.cells_per_ul == plain.cells_per_ul
    (True, True)
    """

    delta = 1.96 * count_sd
    low = count_for(max(0, int(np.floor(count.events - delta))))
    high = count_for(int(np.ceil(max(count.events, upper_events or 0.0) + delta)))
    return replace(count, ci95=(low.ci95[0], high.ci95[1]), method=f"{count.method}, interval widened for gate overlap")


COUNTING_METHODS = ("auto", "beads", "volumetric", "dual-platform")
LYMPHOCYTE_SUBSETS = ("lymphocytes", "t_cells", "cd4_t", "cd8_t", "b_cells", "nk_cells", "car_t")


def _option_or_manifest(options, row, name):
    value = getattr(options, name)
    if value is None and row is not None:
        value = row.number(name)
    return value


def _choose_counting(row, options, sample, gating):
    """The counting method for one sample and a function giving a population's Count.

    ``auto`` takes single-platform beads when the bead constants are known and
    the tube has beads, else volumetric counting when the file has ``$VOL``
    and a dilution factor is given, else dual-platform counting when the
    manifest gives the haematology analyser's lymphocytes/µL. The manifest
    column ``counting_method`` or ``--method`` can insist on one.

    Returns
    -------
    method : str or None
        ``None`` when no counting method applies (``details["reason"]`` says
        why); the populations are still reported, in events and % of parent.
    count_for : callable(events) -> Count, or None
    details : dict
        The constants used (recorded in ``result["counting"]``).
    """

    requested = options.method or "auto"
    if requested == "auto" and row is not None and row.text("counting_method"):
        requested = row.text("counting_method").lower()
    if requested not in COUNTING_METHODS:
        raise SampleError(f"unknown counting method {requested!r} (choose from {', '.join(COUNTING_METHODS)})")
    beads = _option_or_manifest(options, row, "beads_per_test")
    volume = _option_or_manifest(options, row, "sample_volume_ul")
    dilution = _option_or_manifest(options, row, "dilution_factor")
    lymphocytes = _option_or_manifest(options, row, "lymphocytes_per_ul")
    lymphocytes_cv = row.number("lymphocytes_cv") if row is not None else None
    for name, value in (("beads per test", beads), ("sample volume (uL)", volume), ("dilution factor", dilution),
                        ("lymphocytes/uL", lymphocytes)):
        if value is not None and value <= 0:
            raise SampleError(f"{name} ({value:g}) must be positive")
    bead_events = gating.events("beads")
    lymphocyte_events = gating.events("lymphocytes") if "lymphocytes" in gating.masks else 0
    has_volumetric = bool(sample.vol_nl and dilution)
    has_dual = bool(lymphocytes and lymphocyte_events)
    candidates = [requested] if requested != "auto" else ["beads", "volumetric", "dual-platform"]
    for method in candidates:
        if method == "beads" and beads and volume:
            # A tube without beads falls through to another method when there is one.
            if bead_events == 0 and requested == "auto" and (has_volumetric or has_dual):
                continue

            def count_for(events):
                return bead_count(events, bead_events, beads, volume, lloq_events=options.lloq_events)

            return "beads", (count_for if bead_events else None), {"beads_per_test": beads,
                                                                   "sample_volume_ul": volume}
        if method == "volumetric" and has_volumetric:
            def count_for(events):
                return volumetric_count(events, sample.vol_nl, dilution, lloq_events=options.lloq_events)

            return "volumetric", count_for, {"vol_nl": sample.vol_nl, "dilution_factor": dilution}
        if method == "dual-platform" and has_dual:
            def count_for(events):
                return dual_platform_count(events, lymphocyte_events, lymphocytes, lymphocytes_cv=lymphocytes_cv,
                                           lloq_events=options.lloq_events)

            return "dual-platform", count_for, {"lymphocytes_per_ul": lymphocytes, "lymphocytes_cv": lymphocytes_cv,
                                                "lymphocyte_events": lymphocyte_events}
    if requested != "auto":
        raise SampleError(f"counting method {requested} requested but its inputs are missing "
                          f"(beads: --beads-per-test/--sample-volume-ul; volumetric: $VOL and --dilution-factor; "
                          f"dual-platform: --lymphocytes-per-ul and lymphocyte events)")
    return None, None, {"reason": "no beads per test and sample volume (--beads-per-test/--sample-volume-ul or "
                                  "the manifest columns), no $VOL with a dilution factor, and no lymphocytes_per_ul "
                                  "for dual-platform counting"}


def _base_result(path, row):
    result = {"file": str(path), "sha256": None, "status": "ok", "error": None, "panel": None,
              "subject_id": None, "visit": None, "study_day": None, "tube": None,
              "populations": {}, "beads": None, "eligibility": None, "qc_flags": [],
              "software_version": __version__}
    if row is not None:
        result["subject_id"] = row.text("subject_id") or None
        result["visit"] = row.text("visit") or None
        result["tube"] = row.text("tube") or None
        day = row.text("study_day")
        if day:
            try:
                number = float(day)
                result["study_day"] = int(number) if number.is_integer() else number
            except ValueError:
                result["study_day"] = day
        if row.extra:
            result["manifest_extra"] = row.extra
    return result


def analyze_file(path, manifest_row=None, options=None, on_gated=None, raise_errors=False, gates=None,
                 gate_map=None):
    """Analyse one FCS file into the JSON-ready result of the CLI contract.

    Parameters
    ----------
    path : str or Path
    manifest_row : cytometry.loading.manifest.ManifestRow, optional
        Subject, visit, study day, tube and bead constants.
    options : AnalysisOptions, optional
    on_gated : callable, optional
        Called as ``on_gated(gated, result)`` after a successful analysis,
        with the :class:`GatedSample` (to draw figures or export gates
        without gating twice).
    raise_errors : bool
        Raise instead of returning an error result (``--debug``).
    gates, gate_map : str or Path, optional
        A reviewer's corrected gates (GatingML 2.0 or a FlowJo workspace)
        and the mapping of its gate names to populations (see
        :func:`apply_reviewed_gates`); default: the manifest row's ``gates``
        and ``gate_map`` columns. The file is gated automatically first
        (``on_gated`` sees that result, ``gating.source`` ``"automatic"``),
        then counted again from the reviewed gates: the result returned.
        When the reviewed gates cannot be used the result is an error
        naming the reviewed file, with the automatic result intact in
        ``automatic_result``.

    Returns
    -------
    dict
        See the README's JSON contract. ``status`` is ``"error"`` with a
        one-line ``error`` when the file cannot be analysed.

    Examples
    --------
    >>> r = analyze_file("sample_fcs/S01_screening_TBNK.fcs",
    ...                  options=AnalysisOptions(beads_per_test=50120, sample_volume_ul=50))
    >>> r["populations"]["b_cells"]["cells_per_ul"], r["eligibility"]["verdict"]
    (114.471, 'eligible')
    """
    options = options or AnalysisOptions()
    result = _base_result(path, manifest_row)
    screening = is_screening(result["visit"])
    gates, gate_map = reviewed_gates_of(manifest_row, gates, gate_map)
    try:
        # The raw events are not used after automatic gating (memory: one event array per tube); reviewed
        # gates are evaluated by flowkit on the raw events, so a reviewed sample keeps them.
        gated = gate_file(Path(path), options, keep_raw=gates is not None)
        result = _count(gated, manifest_row, options, result, screening)
        if on_gated is not None:
            on_gated(gated, result)
        if gates is None:
            return result
        automatic = result
        try:
            reviewed, audit = apply_reviewed_gates(gated, gates, gate_map)
            result = _count(reviewed, manifest_row, options, _base_result(path, manifest_row), screening)
        except Exception as exc:
            if raise_errors:
                raise
            if isinstance(exc, ReviewedGatesError):
                problem = exc.problem
                named = exc.path.name
            else:  # not foreseen: still one line, still naming the reviewed file
                problem = f"cannot be applied ({type(exc).__name__}: {' '.join(str(exc).split())})"
                named = Path(gates).name
            # The automatic result stands (and is kept); the reviewed one is an error, never a silent fallback.
            result = _base_result(path, manifest_row)
            result.update(status="error", error=f"reviewed gates {named}: {problem}", sha256=automatic["sha256"],
                          panel=automatic["panel"], automatic_result=automatic,
                          gating={"source": "reviewed", "reviewed_gates": {"file": Path(gates).name,
                                                                           "error": problem}})
            if screening:
                result["eligibility"] = decide(None, options.rule, [result["error"]])
            return result
        audit["automatic"] = {"verdict": (automatic.get("eligibility") or {}).get("verdict"),
                              "populations": {name: {key: entry.get(key) for key in ("events", "cells_per_ul", "ci95")}
                                              for name, entry in automatic["populations"].items()}}
        result["gating"].update(source="reviewed", reviewed_gates=audit)
        if on_gated is not None:
            on_gated(reviewed, result)
        return result
    except Exception as exc:  # one bad file must never stop a batch
        if raise_errors:
            raise
        if isinstance(exc, FcsError):
            problem = exc.problem
        elif isinstance(exc, (PanelError, SampleError, ValueError, OSError)):
            problem = " ".join(str(exc).split())
        else:  # a bug or an input nobody foresaw: still one line, still reported
            problem = f"unexpected {type(exc).__name__} while analysing: {' '.join(str(exc).split())}"
        result["status"] = "error"
        result["error"] = problem
        if screening:
            result["eligibility"] = decide(None, options.rule, [problem])
        return result


@dataclass
class GatedSample:
    """A file taken through loading, panel resolution, compensation, transform and gating.

    The object notebooks, figures and GatingML export work from.

    Attributes
    ----------
    sample : cytometry.loading.fcs.FcsSample
    panel : cytometry.loading.panel.Panel
    spillover : cytometry.loading.fcs.Spillover or None
    data : ndarray
        Compensated, transformed events (see :func:`prepare_events`).
    channels : dict
        Marker/scatter name → column of ``data``.
    gating : gating.GatingResult
    flags : list of gating.flags.Flag
        Preprocessing flags (e.g. no compensation) followed by gating flags.
    saturated : ndarray of bool or None
        Events at the top of scale, taken from the raw events before they
        were transformed (:func:`cytometry.decisions.qc.saturated_events`);
        ``None``: computed from ``sample.events`` when asked.
    """

    sample: object
    panel: object
    spillover: object
    data: np.ndarray
    channels: dict
    gating: object
    flags: list
    saturated: np.ndarray | None = field(default=None, repr=False)

    def __repr__(self):
        return (f"GatedSample({Path(self.sample.path).name!r}, panel {self.panel.name!r}, "
                f"{self.data.shape[0]:,} events, {len(self.gating.populations)} populations, "
                f"{len(self.flags)} flags)")

    def to_dataframe(self):
        """The events as a table: one column per named channel, one boolean column per population.

        Channels are the compensated, transformed values (fluorescence on the
        logicle 0–1 scale, scatter divided by its range), named by marker
        (``CD3``, ``CAR``…) or scatter (``FSC-A``…); populations are the
        panel's reported ones (``t_cells``, ``b_cells``…), ``True`` for the
        events inside each gate.

        Returns
        -------
        pandas.DataFrame

        Examples
        --------
        >>> gated = gate_file("sample_fcs/S01_screening_TBNK.fcs")
        >>> table = gated.to_dataframe()
        >>> int(table["b_cells"].sum()) == gated.gating.events("b_cells"), "CD19" in table.columns
        (True, True)
        """

        columns = {name: self.data[:, index] for name, index in self.channels.items()}
        columns.update({name: np.asarray(self.gating.masks[name], dtype=bool) for name in self.gating.populations})
        return pd.DataFrame(columns)

    def stats(self, result=None):
        """The population hierarchy as a table: events, parent, % of parent, % of all events.

        Parameters
        ----------
        result : dict, optional
            This sample's result (:func:`analyze_gated`): adds cells/µL, the
            95 % interval, LLOQ, reliability and the population's flags.

        Returns
        -------
        pandas.DataFrame
            One row per reported population, in gating order.

        Examples
        --------
        >>> gated = gate_file("sample_fcs/S01_screening_TBNK.fcs")
        >>> table = gated.stats(analyze_gated(gated, options=AnalysisOptions(beads_per_test=50120,
        ...                                                                   sample_volume_ul=50)))
        >>> list(table.columns)[:4], round(float(table.loc["b_cells", "cells_per_ul"]))
        (['events', 'parent', 'pct_of_parent', 'pct_of_total'], 114)
        """

        total = self.data.shape[0]
        rows = []
        for name in self.gating.populations:
            events = self.gating.events(name)
            parent = self.gating.parent_of(name)
            parent_events = self.gating.events(parent) if parent is not None else None
            row = {"population": name, "events": events, "parent": parent,
                   "pct_of_parent": 100.0 * events / parent_events if parent_events else None,
                   "pct_of_total": 100.0 * events / total if total else None}
            if result is not None:
                entry = (result.get("populations") or {}).get(name) or {}
                ci = entry.get("ci95") or (None, None)
                row.update(cells_per_ul=entry.get("cells_per_ul"), ci95_low=ci[0], ci95_high=ci[1],
                           below_lloq=entry.get("below_lloq"), reliable=entry.get("reliable"),
                           flags="; ".join(f["message"] for f in result.get("flags", []) if f["population"] == name))
            rows.append(row)
        return pd.DataFrame(rows).set_index("population")

    def to_anndata(self):
        """The events as an :class:`anndata.AnnData` for scverse tools (``pip install 'cytometry-counts[anndata]'``).

        ``X`` holds the named channels (as in :meth:`to_dataframe`), ``obs``
        one boolean column per population, ``uns`` the panel, file and
        gates.

        Examples
        --------
        Not run by the tests: it needs the optional ``anndata`` extra, which
        the test environment does not install.

        >>> adata = gate_file("sample_fcs/S01_screening_TBNK.fcs").to_anndata()  # doctest: +SKIP
        >>> adata.obs["b_cells"].sum() > 0  # doctest: +SKIP
        True
        """
        try:
            import anndata
        except ImportError as exc:  # an optional extra: say how to get it
            raise ImportError("to_anndata needs the anndata package: pip install 'cytometry-counts[anndata]'") \
                from exc

        names = list(self.channels)
        obs = pd.DataFrame({name: np.asarray(self.gating.masks[name], dtype=bool)
                            for name in self.gating.populations})
        obs.index = obs.index.astype(str)
        var = pd.DataFrame(index=names)
        matrix = self.data[:, [self.channels[n] for n in names]].astype(np.float32)
        return anndata.AnnData(X=matrix, obs=obs, var=var,
                               uns={"file": str(self.sample.path), "panel": self.panel.name,
                                    "gates": [g.as_dict() for g in self.gating.gates]})


def export_gating(gated, file_handle):
    """Write a gated sample's automatic gates as GatingML 2.0 (via flowkit).

    Parameters
    ----------
    gated : GatedSample
    file_handle : binary file object

    Returns
    -------
    flowkit.GatingStrategy
        The strategy written, to re-apply with ``strategy.gate_sample(flowkit.Sample(path))``.

    Examples
    --------
    >>> import io
    >>> gated = gate_file("sample_fcs/S01_screening_TBNK.fcs")
    >>> fh = io.BytesIO()                         # or open("S01.gating.xml", "wb")
    >>> export_gating(gated, fh)
    GatingStrategy(17 gates, 10 transforms, 1 compensations)
    >>> fh.getvalue()[:38]
    b"<?xml version='1.0' encoding='UTF-8'?>"
    """

    sample, panel = gated.sample, gated.panel
    names = dict(panel.markers)
    names.update(panel.scatter)
    channels = {key: {"pnn": pnn, "range": sample.channel_top(sample.channel_index(pnn))}
                for key, pnn in names.items()}
    spill = None
    if gated.spillover is not None:
        spill = (gated.spillover.detectors, gated.spillover.matrix)
    return export_gatingml(gated.gating, channels, file_handle, spillover=spill, logicle=LOGICLE_DEFAULTS)


def gate_file(path, options=None, *, keep_raw=True):
    """Load, compensate, transform and gate one file (raises on a bad file).

    Parameters
    ----------
    path : str or Path
    options : AnalysisOptions, optional
    keep_raw : bool
        Keep the raw events in ``gated.sample.events`` (a second
        n_events × n_channels array beside ``gated.data``). ``False``, as
        :func:`analyze_file` runs: the raw array is transformed in place and
        ``gated.sample.events`` is ``None``, so a large tube is held once.

    Returns
    -------
    GatedSample

    Raises
    ------
    FcsError, PanelError, SampleError
        With a one-line message.

    Examples
    --------
    >>> gated = gate_file("sample_fcs/S01_screening_TBNK.fcs")
    >>> gated.gating.events("b_cells")
    551
    """
    options = options or AnalysisOptions()
    sample = read_fcs(path)
    if sample.n_events >= 2 and bool(np.all(sample.events.max(axis=0) == sample.events.min(axis=0))):
        # All zeros (or one value repeated, subnormal or not): nothing to gate. The file
        # still loads (inspect shows it); a count from it would be no measurement.
        raise SampleError(f"all {sample.n_events} events hold the same values in every channel "
                          f"(e.g. {sample.events[0, 0]:.3g}): no signal to analyse")

    try:
        panels = available_panels(options.panel_dirs)
    except PanelDefinitionError as exc:
        raise SampleError(str(exc)) from None
    overrides = read_panel_file(options.panel_file, _gather(panels)[0]) if options.panel_file else None
    panel = resolve_panel(sample.pnn, sample.pns, overrides, override_source=options.panel_file or "panel file",
                          panels=panels)
    for key in ("FSC-A", "SSC-A"):
        if key not in panel.scatter:
            raise SampleError(f"no {key} channel found (channels: {', '.join(sample.pnn)})")
    flags = [Flag("file", "read_note", "info", note) for note in sample.read_notes]
    if sample.dropped_events:
        flags.append(Flag("events", "non_finite_events", "warning",
                          f"{sample.dropped_events} events with NaN or infinite values dropped"))
    if sample.declared_events is not None and sample.read_events is not None \
            and sample.declared_events != sample.read_events:
        # The file contradicts itself about how many events it holds: a truncated or
        # padded DATA segment. The events found are analysed; the verdict is not trusted.
        flags.append(Flag("file", "event_count_mismatch", "fail",
                          f"$TOT says {sample.declared_events} events but the DATA segment holds "
                          f"{sample.read_events}"))
    if options.compensation:
        spillover = read_compensation_csv(options.compensation, sample.pnn)
    else:
        spillover = sample.spillover
    if spillover is None:
        flags.append(Flag("compensation", "not_compensated", "fail",
                          "no spillover matrix in the file and none supplied; data not compensated"))
    saturated = saturated_events(sample, panel)  # from the raw values, before they are transformed
    data, channels = prepare_events(sample, panel, spillover, in_place=not keep_raw)
    tops = {marker: sample.channel_top(sample.channel_index(name)) for marker, name in panel.markers.items()}
    gating = auto_gate(data, channels, panel.definition or panel.name, params=options.gating, device=options.device,
                       tops=tops)
    flags.extend(gating.flags)
    return GatedSample(sample=sample, panel=panel, spillover=spillover, data=data, channels=channels,
                       gating=gating, flags=flags, saturated=saturated)


def reviewed_gates_of(row, gates=None, gate_map=None):
    """The reviewed-gates and mapping paths for a sample: the arguments, else the manifest row's columns.

    Manifest paths are relative to the manifest's folder, like its ``file`` column.
    """
    if gates is None and row is not None and row.text("gates"):
        gates = row.path_of("gates")
        if gate_map is None:
            gate_map = row.path_of("gate_map")
    return (Path(gates) if gates is not None else None), (Path(gate_map) if gate_map is not None else None)


def apply_reviewed_gates(gated, gates, gate_map=None):
    """A gated sample whose gates are a reviewer's corrected ones, and the audit of what moved.

    The reviewed gates (GatingML 2.0 as ``--gatingml`` writes it, edited in
    FlowJo, FCS Express or FlowKit, or a FlowJo workspace) are checked
    against the file and evaluated by flowkit on the same events
    (:mod:`cytometry.loading.reviewed_gates`); each population takes the
    mask of its gate. The automatic gating's own findings (valleys, cut
    checks) no longer apply and are dropped; the file's flags (compensation,
    dropped events) stay. Counting the returned sample with
    :func:`analyze_gated` is the same code that counts automatic gates: beads,
    intervals, LLOQ, reviewer checks and the verdict.

    Parameters
    ----------
    gated : GatedSample
        The automatically gated sample.
    gates : str or Path
    gate_map : str or Path, optional
        CSV ``population,gate`` (:func:`cytometry.loading.reviewed_gates.read_gate_mapping`).

    Returns
    -------
    (GatedSample, dict)
        The audit: the reviewed file's name, path, SHA-256 and kind, the
        mapping, and per population the automatic and reviewed events and
        the events moved in and out.

    Raises
    ------
    ReviewedGatesError
        One line naming the reviewed (or mapping) file and the problem.

    Examples
    --------
    >>> import tempfile, os
    >>> gated = gate_file("sample_fcs/S01_screening_TBNK.fcs")
    >>> with tempfile.TemporaryDirectory() as d:
    ...     path = os.path.join(d, "S01.gating.xml")
    ...     with open(path, "wb") as fh:
    ...         _ = export_gating(gated, fh)
    ...     reviewed, audit = apply_reviewed_gates(gated, path)
    >>> audit["populations"]["b_cells"]
    {'automatic_events': 551, 'reviewed_events': 551, 'moved_in': 0, 'moved_out': 0}
    """
    gates = Path(gates)
    mapping = read_gate_mapping(gate_map) if gate_map is not None else {}
    automatic = gated.gating
    sample, panel = gated.sample, gated.panel
    reviewed = read_reviewed_gates(gates, sample)
    keys = {pnn: key for key, pnn in {**panel.markers, **panel.scatter}.items()}
    required = list(automatic.populations) + [p for p in ("beads",) if p not in automatic.populations]
    # The automatic plan's helper gates (bead_bright, singlets, cd3_negative…), where the reviewed file has
    # them: the doublet beads and the figures' parent populations.
    helpers = tuple(g.name for g in automatic.gates if g.name not in required)
    evaluated = evaluate_reviewed_gates(reviewed, sample, required, mapping, optional=helpers,
                                        channel_keys=keys, logicle=LOGICLE_DEFAULTS, mapping_path=gate_map)
    masks = dict(evaluated.masks)
    # Beads outside the bead scatter (doublets) are known only when the reviewer's file has that gate.
    masks.setdefault("bead_bright", masks["beads"])
    flags = [f for f in gated.flags if not any(f is g for g in automatic.flags)]
    flags.append(Flag("gating", "reviewed_gates", "info",
                      f"manual gates in effect: {gates.name} (sha256 {reviewed.sha256[:12]})"))
    for population, gate_path in evaluated.gate_paths.items():
        if gate_path is None:
            flags.append(Flag(population, "not_gated_in_review", "fail",
                              f"not gated in the reviewed gates {gates.name} (mapping: -)"))
    # The population tree (parents) stays this package's: % of parent and unreliable ancestors mean the same.
    gating = GatingResult(masks=masks, gates=evaluated.gates, flags=[], device=automatic.device,
                          params=automatic.params, parents=dict(automatic.parents),
                          populations=list(automatic.populations), panel=automatic.panel)
    moved = {}
    nothing = np.zeros(sample.n_events, dtype=bool)
    for population in required:
        before, after = np.asarray(automatic.masks.get(population, nothing), dtype=bool), masks[population]
        moved[population] = {"automatic_events": int(before.sum()), "reviewed_events": int(after.sum()),
                             "moved_in": int((after & ~before).sum()), "moved_out": int((before & ~after).sum())}
    audit = {"file": gates.name, "path": str(gates), "sha256": reviewed.sha256, "format": reviewed.kind,
             "workspace_sample": reviewed.sample_id,
             "mapping_file": None if gate_map is None else Path(gate_map).name,
             "mapping_sha256": None if gate_map is None else file_sha256(gate_map),
             "mapping": {p: (None if path is None else " > ".join(path)) for p, path in evaluated.gate_paths.items()
                         if p in required},
             "populations": moved}
    return replace(gated, gating=gating, flags=flags), audit


def analyze_gated(gated, manifest_row=None, options=None):
    """The result of :func:`analyze_file` for an already gated sample (raises on errors).

    Lets a notebook or the accuracy harness keep the masks of
    :func:`gate_file` and still get the exact counts the CLI reports.
    """
    options = options or AnalysisOptions()
    result = _base_result(gated.sample.path, manifest_row)
    return _count(gated, manifest_row, options, result, is_screening(result["visit"]))


def _count(gated, row, options, result, screening):
    """Counts, eligibility and provenance for a gated sample, filled into ``result``.

    Every reported population gets its events and % of parent, whether or
    not a counting method applies; cells/µL are ``null`` with the reason
    when none does. A population whose gate (or an ancestor's) failed its
    checks is marked ``reliable: false`` with the reasons, and a screening
    verdict resting on it is ``qc_fail``.
    """

    sample, panel, spillover, gating = gated.sample, gated.panel, gated.spillover, gated.gating
    result["sha256"] = sample.sha256
    result["panel"] = panel.name
    method, count_for, details = _choose_counting(row, options, sample, gating)
    flags = list(gated.flags)
    bead_events = gating.events("beads")
    # Bright in every channel but outside the bead scatter: bead doublets and
    # bead–cell coincidences, counted as neither.
    result["beads"] = {"events": bead_events, "doublet_events": gating.events("bead_bright") - bead_events,
                       "beads_per_test": details.get("beads_per_test"),
                       "sample_volume_ul": details.get("sample_volume_ul")}
    count_problems = []
    if method is None:
        count_problems.append(f"no count possible: {details['reason']}")
        flags.append(Flag("counting", "no_counting_method", "warning", count_problems[-1]))
    elif method == "beads":
        if bead_events == 0:
            count_problems.append("beads: 0 events, no count possible")
        elif bead_events < options.min_bead_events:
            count_problems.append(f"beads: {bead_events} events < {options.min_bead_events} minimum")
        if count_problems:
            flags.append(Flag("beads", "too_few_beads", "fail", count_problems[-1].split(": ", 1)[1]))

    counts = {}
    if count_for is not None:
        for population in gating.populations:
            # Dual-platform counting scales a share of the lymphocytes: only
            # lymphocyte subsets can be counted that way.
            if method != "dual-platform" or population in LYMPHOCYTE_SUBSETS:
                counts[population] = count_for(gating.events(population))
        gate_sd = _gate_count_sd(gating, "car_t")
        upper = _gate_upper_events(gating, "car_t")
        if "car_t" in counts and (gate_sd or upper > counts["car_t"].events):
            counts["car_t"] = widen_for_overlap(counts["car_t"], gate_sd, count_for, upper_events=upper)
    limits = {name: _limits(gating, name, options) for name in counts}
    for name, count in counts.items():
        lod, lloq = limits[name]
        counts[name] = replace(count, below_lloq=bool(count.events < lloq))
        own_sd = _gate_count_sd(gating, name) if name == "car_t" else 0.0
        cv = float(np.sqrt(count.events + own_sd ** 2) / count.events) if count.events else float("inf")
        if name == "car_t" and own_sd and not counts[name].below_lloq and cv > LLOQ_CV:
            # The LLOQ is where a count's CV reaches 20 %: a count above it in
            # events whose own uncertainty (extrapolation below the cut, the
            # reference's normalisation, the background) is larger than that
            # is not quantifiable either.
            counts[name] = replace(counts[name], below_lloq=True)
            flags.append(Flag(name, "below_lloq", "info",
                              f"{count.events} events >= LLOQ of {lloq:.0f}, but this count's CV is {cv:.0%} "
                              f"(> {LLOQ_CV:.0%}: its estimate's own uncertainty, {own_sd:.0f} events SD): < LLOQ"))
            continue
        if count.events < lod and (_background_events(gating, name) > 0 or name == "car_t") \
                and counts[name].ci95[0] > 0:
            # A net count below its LOD cannot be told from the negatives
            # expected above the cut ("not detected"): none at all is as
            # consistent with the data, and its interval starts at zero
            # (an interval excluding zero would claim the detection the
            # LOD denies). A CAR cut without a reference (the sample's own
            # negative mode) has negatives above it too, only no model of
            # how many: its few events are no detection either.
            counts[name] = replace(counts[name], ci95=(0.0, counts[name].ci95[1]))
        if counts[name].below_lloq and name in ("b_cells", "car_t"):
            detected = "not detected, " if count.events < lod else ""
            flags.append(Flag(name, "below_lloq", "info", f"{count.events} events < LLOQ of {lloq:.0f} "
                                                          f"({detected}LOD {lod:.0f} events)"))
    car_gate = next((g for g in gating.gates if g.name == "car_t"), None)
    if ("car_t" in counts and car_gate is not None
            and options.lloq_events <= counts["car_t"].events < limits["car_t"][1]):
        # A count the configured LLOQ would have quantified: say why this
        # tube's is higher (the negatives' tail, estimated from few reference
        # events, e.g. a small pre-infusion tube against a large follow-up).
        extra = car_gate.extra
        flags.append(Flag("car_t", "lloq_raised", "info",
                          f"LLOQ {limits['car_t'][1]:.0f} events ({format_sig(_per_ul(count_for, limits['car_t'][1]))} "
                          f"cells/uL), raised from {options.lloq_events} by the "
                          f"{extra['expected_negatives_above_cut']:g} negatives expected above the CAR cut, estimated "
                          f"from {extra['reference_tail_events']:g} events of the reference's tail "
                          f"({extra.get('reference_events', '?')} reference T cells, "
                          f"{int(gating.events(gating.parents.get('car_t', 't_cells')))} here)"))

    checks = run_checks(gated, options.qc)
    flags.extend(c.flag for c in checks if c.flag is not None)
    unreliable = unreliable_populations(flags, gating.parents)
    populations = {}
    for name in gating.populations:
        events = gating.events(name)
        parent = gating.parent_of(name)
        parent_events = gating.events(parent) if parent is not None else None
        entry = {"events": events, "parent": parent,
                 "pct_of_parent": round(100.0 * events / parent_events, 3) if parent_events else None,
                 "reliable": name not in unreliable, "unreliable_reasons": unreliable.get(name, [])}
        if name in counts:
            entry.update(counts[name].as_dict())
            lod, lloq = limits[name]
            entry["below_lod"] = bool(counts[name].events < lod)
            entry["lod"] = {"events": round(float(lod), 1), "cells_per_ul": _per_ul(count_for, lod)}
            entry["lloq"] = {"events": round(float(lloq), 1), "cells_per_ul": _per_ul(count_for, lloq)}
        else:
            entry.update(cells_per_ul=None, ci95=None, below_lloq=None, below_lod=None,
                         method=None, count_reason=details.get("reason") or
                         f"{method} counting counts lymphocyte subsets only")
        populations[name] = entry
    result["populations"] = populations

    if screening and "b_cells" in gating.masks:
        population = options.rule.population
        b_problems = list(count_problems)
        b_problems += unreliable.get(population, [])
        # Failing checks that concern the sample as a whole (not one population).
        b_problems += [str(f) for f in flags if f.fails and f.population not in gating.parents
                       and str(f) not in b_problems and f.population not in ("beads",)]
        result["eligibility"] = decide(counts.get(population), options.rule, b_problems)

    if (car_gate is not None and car_gate.threshold is not None and np.isfinite(car_gate.threshold)
            and car_gate.dimensions[0].transform == "logicle"):

        pnn = panel.markers["CAR"]
        top = sample.channel_top(sample.channel_index(pnn))
        result["car_threshold"] = {
            "logicle": round(float(car_gate.threshold), 6),
            "channel": pnn,
            "channel_value": round(float(logicle_inverse(np.array([car_gate.threshold]), t=top,
                                                         **LOGICLE_DEFAULTS)[0]), 2),
            "source": car_gate.extra.get("reference"),
            "method": car_gate.method,
            # the pre-infusion reference mapped onto this tube: gain ratio, its anchor, noise made up
            "normalisation": car_gate.extra.get("normalisation"),
        }
        if options.gating.car_reference is None and _after_infusion(result):
            # Measured: without the pre-infusion tube the CAR+ interval holds
            # the truth in ~78% of simulated tubes, not ~95%, and in under half
            # of those with spillover spreading (README, CAR threshold).
            why = options.gating.car_reference_source or "no pre-infusion CAR tube linked in the manifest"
            flags.append(Flag("car_t", "no_car_reference", "warning",
                              f"{why}; CAR+ cut from this sample's own negative mode (less accurate)"))
    result["flags"] = [f.as_dict() for f in flags]
    result["qc_flags"] = [str(f) for f in flags]
    result["checks"] = [c.as_dict() for c in checks]
    result["device"] = gating.device
    result["compensation"] = {"source": spillover.source if spillover is not None else None,
                              "detectors": list(spillover.detectors) if spillover is not None else []}
    result["panel_channels"] = panel.as_dict()
    result["gating"] = {"source": "automatic", "params": gating.params.as_dict(),
                        "gates": [g.as_dict() for g in gating.gates], "logicle": dict(LOGICLE_DEFAULTS, t="$PnR")}
    result["counting"] = {"method": method, **details, "lloq_events": options.lloq_events,
                          "lod_events": options.lod_events, "min_bead_events": options.min_bead_events,
                          "doublets": "singlet cells over singlet beads (coincidence removes both alike)"
                          if method == "beads" else "singlets only"}
    result["qc_rules"] = asdict(options.qc)
    result["events_total"] = sample.n_events
    return result


def _after_infusion(result):
    """True when the manifest puts this sample after day 0 (CAR-T cells may be present)."""
    try:
        return float(result.get("study_day")) > 0
    except (TypeError, ValueError):
        return False


def t_cell_car_values(gated):
    """CAR-reagent values of a gated tube's T cells (``None`` without a CAR channel or T cells).

    From a pre-infusion tube these are the CAR-negative reference for the
    same subject's later tubes (:func:`with_car_reference`).
    """
    if "CAR" not in gated.channels or "t_cells" not in gated.gating.masks:
        return None
    return gated.data[gated.gating.masks["t_cells"], gated.channels["CAR"]]


def car_reference_of(gated, source=""):
    """The CAR-negative reference a gated pre-infusion tube gives (``None`` without a CAR channel or T cells).

    Its T cells' and counting beads' CAR-reagent values in linear,
    compensated units, so that each follow-up tube can normalise it to its
    own detector setting (:mod:`gating.car`).

    Examples
    --------
    >>> from pathlib import Path
    >>> reference = car_reference_of(gate_file(Path("sample_fcs/S01_day000_CAR.fcs")), "day 0")
    >>> reference.beads.events > 1000
    True
    """

    if "CAR" not in gated.channels or "t_cells" not in gated.gating.masks:
        return None
    column = gated.channels["CAR"]
    top = gated.sample.channel_top(column)
    linear = logicle_inverse(gated.data[:, column], t=top, **LOGICLE_DEFAULTS)
    beads = gated.gating.masks.get("beads")
    level = BeadLevel.of(linear[beads], top) if beads is not None else None
    return CarReference(linear[gated.gating.masks["t_cells"]], level, source)


def with_car_reference(options, reference, source=None):
    """``options`` whose CAR gate is set against ``reference`` (a CAR-negative reference from ``source``).

    ``reference`` is a :class:`gating.car.CarReference` (from
    :func:`car_reference_of`), or T cells' CAR values on the follow-up
    tube's logicle scale (:func:`t_cell_car_values`; no bead anchor).

    Examples
    --------
    >>> import numpy as np
    >>> options = with_car_reference(AnalysisOptions(), np.zeros(300), "pre-infusion tube S01_day000_CAR.fcs")
    >>> len(options.gating.car_reference), options.gating.car_reference_source
    (300, 'pre-infusion tube S01_day000_CAR.fcs')
    """

    if source is None:
        source = getattr(reference, "source", "")
    return replace(options, gating=replace(options.gating, car_reference=reference, car_reference_source=source))


class CarReferences:
    """The subjects' pre-infusion CAR tubes, used as CAR-negative references.

    A CAR tube after infusion is gated against the same subject's latest CAR
    tube at or before study day 0 (before any CAR-T cell was given), when the
    manifest lists one: its T cells' CAR-reagent values are the negatives'
    distribution. Without one, the sample's own negative mode is used. The
    reference file is recorded with the gate and in the result.

    Parameters
    ----------
    manifest : cytometry.loading.manifest.Manifest or None
    options : AnalysisOptions
    """

    def __init__(self, manifest, options):
        self.options = options
        self.candidates = {}
        self._values = {}
        self._problems = {}
        if manifest is None:
            return
        for row in manifest.rows:
            subject, day = row.text("subject_id"), row.text("study_day")
            try:
                day = float(day)
            except ValueError:
                continue
            if subject and day <= 0 and "car" in row.text("tube").lower():
                best = self.candidates.get(subject)
                if best is None or day > best[0]:
                    self.candidates[subject] = (day, row)

    def reference_for(self, row):
        """``(values, file)`` of the reference for a manifest row, or ``(None, None)``."""
        if row is None:
            return None, None
        subject = row.text("subject_id")
        candidate = self.candidates.get(subject)
        if candidate is None or candidate[1] is row:
            return None, None
        try:
            day = float(row.text("study_day"))
        except ValueError:
            return None, None
        if day <= candidate[0]:
            return None, None
        reference_row = candidate[1]
        if subject not in self._values:
            values, problem = None, None
            try:
                values = car_reference_of(gate_file(reference_row.path, self.options, keep_raw=False),
                                          f"pre-infusion tube {reference_row.file}")
                if values is None:
                    problem = "no CAR channel or no T cells"
                elif len(values) < 200:
                    problem = f"{len(values)} T cells < 200, too few to describe the negatives' tail"
                    values = None
            except Exception as exc:  # the reference tube's own error is reported when it is analysed
                problem = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            self._values[subject] = values
            self._problems[subject] = problem
        values = self._values[subject]
        return (values, reference_row.file) if values is not None else (None, None)

    def problem_for(self, row):
        """Why the linked pre-infusion tube of ``row``'s subject could not serve (``None`` if it did or none is linked)."""
        if row is None:
            return None
        self.reference_for(row)
        subject = row.text("subject_id")
        problem = self._problems.get(subject)
        if problem is None:
            return None
        return f"pre-infusion tube {self.candidates[subject][1].file} unusable ({problem})"

    def options_for(self, row):
        """``options`` with the CAR reference for ``row`` filled in (or unchanged)."""
        values, source = self.reference_for(row)
        if values is None:
            problem = self.problem_for(row)
            if problem is None:
                return self.options
            return replace(self.options, gating=replace(self.options.gating, car_reference_source=problem))
        return with_car_reference(self.options, values, f"pre-infusion tube {source}")
