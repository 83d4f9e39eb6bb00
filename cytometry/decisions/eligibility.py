"""Screening eligibility from a count's interval (trial inclusion criterion 7).

The verdict is taken from the 95% interval, never from the point value:
``eligible`` when the interval lies wholly above the threshold,
``not_eligible`` when wholly at or below it, ``indeterminate`` when it
straddles it (re-acquire more events), ``qc_fail`` when the count cannot be
trusted.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from cytometry.outputs.formatting import format_sig, interval_text

DEFAULT_THRESHOLD_CELLS_PER_UL = 5.0
DEFAULT_CRITERION = "CD19+ B cells > 5 cells/uL"


@dataclass
class EligibilityRule:
    """The rule a verdict is taken by (recorded with every verdict)."""

    population: str = "b_cells"
    threshold_cells_per_ul: float = DEFAULT_THRESHOLD_CELLS_PER_UL
    criterion: str = DEFAULT_CRITERION


def decide(count, rule=None, qc_problems=()):
    """Eligibility verdict for one screening count.

    Parameters
    ----------
    count : cytometry.counts.Count or None
        ``None`` when no count could be made.
    rule : EligibilityRule, optional
    qc_problems : sequence of str
        Reasons the count cannot be trusted; any makes the verdict ``qc_fail``.

    Returns
    -------
    dict
        ``criterion``, ``verdict``, ``value``, ``ci95``, ``events``,
        ``threshold_cells_per_ul`` and ``reasons`` (what decided it, and for
        ``indeterminate`` what would settle it).

    Examples
    --------
    >>> from cytometry.counts import bead_count
    >>> decide(bead_count(600, 5000, 50000, 50.0))["verdict"]
    'eligible'
    >>> decide(bead_count(27, 5000, 50000, 50.0))["verdict"]
    'indeterminate'
    """
    rule = rule or EligibilityRule()
    threshold = rule.threshold_cells_per_ul
    out = {"criterion": rule.criterion, "threshold_cells_per_ul": threshold, "verdict": None,
           "value": None, "ci95": None, "events": None, "reasons": []}
    if count is not None:
        out["value"] = round(float(count.cells_per_ul), 4)
        out["ci95"] = [round(float(count.ci95[0]), 4), round(float(count.ci95[1]), 4)]
        out["events"] = int(count.events)
    if qc_problems or count is None:
        out["verdict"] = "qc_fail"
        out["reasons"] = list(qc_problems) or ["no count could be made"]
        return out
    low, high = count.ci95
    if low > threshold:
        out["verdict"] = "eligible"
        out["reasons"].append(f"95% interval {interval_text(out['ci95'])} lies above {threshold:g} cells/uL")
    elif high <= threshold:
        out["verdict"] = "not_eligible"
        out["reasons"].append(f"95% interval {interval_text(out['ci95'])} lies at or below {threshold:g} cells/uL")
    else:
        out["verdict"] = "indeterminate"
        out["reasons"].append(f"95% interval {interval_text(out['ci95'])} straddles {threshold:g} cells/uL")
        out["reasons"].append(_what_would_settle(count, threshold))
    return out


#: The most a proposal asks for: beyond a thousand times the volume no re-acquisition of the tube is practical.
MAX_VOLUME_FACTOR = 1000.0


def _straddles(ci95, threshold):
    return ci95[0] <= threshold < ci95[1]


def _ceil_sig(value, digits=3):
    """``value`` rounded up to ``digits`` significant figures (a proposal never rounds below what it needs)."""
    scale = 10.0 ** (digits - 1 - math.floor(math.log10(value)))
    return math.ceil(value * scale - 1e-9) / scale


def _next_sig(value, digits=3):
    """The next value up at ``digits`` significant figures."""
    step = 10.0 ** (math.floor(math.log10(value)) - digits + 1)
    return _ceil_sig(value + step, digits)


def volume_factor_to_settle(count, threshold, limit=MAX_VOLUME_FACTOR):
    """How many times the volume acquired would give an interval clear of ``threshold``, if the value holds.

    Always above 1 for an interval that straddles the threshold, rounded
    *up* to three significant figures. Where the count knows how it was
    made (:meth:`cytometry.counts.Count.acquired_times`: every Poisson count
    behind it — cells and beads, events and ``$VOL``, cells and lymphocytes
    — times ``k``), ``k`` is the smallest such factor whose exact interval
    no longer straddles the threshold. A count made by hand is scaled from
    its own interval: its log-distance to the value shrinks as ``1/√k``.

    Returns
    -------
    float or None
        ``None`` when no acquisition up to ``limit`` times the volume would
        settle it: the value sits on the threshold, or the interval's width
        does not come from the events (an analyser's CV).

    Examples
    --------
    >>> from cytometry.counts import Count, bead_count
    >>> volume_factor_to_settle(bead_count(26, 4751, 50120, 50.0), 5.0)
    18.1
    >>> volume_factor_to_settle(bead_count(50, 10024, 50120, 50.0), 5.0) is None   # exactly 5 cells/uL
    True
    """
    if count.acquired_times(1.0) is None:
        return _scaled_from_interval(count, threshold, limit)

    def settled(factor):
        return not _straddles(count.acquired_times(factor).ci95, threshold)

    if not settled(limit):
        return None
    low, high = 1.0, 2.0
    while not settled(high):
        low, high = high, high * 2.0
    while high / low > 1.0005:
        middle = math.sqrt(low * high)
        low, high = (low, middle) if settled(middle) else (middle, high)
    factor = _ceil_sig(high)
    while not settled(factor):  # counts are whole: the rounded-up factor must itself settle it
        factor = _next_sig(factor)
    return factor


def _scaled_from_interval(count, threshold, limit):
    """The factor from the interval alone, ``(ln(value/bound) / ln(value/threshold))²``, bound on the side to clear.

    With no events only the upper bound moves, as ``1/k`` (none seen in
    ``k`` times the blood).
    """
    value = float(count.cells_per_ul)
    low, high = (float(bound) for bound in count.ci95)
    if count.events == 0 or value <= 0:
        factor = high / threshold if math.isfinite(high) and high > threshold else None
    elif value == threshold:
        factor = None
    else:
        bound = low if value > threshold else high
        factor = (math.log(value / bound) / math.log(value / threshold)) ** 2 \
            if bound > 0 and math.isfinite(bound) else None
    if factor is None or factor > limit:
        return None
    return _ceil_sig(max(factor, 1.001))


def _what_would_settle(count, threshold):
    """What acquisition would give an interval that no longer straddles the threshold, if the value holds.

    Always more than was acquired, or a sentence saying none would decide it.
    """
    factor = volume_factor_to_settle(count, threshold)
    if factor is None:
        why = "the value sits on the threshold" if count.cells_per_ul == threshold else \
            f"the interval would still straddle it at {MAX_VOLUME_FACTOR:g}x the volume acquired"
        return f"no amount of further acquisition would settle it if the value holds ({why}); a new sample is needed"
    if count.events == 0:
        return (f"no events of this population yet: ~{format_sig(factor)}x the volume acquired, with none seen, "
                "would give an interval that no longer straddles the threshold")
    needed = max(math.ceil(count.events * factor), count.events + 1)
    return (f"about {needed:,} events of this population (now {count.events:,}, i.e. ~{format_sig(factor)}x the "
            f"volume acquired) would give an interval that no longer straddles the threshold, if the value holds")
