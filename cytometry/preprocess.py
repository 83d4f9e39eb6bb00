"""Compensation and display transforms.

Compensation is one matrix product and the logicle a table lookup
(:mod:`gpu.logicle`); flowkit/flowutils, the field's reference
implementations, are what the tests compare both against. This module
chooses the matrix and the parameters and records them.
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from cytometry.loading.fcs import EVENT_BLOCK, Spillover, check_spillover_matrix
from gpu.logicle import logicle as fast_logicle

#: Logicle parameters used for every fluorescence channel (GatingML names).
#: ``T`` defaults to the channel's ``$PnR``; W, M, A are the usual defaults
#: for 18-bit instruments, wide enough that compensated negatives are shown.
LOGICLE_DEFAULTS = {"w": 0.5, "m": 4.5, "a": 0.0}


def read_compensation_csv(path, pnn):
    """Read a spillover matrix from a CSV file.

    The first row names the detectors (``$PnN``); each following row holds
    one detector's spillover into the others, in the same order. A leading
    column of row names is allowed and ignored.

    Parameters
    ----------
    path : str or Path
    pnn : list of str
        The file's ``$PnN`` names, to check the detectors exist.

    Returns
    -------
    Spillover

    Raises
    ------
    ValueError
        With a one-line reason when the file is malformed.

    Examples
    --------
    >>> import tempfile, os
    >>> with tempfile.NamedTemporaryFile("w", suffix=".csv", delete=False) as fh:
    ...     _ = fh.write("FL1-A,FL2-A\\n1,0.2\\n0.01,1\\n")
    >>> float(read_compensation_csv(fh.name, ["FL1-A", "FL2-A"]).matrix[0, 1])
    0.2
    >>> os.unlink(fh.name)
    """
    path = Path(path)
    with open(path, newline="") as fh:
        rows = [r for r in csv.reader(fh) if any(c.strip() for c in r)]
    if len(rows) < 2:
        raise ValueError(f"compensation file {path} has no matrix rows")
    header = [c.strip() for c in rows[0]]
    if header and header[0] == "":
        header = header[1:]
    n = len(header)
    values = []
    for row in rows[1:]:
        cells = [c.strip() for c in row]
        if len(cells) == n + 1:  # a leading row name
            cells = cells[1:]
        if len(cells) != n:
            raise ValueError(f"compensation file {path}: a row has {len(cells)} values, expected {n}")
        try:
            values.append([float(c) for c in cells])
        except ValueError:
            raise ValueError(f"compensation file {path}: a value is not a number") from None
    if len(values) != n:
        raise ValueError(f"compensation file {path}: {len(values)} rows for {n} detectors")
    missing = [d for d in header if d not in pnn]
    if missing:
        raise ValueError(f"compensation file {path} names detector(s) {', '.join(missing)} "
                         f"not in the FCS file (channels: {', '.join(pnn)})")
    check_spillover_matrix(header, np.array(values), f"compensation file {path}")
    return Spillover(detectors=header, matrix=np.array(values), source=str(path))


def compensate(events, pnn, spillover, *, out=None):
    """Compensated copy of ``events``: raw × inverse(spillover) on the listed detectors.

    flowkit/flowutils compute the same (the tests compare them on a real file).
    Computed in float64 a block of events at a time and stored in the
    result's dtype (that of ``events``, or of ``out``), so a float32 tube
    never has a float64 copy.

    Parameters
    ----------
    events : ndarray, shape (n_events, n_channels)
        Raw events in the file's channel order.
    pnn : list of str
        ``$PnN`` of the columns of ``events``.
    spillover : Spillover
    out : ndarray, optional
        Where to write the result (may be ``events`` itself: compensation in
        place); by default a new array like ``events``.

    Returns
    -------
    ndarray
        Same shape; columns not in the spillover matrix are unchanged.

    Examples
    --------
    >>> from cytometry.loading.fcs import Spillover
    >>> s = Spillover(["A", "B"], np.array([[1.0, 0.5], [0.0, 1.0]]), "test")
    >>> compensate(np.array([[100.0, 50.0]]), ["A", "B"], s)
    array([[100.,   0.]])
    """
    indices = [pnn.index(name) for name in spillover.detectors]
    # Singular means ill-conditioned (condition number), not a small determinant.
    check_spillover_matrix(spillover.detectors, spillover.matrix, f"spillover matrix from {spillover.source}")
    # raw = true @ S, so true = raw @ S⁻¹: one small matrix product per file
    # (flowutils solves per event block; both agree to rounding, tested).
    inverse = np.linalg.inv(spillover.matrix)
    if out is None:
        out = np.array(events, dtype=np.result_type(events.dtype, np.float32), copy=True)
    elif out is not events:
        out[...] = events
    for start in range(0, out.shape[0], EVENT_BLOCK):
        rows = slice(start, start + EVENT_BLOCK)
        with np.errstate(all="ignore"):  # overflow is reported below, as one line, not as a RuntimeWarning
            block = out[rows][:, indices].astype(np.float64) @ inverse
        if not np.isfinite(block).all():
            raise ValueError(f"compensation with the spillover matrix from {spillover.source} overflows: the events "
                             f"hold values up to {np.max(np.abs(out[rows][:, indices])):.3g}")
        with np.errstate(all="ignore"):  # beyond float32's range is the overflow said above, never silent inf
            out[rows, indices] = block
        if not np.isfinite(out[rows][:, indices]).all():
            raise ValueError(f"compensation with the spillover matrix from {spillover.source} overflows "
                             f"{out.dtype} (values beyond {np.finfo(out.dtype).max:.3g})")
    return out


def logicle(events, channel_indices, top, w=LOGICLE_DEFAULTS["w"], m=LOGICLE_DEFAULTS["m"],
            a=LOGICLE_DEFAULTS["a"], *, out=None):
    """Logicle-transform the given columns, others returned unchanged.

    ``out`` (which may be ``events`` itself) receives the result, by
    default a new array like ``events``; a block of events is transformed
    at a time, in float64, and stored in the result's dtype.

    The result is on the GatingML/flowutils 0–1 scale: 1 is the top of the
    range ``top`` and ``w`` decades are linear around zero, so compensated
    negatives keep their spread instead of piling up. Computed by the
    table-lookup kernel :func:`gpu.logicle.logicle` (about 20× faster than
    flowutils, which stays the reference it is tested against: agreement
    within 1e-7 on this scale).

    Examples
    --------
    >>> x = logicle(np.array([[0.0, 262144.0]]), [0, 1], top=262144)
    >>> bool(0.0 < x[0, 0] < 0.2), round(float(x[0, 1]), 6)
    (True, 1.0)
    """
    if out is None:
        out = np.array(events, dtype=np.result_type(events.dtype, np.float32), copy=True)
    elif out is not events:
        out[...] = events
    columns = list(channel_indices)
    if columns:
        for start in range(0, out.shape[0], EVENT_BLOCK):
            rows = slice(start, start + EVENT_BLOCK)
            out[rows, columns] = fast_logicle(out[rows][:, columns], t=top, w=w, m=m, a=a)
    return out
