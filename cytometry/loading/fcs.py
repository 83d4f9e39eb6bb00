"""Reading FCS files: events, channels, keywords, spillover and provenance.

Parsing is done by flowkit/flowio (the field's reference readers); this
module turns what they return into one small object, :class:`FcsSample`, and
turns every way a file can be unreadable into :class:`FcsError`, a one-line
message that names the file.
"""
from __future__ import annotations

import array
import hashlib
import io
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import flowio
import numpy as np

from gating.panels import is_fluorescence

#: Channels that are never fluorescence (flowutils uses the same convention).


class FcsError(Exception):
    """A file that cannot be analysed; the message is one line naming the file."""

    def __init__(self, path, problem):
        self.path = str(path)
        self.problem = " ".join(str(problem).split())  # one line, always
        super().__init__(f"{self.path}: {self.problem}")


@dataclass
class Spillover:
    """A spillover matrix over named detectors, as stored in the file.

    Attributes
    ----------
    detectors : list of str
        ``$PnN`` names of the columns (and rows) of ``matrix``.
    matrix : ndarray, shape (n, n)
        Fraction of each detector's primary signal seen in the others;
        diagonal 1. ``compensated = raw @ inv(matrix)``.
    source : str
        Where it came from: ``$SPILLOVER``, ``SPILL``, ``$COMP`` or a path.
    """

    detectors: list
    matrix: np.ndarray
    source: str


@dataclass
class FcsSample:
    """One FCS file, loaded: raw events plus what is needed to interpret them.

    Attributes
    ----------
    path : Path
    sha256 : str
        SHA-256 of the file's bytes (provenance).
    fcs_version : str
    events : ndarray of float32, shape (n_events, n_channels)
        Raw, uncompensated, linear values (``$PnG``/``$PnE`` applied as
        flowio/flowkit do; float32, see :func:`event_matrix`).
    pnn, pns : list of str
        Detector names (``$PnN``) and markers (``$PnS``, ``""`` when absent).
    ranges : list of float
        ``$PnR`` per channel.
    datatype : str
        ``$DATATYPE`` (I, F or D).
    keywords : dict
        All TEXT keywords, lower case, without the leading ``$``.
    spillover : Spillover or None
    vol_nl : float or None
        ``$VOL``: nanolitres of sample analysed (FCS 3.1), when present.
    dropped_events : int
        Events dropped because they held NaN or infinite values (at most 1%
        of the file; more and the file is refused).
    released_events : int
        Events whose raw array was handed on by :meth:`release_events`
        (``events`` is then ``None``; 0 while ``events`` is held).
    read_notes : list of str
        What the reader had to work around (each an ``info`` flag on the result).
    declared_events : int or None
        ``$TOT``, the number of events the file says it holds.
    read_events : int or None
        Events found in the DATA segment (before non-finite ones are dropped);
        when it differs from ``declared_events`` the result gets a ``fail`` flag.
    """

    path: Path
    sha256: str
    fcs_version: str
    events: np.ndarray
    pnn: list
    pns: list
    ranges: list
    datatype: str
    keywords: dict = field(repr=False)
    spillover: Spillover | None = None
    vol_nl: float | None = None
    dropped_events: int = 0
    read_notes: list = field(default_factory=list)
    released_events: int = 0
    declared_events: int | None = None
    read_events: int | None = None

    @property
    def n_events(self):
        return self.events.shape[0] if self.events is not None else self.released_events

    def release_events(self):
        """Hand the raw event array on and drop it from the sample (``events`` becomes ``None``).

        For a caller that transforms the events in place (the CLI's
        :func:`cytometry.analysis.gate_file` with ``keep_raw=False``): the
        sample no longer claims to hold raw values, and a large tube is not
        held twice. ``n_events`` still answers.

        Examples
        --------
        >>> sample = read_fcs("sample_fcs/S01_screening_TBNK.fcs")
        >>> events = sample.release_events()
        >>> events.shape, sample.events, sample.n_events
        ((24123, 10), None, 24123)
        """
        if self.events is None:
            raise ValueError(f"{self.path}: the raw events were already released")
        events, self.events = self.events, None
        self.released_events = events.shape[0]
        return events

    def __repr__(self):
        spill = f", spillover from {self.spillover.source}" if self.spillover is not None else ""
        return (f"FcsSample({Path(self.path).name!r}, FCS {self.fcs_version}, {self.n_events:,} events x "
                f"{len(self.pnn)} channels{spill})")

    def channel_index(self, pnn_name):
        """Column of the channel whose ``$PnN`` is ``pnn_name``."""
        return self.pnn.index(pnn_name)

    def channel_top(self, index):
        """Top of a channel's scale: its ``$PnR``, or 262144 (18 bits) when the file gives none plausible.

        Examples
        --------
        >>> sample = read_fcs("sample_fcs/S01_screening_TBNK.fcs")
        >>> sample.channel_top(sample.channel_index("FSC-A"))
        262144.0
        """
        top = self.ranges[index]
        return float(top) if np.isfinite(top) and 1 < top <= MAX_CHANNEL_RANGE else DEFAULT_CHANNEL_TOP


