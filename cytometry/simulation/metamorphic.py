"""FCS-level transformations for metamorphic tests of the whole pipeline.

A *metamorphic* test changes a file in a way whose effect on the answer is
known without knowing the answer: doubling a detector's gain (and the
spillover matrix with it) must not change any count; appending ``n`` gated
B cells must raise the B-cell count by ``n``; keeping a random half of the
events must halve every count; shuffling the events or the channels must
change nothing. Such properties hold for *any* tube, so they can be checked on
real instrument files that have no event-level truth.

Every function here works on an :class:`FcsTable` (raw, uncompensated events
plus the keywords that interpret them) and returns a new one; nothing is
modified in place. :func:`write_table` writes a table as a real FCS 3.1 file
(float32, via flowio) so that the transformed tube goes through the same
reader, compensation, transform and gating as any other file.

Examples
--------
Double the gain of the CD19 detector (APC-A) of a simulated tube, write it as
a new file and read it back:

>>> import tempfile
>>> from pathlib import Path
>>> from cytometry.simulation.simulate import simulate_tube, write_tube
>>> with tempfile.TemporaryDirectory() as folder:
...     original = write_tube(simulate_tube("tbnk", seed=1, blood_volume_ul=0.5), Path(folder) / "tube.fcs")
...     table = read_table(original)
...     path = write_table(scale_detector_gain(table, "APC-A", 2.0), Path(folder) / "tube_apc_x2.fcs")
...     brighter = read_table(path)
>>> column = table.channel_index("APC-A")
>>> bool(np.array_equal(brighter.events[:, column], 2.0 * table.events[:, column]))
True
"""
from __future__ import annotations

import io
import math
import re
from array import array
from dataclasses import dataclass, field, replace
from pathlib import Path

import flowio
import numpy as np

from cytometry.loading.fcs import Spillover, read_fcs

#: TEXT keywords that describe the DATA segment's layout: flowio writes its own.
_LAYOUT_KEYWORDS = frozenset({
    "beginanalysis", "endanalysis", "beginstext", "endstext", "begindata", "enddata",
    "byteord", "datatype", "mode", "nextdata", "par", "tot",
})
#: Keywords that may hold the spillover matrix (written again from ``FcsTable.spillover``).
_SPILL_KEYWORDS = frozenset({"spillover", "spill", "comp"})
#: Applied to the Time channel by the reader; kept in ``FcsTable.timestep``
#: and undone on writing, so that a round trip gives back the same values.
_APPLIED_KEYWORDS = frozenset({"timestep"})
#: ``$Pn?`` keywords written from the table's own fields (or fixed by float data).
_OWN_CHANNEL_SUFFIXES = frozenset({"b", "e", "g", "n", "r", "s"})
_CHANNEL_KEYWORD = re.compile(r"^p(\d+)([a-z].*)$")


@dataclass
class FcsTable:
    """Raw events of one tube and what is needed to write them back as FCS.

    Attributes
    ----------
    events : ndarray, shape (n_events, n_channels)
        Raw, uncompensated, linear values (``$PnG`` already applied), float64.
    pnn, pns : list of str
        ``$PnN`` and ``$PnS`` per channel (``""`` when a channel has no marker).
    ranges : list of float
        ``$PnR`` per channel; kept through every transformation because the
        logicle transform's top of scale is read from it.
    spillover : cytometry.loading.fcs.Spillover or None
        The spillover matrix, over named detectors.
    spill_keyword : str
        Keyword the matrix is written under (``"$SPILLOVER"`` or ``"SPILL"``).
    keywords : dict
        Other TEXT keywords (lower case, no ``$``; flowio restores the ``$`` of
        standard keywords). Channel keywords (``p3v``...) are kept here by
        channel *name* in ``channel_keywords`` instead, so that they follow
        their channel when channels are permuted.
    channel_keywords : dict
        ``$PnN`` name → {suffix: value} for channel keywords other than
        B, E, G, N, R, S (for example the detector voltage ``V``).
    timestep : str or None
        ``$TIMESTEP``: the reader multiplies the Time channel by it, so the
        writer divides it back out and writes the keyword again.
    """

    events: np.ndarray
    pnn: list
    pns: list
    ranges: list
    spillover: Spillover | None = None
    spill_keyword: str = "$SPILLOVER"
    keywords: dict = field(default_factory=dict)
    channel_keywords: dict = field(default_factory=dict)
    timestep: str | None = None

    @property
    def n_events(self) -> int:
        """Number of events."""
        return int(self.events.shape[0])

    def channel_index(self, name: str) -> int:
        """Column of the channel whose ``$PnN`` is ``name``."""
        return self.pnn.index(name)


