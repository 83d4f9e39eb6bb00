"""Per-subject views of a run: the screening decision and CAR-T kinetics.

Both work on the per-sample results of :func:`cytometry.analysis.analyze_file`
(the JSON contract), grouped by ``subject_id``.

Screening rule (which tube decides)
    A subject's screening tubes are ordered by study day (then file name).
    The **latest tube with a definite or indeterminate verdict** decides; a
    ``qc_fail`` tube (or an unreadable one) never overrides a valid one, and a
    re-acquisition after an ``indeterminate`` tube supersedes it. When every
    tube failed QC, the verdict is ``qc_fail``.

Kinetics
    Cmax / Tmax over quantifiable CAR+ values (at or above LLOQ); AUC(0–28 d)
    by the linear trapezoid over the visits from day 0 to day 28, with values
    below LLOQ taken as 0 (the usual convention for cellular kinetics
    "below the limit of quantification" points; the result says so);
    Clast / Tlast the last quantifiable value; B-cell aplasia by a named,
    versioned rule (default: CD19+ B cells below 1 cell/µL after infusion).
    Each CAR visit is read with the CAR signal's log-SD its subject's
    earlier visits measured (:mod:`cytometry.decisions.car_shape`), its
    tube-alone count kept beside it.

TBNK / CAR T-cell cross-check
    When a subject has a TBNK tube and a CAR tube on the same study day (the
    same blood), both count CD3+ T cells; they must agree within counting
    noise. ``ln(TBNK T/µL) - ln(CAR-tube T/µL)`` is tested against 0 with a
    two-sided z-test whose standard error combines each tube's own: from its
    exact 95 % interval, ``(ln high - ln low) / (2 x 1.96)`` - for bead
    counting about ``sqrt(1/cells + 1/beads)``, the Poisson noise of both
    counts, whatever the counting method. A pair is flagged when
    ``p < 0.001`` (``|z| > 3.29``): with counting noise alone one agreeing
    pair in a thousand is flagged; with 4,000 T cells and 9,000 beads in each
    tube the standard error is 2.7 %, so a difference beyond ~9 % - a wrong
    bead lot constant, a pipetting error, a T-cell gate that lost cells - is.
    The TBNK tubes are never kinetics points.
"""
from __future__ import annotations

import csv
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from cytometry.decisions.car_shape import car_count_details, pooled_shape, reread_with_shape
from cytometry.outputs.formatting import count_text, format_sig, printable, safe_name

SCREENING_RULE = ("latest screening tube with a valid verdict decides; qc_fail tubes never override a valid one; "
                  "a re-acquisition supersedes an earlier indeterminate tube")


def subject_of(result):
    """The subject of a result: the manifest's ``subject_id``, else the file's stem."""
    return result.get("subject_id") or Path(result["file"]).stem


def distinct_tubes(results):
    """``results`` with each FCS file once: a file seen again (same SHA-256) replaces its earlier result.

    The same tube analysed twice (two parameter sets, a copy under another
    name) is one tube: it never doubles a visit nor supersedes itself.
    Results without a SHA-256 (unreadable files) are kept by file path.

    Examples
    --------
    >>> kept = distinct_tubes([{"file": "a.fcs", "sha256": "1", "n": 1}, {"file": "b.fcs", "sha256": "1", "n": 2},
    ...                        {"file": "c.fcs", "sha256": None}])
    >>> [(r["file"], r.get("n")) for r in kept]
    [('b.fcs', 2), ('c.fcs', None)]
    """
    latest = {}
    for index, result in enumerate(results):
        latest[result.get("sha256") or ("path", str(result.get("file")))] = index
    keep = set(latest.values())
    return [result for index, result in enumerate(results) if index in keep]


def _day_key(result):
    day = result.get("study_day")
    return (float(day) if isinstance(day, (int, float)) else float("inf"), Path(result["file"]).name)