def file_sha256(path):
    """SHA-256 hex digest of a file, read in 1 MiB blocks.

    Examples
    --------
    >>> import tempfile, os
    >>> with tempfile.NamedTemporaryFile(delete=False) as fh:
    ...     _ = fh.write(b"abc")
    >>> file_sha256(fh.name)[:16]
    'ba7816bf8f01cfea'
    >>> os.unlink(fh.name)
    """
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def parse_spillover(text, pnn, source="$SPILLOVER"):
    """Parse a spillover keyword value into a :class:`Spillover`.

    Accepts the FCS 3.1 form ``n,name1,...,namen,v11,v12,...,vnn`` (also used
    by most vendors for ``SPILL`` and ``$COMP``) and the older unnamed form
    ``n,v11,...,vnn``, which applies to the first ``n`` fluorescence channels.

    Parameters
    ----------
    text : str
        The keyword's value.
    pnn : list of str
        The file's ``$PnN`` names, to check the detectors and resolve the
        unnamed form.
    source : str
        Keyword name, kept for provenance and error messages.

    Returns
    -------
    Spillover

    Raises
    ------
    ValueError
        When the value is malformed or names a detector the file lacks.

    Examples
    --------
    >>> s = parse_spillover("2,FL1-A,FL2-A,1,0.2,0.01,1", ["FSC-A", "FL1-A", "FL2-A"])
    >>> s.detectors, float(s.matrix[0, 1])
    (['FL1-A', 'FL2-A'], 0.2)
    """
    parts = [p.strip() for p in text.replace("\n", ",").split(",") if p.strip() != ""]
    try:
        n = int(float(parts[0]))
    except (IndexError, ValueError):
        raise ValueError(f"{source} does not start with the number of detectors") from None
    if n < 1:
        raise ValueError(f"{source} lists {n} detectors")
    if len(parts) == 1 + n + n * n:
        detectors = parts[1:1 + n]
        values = parts[1 + n:]
    elif len(parts) == 1 + n * n:
        fluorescence = [name for name in pnn if is_fluorescence(name)]
        if len(fluorescence) < n:
            raise ValueError(f"{source} has {n} unnamed detectors but the file has "
                             f"{len(fluorescence)} fluorescence channels")
        detectors = fluorescence[:n]
        values = parts[1:]
    else:
        raise ValueError(f"{source} has {len(parts)} fields, expected {1 + n + n * n} for {n} detectors")
    try:
        matrix = np.array([float(v) for v in values]).reshape(n, n)
    except ValueError:
        raise ValueError(f"{source} holds a value that is not a number") from None
    missing = [d for d in detectors if d not in pnn]
    if missing:
        raise ValueError(f"{source} names detector(s) {', '.join(missing)} not among the file's channels")
    check_spillover_matrix(detectors, matrix, source)
    return Spillover(detectors=list(detectors), matrix=matrix, source=source)


#: Largest condition number of a spillover matrix that is inverted. Compensation
#: multiplies the raw values by the inverse, which can amplify their relative error
#: by up to the condition number: raw FCS data are mostly float32 (relative rounding
#: 6e-8) with photon-counting noise of a percent or more, so at 1e6 rounding alone
#: reaches 6% of the brightest signal in a row and any noise swamps the result.
#: Real spillover matrices (diagonal 1, spill fractions well below 1) have condition
#: numbers of a few to a few hundred. The determinant is no test: it scales with the
#: n-th power of the entries (0.01 x identity over 6 detectors has 1e-12 and is
#: perfectly invertible) and says nothing about how close to singular a matrix is.
MAX_SPILLOVER_CONDITION = 1e6


