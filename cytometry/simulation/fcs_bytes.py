"""FCS files edited at the byte level: keywords rewritten, DATA replaced, offsets kept consistent.

For tests and the fuzz campaign (never imported at runtime): unlike
:mod:`cytometry.simulation.metamorphic`, which writes a clean file through
flowio, these functions keep every other byte of the file as it was, so a
test can change exactly one keyword (``$PnG``, ``$TOT``, ``$SPILLOVER``…) or
write values no writer would (a negative gain, a duplicated keyword).

Examples
--------
>>> raw = open("sample_fcs/S01_screening_TBNK.fcs", "rb").read()
>>> parts = split_fcs(raw)
>>> parts.get("$P4G"), len(parts.data) == 24123 * 10 * 4
('1.0', True)
>>> edited = split_fcs(parts.with_keywords({"$P4G": "2"}).to_bytes())
>>> edited.get("$P4G"), edited.data == parts.data
('2', True)
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from cytometry.loading.fcs import text_pairs

_OFFSET_KEYWORDS = ("$BEGINDATA", "$ENDDATA")


@dataclass(frozen=True)
class FcsParts:
    """An FCS file taken apart: version, TEXT keywords in file order, delimiter and DATA bytes.

    Attributes
    ----------
    version : bytes
        The six HEADER bytes ``FCS3.1``.
    keywords : tuple of (str, str)
        TEXT keyword/value pairs as written (case kept, duplicates kept).
    delimiter : str
    data : bytes
        The DATA segment.
    """

    version: bytes
    keywords: tuple
    delimiter: str
    data: bytes

    def get(self, name):
        """Value of the first keyword named ``name`` (case-insensitive), or None."""
        for key, value in self.keywords:
            if key.upper() == name.upper():
                return value
        return None

    def with_keywords(self, changes):
        """A copy with ``changes`` applied: a value replaces the keyword's (added when absent); None removes it."""
        pairs = list(self.keywords)
        for name, value in changes.items():
            at = [i for i, (key, _) in enumerate(pairs) if key.upper() == name.upper()]
            if value is None:
                pairs = [p for i, p in enumerate(pairs) if i not in at]
            elif at:
                pairs[at[0]] = (pairs[at[0]][0], str(value))
            else:
                pairs.append((name, str(value)))
        return replace(self, keywords=tuple(pairs))

    def to_bytes(self, header_offsets=None):
        """The file's bytes: HEADER, TEXT, DATA, with ``$BEGINDATA``/``$ENDDATA`` and the HEADER offsets recomputed.

        Parameters
        ----------
        header_offsets : callable(text_start, text_end, data_start, data_end) -> bytes, optional
            Writes the 32 HEADER offset bytes (default: right-aligned in 8
            bytes each, as the standard says).
        """
        d = self.delimiter
        escape = (lambda s: s.replace(d, d + d))
        others = [(k, v) for k, v in self.keywords if k.upper() not in _OFFSET_KEYWORDS]
        begin = 58
        for _ in range(4):  # the offsets' own digits change the TEXT length
            end = begin + max(len(self.data), 1) - 1
            pairs = [("$BEGINDATA", str(begin)), ("$ENDDATA", str(end))] + others
            text = (d + d.join(f"{escape(k)}{d}{escape(v)}" for k, v in pairs) + d).encode("latin-1")
            begin = 58 + len(text)
        end = begin + max(len(self.data), 1) - 1
        writer = header_offsets or (lambda *o: b"".join(str(v).rjust(8).encode() for v in o))
        offsets = writer(58, 58 + len(text) - 1, begin, end)
        header = self.version.ljust(10) + offsets + b"       0       0"
        return header[:58].ljust(58) + text + self.data


def as_integer_data(parts, bits, big_endian=False, top=None):
    """The same float tube stored as ``bits``-bit unsigned integers (8, 16, 24 or 32 per channel).

    Values are rounded and clipped to ``0 .. top - 1`` (``$PnR`` becomes
    ``top``, by default 262144 or what ``bits`` hold if less); ``$DATATYPE`` I, ``$PnB`` and ``$BYTEORD`` follow. Widths other
    than 8/16/32 (24 bits, as a Cytek xP5 writes) are what flowio cannot read.

    Examples
    --------
    >>> raw = open("sample_fcs/S01_screening_TBNK.fcs", "rb").read()
    >>> parts = as_integer_data(split_fcs(raw), 24, big_endian=True)
    >>> parts.get("$DATATYPE"), parts.get("$P1B"), parts.get("$BYTEORD"), len(parts.data) == 24123 * 10 * 3
    ('I', '24', '4,3,2,1', True)
    """
    n = int(parts.get("$PAR"))
    top = min(262144, 2 ** bits) if top is None else top
    events = np.frombuffer(parts.data, dtype="<f4").reshape(-1, n)
    values = np.clip(np.rint(np.nan_to_num(events)), 0, top - 1).astype("<u4")
    width = bits // 8
    as_bytes = values.view(np.uint8).reshape(len(values), n, 4)[:, :, :width]  # little-endian low bytes
    if big_endian:
        as_bytes = as_bytes[:, :, ::-1]
    changes = {"$DATATYPE": "I", "$BYTEORD": "4,3,2,1" if big_endian else "1,2,3,4"}
    for i in range(1, n + 1):
        changes[f"$P{i}B"] = str(bits)
        changes[f"$P{i}R"] = str(top)
    return replace(parts.with_keywords(changes), data=np.ascontiguousarray(as_bytes).tobytes())


def split_fcs(raw):
    """Take an FCS file's bytes apart into :class:`FcsParts` (TEXT decoded as latin-1).

    Parameters
    ----------
    raw : bytes

    Returns
    -------
    FcsParts
    """
    text_start, text_end, data_start, data_end = (int(raw[10 + 8 * k:18 + 8 * k].strip() or 0) for k in range(4))
    text = raw[text_start:text_end + 1].decode("latin-1")
    pairs = tuple(text_pairs(text))
    return FcsParts(version=raw[:6], keywords=pairs, delimiter=text[0], data=raw[data_start:data_end + 1])