def screening_decisions(results):
    """One eligibility row per subject from the screening tubes of a run.

    Parameters
    ----------
    results : list of dict
        Per-sample results (``analyze_file``); only those with an
        ``eligibility`` block (screening visits) are used.

    Returns
    -------
    list of dict
        ``subject_id``, ``verdict``, ``value``, ``ci95``, ``events``, ``file``,
        ``reasons``, ``criterion``, ``rule`` and ``tubes`` (every screening tube
        with its verdict, in order).

    Examples
    --------
    >>> rows = screening_decisions([{"file": "a.fcs", "subject_id": "S1", "study_day": -14, "eligibility":
    ...     {"verdict": "indeterminate", "value": 5.5, "ci95": [3.6, 8.1], "events": 26, "reasons": ["x"],
    ...      "criterion": "CD19+ B cells > 5 cells/uL"}}, {"file": "b.fcs", "subject_id": "S1", "study_day": -7,
    ...     "eligibility": {"verdict": "eligible", "value": 6.9, "ci95": [5.4, 8.7], "events": 140, "reasons": ["y"],
    ...      "criterion": "CD19+ B cells > 5 cells/uL"}}])
    >>> rows[0]["verdict"], rows[0]["file"]
    ('eligible', 'b.fcs')
    """
    by_subject = {}
    for result in distinct_tubes(results):
        if result.get("eligibility"):
            by_subject.setdefault(subject_of(result), []).append(result)
    rows = []
    for subject, tubes in sorted(by_subject.items()):
        tubes = sorted(tubes, key=_day_key)
        valid = [t for t in tubes if t["eligibility"]["verdict"] != "qc_fail" and t.get("status", "ok") == "ok"]
        deciding = valid[-1] if valid else tubes[-1]
        decision = deciding["eligibility"]
        reasons = list(decision.get("reasons") or [])
        for other in tubes:
            if other is deciding:
                continue
            verdict = other["eligibility"]["verdict"]
            why = "failed QC, not used" if other not in valid else \
                f"superseded by the later tube {Path(deciding['file']).name}"
            reasons.append(f"{Path(other['file']).name} (day {other.get('study_day')}): {verdict}, {why}")
        rows.append({
            "subject_id": subject,
            "verdict": decision["verdict"],
            "value": decision.get("value"),
            "ci95": decision.get("ci95"),
            "events": decision.get("events"),
            "file": deciding["file"],
            "study_day": deciding.get("study_day"),
            "reasons": reasons,
            "criterion": decision.get("criterion"),
            "rule": SCREENING_RULE,
            "tubes": [{"file": t["file"], "study_day": t.get("study_day"), "verdict": t["eligibility"]["verdict"]}
                      for t in tubes],
        })
    return rows


@dataclass
class AplasiaRule:
    """A named, versioned definition of B-cell aplasia (recorded with results)."""

    name: str = "absolute-count"
    version: str = "1"
    threshold_cells_per_ul: float = 1.0

    @property
    def definition(self):
        return f"CD19+ B cells < {self.threshold_cells_per_ul:g} cells/uL after infusion (day > 0)"

    def as_dict(self):
        return {**asdict(self), "definition": self.definition}


def _point(result):
    populations = result.get("populations") or {}

    def entry(name):
        count = populations.get(name)
        # No count (no counting method) or a gate that failed its checks is
        # not a point of the kinetics; the visit's flags say why.
        if not count or count.get("cells_per_ul") is None or count.get("reliable") is False:
            return None
        entry = {"cells_per_ul": count["cells_per_ul"], "ci95": count["ci95"], "below_lloq": count["below_lloq"],
                 "events": count["events"]}
        for limit in ("lod", "lloq"):  # the tube's own detection limits, when the analysis gives them
            if count.get(limit):
                entry[limit] = count[limit]
        return entry

    return {"study_day": result.get("study_day"), "file": result["file"], "status": result.get("status", "ok"),
            "car_t": entry("car_t"), "b_cells": entry("b_cells"), "qc_flags": list(result.get("qc_flags") or [])}


def trapezoid_auc(days, values, start=0.0, end=28.0):
    """Linear-trapezoid area under ``values`` over ``days`` in [start, end].

    Only the observed visits inside the window are used (no extrapolation).

    Examples
    --------
    >>> trapezoid_auc([0, 7, 14, 28], [0.0, 70.0, 70.0, 0.0])
    1225.0
    """
    days = np.asarray(days, dtype=float)
    values = np.asarray(values, dtype=float)
    inside = (days >= start) & (days <= end)
    days, values = days[inside], values[inside]
    if days.size < 2:
        return None
    order = np.argsort(days)
    days, values = days[order], values[order]
    return float(np.sum((values[1:] + values[:-1]) / 2.0 * np.diff(days)))


