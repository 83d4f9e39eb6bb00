"""A self-contained HTML QC report of a results store, for a lab reviewer.

One file, images embedded (base64 PNG), no scripts: per-sample counts with
intervals and flags, gating thumbnails (redrawn from the FCS files when they
are still where the store says), the eligibility table and the persistence
plots. Every value that comes from a file, a manifest or a keyword is
HTML-escaped.
"""
from __future__ import annotations

import base64
import datetime as _dt
import html
import io
from pathlib import Path

from ._version import __version__

_STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin-bottom: 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #bbb; padding: 0.25em 0.5em; text-align: left; vertical-align: top; }
th { background: #eee; }
.eligible { background: #e3f4e3; } .not_eligible { background: #f4f4f4; }
.indeterminate { background: #fff4d6; } .qc_fail, .error { background: #fbe0e0; }
.flags { font-size: 0.85em; color: #6a3d00; }
img.thumb { width: 420px; border: 1px solid #ccc; }
"""


def _e(value):
    return html.escape("" if value is None else str(value), quote=True)


def _png(fig, dpi=60):
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _count_text(count):
    if not count:
        return ""
    if count.get("cells_per_ul") is None:
        text = f"{count['events']} ev, no count"
        return _e(text) + ("" if count.get("reliable", True) else " <b>UNRELIABLE</b>")
    if count.get("reliable") is False:
        return "<b>UNRELIABLE</b> " + _count_text({**count, "reliable": True})
    text = f"{count['cells_per_ul']:.3g} [{count['ci95'][0]:.3g}–{count['ci95'][1]:.3g}] ({count['events']} ev)"
    return ("&lt;LLOQ " if count["below_lloq"] else "") + _e(text)


def build_report(results, thumbnails=True, aplasia=None):
    """The report's HTML text for a list of per-sample results.

    Parameters
    ----------
    results : list of dict
        Results of the CLI contract (e.g. ``ResultStore(path).results()``).
    thumbnails : bool
        Redraw a gating figure per sample from its FCS file (when found).

    Returns
    -------
    str
    """
    from .subjects import crosscheck_text, kinetics_figure, persistence, screening_decisions

    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>Cytometry QC report</title>"
             f"<style>{_STYLE}</style></head><body>",
             f"<h1>Cytometry QC report</h1><p>{len(results)} samples; software {_e(__version__)}; written "
             f"{_e(_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'))}.</p>"]

    rows = screening_decisions(results)
    parts.append("<h2>Screening eligibility</h2>")
    if rows:
        parts.append("<table><tr><th>subject</th><th>verdict</th><th>CD19+ B cells/µL [95% CI]</th><th>events</th>"
                     "<th>deciding tube</th><th>reasons</th></tr>")
        for row in rows:
            value = "" if row["value"] is None else f"{row['value']:.3g} [{row['ci95'][0]:.3g}–{row['ci95'][1]:.3g}]"
            parts.append(f"<tr class='{_e(row['verdict'])}'><td>{_e(row['subject_id'])}</td><td>{_e(row['verdict'])}"
                         f"</td><td>{_e(value)}</td><td>{_e(row['events'])}</td><td>{_e(Path(row['file']).name)}</td>"
                         f"<td>{'<br>'.join(_e(r) for r in row['reasons'])}</td></tr>")
        parts.append("</table>")
    else:
        parts.append("<p>No screening tubes.</p>")

    parts.append("<h2>Samples</h2><table><tr><th>file</th><th>subject</th><th>day</th><th>panel</th><th>status</th>"
                 "<th>B cells/µL</th><th>CAR+ T/µL</th><th>T cells/µL</th><th>beads</th><th>method</th>"
                 "<th>flags</th></tr>")
    for r in results:
        populations = r.get("populations") or {}
        status = r.get("status", "ok")
        verdict = (r.get("eligibility") or {}).get("verdict", "")
        css = "error" if status == "error" else verdict
        flags = [r["error"]] if status == "error" else (r.get("qc_flags") or [])
        parts.append(f"<tr class='{_e(css)}'><td>{_e(Path(r['file']).name)}</td><td>{_e(r.get('subject_id'))}</td>"
                     f"<td>{_e(r.get('study_day'))}</td><td>{_e(r.get('panel'))}</td><td>{_e(status)}</td>"
                     f"<td>{_count_text(populations.get('b_cells'))}</td><td>{_count_text(populations.get('car_t'))}"
                     f"</td><td>{_count_text(populations.get('t_cells'))}</td>"
                     f"<td>{_e((r.get('beads') or {}).get('events'))}</td>"
                     f"<td>{_e((r.get('counting') or {}).get('method'))}</td>"
                     f"<td class='flags'>{'<br>'.join(_e(f) for f in flags)}</td></tr>")
    parts.append("</table>")

    subjects = persistence(results, aplasia)
    if subjects:
        parts.append("<h2>CAR-T persistence</h2>")
        for subject in subjects:
            cmax = "none quantifiable" if subject["cmax"] is None else \
                f"{subject['cmax']:.3g}/µL on day {subject['tmax_day']}"
            parts.append(f"<h3>{_e(subject['subject_id'])}</h3><p>Cmax {_e(cmax)}; AUC(0–28 d) "
                         f"{_e(subject['auc_0_28'])} cells/µL × day; last quantifiable {_e(subject['clast'])} on day "
                         f"{_e(subject['tlast_day'])}; B-cell aplasia from day {_e(subject['aplasia_onset_day'])}, "
                         f"recovery day {_e(subject['aplasia_recovery_day'])}.</p>")
            checks = [check for point in subject["timeline"] for check in point.get("t_cell_crosscheck") or []]
            if checks:
                parts.append("<ul>" + "".join(f"<li class='{'error' if c['flagged'] else 'ok'}'>"
                                              f"{_e(crosscheck_text(c))}</li>" for c in checks) + "</ul>")
            parts.append(f"<img alt='kinetics {_e(subject['subject_id'])}' src='{_png(kinetics_figure(subject), 70)}'>")

    if thumbnails:
        parts.append("<h2>Gating</h2>")
        parts.extend(_thumbnails(results))
    parts.append("</body></html>")
    return "\n".join(parts)


def _thumbnails(results):
    from .analysis import gate_file
    from .plots import gating_figure

    out = []
    for r in results:
        path = Path(r["file"])
        if r.get("status") != "ok":
            continue
        if not path.exists():
            out.append(f"<p>{_e(path.name)}: FCS file not found where the store recorded it; no figure.</p>")
            continue
        try:
            figure = gating_figure(gate_file(path), title=path.name)
            out.append(f"<figure><img class='thumb' alt='gating {_e(path.name)}' src='{_png(figure)}'>"
                       f"<figcaption>{_e(path.name)}</figcaption></figure>")
        except Exception as exc:
            out.append(f"<p>{_e(path.name)}: figure not drawn ({_e(type(exc).__name__)}: {_e(exc)})</p>")
    return out


def write_report(store_path, out_dir, thumbnails=True):
    """Write ``out_dir/report.html`` for the store at ``store_path``; returns the path.

    Examples
    --------
    >>> write_report("run.store", "qc")  # doctest: +SKIP
    PosixPath('qc/report.html')
    """
    from .store import ResultStore

    results = ResultStore(store_path).one_parameter_set()[1]  # exactly one parameter set (StoreError if mixed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / "report.html"
    target.write_text(build_report(results, thumbnails=thumbnails), encoding="utf-8")
    return target
