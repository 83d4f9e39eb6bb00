"""Checks a clinical reviewer expects, as flags with reasons.

Each check returns typed :class:`gating.flags.Flag` objects written for a
reviewer (``lymphosum 84% outside 100 ± 10%``); ``fail`` ones make their
population (and what is gated inside it) unreliable, and a screening verdict
resting on it ``qc_fail``. BD-style TBNK software applies the same
kinds of rules: lymphosum, CD4 + CD8 ≈ CD3, enough lymphocytes acquired, the
acquisition itself (saturated events, interrupted flow).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gating.flags import Flag


@dataclass
class QcRules:
    """Limits of the reviewer's checks (recorded with every result)."""

    lymphosum_tolerance_pct: float = 10.0
    cd4_cd8_tolerance_pct: float = 10.0
    min_lymphocyte_events: int = 2500
    max_saturated_fraction: float = 0.01
    flow_bins: int = 50
    min_flow_rate_fraction: float = 0.5
    max_flow_gap_fraction: float = 0.05


@dataclass
class Check:
    """One reviewer check as it was run on a sample: what it measured, against what, and the outcome.

    ``outcome`` is ``pass``, ``flag`` (a warning), ``fail`` or
    ``not_applicable`` (the check needs a population or channel the tube
    lacks); ``flag`` holds the typed flag a ``flag`` or ``fail`` raised.
    """

    check: str
    population: str
    outcome: str
    measured: str
    limit: str
    flag: Flag | None = None

    def as_dict(self):
        return {"check": self.check, "population": self.population, "outcome": self.outcome,
                "measured": self.measured, "limit": self.limit}


def run_checks(gated, rules=None):
    """Every reviewer check on one gated sample, passed or not, with what it measured.

    Parameters
    ----------
    gated : cytometry.analysis.GatedSample
    rules : QcRules, optional

    Returns
    -------
    list of Check
        The acquisition stop rule, the lymphosum, CD4 + CD8 = CD3, saturated
        events and the flow rate, in that order. A lymphosum outside its
        limits fails the lymphocytes (and so every subset); the others are
        warnings.

    Examples
    --------
    >>> from cytometry.analysis import gate_file
    >>> [(c.check, c.outcome, c.measured) for c in run_checks(gate_file("sample_fcs/S05_screening_TBNK.fcs"))][:2]
    [('stop_rule', 'flag', '2275 lymphocyte events'), ('lymphosum', 'pass', 'T+B+NK = 99.7% of lymphocytes')]
    """
    rules = rules or QcRules()
    masks = gated.gating.masks
    checks = []

    def add(check, population, ok, measured, limit, severity=None, message=None):
        if ok is None:
            checks.append(Check(check, population, "not_applicable", measured, limit))
        elif ok:
            checks.append(Check(check, population, "pass", measured, limit))
        else:
            checks.append(Check(check, population, "fail" if severity == "fail" else "flag", measured, limit,
                                Flag(population, check, severity, message)))

    lymphocytes = int(masks["lymphocytes"].sum()) if "lymphocytes" in masks else 0
    add("stop_rule", "lymphocytes", (lymphocytes >= rules.min_lymphocyte_events) if lymphocytes else None,
        f"{lymphocytes} lymphocyte events", f">= {rules.min_lymphocyte_events}", "warning",
        f"{lymphocytes} events < {rules.min_lymphocyte_events} (acquisition stop rule)")
    if lymphocytes and {"t_cells", "b_cells", "nk_cells"} <= set(masks):
        parts = sum(int(masks[p].sum()) for p in ("t_cells", "b_cells", "nk_cells"))
        lymphosum = 100.0 * parts / lymphocytes
        add("lymphosum", "lymphocytes", abs(lymphosum - 100.0) <= rules.lymphosum_tolerance_pct,
            f"T+B+NK = {lymphosum:.1f}% of lymphocytes", f"100 ± {rules.lymphosum_tolerance_pct:g}%", "fail",
            f"lymphosum T+B+NK = {lymphosum:.1f}% of lymphocytes, outside 100 ± {rules.lymphosum_tolerance_pct:g}%")
    else:
        add("lymphosum", "lymphocytes", None, "panel has no T, B and NK gates", f"100 ± {rules.lymphosum_tolerance_pct:g}%")
    t_cells = int(masks["t_cells"].sum()) if "t_cells" in masks else 0
    if t_cells >= 100 and {"cd4_t", "cd8_t"} <= set(masks):
        ratio = 100.0 * (int(masks["cd4_t"].sum()) + int(masks["cd8_t"].sum())) / t_cells
        add("cd4_cd8_sum", "t_cells", abs(ratio - 100.0) <= rules.cd4_cd8_tolerance_pct,
            f"CD4 + CD8 = {ratio:.1f}% of T cells", f"100 ± {rules.cd4_cd8_tolerance_pct:g}%", "warning",
            f"CD4 T + CD8 T = {ratio:.1f}% of CD3+ T cells, outside 100 ± {rules.cd4_cd8_tolerance_pct:g}%")
    else:
        add("cd4_cd8_sum", "t_cells", None, "no CD4/CD8 gates or < 100 T cells", f"100 ± {rules.cd4_cd8_tolerance_pct:g}%")
    _acquisition_checks(gated, rules, add)
    return checks


