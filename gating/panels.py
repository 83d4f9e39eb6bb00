"""Panels as data: markers, reagent aliases, reported populations and a gating plan.

A panel is one JSON file (the built-in ones live in ``gating/panel_files/``)::

    {"name": "tbnk",
     "markers": {"required": ["CD45", "CD3", "CD19"], "optional": ["CD4", "CD8", "CD16+56"]},
     "aliases": {"CD16+56": ["CD16+56", "CD16+CD56", ...], ...},
     "report": ["lymphocytes", "t_cells", "b_cells", ...],
     "plan": [{"population": "t_cells", "parent": "lymphocytes", "method": "positive",
               "dimensions": ["CD3"], "args": {"find_in": "leukocytes", "negative": "cd3_negative"}},
              ...]}

in the spirit of openCyto's gating template: each plan step names its
population(s), its parent, the dimensions it looks at, one of the step
methods of :mod:`gating.engine` and that method's arguments. Adding a panel
(a CD19/CD20 B-cell enumeration tube, say) is one new file; the engine is
not edited. Extra panel folders can be named in ``CYTOMETRY_PANELS``
(separated like ``PATH``) or passed to :func:`load_panels`.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

BUILTIN_PANEL_DIR = Path(__file__).with_name("panel_files")

#: How scatter detectors are named by the vendors (``FSC-A``, ``SSC-B-A``,
#: Beckman's ``FS INT``/``SS INT``); every other channel but time is fluorescence.
SCATTER_PREFIXES = ("FSC", "SSC", "FS ", "SS ")


def is_fluorescence(name):
    """Whether a channel (a ``$PnN`` or this package's name for it) carries fluorescence.

    The one place that tells fluorescence from scatter and time, for the
    reader (which channels a spillover matrix may name), the gating (the
    bead score over fluorescence channels) and the figures.

    Examples
    --------
    >>> [is_fluorescence(n) for n in ("FSC-A", "SSC-B-A", "FS INT", "Time", "HDR-T", "CD19", "BL1-A")]
    [False, False, False, False, True, True, True]
    """
    upper = name.upper()
    return not (upper.startswith(SCATTER_PREFIXES) or upper.startswith("TIME"))


class PanelDefinitionError(ValueError):
    """A panel file that cannot be used (one line naming the file and the problem)."""


@dataclass
class PlanStep:
    """One step of a gating plan.

    Attributes
    ----------
    populations : list of str
        What the step makes (most steps make one).
    parent : str or None
    method : str
        A step method of :mod:`gating.engine` (``positive``, ``leukocyte_classes``...).
    dimensions : list of str
        Markers or scatter channels the step looks at.
    args : dict
        The method's keyword arguments.
    optional : bool
        Skip the step when one of its dimensions is missing; its population
        then stands for its parent.
    """

    populations: list
    parent: str | None
    method: str
    dimensions: list = field(default_factory=list)
    args: dict = field(default_factory=dict)
    optional: bool = False

    @property
    def population(self):
        return self.populations[0]


@dataclass
class GatingPanel:
    """A panel: its markers, how labs name them, what is reported, and its gating plan.

    Examples
    --------
    >>> panel = load_panels()["tbnk"]
    >>> panel.required, [step.method for step in panel.plan][:3]
    (['CD45', 'CD3', 'CD19'], ['beads', 'singlets', 'leukocytes'])
    """

    name: str
    required: list
    optional: list
    aliases: dict
    report: list
    plan: list
    description: str = ""
    source: str = ""

    @property
    def markers(self):
        return list(self.required) + [m for m in self.optional if m not in self.required]

    def as_dict(self):
        return {"name": self.name, "required": list(self.required), "optional": list(self.optional),
                "report": list(self.report), "source": self.source,
                "plan": [{"population": s.populations if len(s.populations) > 1 else s.population,
                          "parent": s.parent, "method": s.method, "dimensions": list(s.dimensions),
                          "args": dict(s.args), "optional": s.optional} for s in self.plan]}


def panel_from_dict(spec, source="<dict>"):
    """Build a :class:`GatingPanel` from its JSON form, checking it.

    Raises
    ------
    PanelDefinitionError
        Naming ``source`` and what is wrong (missing key, unknown method,
        a parent no earlier step makes).
    """
    from .engine import STEP_METHODS

    def problem(text):
        return PanelDefinitionError(f"panel file {source}: {text}")

    if not isinstance(spec, dict):
        raise problem("not a JSON object")
    for key in ("name", "markers", "plan"):
        if key not in spec:
            raise problem(f"missing key {key!r}")
    markers = spec["markers"]
    required = list(markers.get("required", []))
    optional = list(markers.get("optional", []))
    if not required:
        raise problem("no required markers")
    aliases = {m: list(spec.get("aliases", {}).get(m, [m])) for m in required + optional}
    made = {None}
    plan = []
    for number, raw in enumerate(spec["plan"], 1):
        if not isinstance(raw, dict) or "population" not in raw or "method" not in raw:
            raise problem(f"plan step {number} needs 'population' and 'method'")
        if raw["method"] not in STEP_METHODS:
            raise problem(f"plan step {number}: unknown method {raw['method']!r} "
                          f"(known: {', '.join(sorted(STEP_METHODS))})")
        populations = raw["population"] if isinstance(raw["population"], list) else [raw["population"]]
        step = PlanStep(populations=populations, parent=raw.get("parent"), method=raw["method"],
                        dimensions=list(raw.get("dimensions", [])), args=dict(raw.get("args", {})),
                        optional=bool(raw.get("optional", False)))
        if step.parent not in made:
            raise problem(f"plan step {number} ({step.population}): parent {step.parent!r} is made by no earlier step")
        searches = step.args.get("find_in") or []
        for search in [searches] if isinstance(searches, str) else searches:
            if search not in made:
                raise problem(f"plan step {number} ({step.population}): find_in {search!r} is made by no "
                              f"earlier step")
        made.update(populations)
        made.update(STEP_METHODS[step.method].side_populations(step))
        plan.append(step)
    report = list(spec.get("report", [p for s in plan for p in s.populations]))
    unknown = [p for p in report if p not in made]
    if unknown:
        raise problem(f"reports populations no step makes: {', '.join(unknown)}")
    return GatingPanel(name=str(spec["name"]), required=required, optional=optional, aliases=aliases,
                       report=report, plan=plan, description=str(spec.get("description", "")), source=str(source))


def load_panel(path):
    """Read one panel file.

    Examples
    --------
    >>> load_panel(BUILTIN_PANEL_DIR / "car.json").required
    ['CD45', 'CD3', 'CD19', 'CAR']
    """
    path = Path(path)
    try:
        spec = json.loads(path.read_text())
    except OSError as exc:
        raise PanelDefinitionError(f"panel file {path}: cannot read ({exc.strerror or exc})") from None
    except json.JSONDecodeError as exc:
        raise PanelDefinitionError(f"panel file {path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    return panel_from_dict(spec, source=str(path))


def load_panels(extra_dirs=()):
    """All panels: the built-in ones, then those in ``CYTOMETRY_PANELS`` and ``extra_dirs``.

    A later panel of the same name replaces an earlier one.

    Returns
    -------
    dict
        Name → :class:`GatingPanel`, in loading order.
    """
    folders = [BUILTIN_PANEL_DIR]
    folders += [Path(p) for p in os.environ.get("CYTOMETRY_PANELS", "").split(os.pathsep) if p]
    folders += [Path(p) for p in extra_dirs]
    panels = {}
    for folder in folders:
        if folder.is_file():
            files = [folder]
        elif folder.is_dir():
            files = sorted(folder.glob("*.json"))
        else:
            raise PanelDefinitionError(f"panel folder {folder}: does not exist")
        for file in files:
            panel = load_panel(file)
            panels[panel.name] = panel
    return panels
