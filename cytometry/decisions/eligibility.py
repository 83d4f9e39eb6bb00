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

from cytometry.outputs.formatting import interval_text

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


def _what_would_settle(count, threshold):
    """How many events an interval excluding the threshold needs, if the value holds.

    With CV ≈ 1/√n, the interval half-width 1.96·value/√n must be below
    |value − threshold|, so n ≈ (1.96·value / |value − threshold|)².
    """
    value = count.cells_per_ul
    gap = abs(value - threshold)
    if count.events == 0 or gap <= 0 or value <= 0:
        return "re-acquire more blood volume; the value sits on the threshold"
    needed = math.ceil((1.96 * value / gap) ** 2)
    factor = needed / count.events
    return (f"about {needed} events of this population (now {count.events}, i.e. ~{factor:.1f}x the "
            f"volume acquired) would give an interval that no longer straddles the threshold, if the value holds")