def check_spillover_matrix(detectors, matrix, source):
    """Refuse a spillover matrix that cannot be inverted safely (raises ValueError, one line).

    Refused: a detector listed twice (two columns would compensate one
    channel), a non-finite entry, and a matrix whose condition number exceeds
    :data:`MAX_SPILLOVER_CONDITION` (numerically singular: its inverse would
    turn rounding into signal).

    Examples
    --------
    >>> check_spillover_matrix(["A", "B"], np.array([[1.0, 0.2], [0.1, 1.0]]), "test")
    >>> check_spillover_matrix(["A", "A"], np.eye(2), "test")
    Traceback (most recent call last):
    ...
    ValueError: test lists detector A twice
    """
    seen = set()
    for name in detectors:
        if name in seen:
            raise ValueError(f"{source} lists detector {name} twice")
        seen.add(name)
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.shape != (len(detectors), len(detectors)):
        raise ValueError(f"{source} is a {matrix.shape} matrix for {len(detectors)} detectors")
    if not np.all(np.isfinite(matrix)):
        raise ValueError(f"{source} holds a non-finite value")
    with np.errstate(all="ignore"):  # entries near 1e308 overflow inside the SVD: refused below, not warned
        condition = float(np.linalg.cond(matrix))
    if not condition <= MAX_SPILLOVER_CONDITION:  # (NaN too)
        shown = f"{condition:.3g}" if np.isfinite(condition) else "infinite"
        raise ValueError(f"{source} is numerically singular (condition number {shown} > "
                         f"{MAX_SPILLOVER_CONDITION:g}); it cannot be inverted for compensation")


def find_spillover(keywords, pnn):
    """The file's spillover matrix from ``$SPILLOVER``, ``SPILL`` or ``$COMP``.

    Returns ``None`` when the file has none. ``keywords`` are lower case
    without ``$`` (flowkit's convention).
    """
    for key, label in (("spillover", "$SPILLOVER"), ("spill", "SPILL"), ("comp", "$COMP")):
        value = keywords.get(key)
        if value and value.strip():
            return parse_spillover(value, pnn, source=label)
    return None


#: Byte orders the reader decodes; any other is refused rather than guessed.
SUPPORTED_BYTE_ORDERS = ("1,2,3,4", "4,3,2,1", "1,2", "2,1")
#: ``$DATATYPE`` values the reader decodes (ASCII data, ``A``, is refused).
SUPPORTED_DATATYPES = ("I", "F", "D")
#: ``$PnB`` widths of integer data the reader decodes. flowio reads 8, 16 and
#: 32 bits; 24-bit data (Cytek xP5 and other older instruments) are widened to
#: 32 bits in memory first, so flowio still interprets every value.
INTEGER_BITS = (8, 16, 24, 32)
#: Top of scale used where ``$PnR`` gives none that is plausible (18 bits).
DEFAULT_CHANNEL_TOP = 262144.0
#: Largest plausible ``$PnR``: what a 32-bit integer channel can hold. Float-data
#: instruments write 2^18 to 2^22; a larger "range" (1e300) is not a scale the
#: logicle transform can use, so the default top is used and the result says so.
MAX_CHANNEL_RANGE = 2.0 ** 32

#: Largest event value taken as a measurement. No detector reports more than about 1e10
#: (a 32-bit ADC: 4.3e9; float-data instruments: a few million); a value beyond 1e30 is a
#: corrupt word or a scaling gone wrong (a $PnG of 1e-300), and squares of values beyond
#: 1e154 overflow float64 in every variance downstream. Such events count as non-finite.
MAX_EVENT_MAGNITUDE = 1e30

#: Files claiming more events than this are refused before anything is read (configurable).
DEFAULT_MAX_EVENTS = 50_000_000
_MAX_TEXT_BYTES = 16 << 20
#: Segment offsets the standard allows in the 8-byte HEADER fields; beyond it they are 0 there.
_HEADER_OFFSET_LIMIT = 99_999_999


def text_pairs(text):
    """Keyword/value pairs of an FCS TEXT segment, in file order, duplicates kept, keys as written.

    The delimiter is the first byte; a doubled delimiter stands for itself.

    Examples
    --------
    >>> text_pairs("/$PAR/2/$P1N/FSC-A/$COM/a//b/")
    [('$PAR', '2'), ('$P1N', 'FSC-A'), ('$COM', 'a/b')]
    """
    if not text:
        return []
    delimiter = text[0]
    body = text[1:]
    fields, current, i = [], [], 0
    while i < len(body):
        ch = body[i]
        if ch == delimiter:
            if i + 1 < len(body) and body[i + 1] == delimiter:
                current.append(ch)
                i += 2
                continue
            fields.append("".join(current))
            current = []
        else:
            current.append(ch)
        i += 1
    if current:
        fields.append("".join(current))
    return [(fields[k], fields[k + 1]) for k in range(0, len(fields) - 1, 2)]


def _keyword_key(key):
    return key.strip().lstrip("$").lower()


def _text_keywords(text):
    """Keywords of an FCS TEXT segment (lower case, no leading ``$``; the last of a duplicate wins)."""
    return {_keyword_key(k): v for k, v in text_pairs(text)}


def _is_time(name):
    # flowio's rule: it ignores the gain of the channel named "time" (any case).
    return name.strip().lower() == "time"


