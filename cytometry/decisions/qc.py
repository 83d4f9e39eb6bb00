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


def review(gated, rules=None):
    """Reviewer checks for one gated sample.

    Parameters
    ----------
    gated : cytometry.analysis.GatedSample
    rules : QcRules, optional

    Returns
    -------
    list of gating.flags.Flag
        A lymphosum outside its limits fails the lymphocytes (and so every
        subset); the stop rule, CD4 + CD8 ≠ CD3 and acquisition problems
        are warnings.

    Examples
    --------
    >>> from cytometry.analysis import gate_file
    >>> [str(f) for f in review(gate_file("sample_fcs/S05_screening_TBNK.fcs"))]
    ['lymphocytes: 2275 events < 2500 (acquisition stop rule)']
    >>> review(gate_file("sample_fcs/S01_screening_TBNK.fcs"))
    []
    """
    rules = rules or QcRules()
    masks = gated.gating.masks
    flags = []
    lymphocytes = int(masks["lymphocytes"].sum()) if "lymphocytes" in masks else 0
    if lymphocytes and lymphocytes < rules.min_lymphocyte_events:
        flags.append(Flag("lymphocytes", "stop_rule", "warning", f"{lymphocytes} events < "
                          f"{rules.min_lymphocyte_events} (acquisition stop rule)"))
    if lymphocytes and {"t_cells", "b_cells", "nk_cells"} <= set(masks):
        parts = sum(int(masks[p].sum()) for p in ("t_cells", "b_cells", "nk_cells"))
        lymphosum = 100.0 * parts / lymphocytes
        if abs(lymphosum - 100.0) > rules.lymphosum_tolerance_pct:
            flags.append(Flag("lymphocytes", "lymphosum", "fail", f"lymphosum T+B+NK = {lymphosum:.1f}% of "
                              f"lymphocytes, outside 100 ± {rules.lymphosum_tolerance_pct:g}%"))
    t_cells = int(masks["t_cells"].sum()) if "t_cells" in masks else 0
    if t_cells >= 100 and {"cd4_t", "cd8_t"} <= set(masks):
        cd4_cd8 = int(masks["cd4_t"].sum()) + int(masks["cd8_t"].sum())
        ratio = 100.0 * cd4_cd8 / t_cells
        if abs(ratio - 100.0) > rules.cd4_cd8_tolerance_pct:
            flags.append(Flag("t_cells", "cd4_cd8_sum", "warning", f"CD4 T + CD8 T = {ratio:.1f}% of CD3+ T cells, "
                              f"outside 100 ± {rules.cd4_cd8_tolerance_pct:g}%"))
    flags.extend(_acquisition_checks(gated, rules))
    return flags


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


def _acquisition_checks(gated, rules):
    """Saturated events and interruptions of the flow (clogs, bubbles)."""
    sample, panel = gated.sample, gated.panel
    flags = []
    saturated = getattr(gated, "saturated", None)
    if saturated is None:
        saturated = saturated_events(sample, panel)
    fraction = float(saturated.mean())
    if fraction > rules.max_saturated_fraction:
        flags.append(Flag("acquisition", "saturated_events", "warning", f"{100 * fraction:.1f}% of events at the "
                          f"top of scale (> {100 * rules.max_saturated_fraction:g}%)"))
    if "Time" in panel.scatter and sample.n_events >= 20 * rules.flow_bins:
        column = sample.channel_index(panel.scatter["Time"])
        # The transformed data keep the time channel as read (released raw events: take it there).
        time = sample.events[:, column] if sample.events is not None else gated.data[:, column]
        if np.ptp(time) > 0:
            counts, _ = np.histogram(time, bins=rules.flow_bins)
            median = np.median(counts)
            slow = counts < rules.min_flow_rate_fraction * median
            if slow.mean() > rules.max_flow_gap_fraction:
                flags.append(Flag("flow", "flow_interrupted", "warning", f"{100 * slow.mean():.0f}% of the "
                                  f"acquisition time below {100 * rules.min_flow_rate_fraction:g}% of the median "
                                  f"event rate (clog or bubble?)"))
    return flags