def kinetics(points, aplasia=None, auc_window=(0.0, 28.0)):
    """Kinetic parameters of one subject's CAR+ T cells and B-cell aplasia.

    Parameters
    ----------
    points : list of dict
        Timeline points (``study_day``, ``car_t`` and ``b_cells`` entries with
        ``cells_per_ul`` and ``below_lloq``), any order; points without a
        numeric study day or with an error are skipped.
    aplasia : AplasiaRule, optional
    auc_window : (float, float)

    Returns
    -------
    dict
        ``cmax``, ``tmax_day``, ``auc_0_28``, ``clast``, ``tlast_day``,
        ``persistence_last_visit``, ``aplasia_onset_day``,
        ``aplasia_recovery_day``, ``aplasia_duration_days``,
        ``aplasia_ongoing``, and the conventions used.

    Examples
    --------
    >>> pts = [{"study_day": d, "car_t": {"cells_per_ul": v, "below_lloq": v < 5},
    ...         "b_cells": {"cells_per_ul": b, "below_lloq": b < 5}}
    ...        for d, v, b in [(0, 0, 40), (7, 60, 0), (14, 120, 0), (28, 30, 0.5), (84, 2, 3)]]
    >>> k = kinetics(pts)
    >>> k["cmax"], k["tmax_day"], k["auc_0_28"], k["tlast_day"], k["aplasia_onset_day"], k["aplasia_recovery_day"]
    (120, 14, 1890.0, 28, 7, 84)
    """
    aplasia = aplasia or AplasiaRule()
    usable = [p for p in points if isinstance(p.get("study_day"), (int, float)) and p.get("status", "ok") == "ok"]
    usable.sort(key=lambda p: p["study_day"])
    car = [(p["study_day"], p["car_t"]) for p in usable if p.get("car_t")]
    quantifiable = [(day, c["cells_per_ul"]) for day, c in car if not c["below_lloq"]]
    out = {"cmax": None, "tmax_day": None, "auc_0_28": None, "clast": None, "tlast_day": None,
           "persistence_last_visit": None, "aplasia_onset_day": None, "aplasia_recovery_day": None,
           "aplasia_duration_days": None, "aplasia_ongoing": False,
           "conventions": {"below_lloq_in_auc": "taken as 0", "auc": "linear trapezoid over visits in "
                           f"[{auc_window[0]:g}, {auc_window[1]:g}] days, no extrapolation",
                           "cmax_tmax": "over quantifiable values (at or above LLOQ)"},
           "aplasia_rule": aplasia.as_dict()}
    if quantifiable:
        day, value = max(quantifiable, key=lambda item: item[1])
        out["cmax"], out["tmax_day"] = value, day
        out["clast"], out["tlast_day"] = quantifiable[-1][1], quantifiable[-1][0]
    if car:
        days = [day for day, _ in car]
        values = [0.0 if c["below_lloq"] else c["cells_per_ul"] for _, c in car]
        out["auc_0_28"] = trapezoid_auc(days, values, *auc_window)
        last_day, last = car[-1]
        out["persistence_last_visit"] = {"study_day": last_day, "cells_per_ul": last["cells_per_ul"],
                                         "below_lloq": last["below_lloq"],
                                         "detected": bool(last.get("events", 1) >= 1 and last["cells_per_ul"] > 0)}
    b_cells = [(p["study_day"], p["b_cells"]) for p in usable if p.get("b_cells") and p["study_day"] > 0]
    threshold = aplasia.threshold_cells_per_ul
    for day, b in b_cells:
        if out["aplasia_onset_day"] is None and b["cells_per_ul"] < threshold:
            out["aplasia_onset_day"] = day
        elif out["aplasia_onset_day"] is not None and b["cells_per_ul"] >= threshold:
            out["aplasia_recovery_day"] = day
            break
    if out["aplasia_onset_day"] is not None:
        end = out["aplasia_recovery_day"]
        if end is None:
            out["aplasia_ongoing"] = True
            end = b_cells[-1][0]
        out["aplasia_duration_days"] = end - out["aplasia_onset_day"]
    return out


CROSSCHECK_ALPHA = 0.001
CROSSCHECK_RULE = ("two-sided z-test of ln(TBNK T/uL) - ln(CAR-tube T/uL) = 0, each tube's standard error from its "
                   "exact 95% interval ((ln high - ln low) / 3.92: Poisson counting of cells and beads); "
                   "flagged when p < {alpha:g}")


