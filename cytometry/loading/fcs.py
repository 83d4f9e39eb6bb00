"""Reading FCS files: events, channels, keywords, spillover and provenance.

Parsing is done by flowkit/flowio (the field's reference readers); this
module turns what they return into one small object, :class:`FcsSample`, and
turns every way a file can be unreadable into :class:`FcsError`, a one-line
message that names the file.
"""
from __future__ import annotations

import array
import hashlib
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
        """Top of a channel's scale: its ``$PnR``, or 262144 (18 bits) when the file gives none.

        Examples
        --------
        >>> sample = read_fcs("sample_fcs/S01_screening_TBNK.fcs")
        >>> sample.channel_top(sample.channel_index("FSC-A"))
        262144.0
        """
        top = self.ranges[index]
        return float(top) if np.isfinite(top) and top > 1 else 262144.0


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
    if not np.all(np.isfinite(matrix)):
        raise ValueError(f"{source} holds a non-finite value")
    return Spillover(detectors=list(detectors), matrix=matrix, source=source)




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

#: Files claiming more events than this are refused before anything is read (configurable).
DEFAULT_MAX_EVENTS = 50_000_000
_MAX_TEXT_BYTES = 16 << 20


def _text_keywords(text):
    """Keywords of an FCS TEXT segment (delimiter = first byte; doubled delimiters escape it)."""
    if not text:
        return {}
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
    return {fields[k].strip().lstrip("$").lower(): fields[k + 1] for k in range(0, len(fields) - 1, 2)}


def check_header(path, max_events=DEFAULT_MAX_EVENTS):
    """Refuse, before anything large is read, a file whose own numbers cannot be right.

    Reads only the 58-byte HEADER and the TEXT segment (at most 16 MiB) and
    checks that the segments lie inside the file, that ``$TOT``/``$PAR`` are
    numbers within limits, and that the DATA segment they imply fits in the
    file. A crafted file claiming 10^12 events is refused here, so reading
    never allocates more than a small multiple of the file's real size.

    Raises
    ------
    FcsError
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        header = fh.read(58)
        if len(header) < 58:
            raise FcsError(path, f"truncated: {size} bytes, shorter than an FCS header")
        try:
            text_start, text_end, data_start, data_end = (int(header[10 + 8 * k:18 + 8 * k].strip() or 0)
                                                          for k in range(4))
        except ValueError:
            raise FcsError(path, "HEADER offsets are not numbers") from None
        if not (0 < text_start <= text_end < size):
            raise FcsError(path, f"HEADER places TEXT at bytes {text_start}-{text_end} of a {size}-byte file")
        if text_end - text_start + 1 > _MAX_TEXT_BYTES:
            raise FcsError(path, f"TEXT segment of {text_end - text_start + 1} bytes is implausibly large")
        fh.seek(text_start)
        text = fh.read(text_end - text_start + 1).decode("latin-1")
    keywords = _text_keywords(text)
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
    byte_order = keywords.get("byteord", "").strip().replace(" ", "")
    if byte_order not in SUPPORTED_BYTE_ORDERS:
        # flowio would silently fall back to the machine's own order: wrong numbers, no error.
        raise FcsError(path, f"unsupported $BYTEORD {byte_order!r} (readable: {', '.join(SUPPORTED_BYTE_ORDERS)})")
    datatype = keywords.get("datatype", "").strip().upper()
    if datatype in ("F", "D"):
        bits = parameters * (32 if datatype == "F" else 64)
    else:
        try:
            bits = sum(int(keywords.get(f"p{i}b", "0").strip()) for i in range(1, parameters + 1))
        except ValueError:
            raise FcsError(path, "a $PnB keyword is not a number") from None
    needed = events * bits // 8
    try:  # ("¹518".isdigit() is True, yet int() refuses it: parse, don't test)
        begin = int(keywords.get("begindata", "0").strip() or 0)
    except ValueError:
        begin = 0
    start = data_start or begin
    if needed > size - max(start, 0):
        raise FcsError(path, f"truncated or inconsistent: $TOT={events} x $PAR={parameters} needs {needed} bytes "
                             f"of DATA but the file has {max(size - start, 0)} after byte {start}")
    return keywords


def read_fcs(path, max_events=DEFAULT_MAX_EVENTS):
    """Load an FCS file (parsed by flowio, flowkit's reader) into an :class:`FcsSample`.

    Parameters
    ----------
    path : str or Path

    Returns
    -------
    FcsSample

    Raises
    ------
    FcsError
        One-line reason, naming the file, for anything that prevents
        analysis: missing, empty, not FCS, truncated, no events, a malformed
        spillover keyword.

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
    check_header(path, max_events)
    notes = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # flowio parses (what flowkit.Sample does first); the events are then
            # converted here, not by Sample (see event_matrix: float32, no float64 copy).
            try:
                flow = flowio.FlowData(str(path))
            except Exception as exc:
                if type(exc).__name__ == "DataOffsetDiscrepancyError":
                    flow = flowio.FlowData(str(path), ignore_offset_discrepancy=True)
                    notes.append("file: HEADER and TEXT data offsets disagree; read with the HEADER's")
                elif "off by 1" in str(exc):
                    # Some instruments (e.g. Miltenyi FCS 3.1) write a data offset one byte
                    # off; flowio reads them when told to, and the result says so.
                    flow = flowio.FlowData(str(path), ignore_offset_error=True)
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
    finite = np.ones(events.shape[0], dtype=bool)
    for start in range(0, events.shape[0], EVENT_BLOCK):  # blocks: no n_events x n_channels temporary
        finite[start:start + EVENT_BLOCK] = np.isfinite(events[start:start + EVENT_BLOCK]).all(axis=1)
    dropped = int((~finite).sum())
    if dropped:
        if dropped > 0.01 * events.shape[0]:
            raise FcsError(path, f"{dropped} of {events.shape[0]} events hold NaN or infinite values")
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
