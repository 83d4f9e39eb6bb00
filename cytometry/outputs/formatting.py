"""One formatter for measured numbers and one for a population's count, used by every output.

Counts of events are exact and printed whole; values measured from them
(cells/µL, intervals, percentages) are rounded to three significant figures,
so a report reads ``1,540 [1,460–1,630]`` and not ``1544.2159000000001`` or
``1e+03 [964–1.05e+03]``. :func:`count_text` is the one way a population's
count is written, by the command line, the report and ``Count.describe``.

Text that comes from outside (subject IDs, file names, keywords) goes
through two functions before it reaches an output: :func:`safe_name` for a
file name made from it, :func:`printable` for a terminal table or the HTML
report.
"""
from __future__ import annotations

import hashlib
import math
import re
import unicodedata


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


#: Longest name :func:`safe_name` returns (ASCII, so bytes): with a suffix such as ``.kinetics.png`` a file
#: name stays far below the 255 bytes most file systems allow.
NAME_MAX = 100
_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_HASH_TAIL = re.compile(r"-[0-9a-f]{10}$")
# Device names Windows reserves whatever the extension (a share opened from Windows cannot hold them).
_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))}


def safe_name(name, max_length=NAME_MAX):
    """A file-name stem made from an ID or a file name: the one way output names are made.

    Letters, digits, ``.``, ``_`` and ``-`` are kept, every other character
    becomes ``_``, leading dots and dashes are dropped and the name is cut
    to ``max_length``. Whenever the name had to be changed (or would look
    like a changed one, or is a reserved device name), a hash of the
    original is appended, ``-`` and 10 hex digits of its SHA-256, so two
    different IDs never give the same file (``S/01`` and ``S_01``) and the
    same ID always gives the same one. A name that needed no change is kept
    as it is.

    Parameters
    ----------
    name : str
        A subject ID, a sample's file stem, any text from outside.
    max_length : int
        The longest stem returned (at least 16).

    Returns
    -------
    str

    Examples
    --------
    >>> safe_name("S01_day010_CAR")
    'S01_day010_CAR'
    >>> safe_name("S/01"), safe_name("S_01")
    ('S_01-6461d37fd2', 'S_01')
    >>> len(safe_name("Z" * 300))
    100
    """
    text = str(name)
    safe = _NAME_UNSAFE.sub("_", text).lstrip(".-")[:max_length]
    reserved = safe.split(".")[0].upper() in _RESERVED
    if safe and safe == text and not reserved and not _HASH_TAIL.search(safe):
        return safe
    digest = hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:10]
    stem = safe[:max(max_length - 11, 1)] or "unnamed"
    return f"{stem}-{digest}"


# Control (Cc: C0, DEL, C1), format (Cf: bidi overrides and isolates, zero-width characters), surrogate
# (an undecodable byte of a file name) and line/paragraph separator characters: they can recolour or
# clear a terminal, reorder what a reviewer reads, or break a table's rows.
_HIDDEN_CATEGORIES = {"Cc", "Cf", "Cs", "Zl", "Zp"}


def _escape(char):
    code = ord(char)
    if char in "\t\n\r":
        return {"\t": "\\t", "\n": "\\n", "\r": "\\r"}[char]
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def printable(text):
    r"""``text`` with control and bidi characters written as visible escapes (``\x1b``, ``\u202e``).

    For every value from a file, a file name or the manifest that reaches a
    terminal table or the HTML report: an escape sequence cannot recolour
    or clear the screen, a right-to-left override cannot reorder what a
    reviewer reads, a newline cannot forge a row. Other characters (``µ``,
    ``–``, accented letters) are kept; a backslash is left as it is.

    Examples
    --------
    >>> printable("S01 µL")
    'S01 µL'
    >>> print(printable("\x1b[31mS01\u202e\t"))
    \x1b[31mS01\u202e\t
    """
    text = "" if text is None else str(text)
    if text.isprintable():  # the usual case, and a fast one
        return text
    return "".join(_escape(c) if unicodedata.category(c) in _HIDDEN_CATEGORIES else c for c in text)