def _t_cell_count(result):
    """``(entry, None)`` for a result's T-cell count usable in the cross-check, else ``(None, why)``."""
    name = Path(result["file"]).name
    if result.get("status", "ok") != "ok":
        return None, f"{name} failed ({result.get('error') or 'error'})"
    count = (result.get("populations") or {}).get("t_cells")
    if not count:
        return None, f"{name} has no T-cell count"
    if count.get("cells_per_ul") is None:
        return None, f"{name}: T cells not counted ({count.get('count_reason') or 'no counting method'})"
    if count.get("reliable") is False:
        return None, f"{name}: T-cell gate unreliable"
    ci = count.get("ci95")
    if count.get("below_lloq") or not ci or not ci[0] > 0 or not count["cells_per_ul"] > 0:
        return None, f"{name}: {count.get('events')} T-cell events, too few to compare"
    return {"file": result["file"], "cells_per_ul": count["cells_per_ul"], "ci95": list(ci),
            "events": count.get("events"), "bead_events": (result.get("beads") or {}).get("events")}, None


def t_cell_crosscheck(tbnk, car, alpha=CROSSCHECK_ALPHA):
    """Compare the T cells/µL of a TBNK tube and a CAR tube of the same visit (same blood).

    Parameters
    ----------
    tbnk, car : dict
        Per-sample results (``analyze_file``) with ``populations.t_cells``
        (``cells_per_ul``, ``ci95``, ``events``).
    alpha : float
        Two-sided significance level of the z-test (see the module notes).

    Returns
    -------
    dict
        ``study_day``, ``tbnk`` and ``car`` (file, cells/µL, interval, events,
        bead events), ``compared``, ``ratio`` (TBNK / CAR tube),
        ``difference_pct``, ``z``, ``p_value``, ``alpha``, ``flagged``,
        ``reason`` (why not compared) and the ``rule``.

    Examples
    --------
    >>> def tube(name, value, low, high):
    ...     return {"file": name, "study_day": 28, "populations": {"t_cells": {"cells_per_ul": value,
    ...             "ci95": [low, high], "events": 4000, "below_lloq": False}}}
    >>> same = t_cell_crosscheck(tube("T.fcs", 471.6, 458.0, 485.5), tube("C.fcs", 462.4, 448.9, 476.2))
    >>> same["flagged"], round(same["z"], 2)
    (False, 0.93)
    >>> wrong_lot = t_cell_crosscheck(tube("T.fcs", 405.0, 393.3, 417.0), tube("C.fcs", 462.4, 448.9, 476.2))
    >>> wrong_lot["flagged"], round(wrong_lot["difference_pct"], 1), round(wrong_lot["z"], 1)
    (True, -12.4, -6.3)
    """
    rule = CROSSCHECK_RULE.format(alpha=alpha)
    out = {"study_day": car.get("study_day"), "tbnk": None, "car": None, "compared": False, "ratio": None,
           "difference_pct": None, "z": None, "p_value": None, "alpha": alpha, "flagged": False, "reason": None,
           "rule": rule}
    (a, why_a), (b, why_b) = _t_cell_count(tbnk), _t_cell_count(car)
    out["tbnk"], out["car"] = a, b
    if a is None or b is None:
        out["reason"] = "not compared: " + "; ".join(w for w in (why_a, why_b) if w)
        return out
    z_975 = 1.959963984540054
    se = [(math.log(c["ci95"][1]) - math.log(c["ci95"][0])) / (2 * z_975) for c in (a, b)]
    diff = math.log(a["cells_per_ul"]) - math.log(b["cells_per_ul"])
    z = diff / math.hypot(*se)
    p = math.erfc(abs(z) / math.sqrt(2.0))
    out.update(compared=True, ratio=math.exp(diff), difference_pct=(math.exp(diff) - 1.0) * 100.0, z=z,
               p_value=p, flagged=p < alpha)
    return out