@dataclass
class _Layout:
    """What :func:`_read_layout` learnt from the HEADER and TEXT, for :func:`read_fcs`."""

    version: bytes
    offsets: tuple          # text start, text end, data start, data end (HEADER; 0 when blank)
    blank_data_offsets: bool
    delimiter: str
    pairs: list
    keywords: dict
    events: int
    parameters: int


def _read_layout(path, max_events):
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        header = fh.read(58)
        if len(header) < 58:
            raise FcsError(path, f"truncated: {size} bytes, shorter than an FCS header")
        fields = [header[10 + 8 * k:18 + 8 * k] for k in range(4)]
        try:
            text_start, text_end, data_start, data_end = (int(f.strip() or 0) for f in fields)
        except ValueError:
            raise FcsError(path, "HEADER offsets are not numbers") from None
        if not (0 < text_start <= text_end < size):
            raise FcsError(path, f"HEADER places TEXT at bytes {text_start}-{text_end} of a {size}-byte file")
        if text_end - text_start + 1 > _MAX_TEXT_BYTES:
            raise FcsError(path, f"TEXT segment of {text_end - text_start + 1} bytes is implausibly large")
        fh.seek(text_start)
        text = fh.read(text_end - text_start + 1).decode("latin-1")
    pairs = text_pairs(text)
    keywords = {}
    for key, value in pairs:
        # flowio keeps the last of a repeated keyword; a file that says two
        # things about one keyword ($P8G 1 and $P8G -1) is ambiguous, not read.
        name = _keyword_key(key)
        if name in keywords and keywords[name].strip() != value.strip():
            raise FcsError(path, f"keyword {key.strip()} appears twice with different values "
                                 f"({keywords[name].strip()!r} and {value.strip()!r})")
        keywords[name] = value
    for name, meaning in (("tot", "the number of events"), ("par", "the number of channels")):
        if name not in keywords:
            raise FcsError(path, f"no ${name.upper()} keyword ({meaning}, required)")
    try:
        events = int(keywords.get("tot", "").strip())
        parameters = int(keywords.get("par", "").strip())
    except ValueError:
        raise FcsError(path, f"$TOT ({keywords.get('tot')!r}) or $PAR ({keywords.get('par')!r}) is not a number") \
            from None
    if events < 0 or parameters <= 0 or parameters > 10_000:
        raise FcsError(path, f"implausible $TOT={events} or $PAR={parameters}")
    if events > max_events:
        raise FcsError(path, f"claims {events} events, more than the limit of {max_events} (raise it with "
                             f"max_events if the file is genuine)")
    # flowio takes the channels from the $PnN keywords and the event width
    # from $PAR: a disagreement would reshape the data wrongly (or crash).
    named = sorted({int(k[1:-1]) for k in keywords if len(k) > 2 and k[0] == "p" and k[-1] == "n"
                    and k[1:-1].isascii() and k[1:-1].isdigit()})
    beyond = [n for n in named if n > parameters]
    if beyond:
        raise FcsError(path, f"$PAR is {parameters} but TEXT names channel {beyond[-1]} "
                             f"($P{beyond[-1]}N); the event layout is ambiguous")
    unnamed = [n for n in range(1, parameters + 1) if n not in named]
    if unnamed:
        raise FcsError(path, f"$PAR is {parameters} but channel {unnamed[0]} has no $P{unnamed[0]}N name")
    byte_order = keywords.get("byteord", "").strip().replace(" ", "")
    if byte_order not in SUPPORTED_BYTE_ORDERS:
        # flowio would silently fall back to the machine's own order: wrong numbers, no error.
        raise FcsError(path, f"unsupported $BYTEORD {byte_order!r} (readable: {', '.join(SUPPORTED_BYTE_ORDERS)})")
    datatype = keywords.get("datatype", "").strip().upper()
    if datatype not in SUPPORTED_DATATYPES:
        raise FcsError(path, f"unsupported $DATATYPE {datatype!r} (readable: {', '.join(SUPPORTED_DATATYPES)})")
    if datatype in ("F", "D"):
        bits = parameters * (32 if datatype == "F" else 64)
    else:
        widths = []
        for i in range(1, parameters + 1):
            value = keywords.get(f"p{i}b", "").strip()
            try:
                widths.append(int(value))
            except ValueError:
                raise FcsError(path, f"$P{i}B ({value!r}) is not a number") from None
            if widths[-1] not in INTEGER_BITS:
                raise FcsError(path, f"$P{i}B is {widths[-1]} bits: integer data of "
                                     f"{', '.join(map(str, INTEGER_BITS))} bits are readable")
        bits = sum(widths)
    for i in range(1, parameters + 1):
        name = keywords.get(f"p{i}n", "").strip()
        # flowio needs every $PnR (a KeyError otherwise), as an integer for integer data.
        top = keywords.get(f"p{i}r")
        if top is None:
            raise FcsError(path, f"channel {i} ({name}) has no $P{i}R (its range, a required keyword)")
        try:
            int(top) if datatype == "I" else float(top)
        except ValueError:
            kind = "an integer, as integer data need" if datatype == "I" else "a number"
            raise FcsError(path, f"channel {i} ({name}) has $P{i}R {top.strip()!r}: not {kind}") from None
        amplification = keywords.get(f"p{i}e")
        if amplification is not None:
            try:
                decades, offset = (float(v) for v in amplification.split(","))
            except ValueError:
                decades = offset = float("nan")
            # flowio reads a log channel as offset x 10^(decades x value / range): a negative
            # offset would turn every value's sign (the offset is unused when decades is 0).
            if not (np.isfinite(decades) and np.isfinite(offset) and decades >= 0
                    and (offset >= 0 or decades == 0)):
                raise FcsError(path, f"channel {i} ({name}) has $P{i}E {amplification.strip()!r}: expected "
                                     f"'decades,offset', two non-negative numbers")
        value = keywords.get(f"p{i}g")
        if value is None or _is_time(name):
            continue
        try:
            gain = float(value)
        except ValueError:
            gain = float("nan")
        # flowio divides a channel by its gain; a negative one turns every
        # value's sign, and flowio reads 0 as 1: neither is a gain to trust.
        if not (np.isfinite(gain) and gain > 0):
            raise FcsError(path, f"channel {i} ({name}) has $P{i}G {value.strip()!r}: a gain must be a positive "
                                 f"number")
    needed = events * bits // 8
    try:  # ("¹518".isdigit() is True, yet int() refuses it: parse, don't test)
        begin = int(keywords.get("begindata", "0").strip() or 0)
    except ValueError:
        begin = 0
    start = data_start or begin
    if needed > size - max(start, 0):
        raise FcsError(path, f"truncated or inconsistent: $TOT={events} x $PAR={parameters} needs {needed} bytes "
                             f"of DATA but the file has {max(size - start, 0)} after byte {start}")
    blank = any(f.strip() == b"" for f in fields[2:])
    return _Layout(version=header[:6], offsets=(text_start, text_end, data_start, data_end),
                   blank_data_offsets=blank, delimiter=text[0], pairs=pairs, keywords=keywords,
                   events=events, parameters=parameters)


