"""Panel resolution: which channel carries which marker.

Labs and instruments name channels differently: the marker may be ``CD3``,
``CD3 FITC`` or ``CD3-FITC`` in ``$PnS`` and the detector ``FITC-A``,
``FL1-A`` or ``BL1-A`` in ``$PnN``, in any order. Markers are therefore found
by name in ``$PnS`` (never by position or detector), and a small panel file
can override the result when a lab uses names this module does not know.
"""
from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

from gating.panels import load_panels

#: Canonical marker → accepted names (compared after normalisation, see
#: :func:`normalise_label`), gathered from the panel files of
#: :mod:`gating.panels` (each panel says how labs name its reagents).
#: Longer names win, so ``CD19-Fc`` (a CAR detection reagent) is never
#: mistaken for CD19.
MARKER_ALIASES = {}

#: What each panel needs to give its counts, and what it uses when present.
PANELS = {}


def _gather(panels):
    aliases = {}
    for panel in panels.values():
        for marker, names in panel.aliases.items():
            known = aliases.setdefault(marker, [])
            known.extend(n for n in names if n not in known)
    return aliases, {name: {"required": list(p.required), "optional": list(p.optional)} for name, p in panels.items()}


def available_panels(extra_dirs=()):
    """The gating panels (built-in, ``CYTOMETRY_PANELS``, then ``extra_dirs``), by name.

    Examples
    --------
    >>> sorted(available_panels())
    ['car', 'tbnk']
    """

    return load_panels(extra_dirs)


MARKER_ALIASES, PANELS = _gather(available_panels())


class PanelError(ValueError):
    """A required marker is missing or matches more than one channel."""


@dataclass
class Panel:
    """The resolved panel of one file.

    Attributes
    ----------
    name : str
        The panel recognised from the markers (``"tbnk"``, ``"car"``, or one
        from a panel folder), not from the tube name.
    markers : dict
        Canonical marker → ``$PnN`` of its channel.
    scatter : dict
        ``"FSC-A"``, ``"FSC-H"``, ``"SSC-A"``, ``"Time"`` → ``$PnN`` (those found).
    source : str
        ``"file"`` or the path of the panel file that overrode names.
    definition : gating.panels.GatingPanel or None
        The panel's markers, reported populations and gating plan.
    """

    name: str
    markers: dict
    scatter: dict
    source: str = "file"
    definition: object = None

    def as_dict(self):
        out = {"name": self.name, "markers": dict(self.markers), "scatter": dict(self.scatter),
               "source": self.source}
        if self.definition is not None:
            out["definition"] = self.definition.source
        return out


def normalise_label(label):
    """Upper-case a channel label and turn separators into single spaces.

    Examples
    --------
    >>> normalise_label("CD3-FITC"), normalise_label(" cd16+56  PE "), normalise_label("Viability_7-AAD")
    ('CD3 FITC', 'CD16+56 PE', 'VIABILITY 7 AAD')
    """
    text = re.sub(r"[\s\-_:/|,;]+", " ", str(label).upper())
    return text.strip()


def _alias_matches(alias, label):
    """``alias`` occurs in ``label`` as whole words."""
    return re.search(r"(?:^| )" + re.escape(alias) + r"(?:$| )", label) is not None


def match_marker(label, aliases=None):
    """The canonical marker a ``$PnS`` label names, or ``None``.

    ``aliases`` (canonical marker → names) defaults to every panel's.

    Examples
    --------
    >>> [match_marker(x) for x in ["CD3", "CD3 FITC", "CD3-FITC", "FITC CD3", "CD38 PE", "CD19-Fc PE"]]
    ['CD3', 'CD3', 'CD3', 'CD3', None, 'CAR']
    """
    label = normalise_label(label)
    if not label:
        return None
    best, best_len = None, 0
    for marker, names in (aliases or MARKER_ALIASES).items():
        for alias in names:
            alias_norm = normalise_label(alias)
            if len(alias_norm) > best_len and _alias_matches(alias_norm, label):
                best, best_len = marker, len(alias_norm)
    return best


def find_scatter_channels(pnn):
    """Map ``FSC-A``, ``FSC-H``, ``SSC-A`` and ``Time`` to the file's ``$PnN`` names."""
    found = {}
    for name in pnn:
        upper = name.upper().replace(" ", "")
        for key, prefix, suffix in (("FSC-A", "FS", "-A"), ("FSC-H", "FS", "-H"), ("SSC-A", "SS", "-A")):
            if key not in found and upper.startswith(prefix) and upper.endswith(suffix):
                found[key] = name
        if "Time" not in found and upper.startswith("TIME"):
            found["Time"] = name
    # Instruments without area/height suffixes ("FSC", "SSC") give areas.
    for key, prefix in (("FSC-A", "FS"), ("SSC-A", "SS")):
        if key not in found:
            for name in pnn:
                if name.upper().replace(" ", "") in (prefix + "C", prefix, prefix + "CLIN", prefix + "LIN"):
                    found[key] = name
                    break
    return found