def crosscheck_text(check):
    """One line for a cross-check (CLI and flags).

    Examples
    --------
    >>> crosscheck_text({"study_day": 28, "compared": False, "reason": "not compared: T.fcs has no T-cell count"})
    'T-cell cross-check day 28: not compared: T.fcs has no T-cell count'
    """
    head = f"T-cell cross-check day {check['study_day']}"
    if not check["compared"]:
        return f"{head}: {check['reason']}"
    a, b = check["tbnk"], check["car"]
    verdict = (f"DISAGREE beyond counting noise (p = {check['p_value']:.2g} < {check['alpha']:g})" if check["flagged"]
               else f"agree within counting noise (p = {check['p_value']:.2g})")
    return (f"{head}: TBNK {Path(a['file']).name} {count_text(a)} vs "
            f"CAR tube {Path(b['file']).name} {count_text(b)} "
            f"T cells/uL ({check['difference_pct']:+.1f}%, z = {check['z']:.2f}): {verdict}")


def _numeric_day(result):
    day = result.get("study_day")
    return float(day) if isinstance(day, (int, float)) and not isinstance(day, bool) else None


def _carry_car_shape(items):
    """Re-read each visit's CAR+ count with the shape its subject's earlier visits measured (in place).

    See :mod:`cytometry.decisions.car_shape`. The visit's own count stays in
    its entry's ``own``; the timeline point says which visits the shape came
    from, or why it was not used.
    """
    dated = sorted(((day, result, point) for result, point in items
                    if (day := _numeric_day(result)) is not None and result.get("status", "ok") == "ok"),
                   key=lambda item: item[0])
    earlier = []   # (day, log_sd, se) of the visits before, their own fits
    for day, result, point in dated:
        entry = point.get("car_t")
        before = [(d, s, e) for d, s, e in earlier if d < day]
        prior = pooled_shape([(s, e) for _, s, e in before])
        if entry is not None and prior is not None:
            new, why = reread_with_shape(result, entry, prior)
            days = ", ".join(f"{d:g}" for d, _, _ in before)
            if new is not None:
                new["own"] = {key: entry[key] for key in ("cells_per_ul", "ci95", "below_lloq", "events")}
                new["shape"]["prior_days"] = [d for d, _, _ in before]
                point["car_t"] = new
                point["qc_flags"].append(
                    f"car_t: counted with the CAR signal's log-SD of days {days} ({prior['log_sd']:.2f} ± "
                    f"{prior['sd']:.2f}); this tube alone: {format_sig(entry['cells_per_ul'])} cells/uL")
            elif why.startswith("its own"):
                point["qc_flags"].append(f"car_t: shape of days {days} not used: {why}")
        level, _, _ = car_count_details(result)
        # only a usable count's shape (not one whose gate failed its checks) informs later visits
        if entry is not None and level is not None and level.get("log_sd_se"):
            earlier.append((day, float(level["log_sd"]), float(level["log_sd_se"])))


