"""Gating figures: each automatic gating step as a density plot with its gate.

matplotlib draws one figure per sample: the events of each step's parent
population as a 2-D density (or a histogram) with the gate drawn on top, a
legend naming each gate's population with its events and % of parent, and
axes in the instrument's units (fluorescence in decades of the logicle
scale, scatter in thousands), so a reviewer can see at a glance whether a
gate sits where it should.

One drawing serves two sources (:class:`GatingView`): a live
:class:`cytometry.analysis.GatedSample` (``--plots``, notebooks) and an entry
of the results store (the report), whose figures are drawn from the stored
events, masks and gates alone — the exact gating that produced the counts,
with no FCS file and no re-gating. The events drawn may be a subsample;
every count written comes from the full-file masks.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import matplotlib.patches as patches
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.lines import Line2D
from matplotlib.ticker import FixedLocator, FuncFormatter

from cytometry.outputs.formatting import format_sig, printable, safe_name
from cytometry.preprocess import LOGICLE_DEFAULTS
from gating.geometry import Dimension, Gate, axis_values
from gating.panels import is_fluorescence
from gpu.logicle import logicle

#: (x, y or None, parent mask, gate names drawn) for each panel, TBNK and CAR.
_STEPS = [
    ("bead_score", None, None, ["bead_bright"], "All events: dimmest fluorescence channel (beads right)"),
    ("FSC-A", "FSC-H", "not_beads", ["singlets"], "Non-bead events: singlets"),
    ("CD45", "SSC-A", "singlets", ["leukocytes"], "Singlets: CD45+ leukocytes"),
    ("VIABILITY", None, "leukocytes", ["live"], "Leukocytes: live (viability dye negative)"),
    ("CD45", "SSC-A", "@leukocyte_parent", ["lymphocytes", "monocytes", "granulocytes"],
     "Leukocytes: lymphocytes / monocytes / granulocytes"),
    ("CD3", "CD19", "lymphocytes", ["t_cells", "b_cells"], "Lymphocytes: T (CD3+) and B (CD3- CD19+)"),
    ("CD16+56", "CD19", "cd3_negative", ["nk_cells"], "CD3- lymphocytes: NK (CD16/56+)"),
    ("CD4", "CD8", "t_cells", ["cd4_t", "cd8_t"], "T cells: CD4 / CD8"),
    ("CAR", None, "t_cells", ["car_t"], "T cells: CAR+"),
]
_COLOURS = {"lymphocytes": "tab:red", "monocytes": "tab:green", "granulocytes": "tab:blue", "b_cells": "tab:red",
            "t_cells": "tab:orange", "cd4_t": "tab:red", "cd8_t": "tab:blue", "car_t": "tab:red",
            "nk_cells": "tab:purple"}




@dataclass
class GatingView:
    """What a gating figure is drawn from, whichever the source.

    Attributes
    ----------
    data : ndarray
        The events drawn (rows × columns): every event, or a subsample.
    channels : dict
        Marker/scatter name → column of ``data``.
    masks : dict
        Population (and helper gate) → boolean mask over the rows of ``data``.
    counts : dict
        Population → events in the whole file (what labels say).
    gates : list of gating.geometry.Gate
    parents : dict
        Population → the parent its % is of (the reported parent where the
        result gives one, else the gate's parent).
    tops : dict
        Channel name → ``$PnR``, the logicle T (for ticks at decades).
    logicle : dict
        ``w``, ``m``, ``a`` of the logicle scale.
    n_events : int
        Events in the file (``data`` may hold fewer).
    title : str
    """

    data: np.ndarray
    channels: dict
    masks: dict
    counts: dict
    gates: list
    parents: dict = field(default_factory=dict)
    tops: dict = field(default_factory=dict)
    logicle: dict = field(default_factory=lambda: dict(LOGICLE_DEFAULTS))
    n_events: int = 0
    title: str = ""

    @classmethod
    def from_gated(cls, gated, title=None):
        """The view of a live :class:`cytometry.analysis.GatedSample` (every event drawn)."""
        gating = gated.gating
        masks = gating.masks
        parents = {gate.name: gate.parent for gate in gating.gates}
        parents.update({name: gating.parent_of(name) for name in gating.populations})
        return cls(data=gated.data, channels=dict(gated.channels), masks=masks,
                   counts={name: int(mask.sum()) for name, mask in masks.items()}, gates=list(gating.gates),
                   parents=parents, tops={name: gated.sample.channel_top(column)
                                          for name, column in gated.channels.items()},
                   n_events=gated.data.shape[0], title=title or Path(str(gated.sample.path)).name)

    @classmethod
    def from_store(cls, store, entry, result=None):
        """The view of a store entry: its stored events, full-file masks, gates and logicle scale.

        Returns ``None`` when the entry holds no events the report can draw
        (written without them, or before their columns were named).

        Examples
        --------
        >>> import tempfile
        >>> from cytometry.batch.run import run_batch
        >>> from cytometry.loading.manifest import read_manifest
        >>> from cytometry.batch.store import ResultStore
        >>> d = tempfile.TemporaryDirectory()
        >>> _ = run_batch(["sample_fcs/S01_screening_TBNK.fcs"], read_manifest("sample_fcs/manifest.csv"),
        ...               store=f"{d.name}/run.store", workers=1)
        >>> store = ResultStore(f"{d.name}/run.store")
        >>> view = GatingView.from_store(store, store.entries()[0].name)
        >>> fig = gating_figure(view)
        >>> len(fig.axes) > 3
        True
        >>> d.cleanup()
        """
        stored = store.events(entry)
        if stored is None:
            return None
        result = result if result is not None else store.results_for(entry)
        full = store.masks(entry)
        gates = [gate_from_dict(g) for g in (result.get("gating") or {}).get("gates", [])]
        parents = {gate.name: gate.parent for gate in gates}
        parents.update({name: p["parent"] for name, p in (result.get("populations") or {}).items()})
        scale = {k: v for k, v in ((result.get("gating") or {}).get("logicle") or {}).items() if k in "wma"}
        return cls(data=stored["events"], channels=stored["columns"],
                   masks={name: mask[stored["index"]] for name, mask in full.items()},
                   counts={name: int(mask.sum()) for name, mask in full.items()}, gates=gates, parents=parents,
                   tops=stored["tops"], logicle={**LOGICLE_DEFAULTS, **scale}, n_events=stored["n_events"],
                   title=Path(str(result.get("file", entry))).name)


def gate_from_dict(value):
    """A :class:`gating.geometry.Gate` from its JSON form (``result["gating"]["gates"]``).

    Examples
    --------
    >>> gate = gate_from_dict({"name": "b_cells", "parent": "cd3_negative", "shape": "rectangle",
    ...                        "dimensions": [{"channel": "CD19", "transform": "logicle", "min": 0.37, "max": None}]})
    >>> gate.threshold
    0.37
    """
    return Gate(name=value["name"], parent=value.get("parent"), shape=value["shape"],
                dimensions=[Dimension(d["channel"], d["transform"], d.get("min"), d.get("max"))
                            for d in value.get("dimensions", [])],
                vertices=[tuple(v) for v in value.get("vertices", [])], complement_of=value.get("complement_of"),
                method=value.get("method", ""), extra=value.get("extra") or {})


def _axis(view, key):
    """Values of one axis for the drawn events, its label, and how its ticks are set."""
    if key == "bead_score":
        fluorescence = [c for c in view.channels if is_fluorescence(c)]
        values = view.data[:, [view.channels[c] for c in fluorescence]].min(axis=1)
        top = view.tops.get(fluorescence[0], 262144.0) if fluorescence else 262144.0
        return values, "dimmest fluorescence channel of each event", ("logicle", top)
    top = view.tops.get(key, 262144.0)
    if key in ("FSC-A", "FSC-H"):
        return axis_values(view.data, view.channels, Dimension(key, "linear")), key, ("linear", top)
    if key == "SSC-A":
        return axis_values(view.data, view.channels, Dimension(key, "log")), key, ("log", top)
    return view.data[:, view.channels[key]], key, ("logicle", top)


def _decade_label(k):
    return "0" if k is None else f"$10^{{{k}}}$"


def _set_ticks(axis, scale, logicle_params):
    """Ticks in the instrument's units: decades on logicle and log axes, thousands on linear ones."""
    kind, top = scale
    if kind == "logicle":
        decades = list(range(1, int(np.floor(np.log10(top))) + 1))
        raw = np.array([0.0] + [10.0 ** k for k in decades])
        positions = logicle(raw, t=top, **logicle_params)
        # Below 10^2 the logicle scale is near-linear and decades crowd together: label from 10^2 up.
        labels = ["0"] + [_decade_label(k) if k >= 2 else "" for k in decades]
        minor = np.array([m * 10.0 ** k for k in decades[1:] for m in range(2, 10) if m * 10.0 ** k < top])
        axis.set_major_locator(FixedLocator(positions))
        axis.set_major_formatter(FuncFormatter(lambda v, i: labels[i] if i is not None and i < len(labels) else ""))
        axis.set_minor_locator(FixedLocator(logicle(minor, t=top, **logicle_params)))
    elif kind == "log":
        decades = list(range(1, int(np.floor(np.log10(top))) + 1))
        positions = [k - np.log10(top) + 1.0 for k in decades]
        axis.set_major_locator(FixedLocator(positions))
        axis.set_major_formatter(FuncFormatter(lambda v, i: _decade_label(decades[i]) if i is not None and
                                               i < len(decades) else ""))
    else:
        step = 10.0 ** np.floor(np.log10(top / 5.0))
        step *= 5 if top / step >= 25 else (2 if top / step >= 10 else 1)
        positions = np.arange(0.0, top * 1.0001, step) / top
        axis.set_major_locator(FixedLocator(positions))
        axis.set_major_formatter(FuncFormatter(lambda v, i: f"{v * top / 1000:.0f}K" if v > 0 else "0"))


def _draw_gate(ax, gate, horizontal_key, vertical_key, colour):
    if gate.shape == "polygon":
        ax.add_patch(patches.Polygon(np.asarray(gate.vertices), closed=True, fill=False, edgecolor=colour, lw=1.6))
        return
    for dimension in gate.dimensions:
        on_x = dimension.channel == horizontal_key or (horizontal_key == "bead_score")
        on_y = vertical_key is not None and dimension.channel == vertical_key
        for bound in (dimension.minimum, dimension.maximum):
            if bound is None or not np.isfinite(bound):
                continue
            if on_x:
                ax.axvline(bound, color=colour, lw=1.4, ls="--")
            elif on_y:
                ax.axhline(bound, color=colour, lw=1.4, ls="--")
        if horizontal_key == "bead_score":
            break  # one line: every channel has the same bound


def _with_bounds(limits, drawn, gates, key):
    """Axis limits widened to show each gate's cut on this axis (a cut just past the events is what to see).

    Only cuts within half the events' span are taken in, so a gate bounded
    far away (or at infinity) does not shrink the events to a corner.
    """
    low, high = limits
    span = high - low
    for gate in drawn:
        for dimension in gates[gate["population"]].dimensions:
            if dimension.channel != key and key != "bead_score":
                continue
            for bound in (dimension.minimum, dimension.maximum):
                if bound is not None and np.isfinite(bound) and low - span / 2 <= bound <= high + span / 2:
                    low, high = min(low, bound - 0.03 * span), max(high, bound + 0.03 * span)
    return low, high


def gating_steps(source):
    """The panels a gating figure draws, with the counts each one writes.

    Parameters
    ----------
    source : GatingView or cytometry.analysis.GatedSample

    Returns
    -------
    list of dict
        One per panel, in drawing order: ``x``, ``y`` (``None`` for a
        histogram), ``parent`` (the events drawn) with ``parent_events``,
        ``label``, and ``gates``: per gate ``population``, ``events`` (in the
        whole file), ``pct_of_parent`` and ``parent`` (of which the % is).

    Examples
    --------
    >>> from cytometry.analysis import gate_file
    >>> steps = gating_steps(gate_file("sample_fcs/S01_screening_TBNK.fcs"))
    >>> [g["population"] for g in steps[-2]["gates"]]
    ['nk_cells']
    """
    view = source if isinstance(source, GatingView) else GatingView.from_gated(source)
    gates = {g.name: g for g in view.gates}
    steps = []
    for x, y, parent, names, label in _STEPS:
        if parent == "@leukocyte_parent":
            parent = "live" if "live" in view.masks else "leukocytes"
        needed = [k for k in (x, y) if k not in (None, "bead_score")]
        names = [n for n in names if n in gates and n in view.counts]
        if any(k not in view.channels for k in needed) or not names or (parent and parent not in view.masks):
            continue
        drawn = []
        for name in names:
            of = view.parents.get(name) or gates[name].parent
            of_events = view.counts.get(of) if of is not None else view.n_events
            drawn.append({"population": name, "events": view.counts[name], "parent": of or "all events",
                          "pct_of_parent": 100.0 * view.counts[name] / of_events if of_events else None})
        steps.append({"x": x, "y": y, "parent": parent, "label": label, "gates": drawn,
                      "parent_events": view.counts[parent] if parent else view.n_events})
    return steps


def gate_label(gate):
    """The legend text of one drawn gate: population, events and % of parent (one formatter, ``format_sig``)."""
    pct = "" if gate["pct_of_parent"] is None else \
        f" ({format_sig(gate['pct_of_parent'])}% of {gate['parent']})"
    return f"{gate['population']}: {gate['events']:,} events{pct}"


def gating_figure(source, title=None):
    """A matplotlib figure of every gating step, from a gated sample or a stored entry.

    Each panel shows the events of the step's parent population as a 2-D
    density (or a histogram), the gates in colour, and a legend with each
    gate's population, events and % of parent. Fluorescence axes are in
    decades (logicle scale, ticks at 0, 10², 10³…), scatter in thousands of
    the instrument's units. When the events drawn are a subsample, the title
    says how many; the counts always come from every event.

    Parameters
    ----------
    source : cytometry.analysis.GatedSample or GatingView
        A live gated sample, or :meth:`GatingView.from_store` for a store entry.
    title : str, optional

    Returns
    -------
    matplotlib.figure.Figure

    Examples
    --------
    >>> from cytometry.analysis import gate_file
    >>> import io
    >>> fig = gating_figure(gate_file("sample_fcs/S01_screening_TBNK.fcs"))
    >>> fig.savefig(io.BytesIO(), format="png")     # or a file name: fig.savefig("S01_gating.png")
    """
    # No backend chosen here: a notebook keeps its inline figures, and the
    # command line sets Agg before anything imports pyplot (cytometry.outputs.cli).

    view = source if isinstance(source, GatingView) else GatingView.from_gated(source, title)
    gates = {g.name: g for g in view.gates}
    steps = gating_steps(view)
    columns = 3
    rows = max(1, int(np.ceil(len(steps) / columns)))
    fig, axes = plt.subplots(rows, columns, figsize=(5.4 * columns, 5.0 * rows), squeeze=False)
    for ax, step in zip(axes.ravel(), steps):
        x_key, y_key, parent = step["x"], step["y"], step["parent"]
        selection = view.masks[parent] if parent is not None else np.ones(view.data.shape[0], dtype=bool)
        x, x_label, x_scale = _axis(view, x_key)
        x = x[selection]
        finite = np.isfinite(x)
        if y_key is None:
            if finite.sum():
                ax.hist(x[finite], bins=128, color="0.45", histtype="stepfilled", log=True)
            ax.set_ylabel("events (log)", fontsize=11)
        else:
            y, y_label, y_scale = _axis(view, y_key)
            y = y[selection]
            finite &= np.isfinite(y)
            if finite.sum():
                lo_x, hi_x = np.percentile(x[finite], [0.1, 99.9])
                lo_y, hi_y = np.percentile(y[finite], [0.1, 99.9])
                pad_x, pad_y = 0.1 * (hi_x - lo_x + 1e-6), 0.1 * (hi_y - lo_y + 1e-6)
                ax.hist2d(x[finite], y[finite], bins=128, cmin=1, cmap="viridis", norm=matplotlib.colors.LogNorm(),
                          range=[[lo_x - pad_x, hi_x + pad_x], [lo_y - pad_y, hi_y + pad_y]])
            ax.set_ylabel(y_label, fontsize=11)
        limits = (_with_bounds(ax.get_xlim(), step["gates"], gates, x_key),
                  _with_bounds(ax.get_ylim(), step["gates"], gates, y_key) if y_key else ax.get_ylim())
        handles = []
        for gate in step["gates"]:
            colour = _COLOURS.get(gate["population"], "black")
            _draw_gate(ax, gates[gate["population"]], x_key, y_key, colour)
            handles.append(Line2D([], [], color=colour, lw=2, ls="-" if gates[gate["population"]].shape == "polygon"
                                  else "--", label=gate_label(gate)))
        ax.set_xlim(*limits[0])  # gates may extend far beyond the events
        ax.set_ylim(*limits[1])
        _set_ticks(ax.xaxis, x_scale, view.logicle)
        if y_key is not None:
            _set_ticks(ax.yaxis, y_scale, view.logicle)
        ax.set_xlim(*limits[0])
        drawn = int(selection.sum())
        shown = f"{step['parent_events']:,} events" + ("" if drawn == step["parent_events"] else
                                                      f" ({drawn:,} drawn)")
        ax.set_title(f"{step['label']}\n{shown}", fontsize=11)
        ax.set_xlabel(x_label, fontsize=11)
        ax.tick_params(labelsize=10)
        ax.legend(handles=handles, loc="upper left", fontsize=10, framealpha=0.85,
                  bbox_to_anchor=(0.0, -0.14), borderaxespad=0.0)
    for ax in axes.ravel()[len(steps):]:
        ax.axis("off")
    heading = printable(title or view.title)  # a file name's control characters drawn as escapes
    if view.data.shape[0] < view.n_events:
        heading += (f" — dots: a random {view.data.shape[0]:,} of {view.n_events:,} events;"
                    f" counts from every event")
    # The file name is data, not matplotlib math: ``a$^$.fcs`` is drawn as written.
    fig.suptitle(heading, fontsize=13, parse_math=False, usetex=False)
    fig.tight_layout()
    return fig


def save_gating_figure(gated, out_dir, title=None):
    """Write ``<file stem>.gating.png`` into ``out_dir`` and return its path.

    The name comes from the FCS file's own name on disk (never from keywords
    inside the file), so a crafted ``$FIL`` cannot choose where it is written,
    made safe by :func:`cytometry.outputs.formatting.safe_name` (a hash
    suffix when it had to be changed or cut).
    """

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{safe_name(Path(str(gated.sample.path)).stem)}.gating.png"
    fig = gating_figure(gated, title)
    try:
        fig.savefig(target, dpi=90)
    finally:
        plt.close(fig)
    return target
