"""Typed QC flags: what a gate, a count or a reviewer's check found wrong.

A flag names the population it concerns, a stable machine-readable
``code``, a ``severity`` and a sentence for a person. Verdicts are decided
from ``severity`` and the population tree, never from a message's wording:
a ``fail`` makes its population, and every population gated inside it,
``unreliable``.
"""
from __future__ import annotations

from dataclasses import dataclass

#: Severities, mildest first. ``info`` explains a choice, ``warning`` makes a
#: number less certain but usable, ``fail`` means the number must not be used.
SEVERITIES = ("info", "warning", "fail")


@dataclass(frozen=True)
class Flag:
    """One finding about one population.

    Attributes
    ----------
    population : str
        The population (or ``"sample"``, ``"beads"``, ``"acquisition"``...) it concerns.
    code : str
        Stable identifier, e.g. ``"cut_outside_data"``, ``"lymphocytes_miss_t_cells"``.
    severity : {"info", "warning", "fail"}
    message : str
        One line for a reviewer.

    Examples
    --------
    >>> flag = Flag("b_cells", "cut_outside_data", "fail", "CD19 cut 1.3 lies above every event")
    >>> str(flag), flag.fails
    ('b_cells: CD19 cut 1.3 lies above every event', True)
    """

    population: str
    code: str
    severity: str
    message: str

    def __post_init__(self):
        if self.severity not in SEVERITIES:
            raise ValueError(f"severity must be one of {SEVERITIES}, got {self.severity!r}")

    @property
    def fails(self):
        """Whether the flag makes its population unreliable."""
        return self.severity == "fail"

    def __str__(self):
        return f"{self.population}: {self.message}"

    def as_dict(self):
        return {"population": self.population, "code": self.code, "severity": self.severity,
                "message": self.message}


def unreliable_populations(flags, parents):
    """Populations made unreliable by failing flags, each with its reasons.

    Parameters
    ----------
    flags : iterable of Flag
    parents : dict
        Population → parent population (``None`` at the root), the gating tree.

    Returns
    -------
    dict
        Population → list of reason strings (the failing flags of it or of an ancestor).

    Examples
    --------
    >>> parents = {"lymphocytes": None, "t_cells": "lymphocytes", "b_cells": "cd3_negative",
    ...            "cd3_negative": "lymphocytes"}
    >>> bad = unreliable_populations([Flag("lymphocytes", "x", "fail", "wrong cluster")], parents)
    >>> sorted(bad)
    ['b_cells', 'cd3_negative', 'lymphocytes', 't_cells']
    """
    failing = {}
    for flag in flags:
        if flag.fails:
            failing.setdefault(flag.population, []).append(str(flag))
    out = {}
    for population in parents:
        reasons, node, seen = [], population, set()
        while node is not None and node not in seen:
            seen.add(node)
            reasons.extend(failing.get(node, []))
            node = parents.get(node)
        if reasons:
            out[population] = reasons
    for population, reasons in failing.items():
        out.setdefault(population, reasons)
    return out