def persistence(results, aplasia=None, crosscheck_alpha=CROSSCHECK_ALPHA, carry_shape=True):
    """Per-subject timelines and kinetics from the CAR tubes of a run.

    TBNK tubes are not kinetics points; a TBNK tube on the same study day as
    a CAR tube of the subject is compared with it (:func:`t_cell_crosscheck`).

    Parameters
    ----------
    results : list of dict
        Per-sample results of a run (any panels).
    aplasia : AplasiaRule, optional
    crosscheck_alpha : float
        Significance level of the TBNK/CAR T-cell cross-check.
    carry_shape : bool
        Re-read each CAR visit with the CAR signal's log-SD its subject's
        earlier visits measured (:mod:`cytometry.decisions.car_shape`; the
        visit's own count kept in ``car_t["own"]``); ``False``: every
        visit as its tube alone gives it.

    Returns
    -------
    list of dict
        ``subject_id``, ``timeline`` (sorted by study day; each point has
        ``t_cell_crosscheck``, a list with one entry per TBNK tube of that
        day, and a ``t_cells`` qc flag when a pair disagrees), the fields of
        :func:`kinetics`, and ``t_cell_crosscheck`` (``rule``, ``pairs``,
        ``flagged_days``).

    Examples
    --------
    >>> def tube(panel, day, t, car=None):
    ...     pops = {"t_cells": {"cells_per_ul": t, "ci95": [t * 0.96, t * 1.04], "events": 2500, "below_lloq": False},
    ...             "b_cells": {"cells_per_ul": 0.0, "ci95": [0.0, 0.4], "events": 0, "below_lloq": True}}
    ...     if car is not None:
    ...         pops["car_t"] = {"cells_per_ul": car, "ci95": [car * 0.9, car * 1.1], "events": 400,
    ...                          "below_lloq": False}
    ...     return {"file": f"{panel}{day}.fcs", "subject_id": "S1", "study_day": day, "panel": panel,
    ...             "populations": pops, "qc_flags": []}
    >>> rows = persistence([tube("car", 7, 300.0, car=80.0), tube("tbnk", 7, 250.0), tube("tbnk", 14, 400.0)])
    >>> [p["study_day"] for p in rows[0]["timeline"]], rows[0]["t_cell_crosscheck"]["flagged_days"]
    ([7], [7])
    """
    by_subject, tbnk_by_visit = {}, {}
    for result in distinct_tubes(results):
        if result.get("panel") == "car" or (result.get("populations") or {}).get("car_t"):
            by_subject.setdefault(subject_of(result), []).append((result, _point(result)))
        elif result.get("panel") == "tbnk" and _numeric_day(result) is not None:
            tbnk_by_visit.setdefault((subject_of(result), _numeric_day(result)), []).append(result)
    rows = []
    rule = CROSSCHECK_RULE.format(alpha=crosscheck_alpha)
    for subject, items in sorted(by_subject.items()):
        items = _one_tube_per_visit(items)
        pairs, flagged = 0, []
        for result, point in items:
            checks = []
            day = _numeric_day(result)
            if day is not None:
                for tbnk in sorted(tbnk_by_visit.get((subject, day), []), key=lambda r: Path(r["file"]).name):
                    check = t_cell_crosscheck(tbnk, result, crosscheck_alpha)
                    checks.append(check)
                    pairs += check["compared"]
                    if check["flagged"]:
                        point["qc_flags"].append(f"t_cells: {crosscheck_text(check)}")
                        if point["study_day"] not in flagged:
                            flagged.append(point["study_day"])
            point["t_cell_crosscheck"] = checks
        if carry_shape:
            _carry_car_shape(items)
        points = [point for _, point in items]
        points.sort(key=lambda p: (p["study_day"] if isinstance(p["study_day"], (int, float)) else float("inf")))
        rows.append({"subject_id": subject, "timeline": points, **kinetics(points, aplasia),
                     "t_cell_crosscheck": {"rule": rule, "alpha": crosscheck_alpha, "pairs": pairs,
                                           "flagged_days": sorted(flagged)}})
    return rows


def _one_tube_per_visit(items):
    """One timeline point per study day: several CAR tubes of a day give the point of one of them.

    The tube used is the last by file name among those analysed without
    error (the last of all when every one failed); the point names the
    others in a qc flag, so a visit is never counted twice in the kinetics.
    """
    by_day, order = {}, []
    for result, point in items:
        day = _numeric_day(result)
        key = ("day", day) if day is not None else ("file", result["file"])
        if key not in by_day:
            order.append(key)
        by_day.setdefault(key, []).append((result, point))
    kept = []
    for key in order:
        tubes = sorted(by_day[key], key=lambda item: (item[0].get("status", "ok") == "ok", Path(item[0]["file"]).name))
        result, point = tubes[-1]
        others = [Path(other["file"]).name for other, _ in tubes[:-1]]
        if others:
            point["qc_flags"].append(f"visit: other CAR tubes of day {point['study_day']} not used (one point per "
                                     f"visit): {', '.join(others)}")
            point["other_tubes"] = others
        kept.append((result, point))
    return kept


# OWASP's CSV-injection rule: a cell starting with one of these may be run as a formula by a spreadsheet.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_PLAIN_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def safe_cell(value):
    r"""A CSV cell a spreadsheet will not run: text starting with ``= + - @``, tab or CR gets a leading ``'``.

    Numbers are left alone, and so is text that is a plain number (a study
    day ``-14`` read as text): a negative number is data, not a formula, and
    must stay usable as a number. Any other text starting with one of those
    characters (``-1+A1``, a file name starting with a tab) is prefixed.

    Examples
    --------
    >>> safe_cell("=HYPERLINK(1)"), safe_cell(-2.5), safe_cell("-14"), safe_cell("\tS01.fcs"), safe_cell("S01")
    ("'=HYPERLINK(1)", -2.5, '-14', "'\tS01.fcs", 'S01')
    """
    if isinstance(value, str) and value.startswith(_FORMULA_START) and not _PLAIN_NUMBER.fullmatch(value):
        return "'" + value
    return value


