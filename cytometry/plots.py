"""Gating figures: each automatic gating step as a density plot with its gate.

matplotlib (Agg backend, no screen needed) draws one figure per sample: the
events of each step's parent population as a 2-D density (or a histogram)
with the gate drawn on top and the event count in the title, so a reviewer
can see at a glance whether a gate sits where it should.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from gating.geometry import Dimension, axis_values

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


def _axis(gated, key):
    if key == "bead_score":
        fluorescence = [c for c in gated.channels if c not in ("FSC-A", "FSC-H", "SSC-A", "Time")]
        return gated.data[:, [gated.channels[c] for c in fluorescence]].min(axis=1), "min over fluorescence (logicle)"
    if key in ("FSC-A", "FSC-H"):
        return axis_values(gated.data, gated.channels, Dimension(key, "linear")), f"{key} (fraction of range)"
    if key == "SSC-A":
        return axis_values(gated.data, gated.channels, Dimension(key, "log")), "SSC-A (log10 fraction of range + 1)"
    return gated.data[:, gated.channels[key]], f"{key} (logicle)"


def _draw_gate(ax, gate, horizontal_key, vertical_key):
    import matplotlib.patches as patches

    colour = _COLOURS.get(gate.name, "black")
    if gate.shape == "polygon":
        ax.add_patch(patches.Polygon(np.asarray(gate.vertices), closed=True, fill=False, edgecolor=colour, lw=1.4))
        return
    for dimension in gate.dimensions:
        on_x = dimension.channel == horizontal_key or (horizontal_key == "bead_score")
        on_y = vertical_key is not None and dimension.channel == vertical_key
        for bound in (dimension.minimum, dimension.maximum):
            if bound is None or not np.isfinite(bound):
                continue
            if on_x:
                ax.axvline(bound, color=colour, lw=1.2, ls="--")
            elif on_y:
                ax.axhline(bound, color=colour, lw=1.2, ls="--")
        if horizontal_key == "bead_score":
            break  # one line: every channel has the same bound


def gating_figure(gated, title=None):
    """A matplotlib figure of every gating step of a gated sample.

    Parameters
    ----------
    gated : cytometry.analysis.GatedSample
    title : str, optional

    Returns
    -------
    matplotlib.figure.Figure

    Examples
    --------
    >>> from cytometry.analysis import gate_file
    >>> fig = gating_figure(gate_file("sample_fcs/S01_screening_TBNK.fcs"))  # doctest: +SKIP
    >>> fig.savefig("S01_gating.png")  # doctest: +SKIP
    """
    # No backend chosen here: a notebook keeps its inline figures, and the
    # command line sets Agg before anything imports pyplot (cytometry.cli).
    import matplotlib
    import matplotlib.pyplot as plt

    masks = gated.gating.masks
    gates = {g.name: g for g in gated.gating.gates}
    steps = []
    for x, y, parent, names, label in _STEPS:
        if parent == "@leukocyte_parent":
            parent = "live" if "live" in masks else "leukocytes"
        needed = [k for k in (x, y) if k not in (None, "bead_score")]
        if any(k not in gated.channels for k in needed) or not any(n in gates for n in names):
            continue
        steps.append((x, y, parent, [n for n in names if n in gates], label))
    columns = 3
    rows = int(np.ceil(len(steps) / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.6 * rows), squeeze=False)
    for ax, (x_key, y_key, parent, names, label) in zip(axes.ravel(), steps):
        selection = masks[parent] if parent is not None else np.ones(gated.data.shape[0], dtype=bool)
        x, x_label = _axis(gated, x_key)
        x = x[selection]
        finite = np.isfinite(x)
        if y_key is None:
            ax.hist(x[finite], bins=128, color="0.4", histtype="stepfilled", log=True)
            ax.set_ylabel("events (log)")
        else:
            y, y_label = _axis(gated, y_key)
            y = y[selection]
            finite &= np.isfinite(y)
            if finite.sum():
                lo_x, hi_x = np.percentile(x[finite], [0.1, 99.9])
                lo_y, hi_y = np.percentile(y[finite], [0.1, 99.9])
                pad_x, pad_y = 0.1 * (hi_x - lo_x + 1e-6), 0.1 * (hi_y - lo_y + 1e-6)
                ax.hist2d(x[finite], y[finite], bins=128, cmin=1, cmap="viridis", norm=matplotlib.colors.LogNorm(),
                          range=[[lo_x - pad_x, hi_x + pad_x], [lo_y - pad_y, hi_y + pad_y]])
            ax.set_ylabel(y_label, fontsize=8)
        limits = (ax.get_xlim(), ax.get_ylim())
        for name in names:
            _draw_gate(ax, gates[name], x_key, y_key)
        ax.set_xlim(*limits[0])  # gates may extend far beyond the events
        ax.set_ylim(*limits[1])
        counts = ", ".join(f"{n}: {int(masks[n].sum())}" for n in names)
        ax.set_title(f"{label}\n{counts}", fontsize=8)
        ax.set_xlabel(x_label, fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes.ravel()[len(steps):]:
        ax.axis("off")
    fig.suptitle(title or Path(str(gated.sample.path)).name, fontsize=10)
    fig.tight_layout()
    return fig


def save_gating_figure(gated, out_dir, title=None):
    """Write ``<file stem>.gating.png`` into ``out_dir`` and return its path.

    The name comes from the FCS file's own name on disk (never from keywords
    inside the file), so a crafted ``$FIL`` cannot choose where it is written.
    """
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{Path(str(gated.sample.path)).stem}.gating.png"
    fig = gating_figure(gated, title)
    fig.savefig(target, dpi=90)
    plt.close(fig)
    return target