def read_table(path) -> FcsTable:
    """Read an FCS file into an :class:`FcsTable` with the project's reader.

    Parameters
    ----------
    path : str or Path

    Returns
    -------
    FcsTable

    Raises
    ------
    cytometry.loading.fcs.FcsError
        When the file cannot be read.

    Examples
    --------
    >>> import tempfile
    >>> from pathlib import Path
    >>> from cytometry.simulation.simulate import simulate_tube, write_tube
    >>> tube = simulate_tube("tbnk", seed=1, blood_volume_ul=0.2)
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     table = read_table(write_tube(tube, Path(folder) / "t.fcs"))
    >>> table.n_events == tube.n_events, table.pnn == tube.pnn
    (True, True)
    """
    sample = read_fcs(path)
    keywords, channel_keywords = {}, {}
    for key, value in sample.keywords.items():
        match = _CHANNEL_KEYWORD.match(key)
        if match:
            number, suffix = int(match.group(1)), match.group(2)
            if suffix not in _OWN_CHANNEL_SUFFIXES and 1 <= number <= len(sample.pnn):
                channel_keywords.setdefault(sample.pnn[number - 1], {})[suffix] = value
            continue
        if key in _LAYOUT_KEYWORDS or key in _SPILL_KEYWORDS or key in _APPLIED_KEYWORDS:
            continue
        keywords[key] = value
    spillover = sample.spillover
    # "$COMP" cannot be written by flowio under its own name; the reader
    # accepts the same matrix under "$SPILLOVER", so that is where it goes.
    spill_keyword = "SPILL" if spillover is not None and spillover.source == "SPILL" else "$SPILLOVER"
    return FcsTable(events=np.array(sample.events, dtype=np.float64), pnn=list(sample.pnn),
                    pns=list(sample.pns), ranges=list(sample.ranges), spillover=spillover,
                    spill_keyword=spill_keyword, keywords=keywords, channel_keywords=channel_keywords,
                    timestep=sample.keywords.get("timestep"))


def _valid_value(value) -> bool:
    """Whether flowio can write ``value`` (non-empty, not starting or ending with ``/``)."""
    return isinstance(value, str) and bool(value) and value[0] != "/" and value[-1] != "/"


def format_spillover(spillover: Spillover) -> str:
    """FCS 3.1 spillover text, ``n,name1,...,namen,v11,v12,...`` (row-major).

    Values are written with ``repr`` so that the matrix is read back exactly.

    Examples
    --------
    >>> format_spillover(Spillover(["A", "B"], np.array([[1.0, 0.25], [0.0, 1.0]]), "test"))
    '2,A,B,1.0,0.25,0.0,1.0'
    """
    matrix = np.asarray(spillover.matrix, dtype=np.float64)
    values = ",".join(repr(float(v)) for v in matrix.ravel())
    return f"{len(spillover.detectors)}," + ",".join(spillover.detectors) + "," + values