def check_header(path, max_events=DEFAULT_MAX_EVENTS):
    """Refuse, before anything large is read, a file whose own numbers cannot be right.

    Reads only the 58-byte HEADER and the TEXT segment (at most 16 MiB) and
    checks that the segments lie inside the file, that ``$TOT``/``$PAR`` are
    numbers within limits, that ``$PAR`` matches the ``$PnN`` names, that
    ``$DATATYPE``, ``$BYTEORD`` and integer ``$PnB`` are ones the reader
    decodes, that every ``$PnG`` is a positive number, that no keyword is
    given twice with different values, and that the DATA segment they imply
    fits in the file. A crafted file claiming 10^12 events is refused here,
    so reading never allocates more than a small multiple of the file's real
    size.

    Returns
    -------
    dict
        The TEXT keywords (lower case, no leading ``$``).

    Raises
    ------
    FcsError

    Examples
    --------
    >>> check_header("sample_fcs/S01_screening_TBNK.fcs")["par"]
    '10'
    """
    return _read_layout(path, max_events).keywords


def _data_segment(layout):
    """(start, end) of DATA as flowio will read it: the HEADER's for FCS 2.0, else the TEXT's."""
    keywords = layout.keywords
    if layout.version != b"FCS2.0":
        try:
            return int(keywords["begindata"].strip()), int(keywords["enddata"].strip())
        except (KeyError, ValueError):
            pass
    return layout.offsets[2], layout.offsets[3]


def _rebuilt(layout, changes, data):
    """FCS bytes: the file's TEXT with ``changes`` (lower-case key → value) applied, then ``data``.

    Analysis and supplemental TEXT are dropped (their offsets set to 0); the
    DATA offsets are written in TEXT and, where they fit, in the HEADER.
    """
    d = layout.delimiter
    wanted = dict(changes, beginanalysis="0", endanalysis="0", beginstext="0", endstext="0")
    pairs, seen = [], set()
    for key, value in layout.pairs:
        name = _keyword_key(key)
        if name in seen:
            continue  # a repeated keyword (same value) is written once
        seen.add(name)
        pairs.append((key, wanted.get(name, value)))
    for name, value in wanted.items():
        if name not in seen:
            pairs.append((f"${name.upper()}", value))
    begin = 58
    for _ in range(4):  # the offsets' own digits change the TEXT length
        end = begin + max(len(data), 1) - 1
        rendered = [(k, {"begindata": str(begin), "enddata": str(end)}.get(_keyword_key(k), v)) for k, v in pairs]
        text = (d + d.join(f"{k.replace(d, d + d)}{d}{v.replace(d, d + d)}" for k, v in rendered) + d)
        text = text.encode("latin-1")
        if 58 + len(text) == begin:
            break
        begin = 58 + len(text)
    fits = end <= _HEADER_OFFSET_LIMIT
    offsets = (58, 58 + len(text) - 1, begin if fits else 0, end if fits else 0, 0, 0)
    header = layout.version.ljust(10) + b"".join(str(v).rjust(8).encode() for v in offsets)
    return header + text + data


