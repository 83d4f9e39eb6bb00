"""A reviewer's corrected gates: GatingML 2.0 or a FlowJo workspace, read through flowkit.

When a tube fails its checks a person moves a gate (in FlowJo, FCS Express or
FlowKit) and the count is done again from the corrected gates. This module
reads such a file, checks it against the FCS file it is meant for (every
channel the gates use exists, every transform has the file's scale, a
workspace names this sample and acquisition), evaluates it with flowkit on
the very events the automatic gating used, and maps the reviewer's gates to
this package's populations.

The mapping is explicit: by default a population is the gate of the same name
(the names ``--gatingml`` writes, so an exported file comes back as is); a
mapping file (CSV, columns ``population,gate``) names another gate, by name
or by path (``Singlets2 > NK1_1- > T cells`` when a name is not unique), or
``-`` for a population the reviewer did not gate (0 events, flagged as a
failure so no verdict rests on it). A population the file lacks is an error,
never a silent zero.

Counting is not done here: :func:`cytometry.analysis.apply_reviewed_gates`
turns the masks into a gating result that the same counting code serves.
"""
from __future__ import annotations

import csv
import warnings
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cytometry.loading.fcs import file_sha256
from gating.geometry import Dimension, Gate

#: Written in a mapping file's ``gate`` column for a population the reviewer did not gate.
NOT_GATED = "-"
#: Separates the gate names of a path in a mapping file.
PATH_SEPARATOR = ">"
#: Workspace keywords compared with the file's (another acquisition under the same name is refused).
IDENTITY_KEYWORDS = ("fil", "date", "btim", "etim", "tot")
#: The scale the automatic gates (and the figures) put each scatter channel on; fluorescence is logicle.
AXIS_SCALES = {"FSC-A": "linear", "FSC-H": "linear", "SSC-A": "log"}
#: What the export writes for an infinite bound (:data:`gating.gatingml._NOTHING`).
_NOTHING = 1e12


class ReviewedGatesError(ValueError):
    """A reviewed-gates or mapping file that cannot be used: one line naming the file and the problem."""

    def __init__(self, path, problem):
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path.name}: {problem}")


@dataclass
class ReviewedGates:
    """A reviewer's gating strategy, checked against one FCS file.

    Attributes
    ----------
    path : Path
    sha256 : str
        SHA-256 of the reviewed file (the audit trail).
    kind : {"gatingml", "flowjo-workspace"}
    strategy : flowkit.GatingStrategy
    sample_id : str or None
        The workspace's sample the gates are those of.
    """

    path: Path
    sha256: str
    kind: str
    strategy: object = field(repr=False)
    sample_id: str | None = None


def read_gate_mapping(path):
    """Population → reviewer's gate (a name, a path tuple, or ``None`` for not gated) from a CSV.

    Parameters
    ----------
    path : str or Path
        CSV with a header ``population,gate``; one line per population.

    Returns
    -------
    dict

    Raises
    ------
    ReviewedGatesError
        Missing file, no such columns, a population twice.

    Examples
    --------
    >>> import tempfile, os
    >>> with tempfile.TemporaryDirectory() as d:
    ...     path = os.path.join(d, "map.csv")
    ...     _ = open(path, "w").write("population,gate\\nt_cells,Singlets2 > NK1_1- > T cells\\nbeads,-\\n")
    ...     read_gate_mapping(path)
    {'t_cells': ('Singlets2', 'NK1_1-', 'T cells'), 'beads': None}
    """
    path = Path(path)
    if not path.is_file():
        raise ReviewedGatesError(path, "gate mapping file not found")
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            names = [name.strip().lower() for name in (reader.fieldnames or [])]
            if "population" not in names or "gate" not in names:
                raise ReviewedGatesError(path, f"gate mapping needs columns population,gate (has: "
                                               f"{','.join(names) or 'none'})")
            mapping = {}
            for line, row in enumerate(reader, start=2):
                row = {str(k).strip().lower(): (v or "").strip() for k, v in row.items() if k is not None}
                population, gate = row.get("population", ""), row.get("gate", "")
                if not population:
                    continue
                if population in mapping:
                    raise ReviewedGatesError(path, f"row {line}: population {population} mapped twice")
                if gate in ("", NOT_GATED):
                    mapping[population] = None
                else:
                    mapping[population] = tuple(part.strip() for part in gate.split(PATH_SEPARATOR))
    except UnicodeDecodeError:
        raise ReviewedGatesError(path, "gate mapping is not UTF-8 text") from None
    except csv.Error as exc:
        raise ReviewedGatesError(path, f"gate mapping is not a readable CSV ({exc})") from None
    return mapping