def read_panel_file(path, aliases=None):
    """Read a panel override: CSV with columns ``marker,channel``.

    ``channel`` is a ``$PnN`` name; ``marker`` any name :func:`match_marker`
    recognises (``CD19``, ``CAR``, ``Viability``...).

    Examples
    --------
    >>> import tempfile, os
    >>> with tempfile.NamedTemporaryFile("w", suffix=".csv", delete=False) as fh:
    ...     _ = fh.write("marker,channel\\nCD19,RL1-A\\nCAR,YL1-A\\n")
    >>> read_panel_file(fh.name)
    {'CD19': 'RL1-A', 'CAR': 'YL1-A'}
    >>> os.unlink(fh.name)
    """
    path = Path(path)
    overrides = {}
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or not {"marker", "channel"} <= {f.strip().lower() for f in reader.fieldnames}:
            raise PanelError(f"panel file {path} needs the columns marker,channel")
        for row in reader:
            row = {k.strip().lower(): (v or "").strip() for k, v in row.items() if k}
            known = aliases or MARKER_ALIASES
            marker = match_marker(row["marker"], known) or normalise_label(row["marker"])
            if marker not in known:
                raise PanelError(f"panel file {path}: unknown marker {row['marker']!r} "
                                 f"(known: {', '.join(known)})")
            overrides[marker] = row["channel"]
    return overrides


def resolve_panel(pnn, pns, overrides=None, override_source="panel file", panels=None):
    """Find the marker channels of a file and recognise its panel.

    Parameters
    ----------
    pnn, pns : list of str
        The file's ``$PnN`` and ``$PnS`` per channel.
    overrides : dict, optional
        Canonical marker → ``$PnN``, from :func:`read_panel_file`; wins over
        the names in the file.
    panels : dict, optional
        Name → :class:`gating.panels.GatingPanel` (default
        :func:`available_panels`). The panel is the one whose required
        markers are all found, the most specific (most required markers)
        first.

    Returns
    -------
    Panel

    Raises
    ------
    PanelError
        Naming the marker and the channels seen, when a required marker is
        missing or when two channels claim the same marker.

    Examples
    --------
    >>> p = resolve_panel(["FSC-A", "FSC-H", "SSC-A", "FL1-A", "FL2-A", "FL3-A"],
    ...                   ["", "", "", "CD3-FITC", "CD45-PerCP", "CD19 APC"])
    >>> p.name, p.markers["CD19"]
    ('tbnk', 'FL3-A')
    """
    panels = panels if panels is not None else available_panels()
    aliases, _ = _gather(panels)
    overrides = dict(overrides or {})
    candidates = {}
    for name, label in zip(pnn, pns):
        marker = match_marker(label, aliases)
        if marker is not None:
            candidates.setdefault(marker, []).append(name)
    markers = {}
    for marker, channels in candidates.items():
        if marker in overrides:
            continue
        if len(channels) > 1:
            labels = ", ".join(f"{c} ({pns[pnn.index(c)]!r})" for c in channels)
            raise PanelError(f"marker {marker} is ambiguous: channels {labels} all name it; give a panel file "
                             f"(--panel PANEL.csv) with the line '{marker},<channel>' to choose")
        markers[marker] = channels[0]
    for marker, channel in overrides.items():
        if channel not in pnn:
            raise PanelError(f"{override_source} maps {marker} to channel {channel!r}, which the file lacks "
                             f"(channels: {', '.join(pnn)})")
        markers[marker] = channel
    # The most specific panel whose required markers are all present; failing
    # that, the one that comes closest names what is missing.
    ranked = sorted(panels.values(), key=lambda p: (-sum(m in markers for m in p.required), len(p.required)))
    complete = [p for p in panels.values() if all(m in markers for m in p.required)]
    if complete:
        chosen = max(complete, key=lambda p: len(p.required))
    else:
        chosen = ranked[0]
        missing = [m for m in chosen.required if m not in markers]
        seen = ", ".join(f"{n}={s!r}" if s else n for n, s in zip(pnn, pns))
        raise PanelError(f"required marker{'s' if len(missing) > 1 else ''} {', '.join(missing)} not found "
                         f"for a {chosen.name.upper()} panel; channels seen: {seen}")
    wanted = set(chosen.markers)
    return Panel(name=chosen.name, markers={m: c for m, c in markers.items() if m in wanted},
                 scatter=find_scatter_channels(pnn), source="file" if not overrides else override_source,
                 definition=chosen)