def write_csv(path_or_handle, columns, rows):
    """Write rows (dicts) with the given ``(header, key)`` columns, neutralising formula cells (:func:`safe_cell`).

    A file is UTF-8; a file name that is not (its undecodable bytes) is
    written with backslash escapes (``\\udcff``) rather than failing.
    """
    close = False
    if isinstance(path_or_handle, (str, Path)):
        handle = open(path_or_handle, "w", newline="", encoding="utf-8", errors="backslashreplace")
        close = True
    else:
        handle = path_or_handle
    try:
        writer = csv.writer(handle)
        writer.writerow([header for header, _ in columns])
        for row in rows:
            writer.writerow([safe_cell(key(row) if callable(key) else row.get(key)) for _, key in columns])
    finally:
        if close:
            handle.close()


ELIGIBILITY_COLUMNS = [
    ("subject_id", "subject_id"), ("verdict", "verdict"), ("b_cells_per_ul", "value"),
    ("b_cells_ci95_low_per_ul", lambda r: r["ci95"][0] if r.get("ci95") else None),
    ("b_cells_ci95_high_per_ul", lambda r: r["ci95"][1] if r.get("ci95") else None),
    ("b_cell_events", "events"), ("study_day", "study_day"), ("file", "file"),
    ("reasons", lambda r: " | ".join(r.get("reasons") or [])),
]


def _timeline_value(name, field):
    def get(point):
        entry = point.get(name)
        if not entry:
            return None
        if field == "low":
            return entry["ci95"][0]
        if field == "high":
            return entry["ci95"][1]
        return entry[field]
    return get


def _crosscheck_value(get):
    """A CSV cell from the point's TBNK/CAR cross-checks: the value, or values joined by ' | ' for several."""
    def cell(point):
        values = [get(check) for check in point.get("t_cell_crosscheck") or []]
        if not values:
            return None
        return values[0] if len(values) == 1 else " | ".join(str(v) for v in values)
    return cell


PERSISTENCE_COLUMNS = [
    ("subject_id", "subject_id"), ("study_day", "study_day"),
    ("car_t_per_ul", _timeline_value("car_t", "cells_per_ul")),
    ("car_t_ci95_low_per_ul", _timeline_value("car_t", "low")),
    ("car_t_ci95_high_per_ul", _timeline_value("car_t", "high")),
    ("car_t_below_lloq", _timeline_value("car_t", "below_lloq")),
    # the tube alone, where the count above was read with the earlier visits' CAR signal shape
    ("car_t_tube_alone_per_ul", lambda p: ((p.get("car_t") or {}).get("own") or {}).get("cells_per_ul")),
    ("car_t_shape_from_days", lambda p: " ".join(f"{d:g}" for d in ((p.get("car_t") or {}).get("shape") or {})
                                                 .get("prior_days", [])) or None),
    ("b_cells_per_ul", _timeline_value("b_cells", "cells_per_ul")),
    ("b_cells_below_lloq", _timeline_value("b_cells", "below_lloq")),
    ("file", "file"), ("qc_flags", lambda p: " | ".join(p.get("qc_flags") or [])),
    ("tbnk_t_cells_per_ul", _crosscheck_value(lambda c: c["tbnk"] and c["tbnk"]["cells_per_ul"])),
    ("car_tube_t_cells_per_ul", _crosscheck_value(lambda c: c["car"] and c["car"]["cells_per_ul"])),
    ("t_cell_crosscheck_z", _crosscheck_value(lambda c: c["z"])),
    ("t_cell_crosscheck_flagged", _crosscheck_value(lambda c: c["flagged"] if c["compared"] else None)),
]


def persistence_csv_rows(subjects):
    """One CSV row per visit (with its subject), for :data:`PERSISTENCE_COLUMNS`."""
    return [{"subject_id": s["subject_id"], **point} for s in subjects for point in s["timeline"]]


