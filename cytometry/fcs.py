"""Reading FCS files: events, channels, keywords, spillover and provenance.

Parsing is done by flowkit/flowio (the field's reference readers); this
module turns what they return into one small object, :class:`FcsSample`, and
turns every way a file can be unreadable into :class:`FcsError`, a one-line
message that names the file.
"""
from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

#: Channels that are never fluorescence (flowutils uses the same convention).
SCATTER_PREFIXES = ("FSC", "SSC", "FS ", "SS ")


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
    events : ndarray, shape (n_events, n_channels)
        Raw, uncompensated, linear values (``$PnG``/``$PnE`` applied by flowkit).
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

    @property
    def n_events(self):
        return self.events.shape[0]

    def channel_index(self, pnn_name):
        """Column of the channel whose ``$PnN`` is ``pnn_name``."""
        return self.pnn.index(pnn_name)


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
        fluorescence = [name for name in pnn if not _is_scatter_or_time(name)]
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


def _is_scatter_or_time(name):
    upper = name.upper()
    return upper.startswith(SCATTER_PREFIXES) or upper == "TIME" or upper.startswith("TIME")


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


def read_fcs(path):
    """Load an FCS file with flowkit into an :class:`FcsSample`.

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
    >>> sample = read_fcs("sample_fcs/S01_screening_TBNK.fcs")  # doctest: +SKIP
    >>> sample.pnn[:3], sample.n_events  # doctest: +SKIP
    (['FSC-A', 'FSC-H', 'SSC-A'], 27012)
    """
    import flowkit as fk

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
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            flow = fk.Sample(str(path), subsample=0)
            events = np.asarray(flow.get_events(source="raw"), dtype=np.float64)
    except Exception as exc:  # flowio/flowkit raise many types; all mean "unreadable"
        raise FcsError(path, f"cannot be read as FCS: {_describe(exc)}") from exc
    if events.ndim != 2 or events.shape[0] == 0:
        raise FcsError(path, "contains no events")
    keywords = {str(k).lower().lstrip("$"): str(v) for k, v in flow.metadata.items()}
    pnn = [str(x) for x in flow.pnn_labels]
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
        raise FcsError(path, str(exc)) from exc
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
    )


def _describe(exc):
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__