def _root_tag(path):
    """The local name of the XML root element (``None`` when the file is not XML)."""
    try:
        for _, element in ElementTree.iterparse(path, events=("start",)):
            return element.tag.rsplit("}", 1)[-1]
    except ElementTree.ParseError:
        return None
    return None


def read_reviewed_gates(path, sample):
    """Read a reviewer's GatingML 2.0 file or FlowJo workspace and check it against ``sample``.

    Parameters
    ----------
    path : str or Path
    sample : cytometry.loading.fcs.FcsSample
        The file the gates are meant for.

    Returns
    -------
    ReviewedGates

    Raises
    ------
    ReviewedGatesError
        Not GatingML or a workspace; a workspace of another sample or
        acquisition; a gate on a channel the file lacks; a transform on
        another scale than the file's; a compensation naming detectors the
        file lacks.

    Examples
    --------
    >>> import io, tempfile, os
    >>> from cytometry.analysis import export_gating, gate_file
    >>> gated = gate_file("sample_fcs/S01_screening_TBNK.fcs")
    >>> with tempfile.TemporaryDirectory() as d:
    ...     path = os.path.join(d, "S01.gating.xml")
    ...     with open(path, "wb") as fh:
    ...         _ = export_gating(gated, fh)
    ...     reviewed = read_reviewed_gates(path, gated.sample)
    >>> reviewed.kind, len(reviewed.sha256)
    ('gatingml', 64)
    """
    import flowkit as fk

    path = Path(path)
    if not path.is_file():
        raise ReviewedGatesError(path, "reviewed gates file not found")
    tag = _root_tag(path)
    if tag is None:
        raise ReviewedGatesError(path, "not GatingML 2.0 or a FlowJo workspace (not XML)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flowkit warns per missing FCS file of a workspace
        if tag == "Workspace":
            try:
                workspace = fk.Workspace(str(path), load_missing_file_data=True)
            except Exception as exc:
                raise ReviewedGatesError(path, f"FlowJo workspace cannot be read: {_one_line(exc)}") from None
            sample_id = _workspace_sample(path, workspace, sample)
            strategy = workspace.get_gating_strategy(sample_id)
            kind = "flowjo-workspace"
        elif tag == "Gating-ML":
            try:
                strategy = fk.parse_gating_xml(str(path))
            except Exception as exc:
                raise ReviewedGatesError(path, f"not a valid GatingML 2.0 file: {_one_line(exc)}") from None
            sample_id, kind = None, "gatingml"
        else:
            raise ReviewedGatesError(path, f"not GatingML 2.0 or a FlowJo workspace (XML root <{tag}>)")
    _check_against_file(path, strategy, sample)
    return ReviewedGates(path=path, sha256=file_sha256(path), kind=kind, strategy=strategy, sample_id=sample_id)


def _one_line(exc):
    return " ".join(str(exc).split()) or type(exc).__name__


def _workspace_sample(path, workspace, sample):
    """The workspace's sample that is this FCS file (same name, same acquisition), or an error."""
    ids = list(workspace.get_sample_ids(loaded_only=False))
    name = Path(sample.path).name
    if name not in ids:
        shown = ", ".join(ids[:5]) + (f" and {len(ids) - 5} more" if len(ids) > 5 else "")
        raise ReviewedGatesError(path, f"workspace holds the gates of {shown or 'no sample'}, not of {name} "
                                       "(another sample's workspace?)")
    stored = {str(k).lower().lstrip("$"): str(v).strip() for k, v in workspace.get_keywords(name).items()}
    actual = dict(sample.keywords)
    actual["tot"] = str(sample.n_events + sample.dropped_events)
    for key in IDENTITY_KEYWORDS:
        if stored.get(key) and actual.get(key) and stored[key] != actual[key].strip():
            raise ReviewedGatesError(path, f"workspace sample {name} has ${key.upper()} {stored[key]!r} but the "
                                           f"file has {actual[key].strip()!r} (another acquisition under the "
                                           "same name?)")
    return name


def _transform_top(transform):
    """The top of scale (T) a flowkit transform was made with, or ``None`` when it has none."""
    for attribute in ("param_t", "top", "max_value"):  # GatingML transforms; FlowJo biex (max_value)
        value = getattr(transform, attribute, None)
        if value is not None:
            return float(value)
    return None


def _check_against_file(path, strategy, sample):
    """Every gate's channels, transforms and compensation must fit the FCS file."""
    pnn = list(sample.pnn)
    dimensions = []
    for name, gate_path in strategy.get_gate_ids():
        gate = strategy.get_gate(name, gate_path)
        for dimension in getattr(gate, "dimensions", None) or []:
            channel = getattr(dimension, "id", None)
            if channel is None:  # a ratio dimension: its channels are in the transform
                continue
            if channel not in pnn:
                raise ReviewedGatesError(path, f"gate {name!r} uses channel {channel!r}, which the file does not "
                                               f"have (channels: {', '.join(pnn)})")
            dimensions.append((name, channel, dimension))
    for name, channel, dimension in dimensions:
        reference = getattr(dimension, "transformation_ref", None)
        if reference:
            try:
                transform = strategy.get_transform(reference)
            except Exception:
                raise ReviewedGatesError(path, f"gate {name!r} refers to transform {reference!r}, which the "
                                               "file does not define") from None
            top = _transform_top(transform)
            file_top = sample.channel_top(pnn.index(channel))
            if top is not None and not np.isclose(top, file_top, rtol=1e-6):
                raise ReviewedGatesError(path, f"gate {name!r}: transform {reference!r} has T = {top:g} but "
                                               f"channel {channel} has range {file_top:g} in the FCS file (gates "
                                               "drawn on another scale)")
        compensation = getattr(dimension, "compensation_ref", None)
        if compensation in (None, "uncompensated", "FCS", "Acquisition-defined"):
            if compensation in ("FCS",) and sample.spillover is None:
                raise ReviewedGatesError(path, f"gate {name!r} asks for the file's compensation, and the "
                                               "file has no spillover matrix")
            continue
        try:
            matrix = strategy.get_comp_matrix(compensation)
        except Exception:
            raise ReviewedGatesError(path, f"gate {name!r} refers to compensation {compensation!r}, which "
                                           "the file does not define") from None
        missing = [d for d in matrix.detectors if d not in pnn]
        if missing:
            raise ReviewedGatesError(path, f"compensation {compensation!r} names detectors the FCS file does "
                                           f"not have: {', '.join(missing)}")


def flowkit_sample(sample, sample_id=None):
    """A flowkit ``Sample`` of exactly the events the automatic gating used (same rows, raw values).

    Built from the loaded events rather than by flowkit reading the file
    again, so a reviewed gate's membership lines up event by event with the
    automatic masks (events dropped for NaN are dropped from both).

    Examples
    --------
    >>> from cytometry.loading.fcs import read_fcs
    >>> flowkit_sample(read_fcs("sample_fcs/S01_screening_TBNK.fcs"))
    Sample(v3.1, S01_screening_TBNK.fcs, 10 channels, 24123 events)
    """
    import flowkit as fk

    columns = pd.MultiIndex.from_arrays([list(sample.pnn), list(sample.pns)], names=["pnn", "pns"])
    return fk.Sample(pd.DataFrame(np.asarray(sample.events, dtype=np.float64), columns=columns),
                     sample_id=sample_id or Path(sample.path).name)


def _find_gate(path, gate_ids, wanted, population):
    """The ``(name, gate_path)`` of ``wanted`` (a name or a path tuple), or an error."""
    if len(wanted) == 1:
        matches = [gid for gid in gate_ids if gid[0] == wanted[0]]
    else:
        matches = [gid for gid in gate_ids if (gid[1] + (gid[0],))[-len(wanted):] == tuple(wanted)
                   or (gid[1][1:] + (gid[0],))[-len(wanted):] == tuple(wanted)]
    label = f" {PATH_SEPARATOR} ".join(wanted)
    if not matches:
        names = sorted({gid[0] for gid in gate_ids})
        shown = ", ".join(names[:12]) + (" …" if len(names) > 12 else "")
        raise ReviewedGatesError(path, f"lacks population {population}: no gate {label!r} (gates: {shown}); name "
                                       "it in a gate mapping file (--gate-map)")
    if len(matches) > 1:
        paths = "; ".join(f" {PATH_SEPARATOR} ".join(gid[1][1:] + (gid[0],)) for gid in matches)
        raise ReviewedGatesError(path, f"gate {label!r} for population {population} is not unique ({paths}); give "
                                       "its path in the gate mapping file")
    return matches[0]


@dataclass
class ReviewedMasks:
    """The reviewed gates evaluated on one file.

    Attributes
    ----------
    masks : dict
        Population → boolean mask over the file's events.
    gate_paths : dict
        Population → the reviewer's gate path (``None`` when not gated).
    gates : list of gating.geometry.Gate
        The reviewer's gates, for the record (coordinates in this package's
        scales where the gate uses them, else the reviewer's own).
    """

    masks: dict
    gate_paths: dict
    gates: list


def evaluate_reviewed_gates(reviewed, sample, populations, mapping=None, *, optional=(), channel_keys=None,
                            logicle=None, mapping_path=None):
    """Evaluate ``reviewed`` on ``sample`` with flowkit; the mask of each population.

    Parameters
    ----------
    reviewed : ReviewedGates
    sample : cytometry.loading.fcs.FcsSample
    populations : list of str
        Every population that must have a gate (or an explicit ``-`` in the mapping).
    mapping : dict, optional
        From :func:`read_gate_mapping`; populations it does not name are the gates of their own name.
    optional : tuple of str
        Populations taken when a gate of that name exists (helper gates such as ``bead_bright``).
    channel_keys : dict, optional
        ``$PnN`` → the marker or scatter name the automatic gates use, so
        reviewed gates on this package's scales are recorded as such.
    logicle : dict, optional
        ``w``, ``m``, ``a`` of this package's logicle scale.
    mapping_path : Path, optional
        Named in errors about the mapping.

    Returns
    -------
    ReviewedMasks

    Examples
    --------
    >>> import tempfile, os
    >>> from cytometry.analysis import export_gating, gate_file
    >>> gated = gate_file("sample_fcs/S01_screening_TBNK.fcs")
    >>> with tempfile.TemporaryDirectory() as d:
    ...     path = os.path.join(d, "S01.gating.xml")
    ...     with open(path, "wb") as fh:
    ...         _ = export_gating(gated, fh)
    ...     reviewed = read_reviewed_gates(path, gated.sample)
    ...     masks = evaluate_reviewed_gates(reviewed, gated.sample, ["b_cells"]).masks
    >>> int(masks["b_cells"].sum())
    551
    """
    mapping = dict(mapping or {})
    unknown = sorted(set(mapping) - set(populations) - set(optional))
    if unknown:
        raise ReviewedGatesError(mapping_path or reviewed.path,
                                 f"gate mapping names unknown population(s) {', '.join(unknown)} (this sample's "
                                 f"populations: {', '.join(populations)})")
    strategy = reviewed.strategy
    gate_ids = list(strategy.get_gate_ids())
    wanted = {}
    for population in populations:
        target = mapping.get(population, (population,))
        wanted[population] = None if target is None else _find_gate(reviewed.path, gate_ids, target, population)
    for population in optional:
        target = mapping.get(population, (population,))
        if target is not None and population not in wanted:
            # Helper gates (the export's bead_bright, singlets, cd3_negative…): taken when unambiguous.
            try:
                wanted[population] = _find_gate(reviewed.path, gate_ids, target, population)
            except ReviewedGatesError:
                if population in mapping:
                    raise
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            results = strategy.gate_sample(flowkit_sample(sample, reviewed.sample_id))
    except Exception as exc:
        raise ReviewedGatesError(reviewed.path, f"gates cannot be applied to {Path(sample.path).name}: "
                                                f"{_one_line(exc)}") from None
    masks, paths = {}, {}
    n = sample.n_events
    for population, gid in wanted.items():
        if gid is None:
            masks[population] = np.zeros(n, dtype=bool)
            paths[population] = None
            continue
        masks[population] = np.asarray(results.get_gate_membership(gid[0], gate_path=gid[1]), dtype=bool)
        paths[population] = list(gid[1][1:]) + [gid[0]]
    by_gate = {gid: population for population, gid in wanted.items() if gid is not None}
    # Recorded names: the population a gate serves, else the reviewer's name when it is no population's.
    names = {gid: by_gate.get(gid) or (gid[0] if gid[0] not in set(by_gate.values()) else f"reviewed:{gid[0]}")
             for gid in gate_ids}
    gates = [_record_gate(strategy, gid, names, by_gate.get(gid), sample, channel_keys or {}, logicle or {})
             for gid in gate_ids]
    return ReviewedMasks(masks=masks, gate_paths=paths, gates=gates)


def _our_transform(transform, top, logicle):
    """``"logicle"``, ``"linear"`` or ``"log"`` when ``transform`` is exactly this package's scale, else ``None``."""
    kind = type(transform).__name__
    t = _transform_top(transform)
    if t is None or not np.isclose(t, top):
        return None
    if kind == "LogicleTransform" and all(np.isclose(getattr(transform, f"param_{k}"), logicle.get(k, v))
                                          for k, v in (("w", 0.5), ("m", 4.5), ("a", 0.0))):
        return "logicle"
    if kind == "LinearTransform" and np.isclose(transform.param_a, 0.0):
        return "linear"
    if kind == "LogTransform" and np.isclose(transform.param_m, 1.0):
        return "log"
    return None


def _bound(value):
    if value is None:
        return None
    value = float(value)
    return float(np.sign(value) * np.inf) if abs(value) >= _NOTHING else value


def _record_gate(strategy, gid, names, population, sample, channel_keys, logicle):
    """One reviewer's gate as a :class:`gating.geometry.Gate` (for the result, the store and the figures).

    A gate drawn on this package's scales (logicle, linear and log as
    :mod:`gating.geometry` defines them) keeps its shape and coordinates, so
    the figures draw it. A gate on another scale (a FlowJo biex, raw values)
    keeps its numbers for the record, but its shape is ``reviewed <kind>`` and
    its channels ``<$PnN> (<transform>)``: the figures then show the
    population's events without drawing a border on the wrong axes.
    """
    name, gate_path = gid
    gate = strategy.get_gate(name, gate_path)
    kind = type(gate).__name__
    dimensions, ours = [], True
    for dimension in getattr(gate, "dimensions", None) or []:
        channel = getattr(dimension, "id", None) or "ratio"
        reference = getattr(dimension, "transformation_ref", None)
        transform = None
        if reference and channel in sample.pnn:
            transform = _our_transform(strategy.get_transform(reference), sample.channel_top(
                sample.pnn.index(channel)), logicle)
        key = channel_keys.get(channel)
        # The figures draw every axis on one scale (gating.geometry): a border on another one is not drawn.
        if transform is None or key is None or transform != AXIS_SCALES.get(key, "logicle"):
            ours = False
        if transform and key:
            dimensions.append(Dimension(key, transform, _bound(getattr(dimension, "min", None)),
                                        _bound(getattr(dimension, "max", None))))
        else:
            dimensions.append(Dimension(f"{channel} ({reference or 'raw'})", reference or "raw",
                                        getattr(dimension, "min", None), getattr(dimension, "max", None)))
    shape = {"RectangleGate": "rectangle", "PolygonGate": "polygon"}.get(kind, kind) if ours else f"reviewed {kind}"
    complement_of = None
    if kind == "BooleanGate" and getattr(gate, "type", "") == "not" and gate.gate_refs:
        reference = gate.gate_refs[0]
        target = (tuple(reference.get("path") or ()), reference["ref"])
        shape, complement_of = "not", names.get((target[1], target[0]), reference["ref"])
    vertices = [tuple(float(c) for c in v) for v in getattr(gate, "vertices", None) or []]
    parent = None
    if len(gate_path) > 1:
        parent = names.get((gate_path[-1], gate_path[:-1]), gate_path[-1])
    return Gate(name=names[gid], parent=parent, shape=shape, dimensions=dimensions, vertices=vertices,
                complement_of=complement_of, method=f"reviewed gate {' > '.join(gate_path[1:] + (name,))}",
                extra={"population": population, "flowkit_gate": kind})


__all__ = ["ReviewedGates", "ReviewedGatesError", "ReviewedMasks", "read_reviewed_gates", "read_gate_mapping",
           "evaluate_reviewed_gates", "flowkit_sample", "NOT_GATED"]