def encode_table(table: FcsTable) -> bytes:
    """FCS 3.1 bytes of a table: float32 list-mode data written by flowio.

    ``$PnR`` and ``$PnS`` are kept, ``$PnG`` is 1 (the events are already
    gain-scaled), ``$TIMESTEP`` is written back (the Time channel divided
    by it), the spillover is written under ``table.spill_keyword`` and
    every other keyword flowio can write is carried over. Keywords whose
    value is empty or starts or ends with ``/`` are dropped (FCS cannot tell
    such a value from an escaped delimiter).

    Parameters
    ----------
    table : FcsTable

    Returns
    -------
    bytes
    """

    if len(table.pnn) != table.events.shape[1]:
        raise ValueError(f"{len(table.pnn)} channel names for {table.events.shape[1]} columns")
    metadata = {key: value for key, value in table.keywords.items() if _valid_value(value)}
    for number, name in enumerate(table.pnn, start=1):
        top = table.ranges[number - 1]
        if np.isfinite(top) and top > 0:
            metadata[f"p{number}r"] = repr(float(top)) if top != int(top) else str(int(top))
        for suffix, value in table.channel_keywords.get(name, {}).items():
            if _valid_value(value):
                metadata[f"p{number}{suffix}"] = value
    if table.spillover is not None:
        metadata[table.spill_keyword] = format_spillover(table.spillover)
    events = table.events
    time_columns = [i for i, name in enumerate(table.pnn) if name.strip().lower() == "time"]
    if table.timestep is not None and _valid_value(table.timestep) and time_columns:
        try:
            step = float(table.timestep)
        except ValueError:
            step = 0.0
        if step > 0:
            # flowkit multiplies the Time channel by $TIMESTEP on reading; store the
            # values it was read from (float64 division, then the file's float32).
            events = np.array(events, dtype=np.float64, copy=True)
            events[:, time_columns[0]] /= step
            metadata["timestep"] = table.timestep
    flat = array("f", np.ascontiguousarray(events, dtype="<f4").tobytes())
    buffer = io.BytesIO()
    flowio.create_fcs(buffer, flat, list(table.pnn), opt_channel_names=list(table.pns),
                      metadata_dict=metadata)
    return buffer.getvalue()