def _widened_to_32_bits(path, layout):
    """The file rewritten with every integer channel 32 bits wide, little-endian (for 24-bit data).

    Values are unchanged: each w-byte field becomes the same unsigned number
    in 4 bytes; flowio then masks, log-scales and gain-scales them as usual.
    """
    keywords = layout.keywords
    widths = [int(keywords[f"p{i}b"].strip()) // 8 for i in range(1, layout.parameters + 1)]
    record = sum(widths)
    start, end = _data_segment(layout)
    with open(path, "rb") as fh:
        fh.seek(start)
        raw = fh.read(max(end - start + 1, 0))
    if len(raw) % record:
        raise FcsError(path, f"DATA segment of {len(raw)} bytes is not a whole number of {record}-byte events")
    block = np.frombuffer(raw, dtype=np.uint8).reshape(-1, record)
    big_endian = keywords["byteord"].strip().replace(" ", "") in ("4,3,2,1", "2,1")
    out = np.zeros((block.shape[0], len(widths)), dtype="<u4")
    offset = 0
    for column, width in enumerate(widths):
        order = range(width) if big_endian else range(width - 1, -1, -1)
        for byte in order:  # most significant byte first
            out[:, column] = (out[:, column] << np.uint32(8)) | block[:, offset + byte]
        offset += width
    changes = {f"p{i}b": "32" for i in range(1, layout.parameters + 1)}
    changes.update(byteord="1,2,3,4", datatype="I")
    return _rebuilt(layout, changes, out.tobytes())


def _with_header_data_offsets(path, layout):
    """The file's bytes with blank HEADER DATA offsets filled in from ``$BEGINDATA``/``$ENDDATA``."""
    start, end = _data_segment(layout)
    raw = bytearray(path.read_bytes())
    fits = 0 < start <= end <= _HEADER_OFFSET_LIMIT
    raw[26:42] = b"".join(str(v if fits else 0).rjust(8).encode() for v in (start, end))
    return bytes(raw)


def _flowio_source(path, layout):
    """What flowkit is given to read: the path, or a normalised copy in memory, and a note saying why.

    Two layouts other readers accept but flowio does not: integer data of 24
    bits, and HEADER DATA offsets left blank (spaces) where the TEXT gives
    ``$BEGINDATA``/``$ENDDATA``. Each is rewritten byte for byte into a form
    flowio reads, so flowio still decodes and scales every value.
    """
    keywords = layout.keywords
    datatype = keywords.get("datatype", "").strip().upper()
    if datatype == "I" and any(keywords[f"p{i}b"].strip() == "24" for i in range(1, layout.parameters + 1)):
        return _widened_to_32_bits(path, layout), "file: 24-bit integer data, widened to 32 bits for reading"
    # flowio compares these two verbatim: "4, 3, 2, 1" would be read in the machine's own
    # byte order (wrong numbers, no error) and " F" not at all. Written as the reader checked them.
    canonical = {"byteord": keywords["byteord"].strip().replace(" ", ""), "datatype": datatype}
    changes = {k: v for k, v in canonical.items() if keywords[k] != v}
    if changes:
        start, end = _data_segment(layout)
        with open(path, "rb") as fh:
            fh.seek(start)
            data = fh.read(max(end - start + 1, 0))
        return (_rebuilt(layout, changes, data),
                f"file: {', '.join(f'${k.upper()} {keywords[k]!r}' for k in changes)} read as "
                f"{', '.join(repr(v) for v in changes.values())}")
    if layout.blank_data_offsets and layout.version != b"FCS2.0" and "begindata" in keywords:
        return (_with_header_data_offsets(path, layout),
                "file: HEADER DATA offsets are blank; read at the TEXT's $BEGINDATA/$ENDDATA")
    return None, None


def read_fcs(path, max_events=DEFAULT_MAX_EVENTS):
    """Load an FCS file (parsed by flowio, flowkit's reader) into an :class:`FcsSample`.

    Parameters
    ----------
    path : str or Path
    max_events : int
        Files claiming more events are refused before their DATA is read.

    Returns
    -------
    FcsSample

    Raises
    ------
    FcsError
        One-line reason, naming the file, for anything that prevents
        analysis: missing, empty, not FCS, truncated, no events, a layout
        that contradicts itself (``$PAR`` and ``$PnN``, a
        keyword given twice), a non-positive ``$PnG``.

    Notes
    -----
    Read, with a note in ``read_notes`` (an ``info`` flag on the result):
    24-bit integer data, blank HEADER DATA offsets, a HEADER/TEXT offset
    discrepancy, a data offset off by one byte, a ``$PnR`` that is no
    plausible top of scale (the default 262144 is used). ``$TOT`` is kept in
    ``declared_events``; a file whose DATA holds another number of events
    gets a ``fail`` flag on its result. A malformed or singular spillover
    keyword leaves the file uncompensated, with a ``fail`` flag.

    Examples
    --------
    >>> sample = read_fcs("sample_fcs/S01_screening_TBNK.fcs")
    >>> sample.pnn[:3], sample.n_events
    (['FSC-A', 'FSC-H', 'SSC-A'], 24123)
    """
    path = Path(path)
    if not path.exists():
        raise FcsError(path, "file not found")
    if path.is_dir():
        raise FcsError(path, "is a directory, not an FCS file")
    size = path.stat().st_size
    if size == 0:
        raise FcsError(path, "file is empty (0 bytes)")
    with open(path, "rb") as fh:
        magic = fh.read(6)
    if not magic.startswith(b"FCS"):
        raise FcsError(path, "not an FCS file (header does not start with 'FCS')")
    layout = _read_layout(path, max_events)
    normalised, note = _flowio_source(path, layout)
    notes = [note] if note else []

    def source():
        return str(path) if normalised is None else io.BytesIO(normalised)

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # flowio parses (what flowkit.Sample does first); the events are then
            # converted here, not by Sample (see event_matrix: float32, no float64 copy).
            try:
                flow = flowio.FlowData(source())
            except Exception as exc:
                if type(exc).__name__ == "DataOffsetDiscrepancyError":
                    # flowio then reads at the TEXT's offsets ($BEGINDATA/$ENDDATA).
                    flow = flowio.FlowData(source(), ignore_offset_discrepancy=True)
                    notes.append("file: HEADER and TEXT data offsets disagree; read with the TEXT's")
                elif "off by 1" in str(exc):
                    # Some instruments (e.g. Miltenyi FCS 3.1) write a data offset one byte
                    # off; flowio reads them when told to, and the result says so.
                    flow = flowio.FlowData(source(), ignore_offset_error=True)
                    notes.append("file: data offset off by 1 byte in the file (a known instrument quirk); "
                                 "read anyway, review the events")
                else:
                    raise
            events = event_matrix(flow)
            flow.events = None  # flowio's copy of the DATA segment: freed before the next stage
    except Exception as exc:  # flowio/flowkit raise many types; all mean "unreadable"
        raise FcsError(path, f"cannot be read as FCS: {_describe(exc)}") from exc
    if events.ndim != 2 or events.shape[0] == 0:
        raise FcsError(path, "contains no events")
    read_events = int(events.shape[0])
    finite = np.ones(events.shape[0], dtype=bool)
    for start in range(0, events.shape[0], EVENT_BLOCK):  # blocks: no n_events x n_channels temporary
        with np.errstate(invalid="ignore"):
            block = np.abs(events[start:start + EVENT_BLOCK])
            finite[start:start + EVENT_BLOCK] = (block <= MAX_EVENT_MAGNITUDE).all(axis=1)  # False for NaN too
    dropped = int((~finite).sum())
    if dropped:
        if dropped > 0.01 * events.shape[0]:
            raise FcsError(path, f"{dropped} of {events.shape[0]} events hold NaN or infinite values "
                                 f"(or beyond ±{MAX_EVENT_MAGNITUDE:g})")
        # A few corrupt events: dropped, and said so (FcsSample.dropped_events, a QC flag).
        events = events[finite]
    keywords = {str(k).lower().lstrip("$"): str(v) for k, v in flow.text.items()}
    pnn = [str(x) for x in flow.pnn_labels]
    duplicates = sorted({name for name in pnn if pnn.count(name) > 1})
    if duplicates:
        # Markers are found by $PnS, but a duplicated $PnN makes a channel ambiguous to name.
        notes.append(f"file: duplicate channel names {', '.join(duplicates)}; the first of each is used")
    pns = [("" if x is None else str(x).strip()) for x in flow.pns_labels]
    ranges = []
    for i in range(len(pnn)):
        try:
            ranges.append(float(keywords.get(f"p{i + 1}r", "nan")))
        except ValueError:
            ranges.append(float("nan"))
        top = ranges[-1]
        if np.isfinite(top) and top > MAX_CHANNEL_RANGE and not _is_time(pnn[i]):
            notes.append(f"file: $P{i + 1}R ({pnn[i]}) is {top:g}, no plausible top of scale; "
                         f"{DEFAULT_CHANNEL_TOP:g} used")
    try:
        spillover = find_spillover(keywords, pnn)
    except ValueError as exc:
        # The events are fine; the matrix is not. Say so, and let a supplied
        # --compensation matrix (or nothing: a flagged, qc_fail result) take over.
        spillover = None
        notes.append(f"compensation: the file's spillover keyword is unusable ({exc})")
    vol_nl = None
    if keywords.get("vol", "").strip():
        try:
            vol_nl = float(keywords["vol"])
        except ValueError:
            raise FcsError(path, f"$VOL is not a number: {keywords['vol']!r}") from None
    return FcsSample(
        path=path,
        sha256=file_sha256(path),
        fcs_version=str(flow.version),
        events=events,
        pnn=pnn,
        pns=pns,
        ranges=ranges,
        datatype=keywords.get("datatype", "?"),
        keywords=keywords,
        spillover=spillover,
        vol_nl=vol_nl,
        dropped_events=dropped,
        read_notes=notes,
        declared_events=layout.events,
        read_events=read_events,
    )


#: dtype of :attr:`FcsSample.events` and of the gated data: 4 bytes a value (float64 doubled a
#: 10-million-event tube's memory); a 24-bit significand keeps integer data to 2^24 exactly and
#: anything else to 6e-8 of its value, far finer than any detector resolves.
EVENT_DTYPE = np.float32

#: Events converted per step: the float64 arithmetic of a block stays small (2 MB at 16 channels).
EVENT_BLOCK = 1 << 14


def event_matrix(flow, dtype=EVENT_DTYPE):
    """The events of a parsed :class:`flowio.FlowData`, as an ``(n_events, n_channels)`` array of ``dtype``.

    The same values as ``flowio.FlowData.as_array()`` (and so as
    ``flowkit.Sample(...).get_events(source="raw")``): ``$TIMESTEP`` applied
    to the time channel, ``$PnE`` log decades and ``$PnG`` gains undone, each
    computed in float64 exactly as flowio does, then stored as ``dtype``.
    flowio's version holds the whole file in float64 (twice the float32
    data, beside flowio's own copy of the DATA segment); this one converts a
    block of :data:`EVENT_BLOCK` events at a time into the result.

    Parameters
    ----------
    flow : flowio.FlowData
        Parsed with its events (not ``only_text``).
    dtype : numpy dtype
        Of the result (default :data:`EVENT_DTYPE`, float32).

    Returns
    -------
    ndarray, shape (n_events, n_channels)

    Raises
    ------
    ValueError
        When the DATA segment does not hold whole events, or ``$TIMESTEP``
        is not a number.

    Examples
    --------
    >>> import flowio
    >>> flow = flowio.FlowData("sample_fcs/S01_screening_TBNK.fcs")
    >>> events = event_matrix(flow)
    >>> events.dtype, events.shape
    (dtype('float32'), (24123, 10))
    >>> bool((events == flow.as_array().astype(np.float32)).all())
    True
    """
    raw = flow.events
    if isinstance(raw, array.array):
        flat = np.frombuffer(raw, dtype=np.dtype(raw.typecode))  # a view: no copy of the DATA segment
    else:  # flowio's list for mixed integer widths
        flat = np.asarray(raw)
    matrix = np.reshape(flat, (-1, flow.channel_count))
    time_step = None
    if "timestep" in flow.text and flow.time_index is not None:
        try:
            time_step = float(flow.text["timestep"])
        except ValueError:
            if flow.text["timestep"].strip() != "":
                raise ValueError(f"$TIMESTEP is not a number: {flow.text['timestep']!r}") from None
            time_step = 1.0
    scaling = []
    for number, channel in flow.channels.items():
        decades, log0 = channel["pne"]
        scaling.append((int(number) - 1, decades, log0, channel["pnr"], channel["png"]))
    out = np.empty(matrix.shape, dtype=dtype)
    for start in range(0, matrix.shape[0], EVENT_BLOCK):
        block = matrix[start:start + EVENT_BLOCK].astype(np.float64)
        # flowio's own steps and order (FlowData.as_array), so the values match it to the last bit.
        if time_step is not None:
            block[:, flow.time_index] = block[:, flow.time_index] * time_step
        for index, decades, log0, top, gain in scaling:
            if decades > 0:
                block[:, index] = (10 ** (decades * block[:, index] / top)) * log0
            if gain != 1.0 and gain != 0:
                block[:, index] = block[:, index] / gain
        out[start:start + EVENT_BLOCK] = block
    return out


def _describe(exc):
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__
