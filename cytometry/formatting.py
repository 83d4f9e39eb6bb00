"""One formatter for measured numbers: rounded to significant figures, never in scientific notation.

Counts of events are exact and printed whole; values measured from them
(cells/µL, intervals, percentages) are rounded to three significant figures,
so a report reads ``1,540 [1,460–1,630]`` and not ``1544.2159000000001`` or
``1e+03 [964–1.05e+03]``.
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
