"""A self-contained HTML QC report of a results store, for a lab reviewer, drawn from the store alone.

One file, images embedded (base64 PNG), no scripts. The report reads the
store and nothing else — no FCS file, no re-gating — so what it shows is the
exact gating that produced the counts, wherever it is run from:

* the screening eligibility table, a summary row per sample and the CAR-T
  persistence of each subject, rows sorted by subject and study day;
* per sample, full-size gating figures drawn from the stored events, masks
  and gates (each gate labelled with its population, events and % of
  parent; axes in decades), the population hierarchy (events, % of parent,
  % of all events, cells/µL, 95% CI, flags), each reviewer check as pass /
  flag / fail, and an audit block (file SHA-256, instrument and acquisition
  date from the file's keywords, software version, parameter hash, the CAR
  reference and its normalisation, the gates' thresholds) with a blank
  sign-off line.

Numbers measured from events are rounded to three significant figures
(:func:`cytometry.outputs.formatting.format_sig`); event counts are exact. A print
stylesheet keeps each sample on its own pages when printed to PDF. Every
value that comes from a file, a manifest or a keyword is HTML-escaped, its
control and bidi characters written as visible escapes
(:func:`cytometry.outputs.formatting.printable`). A figure that cannot be
drawn is said in its place; the rest of the report is still written.
"""
from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import logging
import sys
from pathlib import Path

import matplotlib.pyplot as plt
from tqdm import tqdm

from cytometry._version import __version__
from cytometry.batch.store import ResultStore
from cytometry.decisions.subjects import crosscheck_text, kinetics_figure, persistence, screening_decisions
from cytometry.outputs.formatting import count_text, format_sig, interval_text, printable
from cytometry.outputs.plots import GatingView, gating_figure

logger = logging.getLogger(__name__)

_STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; max-width: 1600px; }
table { border-collapse: collapse; margin-bottom: 1.2em; font-size: 0.9em; }
th, td { border: 1px solid #bbb; padding: 0.25em 0.5em; text-align: left; vertical-align: top; }
th { background: #eee; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.nowrap { white-space: nowrap; }
.eligible { background: #e3f4e3; } .not_eligible { background: #f4f4f4; }
.indeterminate { background: #fff4d6; } .qc_fail, .error { background: #fbe0e0; }
.flags { font-size: 0.85em; color: #6a3d00; }
td.flags { min-width: 14em; }
.check-pass { background: #e3f4e3; } .check-flag { background: #fff4d6; } .check-fail { background: #fbe0e0; }
.check-not_applicable { color: #666; }
.verdict { font-weight: bold; text-transform: uppercase; }
section.sample { border-top: 3px solid #888; margin-top: 2em; padding-top: 0.5em; }
img.gating { width: 100%; max-width: 1500px; border: 1px solid #ccc; }
.missing { background: #fbe0e0; padding: 0.5em; border: 1px solid #c66; }
table.audit th { width: 14em; }
.signoff td { height: 2.2em; min-width: 14em; }
.indent1 { padding-left: 1.5em; } .indent2 { padding-left: 3em; } .indent3 { padding-left: 4.5em; }
.indent4 { padding-left: 6em; }
@media print {
  body { margin: 0; font-size: 10pt; max-width: none; }
  section.sample { page-break-before: always; break-before: page; border-top: none; }
  table, figure, .signoff { page-break-inside: avoid; break-inside: avoid; }
  h2, h3, summary { page-break-after: avoid; break-after: avoid; }
  img.gating { max-width: 100%; border: none; }
  th { background: #eee !important; -webkit-print-color-adjust: exact; print-color-adjust: exact; }
  .check-pass, .check-flag, .check-fail, .eligible, .indeterminate, .qc_fail, .error {
    -webkit-print-color-adjust: exact; print-color-adjust: exact; }
  nav { display: none; }
}
"""

#: How a typed flag's severity reads as a reviewer check.
CHECK_OUTCOME = {"info": "pass", "warning": "flag", "fail": "fail"}


def _e(value):
    # Controls and bidi overrides as visible escapes first: html.escape leaves them raw.
    return html.escape(printable(value), quote=True)


def _png(fig, dpi=100):
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=dpi)
    finally:  # closed even when drawing fails, so a long report does not keep failed figures open
        plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _count_text(count):
    """One population's count for the summary table: value [95% CI] (events), LLOQ and reliability said."""
    if not count:
        return ""
    text = _e(count_text(count)).replace("UNRELIABLE", "<b>UNRELIABLE</b>", 1)
    if count.get("cells_per_ul") is None:
        return text
    # The value and its interval stay on one line; the events go below.
    events = _e(f"({count['events']:,} ev)")
    return f'<span class="nowrap">{text}</span> <span class="nowrap">{events}</span>'



def sort_key(result):
    """Subject, then study day (unknown last), then file name: the report's row order.

    Examples
    --------
    >>> rows = [{"subject_id": "S01", "study_day": 4, "file": "b"}, {"subject_id": "S01", "study_day": -14,
    ...         "file": "a"}, {"subject_id": None, "study_day": None, "file": "c"}]
    >>> [r["file"] for r in sorted(rows, key=sort_key)]
    ['a', 'b', 'c']
    """
    day = result.get("study_day")
    try:
        day = float(day)
    except (TypeError, ValueError):
        day = float("inf")
    subject = result.get("subject_id")
    return (subject is None, str(subject or ""), day, Path(str(result.get("file", ""))).name)


def _hierarchy(populations):
    """Population names in tree order (each after its parent), with their depth."""
    children = {}
    for name, entry in populations.items():
        parent = entry.get("parent") if entry.get("parent") in populations else None
        children.setdefault(parent, []).append(name)
    out = []

    def walk(parent, depth):
        for name in children.get(parent, []):
            out.append((name, depth))
            walk(name, depth + 1)

    walk(None, 0)
    return out


def population_rows(result):
    """The hierarchy table of one sample: one dict per population, tree order, numbers as the report prints them.

    Returns
    -------
    list of dict
        ``population``, ``depth``, ``events`` (int), ``parent``,
        ``pct_of_parent``, ``pct_of_total``, ``cells_per_ul``, ``ci95`` (text)
        and ``flags`` (list of str).

    Examples
    --------
    >>> rows = population_rows({"events_total": 1000, "flags": [], "populations": {
    ...     "leukocytes": {"events": 800, "parent": None, "pct_of_parent": None, "cells_per_ul": 2000.4,
    ...                    "ci95": [1900.1, 2100.9], "reliable": True},
    ...     "lymphocytes": {"events": 200, "parent": "leukocytes", "pct_of_parent": 25.0, "cells_per_ul": 500.1,
    ...                     "ci95": [430.2, 570.3], "reliable": True}}})
    >>> [(r["population"], r["depth"], r["pct_of_total"], r["cells_per_ul"]) for r in rows]
    [('leukocytes', 0, '80.0', '2,000'), ('lymphocytes', 1, '20.0', '500')]
    """
    populations = result.get("populations") or {}
    total = result.get("events_total")
    by_population = {}
    for flag in result.get("flags") or []:
        by_population.setdefault(flag.get("population"), []).append(f"{flag.get('code')}: {flag.get('message')}")
    rows = []
    for name, depth in _hierarchy(populations):
        entry = populations[name]
        flags = list(by_population.get(name, []))
        flags += [f"unreliable: {reason}" for reason in entry.get("unreliable_reasons") or []]
        if entry.get("cells_per_ul") is None and entry.get("count_reason"):
            flags.append(f"no count: {entry['count_reason']}")
        lloq = (entry.get("lloq") or {}).get("events")
        value = format_sig(entry.get("cells_per_ul"))
        if entry.get("below_lloq") and value:
            value = f"<LLOQ {value}"
        rows.append({"population": name, "depth": depth, "events": int(entry["events"]), "parent": entry.get("parent"),
                     "pct_of_parent": format_sig(entry.get("pct_of_parent")),
                     "pct_of_total": format_sig(100.0 * entry["events"] / total) if total else "",
                     "cells_per_ul": value, "ci95": interval_text(entry.get("ci95")),
                     "lloq_events": "" if lloq is None else f"{lloq:g}", "reliable": entry.get("reliable", True), "flags": flags})
    return rows


def checks(result):
    """Each reviewer check of one sample as ``(outcome, population, code, message)``, worst first.

    Every check the QC ran is listed, passed or not, with what it measured
    and its limit (``result["checks"]``); a typed flag from the gating
    (severity ``fail`` a *fail*, ``warning`` a *flag*, ``info`` a *pass*
    with a note) is listed with its message; a population whose gate raised
    nothing is one *pass* line; a sample that failed to analyse is one
    *fail*. Outcomes sort fail, flag, pass, not_applicable.

    Examples
    --------
    >>> result = {"status": "ok", "populations": {"b_cells": {}, "lymphocytes": {}},
    ...           "checks": [{"check": "stop_rule", "population": "lymphocytes", "outcome": "flag",
    ...                       "measured": "2275 lymphocyte events", "limit": ">= 2500"}],
    ...           "flags": [{"population": "lymphocytes", "code": "stop_rule", "severity": "warning",
    ...                      "message": "2275 events < 2500"},
    ...                     {"population": "b_cells", "code": "below_lloq", "severity": "info", "message": "..."}]}
    >>> for row in checks(result):
    ...     print(row)
    ('flag', 'lymphocytes', 'stop_rule', '2275 events < 2500 (measured 2275 lymphocyte events; limit >= 2500)')
    ('pass', 'b_cells', 'below_lloq', '...')
    """
    if result.get("status") == "error":
        return [("fail", None, "analysis", result.get("error"))]
    flags = result.get("flags") or []
    run = {(c["population"], c["check"]): c for c in result.get("checks") or []}
    out = []
    for check in run.values():
        measured = f"measured {check['measured']}; limit {check['limit']}"
        flag = next((f for f in flags if (f.get("population"), f.get("code")) == (check["population"], check["check"])),
                    None)
        out.append((check["outcome"], check["population"], check["check"],
                    f"{flag['message']} ({measured})" if flag else measured))
    for f in flags:
        if (f.get("population"), f.get("code")) not in run:
            out.append((CHECK_OUTCOME.get(f.get("severity"), "flag"), f.get("population"), f.get("code"),
                        f.get("message")))
    flagged = {f.get("population") for f in flags}
    for name in result.get("populations") or {}:
        if name not in flagged:
            out.append(("pass", name, "gate checks", "no gate check raised a note, a flag or a failure"))
    order = {"fail": 0, "flag": 1, "pass": 2, "not_applicable": 3}
    return sorted(out, key=lambda c: order.get(c[0], 1))


def _table(header, rows, css="", numeric=()):
    parts = [f"<table class='{css}'><tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr>"]
    for row in rows:
        parts.append("<tr>" + "".join(f"<td class='num'>{cell}</td>" if i in numeric else f"<td>{cell}</td>"
                                      for i, cell in enumerate(row)) + "</tr>")
    parts.append("</table>")
    return "".join(parts)


def _audit(result, provenance, parameter_set):
    keywords = provenance.get("fcs_keywords") or {}
    acquired = " ".join(str(keywords[k]) for k in ("date", "btim") if keywords.get(k))
    if keywords.get("etim"):
        acquired += f"–{keywords['etim']}"
    counting = result.get("counting") or {}
    beads = result.get("beads") or {}
    rows = [("file", Path(str(result.get("file", ""))).name),
            ("file SHA-256", result.get("sha256") or provenance.get("sha256")),
            ("file size", f"{provenance['file_size']:,} bytes" if provenance.get("file_size", -1) >= 0 else ""),
            ("instrument ($CYT)", keywords.get("cyt", "not in the file")),
            ("acquired ($DATE $BTIM–$ETIM)", acquired or "not in the file"),
            ("tube name / source ($SRC)", " / ".join(str(keywords[k]) for k in ("tube name", "src") if keywords.get(k))),
            ("software version", result.get("software_version") or provenance.get("software_version")),
            ("parameter hash", provenance.get("params_hash")),
            ("parameter set", parameter_set),
            ("analysed at", provenance.get("written_at")),
            ("device", result.get("device")),
            ("compensation", (result.get("compensation") or {}).get("source")),
            ("counting", f"{counting.get('method') or 'none'}; beads per test {format_sig(beads.get('beads_per_test'), 5)}, "
                         f"{format_sig(beads.get('sample_volume_ul'))} µL of blood, {beads.get('events', '')} bead events; "
                         f"LLOQ {counting.get('lloq_events', '')} events, LOD {counting.get('lod_events', '')} events")]
    car = result.get("car_threshold")
    if car:
        norm = car.get("normalisation") or {}
        text = (f"{car.get('source') or 'none'} — {car.get('method', '')}; cut at {format_sig(car.get('channel_value'))} "
                f"on {car.get('channel', '')} (logicle {format_sig(car.get('logicle'))})")
        rows.append(("CAR reference", text))
        if norm:
            rows.append(("CAR normalisation", f"gain ratio {format_sig(norm.get('gain_ratio'))} from "
                                              f"{norm.get('source', '?')} (bead ratio {format_sig(norm.get('bead_ratio'))}"
                                              f", negatives' ratio {format_sig(norm.get('negative_ratio'))}); added "
                                              f"noise SD {format_sig(norm.get('added_noise_sd'))}, stretch "
                                              f"{format_sig(norm.get('stretch'))}"))
    parts = [_table(["audit", ""], [(f"<b>{_e(k)}</b>", _e(v)) for k, v in rows], css="audit")]
    gates = (result.get("gating") or {}).get("gates") or []
    gate_rows = []
    for gate in gates:
        bounds = "; ".join(f"{d['channel']} ({d['transform']}) "
                           + " ".join(part for part in (f"≥ {format_sig(d['min'], 4)}" if d.get("min") is not None else "",
                                                        f"< {format_sig(d['max'], 4)}" if d.get("max") is not None else "")
                                      if part)
                           for d in gate.get("dimensions", []) if d.get("min") is not None or d.get("max") is not None)
        if gate.get("shape") == "polygon":
            bounds = f"polygon on {', '.join(d['channel'] for d in gate['dimensions'])}, {len(gate['vertices'])} vertices"
        elif gate.get("shape") == "not":
            bounds = f"not {gate.get('complement_of')}"
        gate_rows.append((_e(gate["name"]), _e(gate.get("parent") or ""), _e(bounds), _e(gate.get("method", ""))))
    if gate_rows:
        parts.append("<details open><summary>Gates and thresholds (transformed scale)</summary>"
                     + _table(["gate", "parent", "bounds", "how it was found"], gate_rows) + "</details>")
    parts.append("<table class='signoff'><tr><th>Reviewed by (name)</th><th>Signature</th><th>Date</th>"
                 "<th>Outcome (accept / reject)</th></tr><tr><td></td><td></td><td></td><td></td></tr></table>")
    return "".join(parts)


def _review_block(result):
    """"Manual gates in effect": the reviewed file and, per population, the automatic and reviewed counts."""

    review = (result.get("gating") or {}).get("reviewed_gates")
    if not review or "populations" not in review:
        return []
    automatic = (review.get("automatic") or {}).get("populations") or {}
    populations = result.get("populations") or {}
    mapping = f"; mapping {_e(review['mapping_file'])}" if review.get("mapping_file") else ""
    rows = []
    for name, moved in review["populations"].items():
        before, after = automatic.get(name) or {}, populations.get(name) or {}
        rows.append((_e(name), _e(review["mapping"].get(name) or "not gated"), f"{moved['automatic_events']:,}",
                     f"{moved['reviewed_events']:,}", f"{moved['moved_in']:,}", f"{moved['moved_out']:,}",
                     _e(format_sig(before.get("cells_per_ul"))), _e(format_sig(after.get("cells_per_ul")))))
    verdict = (review.get("automatic") or {}).get("verdict")
    return [f"<p class='manual'><b>manual gates in effect</b>: {_e(review['file'])} ({_e(review['format'])}, "
            f"sha256 <code>{_e(review['sha256'])}</code>{mapping})"
            + (f"; the automatic gates gave eligibility {_e(verdict)}" if verdict else "") + "</p>",
            _table(["population", "reviewer's gate", "automatic events", "reviewed events", "moved in", "moved out",
                    "automatic cells/µL", "reviewed cells/µL"], rows, numeric=(2, 3, 4, 5, 6, 7))]


def _sample_section(result, store, parameter_set, figures):
    """One sample's section and whether its gating figure was drawn."""
    name = Path(str(result.get("file", ""))).name
    day = result.get("study_day")
    anchor = _e(result.get("store_entry") or name)
    parts = [f"<section class='sample' id='{anchor}'><h2>{_e(name)}</h2>"
             f"<p>subject {_e(result.get('subject_id') or '—')}, study day {_e('—' if day is None else day)}, "
             f"visit {_e(result.get('visit') or '—')}, tube {_e(result.get('tube') or '—')}, panel "
             f"{_e(result.get('panel') or '—')}, status <b>{_e(result.get('status'))}</b>"
             + (f", eligibility <b>{_e(result['eligibility'].get('verdict'))}</b>" if result.get("eligibility") else "")
             + "</p>"]
    parts.extend(_review_block(result))
    provenance = {}
    entry = result.get("store_entry")
    if store is not None and entry:
        try:
            provenance = store.provenance(entry)
        except Exception as exc:  # an unreadable entry is said, never dropped
            parts.append(f"<p class='missing'>store entry unreadable: {_e(type(exc).__name__)}: {_e(exc)}</p>")

    outcome = checks(result)
    worst = outcome[0][0] if outcome else "pass"
    parts.append(f"<h3>Reviewer checks: <span class='verdict check-{worst}'>{_e(worst)}</span></h3>")
    if outcome:
        parts.append(_table(["check", "population", "code", "message"],
                            [(f"<span class='check-{o}'>{_e(o)}</span>", _e(p), _e(c), _e(m))
                             for o, p, c, m in outcome]))
    else:
        parts.append("<p class='check-pass'>No check raised a note, a flag or a failure.</p>")

    rows = population_rows(result)
    if rows:
        parts.append("<h3>Populations</h3>")
        parts.append(_table(
            ["population", "events", "% of parent", "% of all events", "cells/µL", "95% CI", "LLOQ (events)", "flags"],
            [(f"<span class='indent{min(r['depth'], 4)}'>{_e(r['population'])}</span>"
              + ("" if r["reliable"] else " <b>UNRELIABLE</b>"), f"{r['events']:,}",
              _e(r["pct_of_parent"] and f"{r['pct_of_parent']}% of {r['parent']}"), _e(r["pct_of_total"]),
              _e(r["cells_per_ul"]), _e(r["ci95"]), _e(r["lloq_events"]),
              "<span class='flags'>" + "<br>".join(_e(f) for f in r["flags"]) + "</span>") for r in rows],
            numeric=(1, 3, 4, 5, 6)))

    drawn = False
    if figures and result.get("status") == "ok":
        view = None
        if store is not None and entry:
            try:
                view = GatingView.from_store(store, entry, result)
            except Exception as exc:
                parts.append(f"<p class='missing'>{_e(name)}: gating figure not drawn "
                             f"({_e(type(exc).__name__)}: {_e(exc)})</p>")
                view = False
        if view is None:
            parts.append(f"<p class='missing'>{_e(name)}: no events stored for this sample, so no gating figure "
                         "(the entry was written without them). Analyse it into a new store with "
                         "<code>cytometry analyze … --out STORE</code>, which keeps them.</p>")
        elif view:
            try:
                image = _png(gating_figure(view))
            except Exception as exc:  # one figure that cannot be drawn is said, the report goes on
                parts.append(f"<p class='missing'>{_e(name)}: gating figure not drawn "
                             f"({_e(type(exc).__name__)}: {_e(exc)})</p>")
            else:
                parts.append(f"<h3>Gating</h3><figure><img class='gating' alt='gating {_e(name)}' src='{image}'>"
                             f"<figcaption>{_e(name)}: drawn from the store's events, masks and gates.</figcaption>"
                             "</figure>")
                drawn = True
    parts.append("<h3>Audit</h3>")
    parts.append(_audit(result, provenance, parameter_set))
    parts.append("</section>")
    return "\n".join(parts), drawn


def _progress(total, progress):
    """A tqdm bar on stderr (on a terminal by default), or nothing."""
    if progress is None:
        progress = sys.stderr.isatty()
    if not progress or total == 0:
        return None
    return tqdm(total=total, unit="sample", desc="report", file=sys.stderr)


def build_report(results, thumbnails=True, aplasia=None, store=None, parameter_set=None, progress=None,
                 summary=None):
    """The report's HTML text for a list of per-sample results.

    Parameters
    ----------
    results : list of dict
        Results of the CLI contract (e.g. ``ResultStore(path).one_parameter_set()[1]``).
    thumbnails : bool
        Draw each sample's gating figure (from ``store``).
    aplasia : optional
        The aplasia rule for the persistence section.
    store : cytometry.batch.store.ResultStore, optional
        Where the figures' events, masks and provenance come from; without
        one, each sample says it has no figure.
    parameter_set : str, optional
        The store's parameter set, named in the header and audit blocks.
    progress : bool, optional
        Progress bar on stderr (default: when stderr is a terminal).
    summary : dict, optional
        Filled with ``samples``, ``figures`` and ``without_figure`` (file names).

    Returns
    -------
    str

    Examples
    --------
    >>> text = build_report([], thumbnails=False)
    >>> "<h1>Cytometry QC report</h1>" in text and "@media print" in text
    True
    """

    results = sorted(results, key=sort_key)
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>Cytometry QC report</title>"
             f"<style>{_STYLE}</style></head><body>",
             f"<h1>Cytometry QC report</h1><p>{len(results)} samples; software {_e(__version__)}; parameter set "
             f"{_e(parameter_set or '—')}; written "
             f"{_e(_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'))}. Drawn from the results "
             "store alone: figures from the stored events, masks and gates.</p>"]

    rows = screening_decisions(results)
    parts.append("<h2>Screening eligibility</h2>")
    if rows:
        parts.append("<table><tr><th>subject</th><th>verdict</th><th>CD19+ B cells/µL [95% CI]</th><th>events</th>"
                     "<th>deciding tube</th><th>reasons</th></tr>")
        for row in rows:
            value = "" if row["value"] is None else f"{format_sig(row['value'])} {interval_text(row['ci95'])}"
            parts.append(f"<tr class='{_e(row['verdict'])}'><td>{_e(row['subject_id'])}</td><td>{_e(row['verdict'])}"
                         f"</td><td class='num'>{_e(value)}</td><td class='num'>{_e(row['events'])}</td>"
                         f"<td>{_e(Path(row['file']).name)}</td>"
                         f"<td>{'<br>'.join(_e(r) for r in row['reasons'])}</td></tr>")
        parts.append("</table>")
    else:
        parts.append("<p>No screening tubes.</p>")

    parts.append("<h2>Samples</h2><table><tr><th>file</th><th>subject</th><th>day</th><th>panel</th><th>status</th>"
                 "<th>checks</th><th>B cells/µL</th><th>CAR+ T/µL</th><th>T cells/µL</th><th>beads</th><th>method</th>"
                 "<th>flags</th></tr>")
    for r in results:
        populations = r.get("populations") or {}
        status = r.get("status", "ok")
        verdict = (r.get("eligibility") or {}).get("verdict", "")
        css = "error" if status == "error" else verdict
        flags = [r["error"]] if status == "error" else (r.get("qc_flags") or [])
        outcome = checks(r)
        worst = outcome[0][0] if outcome else "pass"
        anchor = _e(r.get("store_entry") or Path(str(r["file"])).name)
        parts.append(f"<tr class='{_e(css)}'><td><a href='#{anchor}'>{_e(Path(str(r['file'])).name)}</a></td>"
                     f"<td>{_e(r.get('subject_id'))}</td><td class='num'>{_e(r.get('study_day'))}</td>"
                     f"<td>{_e(r.get('panel'))}</td><td>{_e(status)}</td>"
                     f"<td class='check-{worst}'>{_e(worst)}</td>"
                     f"<td class='num'>{_count_text(populations.get('b_cells'))}</td>"
                     f"<td class='num'>{_count_text(populations.get('car_t'))}</td>"
                     f"<td class='num'>{_count_text(populations.get('t_cells'))}</td>"
                     f"<td class='num'>{_e((r.get('beads') or {}).get('events'))}</td>"
                     f"<td>{_e((r.get('counting') or {}).get('method'))}</td>"
                     f"<td class='flags'>{'<br>'.join(_e(f) for f in flags)}</td></tr>")
    parts.append("</table>")

    subjects = persistence(results, aplasia)
    if subjects:
        parts.append("<h2>CAR-T persistence</h2>")
        for subject in subjects:
            cmax = "none quantifiable" if subject["cmax"] is None else \
                f"{format_sig(subject['cmax'])}/µL on day {subject['tmax_day']}"
            clast = "none" if subject["clast"] is None else \
                f"{format_sig(subject['clast'])}/µL on day {subject['tlast_day']}"
            parts.append(f"<h3>{_e(subject['subject_id'])}</h3><p>Cmax {_e(cmax)}; AUC(0–28 d) "
                         f"{_e(format_sig(subject['auc_0_28'], 4))} cells/µL × day; last quantifiable {_e(clast)}; "
                         f"B-cell aplasia from day {_e(subject['aplasia_onset_day'])}, "
                         f"recovery day {_e(subject['aplasia_recovery_day'])}.</p>")
            crosschecks = [check for point in subject["timeline"] for check in point.get("t_cell_crosscheck") or []]
            if crosschecks:
                parts.append("<ul>" + "".join(f"<li class='{'error' if c['flagged'] else 'ok'}'>"
                                              f"{_e(crosscheck_text(c))}</li>" for c in crosschecks) + "</ul>")
            try:
                image = _png(kinetics_figure(subject), 80)
            except Exception as exc:  # said in its place; the other subjects and samples are still reported
                parts.append(f"<p class='missing'>kinetics figure of {_e(subject['subject_id'])} not drawn "
                             f"({_e(type(exc).__name__)}: {_e(exc)})</p>")
            else:
                parts.append(f"<img alt='kinetics {_e(subject['subject_id'])}' src='{image}'>")

    parts.append("<h2>Per sample</h2>")
    without = []
    bar = _progress(len(results), progress)
    try:
        for result in results:
            section, drawn = _sample_section(result, store, parameter_set, thumbnails)
            parts.append(section)
            if thumbnails and result.get("status") == "ok" and not drawn:
                without.append(Path(str(result.get("file", ""))).name)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    if summary is not None:
        summary.update(samples=len(results), figures=len(results) - len(without) if thumbnails else 0,
                       without_figure=without)
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(store_path, out_dir, thumbnails=True, progress=None, summary=None):
    """Write ``out_dir/report.html`` for the store at ``store_path``, from the store alone; returns the path.

    The store's one parameter set is reported (a store holding several is
    refused, :class:`cytometry.batch.store.StoreError`). Samples whose entry holds
    no events get a line saying so instead of a figure, and a warning is
    logged naming how many.

    Parameters
    ----------
    store_path : str or Path
    out_dir : str or Path
        Created when missing.
    thumbnails : bool
        Draw the gating figures (``--no-thumbnails`` skips them).
    progress : bool, optional
        Progress bar on stderr (default: when stderr is a terminal).
    summary : dict, optional
        Filled as by :func:`build_report`.

    Examples
    --------
    >>> import tempfile
    >>> from cytometry.batch.run import run_batch
    >>> from cytometry.loading.manifest import read_manifest
    >>> d = tempfile.TemporaryDirectory()
    >>> _ = run_batch(["sample_fcs/S03_screening_TBNK.fcs"], read_manifest("sample_fcs/manifest.csv"),
    ...               store=f"{d.name}/run.store", workers=1)
    >>> write_report(f"{d.name}/run.store", f"{d.name}/qc", progress=False).name
    'report.html'
    >>> d.cleanup()
    """

    store = ResultStore(store_path)
    parameter_set, results = store.one_parameter_set()  # exactly one parameter set (StoreError if mixed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / "report.html"
    summary = {} if summary is None else summary
    text = build_report(results, thumbnails=thumbnails, store=store, parameter_set=parameter_set, progress=progress,
                        summary=summary)
    target.write_text(text, encoding="utf-8")
    if summary.get("without_figure"):
        logger.warning("%s: %d of %d samples have no stored events and no gating figure (%s)", target,
                       len(summary["without_figure"]), summary["samples"], ", ".join(summary["without_figure"]))
    return target
