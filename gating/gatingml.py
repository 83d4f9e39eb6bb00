"""Export the automatic gates as GatingML 2.0, through flowkit.

The gates of :mod:`gating.geometry` are rebuilt as a flowkit
``GatingStrategy`` — the file's spillover matrix as the compensation, the
same logicle / linear / log transforms, rectangle, polygon and NOT gates in
the same hierarchy — and written with ``flowkit.export_gatingml``. A reviewer
can open the file in FlowKit, FlowJo or FCS Express; re-applying it to the
FCS file with flowkit reproduces the reported event counts (tested).
"""
from __future__ import annotations

import numpy as np

from .auto import GatingResult
from .geometry import Gate

#: GatingML cannot hold an infinite bound; a gate that admits nothing gets this.
_NOTHING = 1e12


def _transform_id(dimension, channel):
    name = channel["pnn"].replace(" ", "_")
    if dimension.transform == "logicle":
        return f"logicle_{name}"
    return f"{dimension.transform}_{name}"


def _flowkit_transform(dimension, channel, logicle):
    import flowkit as fk

    top = float(channel["range"])
    if dimension.transform == "logicle":
        return fk.transforms.LogicleTransform(param_t=top, param_w=logicle["w"], param_m=logicle["m"],
                                              param_a=logicle["a"])
    if dimension.transform == "linear":
        return fk.transforms.LinearTransform(param_t=top, param_a=0.0)
    if dimension.transform == "log":
        return fk.transforms.LogTransform(param_t=top, param_m=1.0)
    raise ValueError(f"no GatingML transform for {dimension.transform!r}")


def _bound(value):
    if value is None:
        return None
    value = float(value)
    if np.isinf(value):
        return _NOTHING if value > 0 else -_NOTHING
    return value


def to_flowkit_strategy(result: GatingResult, channels, spillover=None, logicle=None):
    """A flowkit ``GatingStrategy`` equivalent to ``result``'s gates.

    Parameters
    ----------
    result : GatingResult
    channels : dict
        Channel key (marker or scatter name, as in the gates) → ``{"pnn":
        $PnN, "range": $PnR}``.
    spillover : (list of str, ndarray) or None
        Detectors and spillover matrix the events were compensated with.
    logicle : dict, optional
        ``w``, ``m``, ``a`` of the logicle transform (T is each channel's range).

    Returns
    -------
    flowkit.GatingStrategy
    """
    import flowkit as fk

    logicle = logicle or {"w": 0.5, "m": 4.5, "a": 0.0}
    strategy = fk.GatingStrategy()
    compensated = set()
    if spillover is not None:
        detectors, matrix = spillover
        # GatingML needs a fluorochrome name per row; the detector names serve.
        strategy.add_comp_matrix("spill", fk.Matrix(np.asarray(matrix, dtype=float), list(detectors),
                                                    fluorochromes=list(detectors)))
        compensated = set(detectors)
    added_transforms = set()
    paths = {None: ("root",)}

    def dimension(d):
        channel = channels[d.channel]
        transform_id = _transform_id(d, channel)
        if transform_id not in added_transforms:
            strategy.add_transform(transform_id, _flowkit_transform(d, channel, logicle))
            added_transforms.add(transform_id)
        comp = "spill" if channel["pnn"] in compensated else "uncompensated"
        return fk.Dimension(channel["pnn"], compensation_ref=comp, transformation_ref=transform_id,
                            range_min=_bound(d.minimum), range_max=_bound(d.maximum))

    for gate in result.gates:
        path = paths[gate.parent]
        if gate.shape == "rectangle":
            if not gate.dimensions:
                raise ValueError(f"gate {gate.name} has no dimensions and cannot be exported")
            flowkit_gate = fk.gates.RectangleGate(gate.name, [dimension(d) for d in gate.dimensions])
        elif gate.shape == "polygon":
            flowkit_gate = fk.gates.PolygonGate(gate.name, [dimension(d) for d in gate.dimensions],
                                                [list(v) for v in gate.vertices])
        elif gate.shape == "not":
            flowkit_gate = fk.gates.BooleanGate(gate.name, "not", [
                {"ref": gate.complement_of, "path": paths[_parent_of(result, gate.complement_of)],
                 "complement": False}])
        else:
            raise ValueError(f"unknown gate shape {gate.shape!r}")
        strategy.add_gate(flowkit_gate, path)
        paths[gate.name] = path + (gate.name,)
    return strategy


def _parent_of(result, name):
    for gate in result.gates:
        if gate.name == name:
            return gate.parent
    raise KeyError(name)


def gate_paths(result: GatingResult):
    """Gate name → flowkit gate path: the names from ``"root"`` to its parent."""
    full = {None: ("root",)}
    for gate in result.gates:
        full[gate.name] = full[gate.parent] + (gate.name,)
    return {gate.name: full[gate.parent] for gate in result.gates}


def export_gatingml(result: GatingResult, channels, file_handle, spillover=None, logicle=None):
    """Write ``result``'s gates to ``file_handle`` as GatingML 2.0 (see :func:`to_flowkit_strategy`).

    Examples
    --------
    ``channels`` maps each marker or scatter name of the gates to its ``$PnN``
    and range (``cytometry.analysis.export_gating`` builds it, with the
    file's spillover, from a gated sample):

    >>> import io
    >>> from cytometry.analysis import gate_file
    >>> gated = gate_file("sample_fcs/S01_screening_TBNK.fcs")
    >>> names = {**gated.panel.markers, **gated.panel.scatter}
    >>> names["CD19"], names["SSC-A"]
    ('APC-A', 'SSC-A')
    >>> channels = {key: {"pnn": pnn, "range": 262144} for key, pnn in names.items()}
    >>> fh = io.BytesIO()                         # or open("S01.gating.xml", "wb")
    >>> export_gatingml(gated.gating, channels, fh, spillover=(gated.spillover.detectors, gated.spillover.matrix))
    GatingStrategy(17 gates, 10 transforms, 1 compensations)
    """
    import flowkit as fk

    strategy = to_flowkit_strategy(result, channels, spillover, logicle)
    fk.export_gatingml(strategy, file_handle)
    return strategy


__all__ = ["to_flowkit_strategy", "export_gatingml", "gate_paths", "Gate"]