def kinetics_figure(subject):
    """CAR+ T and CD19+ B cells over study days, log scale, with intervals, LLOQ and aplasia.

    Parameters
    ----------
    subject : dict
        A row of :func:`persistence`.

    Returns
    -------
    matplotlib.figure.Figure
    """
    # No backend chosen here: a notebook keeps its inline figures, and the
    # command line sets Agg before anything imports pyplot (cytometry.outputs.cli).

    fig, axes = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    floor = 0.05  # where zero and < LLOQ values are drawn on a log axis
    for ax, name, label, colour in ((axes[0], "car_t", "CAR+ T cells/uL", "tab:red"),
                                    (axes[1], "b_cells", "CD19+ B cells/uL", "tab:blue")):
        points = [p for p in subject["timeline"] if p.get(name) and isinstance(p.get("study_day"), (int, float))]
        if not points:
            ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center")
            continue
        days = np.array([p["study_day"] for p in points], dtype=float)
        values = np.array([max(p[name]["cells_per_ul"], floor) for p in points])
        low = np.array([max(p[name]["ci95"][0], floor) for p in points])
        high = np.array([max(p[name]["ci95"][1], floor) for p in points])
        below = np.array([p[name]["below_lloq"] for p in points])
        ax.errorbar(days, values, yerr=[values - low, high - values], fmt="-", color=colour, alpha=0.6, capsize=3)
        ax.plot(days[~below], values[~below], "o", color=colour, label="quantifiable")
        ax.plot(days[below], values[below], "o", mfc="white", color=colour, label="< LLOQ")
        # LLOQ in cells/uL differs per tube (its own bead ratio): draw it per visit.
        lloq = []
        for p in points:
            entry = p[name]
            if (entry.get("lloq") or {}).get("cells_per_ul") is not None:  # the tube's own LLOQ
                lloq.append(entry["lloq"]["cells_per_ul"])
                continue
            # cells/uL per event; with 0 events, from the exact upper bound (3.689 events).
            per_event = entry["cells_per_ul"] / entry["events"] if entry["events"] else entry["ci95"][1] / 3.689
            lloq.append(25 * per_event if per_event else np.nan)
        ax.step(days, lloq, where="mid", color="0.5", ls="--", lw=1, label="LLOQ (per tube)")
        ax.set_yscale("log")
        ax.set_ylabel(label)
        ax.legend(fontsize=7, loc="best")
    onset, recovery = subject.get("aplasia_onset_day"), subject.get("aplasia_recovery_day")
    if onset is not None:
        last = max(p["study_day"] for p in subject["timeline"] if isinstance(p.get("study_day"), (int, float)))
        for ax in axes:
            ax.axvspan(onset, recovery if recovery is not None else last, color="tab:blue", alpha=0.08,
                       label="B-cell aplasia")
    axes[1].set_xlabel("study day")
    cmax = subject.get("cmax")
    name = printable(subject["subject_id"])  # control characters drawn as escapes, as in the tables
    title = f"{name}: Cmax {format_sig(cmax)}/uL on day {subject.get('tmax_day')}" if cmax else \
        f"{name}: no quantifiable CAR+ value"
    if subject.get("auc_0_28") is not None:
        title += f", AUC0-28 {format_sig(subject['auc_0_28'], 4)} cells/uL x day"
    # The subject ID is data, not matplotlib math: an ID such as ``x$^$`` is drawn as written.
    fig.suptitle(title, fontsize=10, parse_math=False, usetex=False)
    fig.tight_layout()
    return fig


def save_kinetics_figure(subject, out_dir):
    """Write ``<subject>.kinetics.png`` and return its path.

    The name is :func:`cytometry.outputs.formatting.safe_name` of the subject
    ID: ``S01`` writes ``S01.kinetics.png``; an ID that is not a safe file
    name (``S/01``, 300 characters) gets a safe one with a hash suffix, so two
    subjects never write the same file. The title draws the ID as written
    (no matplotlib math).

    Examples
    --------
    >>> import tempfile
    >>> d = tempfile.TemporaryDirectory()
    >>> [save_kinetics_figure({"subject_id": s, "timeline": []}, d.name).name for s in ("S_01", "S/01", "x$^$")]
    ['S_01.kinetics.png', 'S_01-6461d37fd2.kinetics.png', 'x___-a68438872b.kinetics.png']
    >>> d.cleanup()
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{safe_name(subject['subject_id'])}.kinetics.png"
    fig = kinetics_figure(subject)
    try:
        fig.savefig(target, dpi=90)
    finally:
        plt.close(fig)
    return target
