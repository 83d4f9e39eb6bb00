"""Gate geometry: the exact shapes the automatic gating applies.

Every population mask is computed by evaluating these gates, and the same
gates are what :mod:`gating.gatingml` exports, so a reviewer who re-applies
the exported GatingML to the file gets the reported event counts.

Coordinates live in the transformed space the gating works in:

* ``logicle`` — fluorescence, GatingML logicle with T = ``$PnR``, W = 0.5,
  M = 4.5, A = 0 (0–1 scale);
* ``linear`` — scatter divided by its range (GatingML ``flin`` with T = range, A = 0);
* ``log`` — scatter as log10(value / range) + 1 (GatingML ``flog`` with
  T = range, M = 1).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

TRANSFORMS = ("logicle", "linear", "log")


@dataclass
class Dimension:
    """One axis of a gate: a channel (marker or scatter name), its transform, and bounds.

    ``minimum`` is inclusive and ``maximum`` exclusive, as in GatingML;
    ``None`` means unbounded.
    """

    channel: str
    transform: str
    minimum: float | None = None
    maximum: float | None = None

    def as_dict(self):
        return {"channel": self.channel, "transform": self.transform,
                "min": None if self.minimum is None else round(float(self.minimum), 9),
                "max": None if self.maximum is None else round(float(self.maximum), 9)}


@dataclass
class Gate:
    """One gate: its shape, its parent, and how it was found.

    Attributes
    ----------
    name : str
        Unique; population gates carry the stable population names.
    parent : str or None
        Name of the parent gate (``None`` for the root).
    shape : str
        ``"rectangle"`` (all ``dimensions`` bounds), ``"polygon"`` (two
        ``dimensions`` and ``vertices``) or ``"not"`` (events of the parent
        outside gate ``complement_of``).
    dimensions : list of Dimension
    vertices : list of (x, y), for polygons
    complement_of : str or None
    method : str
        How the geometry was found, for a reviewer.
    extra : dict
        Numbers behind the method (valley depth, reference centre and SD…).
    """

    name: str
    parent: str | None
    shape: str
    dimensions: list = field(default_factory=list)
    vertices: list = field(default_factory=list)
    complement_of: str | None = None
    method: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def threshold(self):
        """The single bound of a one-dimensional rectangle gate (``None`` otherwise)."""
        if self.shape == "rectangle" and len(self.dimensions) == 1:
            d = self.dimensions[0]
            return d.minimum if d.minimum is not None else d.maximum
        return None

    def as_dict(self):
        return {"name": self.name, "parent": self.parent, "shape": self.shape,
                "dimensions": [d.as_dict() for d in self.dimensions],
                "vertices": [[round(float(x), 9), round(float(y), 9)] for x, y in self.vertices],
                "complement_of": self.complement_of, "method": self.method,
                "threshold": None if self.threshold is None else round(float(self.threshold), 9),
                "extra": _plain(self.extra)}


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return round(float(value), 9)
    if isinstance(value, np.integer):
        return int(value)
    return value


#: Events per block where a gate is evaluated block by block (its temporaries stay small on a large tube).
BLOCK_EVENTS = 1 << 16


def axis_values(data, channels, dimension):
    """The values of ``dimension`` for every event (applying the ``log`` transform).

    ``log`` is log10(x) + 1 for x > 0 and −inf elsewhere, in the data's
    dtype, written into one new array (no full-length temporaries beside it).
    """
    values = data[:, channels[dimension.channel]]
    if dimension.transform == "log":
        positive = values > 0
        out = np.where(positive, values, 1.0)  # the one new array: log10 and + 1 in place, as before
        with np.errstate(divide="ignore", invalid="ignore"):
            np.log10(out, out=out)
        out += 1.0
        out[~positive] = -np.inf
        return out
    return values


def points_in_polygon(x, y, vertices):
    """Even–odd point-in-polygon test (vectorised over points)."""
    vertices = np.asarray(vertices, dtype=np.float64)
    result = np.zeros(x.shape, dtype=bool)
    # Only points inside the bounding box can be inside (most events are not).
    box = ((x >= vertices[:, 0].min()) & (x <= vertices[:, 0].max()) &
           (y >= vertices[:, 1].min()) & (y <= vertices[:, 1].max()))
    candidates = np.flatnonzero(box)
    x, y = x[candidates], y[candidates]
    inside = np.zeros(x.shape, dtype=bool)
    x0, y0 = vertices[-1]
    for x1, y1 in vertices:
        crosses = (y1 > y) != (y0 > y)
        with np.errstate(divide="ignore", invalid="ignore"):
            at_x = (x0 - x1) * (y - y1) / (y0 - y1) + x1
        inside ^= crosses & (x < at_x)
        x0, y0 = x1, y1
    result[candidates] = inside
    return result


def gate_contains(gate, data, channels, masks):
    """Events of ``gate``'s parent that the gate's own shape contains."""
    parent = masks[gate.parent] if gate.parent is not None else np.ones(data.shape[0], dtype=bool)
    if gate.shape == "not":
        return parent & ~masks[gate.complement_of]
    if gate.shape not in ("rectangle", "polygon"):
        raise ValueError(f"unknown gate shape {gate.shape!r}")
    inside = parent.copy()
    # A block of events at a time (each event's membership is its own): a
    # log axis or the polygon test never needs a full-length temporary.
    for start in range(0, data.shape[0], BLOCK_EVENTS):
        rows = slice(start, start + BLOCK_EVENTS)
        block, within = data[rows], inside[rows]
        if gate.shape == "rectangle":
            for dimension in gate.dimensions:
                values = axis_values(block, channels, dimension)
                if dimension.minimum is not None:
                    within &= values >= dimension.minimum
                if dimension.maximum is not None:
                    within &= values < dimension.maximum
        else:
            x = axis_values(block, channels, gate.dimensions[0])
            y = axis_values(block, channels, gate.dimensions[1])
            within[within] = points_in_polygon(x[within], y[within], gate.vertices)
    return inside