def write_table(table: FcsTable, path) -> Path:
    """Write a table as an FCS 3.1 file (see :func:`encode_table`).

    Parameters
    ----------
    table : FcsTable
    path : str or Path
        Parent folders are created.

    Returns
    -------
    Path

    Examples
    --------
    >>> import tempfile
    >>> from pathlib import Path
    >>> table = FcsTable(events=np.array([[1.0, 2.0], [3.0, 4.0]]), pnn=["FSC-A", "SSC-A"],
    ...                  pns=["", ""], ranges=[262144.0, 262144.0])
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     read_table(write_table(table, Path(folder) / "two.fcs")).events.tolist()
    [[1.0, 2.0], [3.0, 4.0]]
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_table(table))
    return path


def scale_detector_gain(table: FcsTable, detector: str, gain: float) -> FcsTable:
    """The tube as acquired with detector ``detector``'s gain multiplied by ``gain``.

    Raw values of the detector are multiplied by ``gain``. Light spilling
    *into* that detector is amplified too, so the spillover matrix becomes
    ``S' = D⁻¹ S D`` with ``D = diag(1, ..., gain, ..., 1)``: with
    ``raw' = raw D`` the compensated events ``raw' S'⁻¹ = raw S⁻¹ D`` are the
    original compensated events with that one channel scaled by ``gain``
    (the other channels are unchanged), which is what re-acquiring the same
    cells at a different detector voltage does. ``$PnR`` is kept: a
    detector's range does not change with its voltage.

    Parameters
    ----------
    table : FcsTable
    detector : str
        ``$PnN`` of the channel.
    gain : float
        Positive multiplier (powers of two keep float32 values exact).

    Returns
    -------
    FcsTable

    Examples
    --------
    >>> s = Spillover(["A", "B"], np.array([[1.0, 0.2], [0.1, 1.0]]), "SPILL")
    >>> t = FcsTable(events=np.array([[100.0, 30.0]]), pnn=["A", "B"], pns=["", ""],
    ...              ranges=[262144.0] * 2, spillover=s)
    >>> doubled = scale_detector_gain(t, "B", 2.0)
    >>> from cytometry.preprocess import compensate
    >>> compensate(doubled.events, doubled.pnn, doubled.spillover) / compensate(t.events, t.pnn, s)
    array([[1., 2.]])
    """
    if not gain > 0:
        raise ValueError(f"gain must be positive, got {gain!r}")
    column = table.channel_index(detector)
    events = np.array(table.events, dtype=np.float64, copy=True)
    events[:, column] *= gain
    spillover = table.spillover
    if spillover is not None and detector in spillover.detectors:
        d = np.ones(len(spillover.detectors))
        d[spillover.detectors.index(detector)] = gain
        # (D⁻¹ S D)_ik = S_ik · d_k / d_i
        matrix = np.asarray(spillover.matrix, dtype=np.float64) * d[None, :] / d[:, None]
        spillover = replace(spillover, matrix=matrix)
    return replace(table, events=events, spillover=spillover)


def select_events(table: FcsTable, index) -> FcsTable:
    """The tube restricted to some events, in the order given.

    Parameters
    ----------
    table : FcsTable
    index : array_like of int or bool
        Row indices (in the order wanted) or a boolean mask over events.
        ``$VOL`` and other keywords are kept as they are.

    Returns
    -------
    FcsTable

    Examples
    --------
    >>> t = FcsTable(events=np.arange(6.0).reshape(3, 2), pnn=["A", "B"], pns=["", ""], ranges=[1024.0] * 2)
    >>> select_events(t, [2, 0]).events.tolist()
    [[4.0, 5.0], [0.0, 1.0]]
    """
    index = np.asarray(index)
    if index.dtype == bool and index.shape != (table.n_events,):
        raise ValueError(f"mask of {index.shape} for {table.n_events} events")
    return replace(table, events=np.array(table.events[index], dtype=np.float64))


def append_events(table: FcsTable, extra_events) -> FcsTable:
    """The tube with ``extra_events`` (raw, same channels and order) appended.

    Use it to spike a population gated in another tube acquired with the same
    channels, gains and spillover (or in a disjoint part of the same tube).

    Parameters
    ----------
    table : FcsTable
    extra_events : array_like, shape (n_extra, n_channels)
        Raw events in ``table``'s channel order.

    Returns
    -------
    FcsTable
        ``table``'s events followed by ``extra_events``.

    Examples
    --------
    >>> t = FcsTable(events=np.zeros((2, 2)), pnn=["A", "B"], pns=["", ""], ranges=[1024.0] * 2)
    >>> append_events(t, np.ones((3, 2))).n_events
    5
    """
    extra = np.asarray(extra_events, dtype=np.float64)
    if extra.ndim != 2 or extra.shape[1] != table.events.shape[1]:
        raise ValueError(f"extra events of shape {extra.shape} for {table.events.shape[1]} channels")
    return replace(table, events=np.concatenate([table.events, extra], axis=0))


def shuffle_events(table: FcsTable, seed: int = 0):
    """The tube with its events in a random order.

    Parameters
    ----------
    table : FcsTable
    seed : int
        Seed of ``numpy.random.default_rng``.

    Returns
    -------
    shuffled : FcsTable
    order : ndarray of int
        ``shuffled.events[i] == table.events[order[i]]``; a mask ``m`` gated on
        the shuffled file corresponds to ``m[np.argsort(order)]`` on the original.

    Examples
    --------
    >>> t = FcsTable(events=np.arange(8.0).reshape(4, 2), pnn=["A", "B"], pns=["", ""], ranges=[1024.0] * 2)
    >>> shuffled, order = shuffle_events(t, seed=1)
    >>> bool((shuffled.events[np.argsort(order)] == t.events).all())
    True
    """
    order = np.random.default_rng(seed).permutation(table.n_events)
    return select_events(table, order), order


def permute_channels(table: FcsTable, order, spill_order=None) -> FcsTable:
    """The tube with its channels (columns) written in another order.

    ``$PnN``, ``$PnS``, ``$PnR`` and the channel keywords move with their
    column; the spillover matrix is over named detectors, so it stays right
    whatever the column order, and may itself be listed in another detector
    order (rows and columns permuted together).

    Parameters
    ----------
    table : FcsTable
    order : sequence of int
        New column ``i`` is old column ``order[i]``.
    spill_order : sequence of int, optional
        New spillover detector ``i`` is old detector ``spill_order[i]``.

    Returns
    -------
    FcsTable

    Examples
    --------
    >>> t = FcsTable(events=np.array([[1.0, 2.0, 3.0]]), pnn=["A", "B", "C"], pns=["x", "", "z"],
    ...              ranges=[1.0, 2.0, 3.0])
    >>> p = permute_channels(t, [2, 0, 1])
    >>> p.pnn, p.pns, p.events.tolist()
    (['C', 'A', 'B'], ['z', 'x', ''], [[3.0, 1.0, 2.0]])
    """
    order = [int(i) for i in order]
    if sorted(order) != list(range(len(table.pnn))):
        raise ValueError(f"{order} is not a permutation of {len(table.pnn)} channels")
    spillover = table.spillover
    if spillover is not None and spill_order is not None:
        spill_order = [int(i) for i in spill_order]
        if sorted(spill_order) != list(range(len(spillover.detectors))):
            raise ValueError(f"{spill_order} is not a permutation of {len(spillover.detectors)} detectors")
        matrix = np.asarray(spillover.matrix, dtype=np.float64)[np.ix_(spill_order, spill_order)]
        spillover = replace(spillover, detectors=[spillover.detectors[i] for i in spill_order], matrix=matrix)
    return replace(table, events=np.array(table.events[:, order], dtype=np.float64),
                   pnn=[table.pnn[i] for i in order], pns=[table.pns[i] for i in order],
                   ranges=[table.ranges[i] for i in order], spillover=spillover)


def split_events(n_events: int, seed: int = 0):
    """Two disjoint random halves of ``range(n_events)`` (sorted, sizes ⌊n/2⌋ and ⌈n/2⌉).

    Sorted so that each half keeps the acquisition order of its events.

    Parameters
    ----------
    n_events : int
    seed : int
        Seed of ``numpy.random.default_rng``.

    Returns
    -------
    first, second : ndarray of int
        Row indices of the two halves.

    Examples
    --------
    >>> first, second = split_events(5, seed=0)
    >>> len(first), len(second), sorted(np.concatenate([first, second]).tolist())
    (2, 3, [0, 1, 2, 3, 4])
    """
    order = np.random.default_rng(seed).permutation(n_events)
    half = n_events // 2
    return np.sort(order[:half]), np.sort(order[half:])


def dilute_population(table: FcsTable, population_mask, fraction: float, seed: int = 0,
                      keep_mask=None) -> FcsTable:
    """The tube mixed with a tube free of one population, at ``fraction`` of the original.

    Mixing the tube with a population-free tube of otherwise identical
    content keeps every other event's concentration and scales the
    population's by ``fraction``: the result keeps all events outside
    ``population_mask`` and a random ``fraction`` of those inside it (each
    kept independently, so the kept number is binomial). ``fraction = 0`` is
    the population-free tube itself.

    For a bead-counted tube, pass the bead events as ``keep_mask`` and all
    other events as ``population_mask``: the cells are diluted, the beads
    are not, so every cells/µL scales by ``fraction``.

    Parameters
    ----------
    table : FcsTable
    population_mask : array_like of bool
        Events of the population to dilute.
    fraction : float
        In [0, 1].
    seed : int
    keep_mask : array_like of bool, optional
        Events always kept (they win over ``population_mask``).

    Returns
    -------
    FcsTable
        Events in their original order.

    Examples
    --------
    >>> t = FcsTable(events=np.arange(20.0).reshape(10, 2), pnn=["A", "B"], pns=["", ""], ranges=[1024.0] * 2)
    >>> mask = np.arange(10) < 4
    >>> dilute_population(t, mask, 0.0).n_events
    6
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction!r}")
    population = np.asarray(population_mask, dtype=bool)
    if population.shape != (table.n_events,):
        raise ValueError(f"population mask of {population.shape} for {table.n_events} events")
    drawn = np.random.default_rng(seed).random(table.n_events) < fraction
    keep = ~population | drawn
    if keep_mask is not None:
        keep |= np.asarray(keep_mask, dtype=bool)
    return select_events(table, keep)


def count_tolerance(expected: float, total_events: float, sigmas: float = 3.0,
                    floor_events: float = 5.0) -> float:
    """Largest difference from ``expected`` that counts as noise, in events.

    ``max(floor_events, sigmas × sqrt(N p (1 − p)))`` with ``p = expected / N``:
    the binomial standard deviation of a count of ``expected`` events among
    ``N = total_events``, i.e. what re-drawing the tube would change the count
    by. A transformation that moves a count by less than that leaves the
    result inside its own counting noise. The floor keeps a few events of
    slack where the binomial SD vanishes (``p`` near 0 or 1).

    Parameters
    ----------
    expected : float
        Expected count (events).
    total_events : float
        Events in the tube the count is taken from.
    sigmas : float
    floor_events : float

    Returns
    -------
    float

    Examples
    --------
    >>> round(count_tolerance(764, 25678), 1)
    81.7
    >>> count_tolerance(0, 25678)
    5.0
    """
    if total_events <= 0:
        return float(floor_events)
    p = min(max(expected / total_events, 0.0), 1.0)
    return max(float(floor_events), sigmas * math.sqrt(total_events * p * (1.0 - p)))