def review(gated, rules=None):
    """The flags the reviewer checks raised on one gated sample (see :func:`run_checks`).

    Parameters
    ----------
    gated : cytometry.analysis.GatedSample
    rules : QcRules, optional

    Returns
    -------
    list of gating.flags.Flag

    Examples
    --------
    >>> from cytometry.analysis import gate_file
    >>> [str(f) for f in review(gate_file("sample_fcs/S05_screening_TBNK.fcs"))]
    ['lymphocytes: 2275 events < 2500 (acquisition stop rule)']
    >>> review(gate_file("sample_fcs/S01_screening_TBNK.fcs"))
    []
    """
    return [c.flag for c in run_checks(gated, rules) if c.flag is not None]


def saturated_events(sample, panel, block=1 << 16):
    """Events at the top of scale (raw value ≥ ``$PnR`` − 1) in a marker's channel or FSC-A/SSC-A.

    Read from the raw events, so it is taken before they are transformed in
    place (:func:`cytometry.analysis.gate_file`); a block of events at a
    time, without a copy of the columns.

    Returns
    -------
    ndarray of bool, shape (n_events,)

    Examples
    --------
    >>> from cytometry.loading.fcs import read_fcs
    >>> from cytometry.loading.panel import resolve_panel
    >>> sample = read_fcs("sample_fcs/S01_screening_TBNK.fcs")
    >>> mask = saturated_events(sample, resolve_panel(sample.pnn, sample.pns))
    >>> mask.shape, mask.dtype
    ((24123,), dtype('bool'))
    """
    names = list(panel.markers.values()) + [panel.scatter[k] for k in ("FSC-A", "SSC-A") if k in panel.scatter]
    columns = [sample.channel_index(name) for name in names]
    tops = np.array([sample.ranges[c] if np.isfinite(sample.ranges[c]) and sample.ranges[c] > 1 else np.inf
                     for c in columns])
    saturated = np.zeros(sample.n_events, dtype=bool)
    for start in range(0, sample.n_events, block):
        saturated[start:start + block] = (sample.events[start:start + block, columns] >= tops - 1).any(axis=1)
    return saturated


def _acquisition_checks(gated, rules, add):
    """Saturated events and interruptions of the flow (clogs, bubbles), through ``add`` of :func:`run_checks`."""
    sample, panel = gated.sample, gated.panel
    saturated = getattr(gated, "saturated", None)
    if saturated is None:
        saturated = saturated_events(sample, panel)
    fraction = float(saturated.mean())
    add("saturated_events", "acquisition", fraction <= rules.max_saturated_fraction,
        f"{100 * fraction:.2f}% of events at the top of scale", f"<= {100 * rules.max_saturated_fraction:g}%",
        "warning", f"{100 * fraction:.1f}% of events at the top of scale (> {100 * rules.max_saturated_fraction:g}%)")
    limit = f"<= {100 * rules.max_flow_gap_fraction:g}% of the time below {100 * rules.min_flow_rate_fraction:g}% of the median rate"
    if "Time" in panel.scatter and sample.n_events >= 20 * rules.flow_bins:
        column = sample.channel_index(panel.scatter["Time"])
        # The transformed data keep the time channel as read (released raw events: take it there).
        time = sample.events[:, column] if sample.events is not None else gated.data[:, column]
        if np.ptp(time) > 0:
            counts, _ = np.histogram(time, bins=rules.flow_bins)
            slow = counts < rules.min_flow_rate_fraction * np.median(counts)
            add("flow_interrupted", "flow", slow.mean() <= rules.max_flow_gap_fraction,
                f"{100 * slow.mean():.0f}% of the time slow", limit, "warning",
                f"{100 * slow.mean():.0f}% of the acquisition time below {100 * rules.min_flow_rate_fraction:g}% of "
                f"the median event rate (clog or bubble?)")
            return
    add("flow_interrupted", "flow", None, "no time channel, or too few events", limit)
