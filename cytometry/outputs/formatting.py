"""One formatter for measured numbers and one for a population's count, used by every output.

Counts of events are exact and printed whole; values measured from them
(cells/µL, intervals, percentages) are rounded to three significant figures,
so a report reads ``1,540 [1,460–1,630]`` and not ``1544.2159000000001`` or
``1e+03 [964–1.05e+03]``. :func:`count_text` is the one way a population's
count is written, by the command line, the report and ``Count.describe``.
"""
from __future__ import annotations

import math


def format_sig(value, digits=3):
    """``value`` rounded to ``digits`` significant figures, as plain text.

    Thousands are separated by commas; no exponent is ever written; ``None``
    and NaN give an empty string.

    Examples
    --------
    >>> format_sig(1544.2159000000001)
    '1,540'
    >>> format_sig(5.48571), format_sig(0.012345), format_sig(0), format_sig(964.3)
    ('5.49', '0.0123', '0', '964')
    >>> format_sig(None), format_sig(float("nan"))
    ('', '')
    """
    if value is None:
        return ""
    value = float(value)
    if math.isnan(value):
        return ""
    if math.isinf(value):
        return "∞" if value > 0 else "−∞"
    if value == 0:
        return "0"
    exponent = math.floor(math.log10(abs(value)))
    decimals = digits - 1 - exponent
    rounded = round(value, decimals)
    if rounded != 0 and math.floor(math.log10(abs(rounded))) > exponent:  # 999.7 → 1,000: one digit fewer
        decimals -= 1
    return f"{rounded:,.{max(decimals, 0)}f}"


def interval_text(ci95):
    """A 95% interval as ``[low–high]`` in significant figures; empty for none.

    Examples
    --------
    >>> interval_text([964.3, 1051.2]), interval_text(None)
    ('[964–1,050]', '')
    """
    return "" if not ci95 else f"[{format_sig(ci95[0])}–{format_sig(ci95[1])}]"


def count_text(count, *, events=False, interval=True):
    """One population's count as text: ``value [95% interval]``, what limits it said.

    ``count`` is a count as results hold it (``cells_per_ul``, ``ci95``,
    ``events``, optional ``below_lloq`` and ``reliable``). Below the LLOQ the
    text starts ``<LLOQ``; an unreliable population starts ``UNRELIABLE``; a
    population with no counting method (no beads, no volume) gives its
    events and says there is no count.

    Parameters
    ----------
    count : dict or None
        The population's count; ``None`` or empty gives ``""``.
    events : bool
        Append the gated events, ``(551 ev)``.
    interval : bool
        Write the 95% interval after the value (off for narrow columns).

    Examples
    --------
    >>> count_text({"cells_per_ul": 114.4712, "ci95": [105.1, 124.4], "events": 551})
    '114 [105–124]'
    >>> count_text({"cells_per_ul": 0.82, "ci95": [0.2, 2.0], "events": 4, "below_lloq": True}, events=True)
    '<LLOQ 0.820 [0.200–2.00] (4 ev)'
    >>> count_text({"cells_per_ul": None, "ci95": None, "events": 1234, "reliable": False})
    'UNRELIABLE 1,234 ev, no count'
    """
    if not count:
        return ""
    flag = "" if count.get("reliable", True) else "UNRELIABLE "
    if count.get("cells_per_ul") is None:
        return f"{flag}{count['events']:,} ev, no count"
    lloq = "<LLOQ " if count.get("below_lloq") else ""
    ci = interval_text(count.get("ci95")) if interval else ""
    text = f"{flag}{lloq}{format_sig(count['cells_per_ul'])} {ci}".rstrip()
    return f"{text} ({count['events']:,} ev)" if events else text
