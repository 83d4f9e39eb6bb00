"""The ``cytometry`` command.

Exit codes: 0 every sample ok, 1 some sample failed (the others are still
reported) or could not be stored or read back (a damaged store entry, a
full disk: one line each on stderr), 2 usage error (including a manifest
with problems, all listed in one message before anything is analysed, a
run whose parameters differ from its store's, and a store another run
holds). Errors are one line on stderr naming the file; a
traceback only with ``--debug``. Text from files, file names and the
manifest is printed through :func:`cytometry.outputs.formatting.printable`:
control and bidi characters appear as visible escapes (``\\x1b``,
``\\u202e``), never raw on a terminal. Log messages (module loggers under
``cytometry``) go to stderr: warnings by default, ``--verbose`` adds what
each step does, ``--quiet`` leaves errors only; stdout is the same either way.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

# Figures are files here (report, --plots): no display is needed or wanted.
os.environ.setdefault("MPLBACKEND", "Agg")

from cytometry._version import __version__
from cytometry.analysis import AnalysisOptions
from cytometry.batch.run import default_workers, run_batch
from cytometry.batch.store import ResultStore, StoreError, StoreWriteError, is_reviewed_entry
from cytometry.decisions.subjects import (ELIGIBILITY_COLUMNS, PERSISTENCE_COLUMNS, AplasiaRule, crosscheck_text,
                                          persistence, persistence_csv_rows, save_kinetics_figure, screening_decisions,
                                          write_csv)
from cytometry.loading.fcs import FcsError, read_fcs
from cytometry.loading.manifest import ManifestError, check_manifest, read_manifest
from cytometry.loading.panel import PanelError, match_marker, resolve_panel
from cytometry.outputs.formatting import count_text, format_sig, interval_text, printable
from cytometry.outputs.report import write_report
from gating.panels import PanelDefinitionError, load_panels

EXIT_OK, EXIT_SAMPLE_FAILED, EXIT_USAGE = 0, 1, 2
logger = logging.getLogger(__name__)


class UsageError(Exception):
    """Bad command-line input (exit code 2)."""


def _collect_files(inputs, manifest):
    """FCS files named on the command line (directories give their *.fcs), in a stable order."""
    files = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() == ".fcs")
            if not found and manifest is None:
                raise UsageError(f"{path}: no .fcs files in this directory")
            files.extend(found)
        elif path.exists():
            files.append(path)
        else:
            # Reported as that sample's error, so the rest of the batch still runs.
            files.append(path)
    if manifest is not None:
        # Files the manifest lists but that were not found are reported, not silently skipped.
        given = {p.resolve() for p in files}
        given_dirs = {Path(i).resolve() for i in inputs if Path(i).is_dir()}
        for listed in manifest.files():
            if listed.resolve() not in given and listed.resolve().parent in given_dirs:
                files.append(listed)
    unique, seen = [], set()
    for path in files:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(path)
    return unique


def _format_table(results):
    headers = ["file", "subject", "day", "tube", "panel", "B cells/uL [95% CI]", "CAR+ T/uL [95% CI]",
               "beads", "eligibility", "flags"]
    rows = []
    for r in results:
        if r["status"] == "error":
            verdict = r["eligibility"]["verdict"] if r.get("eligibility") else ""
            rows.append([Path(r["file"]).name, r.get("subject_id") or "", _day(r), r.get("tube") or "",
                         r.get("panel") or "", "ERROR", "", "", verdict, r["error"]])
            continue
        pops = r["populations"]
        rows.append([
            Path(r["file"]).name, r.get("subject_id") or "", _day(r), r.get("tube") or "", r["panel"],
            _cell(pops.get("b_cells")), _cell(pops.get("car_t")) if r["panel"] == "car" else "",
            str(r["beads"]["events"]) if r.get("beads") else "",
            r["eligibility"]["verdict"] if r.get("eligibility") else "",
            "; ".join(r["qc_flags"]),
        ])
    rows = [[printable(cell) for cell in row] for row in rows]  # escapes first, so the widths are what is shown
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    return "\n".join(lines)


def _day(result):
    day = result.get("study_day")
    return "" if day is None else str(day)


def _cell(count):
    return count_text(count)


def _analyse_run(args):
    """Analyse the files of a run (shared by analyze, eligibility and persistence)."""
    manifest = None
    if args.manifest:
        try:
            manifest = read_manifest(args.manifest)
        except ManifestError as exc:
            raise UsageError(str(exc)) from None
    for option in ("compensation", "panel"):
        value = getattr(args, option)
        if value and not Path(value).is_file():
            raise UsageError(f"{value}: --{option} file not found")

    try:
        load_panels(args.panels)  # a broken panel file is one line here, not one per sample
    except PanelDefinitionError as exc:
        raise UsageError(str(exc)) from None
    options = AnalysisOptions(beads_per_test=args.beads_per_test, sample_volume_ul=args.sample_volume_ul,
                              compensation=args.compensation, panel_file=args.panel, device=args.device,
                              panel_dirs=tuple(args.panels),
                              lloq_events=args.lloq_events, lod_events=args.lod_events,
                              min_bead_events=args.min_bead_events, method=args.method,
                              dilution_factor=args.dilution_factor, lymphocytes_per_ul=args.lymphocytes_per_ul)
    files = _collect_files(args.inputs, manifest)
    if not files:
        raise UsageError("no FCS files to analyse")
    gates, gate_map = getattr(args, "gates", None), getattr(args, "gate_map", None)
    if gate_map and not gates:
        raise UsageError("--gate-map maps the gates of --gates REVIEWED; give both")
    if gates and len(files) != 1:
        raise UsageError(f"--gates names one file's reviewed gates, and {len(files)} files are analysed; use the "
                         "manifest column gates for several")
    allow_unlisted = getattr(args, "allow_unlisted", False)
    if manifest is not None:
        folders = [Path(item) for item in args.inputs if Path(item).is_dir()]
        try:
            check_manifest(manifest, files, folders, options, allow_unlisted=allow_unlisted)
        except ManifestError as exc:
            raise UsageError(str(exc)) from None

    def report_error(result):
        if result["status"] == "error":
            print(printable(f"error: {result['file']}: {result['error']}"), file=sys.stderr)
        if result.get("store_error"):
            print(printable(f"error: {result['file']}: not stored: {result['store_error']}"), file=sys.stderr)
        for line in result.get("output_errors") or ():
            print(printable(f"error: {result['file']}: {line}"), file=sys.stderr)

    def notice(line):  # a damaged entry moved aside (its sample is analysed again in this run)
        print(printable(f"warning: {line}"), file=sys.stderr)

    logger.info("%d FCS files to analyse%s", len(files), f" with {args.manifest}" if manifest else "")
    try:
        results = run_batch(files, manifest, options, store=getattr(args, "out", None),
                            workers=getattr(args, "workers", None) or default_workers(),
                            scheduler=getattr(args, "scheduler", None),
                            keep_events=getattr(args, "store_events", False),
                            plots_dir=getattr(args, "gating_plots", None),
                            gatingml_dir=getattr(args, "gatingml", None),
                            raise_errors=args.debug, on_result=report_error,
                            replace=getattr(args, "replace", False), allow_unlisted=allow_unlisted,
                            gates=gates, gate_map=gate_map,
                            lock_timeout=getattr(args, "lock_timeout", 0.0), on_notice=notice)
    except (ManifestError, StoreError) as exc:
        raise UsageError(str(exc)) from None
    except StoreWriteError as exc:  # e.g. parameters.json on a full disk: nothing can be stored
        raise _Failed(str(exc)) from None
    for result in results:  # samples already in the store are reported too
        if result.get("skipped"):
            report_error(result)
    return results


class _Failed(Exception):
    """The command could not do its work (exit code 1, one line)."""


def _exit_code(results):
    failed = any(r["status"] == "error" or r.get("store_error") or r.get("output_errors") for r in results)
    return EXIT_SAMPLE_FAILED if failed else EXIT_OK


SAMPLE_COLUMNS = [
    ("file", lambda r: Path(r["file"]).name), ("subject_id", "subject_id"), ("study_day", "study_day"),
    ("tube", "tube"), ("panel", "panel"), ("status", "status"),
    ("b_cells_per_ul", lambda r: _pop(r, "b_cells", "cells_per_ul")),
    ("b_cells_ci95_low_per_ul", lambda r: _pop(r, "b_cells", "ci95", 0)),
    ("b_cells_ci95_high_per_ul", lambda r: _pop(r, "b_cells", "ci95", 1)),
    ("b_cell_events", lambda r: _pop(r, "b_cells", "events")),
    ("b_cells_below_lloq", lambda r: _pop(r, "b_cells", "below_lloq")),
    ("car_t_per_ul", lambda r: _pop(r, "car_t", "cells_per_ul")),
    ("car_t_ci95_low_per_ul", lambda r: _pop(r, "car_t", "ci95", 0)),
    ("car_t_ci95_high_per_ul", lambda r: _pop(r, "car_t", "ci95", 1)),
    ("car_t_events", lambda r: _pop(r, "car_t", "events")),
    ("car_t_below_lloq", lambda r: _pop(r, "car_t", "below_lloq")),
    ("bead_events", lambda r: (r.get("beads") or {}).get("events")),
    ("eligibility", lambda r: (r.get("eligibility") or {}).get("verdict")),
    ("flags", lambda r: " | ".join(r.get("qc_flags") or [])),
    ("error", "error"),
    ("gating_source", lambda r: (r.get("gating") or {}).get("source")),
    ("reviewed_gates_sha256", lambda r: ((r.get("gating") or {}).get("reviewed_gates") or {}).get("sha256")),
]


def _pop(result, population, field, index=None):
    value = ((result.get("populations") or {}).get(population) or {}).get(field)
    if index is not None:
        return value[index] if value else None
    return value


def cmd_analyze(args):
    results = _analyse_run(args)
    if args.csv:

        write_csv(args.csv, SAMPLE_COLUMNS, results)
        logger.info("wrote %d rows to %s", len(results), args.csv)
    if args.json:
        json.dump({"samples": results, "software_version": __version__}, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(_format_table(results))
        failed = sum(r["status"] == "error" for r in results)
        unstored = sum(bool(r.get("store_error")) for r in results)
        also = f", {unstored} not stored" if unstored else ""
        print(f"\n{len(results)} samples, {len(results) - failed} ok, {failed} failed{also}")
    return _exit_code(results)


def _subject_results(args):
    """Per-sample results for the subject commands: from a store, or by analysing the files."""
    if getattr(args, "store", None):
        if args.inputs:
            raise UsageError("give FCS files or --store, not both")
        return _store_results(args.store, args)
    if not args.inputs:
        raise UsageError("give FCS files (with --manifest) or --store STORE")
    return _analyse_run(args)


def _store_results(path, args=None):
    """The results of the store's one parameter set; a line on stderr names it (not with ``--quiet``)."""
    if not (Path(path) / "samples").is_dir():
        raise UsageError(f"{path}: not a results store (no samples/ folder)")
    try:
        name, results = ResultStore(path).one_parameter_set()
    except StoreError as exc:
        raise UsageError(str(exc)) from None
    if args is not None:
        args.parameter_set = name
    unreadable = [r for r in results if r.get("store_damaged")]
    if not getattr(args, "quiet", False):
        also = f", {len(unreadable)} unreadable" if unreadable else ""
        print(printable(f"{path}: parameter set {name}, {len(results) - len(unreadable)} samples{also}"),
              file=sys.stderr)
    for result in results:  # what could not be read (or was not analysed) is named, never silently left out
        if result.get("status") == "error":
            print(printable(f"error: {result['file']}: {result['error']}"), file=sys.stderr)
    return results


def cmd_gates(args):
    """Write the stored automatic gates of one sample as GatingML 2.0, for a reviewer to correct."""
    if not (Path(args.store) / "samples").is_dir():
        raise UsageError(f"{args.store}: not a results store (no samples/ folder)")
    store = ResultStore(args.store)
    wanted = args.sample
    matches = []
    for entry in store.entries():
        if is_reviewed_entry(entry):
            continue
        result = store.results_for(entry)
        names = {Path(str(result.get("file", ""))).name, Path(str(result.get("file", ""))).stem}
        if wanted in names or (len(wanted) >= 8 and str(result.get("sha256") or "").startswith(wanted)):
            matches.append((entry, result))
    if not matches:
        raise UsageError(f"{args.store}: no automatic result for sample {wanted!r} (give its FCS file name)")
    if len(matches) > 1:
        raise UsageError(f"{args.store}: {len(matches)} results match {wanted!r}; give the file's SHA-256")
    entry, result = matches[0]
    try:
        text = store.gatingml(entry.name)
    except Exception:
        text = None
    if not text:
        raise UsageError(f"{args.store}: the entry of {wanted} holds no GatingML (status {result.get('status')}); "
                         "analyse it again with --out")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    target = out / f"{Path(str(result['file'])).stem}.gating.xml"
    target.write_text(text if isinstance(text, str) else text.decode("utf-8"), encoding="utf-8")
    print(f"automatic gates of {Path(str(result['file'])).name} written to {target}; correct them (FlowJo, FCS "
          f"Express, FlowKit) and re-count with: cytometry analyze FILE --gates {target}")
    return EXIT_OK


def cmd_report(args):
    results = _store_results(args.store, args)  # a clear error for a path that is not a store
    if not results:
        raise UsageError(f"{args.store}: the results store holds no samples; nothing to report")
    target = write_report(args.store, args.out, thumbnails=not args.no_thumbnails)
    print(f"report written to {target}")
    # Damaged entries are in the report as errors, and named on stderr above.
    return EXIT_SAMPLE_FAILED if any(r.get("store_damaged") for r in results) else EXIT_OK


def _document(args, document):
    """A JSON document with the software version and, read from a store, its parameter set."""
    document["software_version"] = __version__
    if getattr(args, "parameter_set", None):
        document["parameter_set"] = args.parameter_set
    return document


def _unreadable(args, results, document):
    """Name the store entries that could not be read in a subject command's JSON document."""
    unreadable = [{"store_entry": r.get("store_entry"), "file": r["file"], "error": r["error"]}
                  for r in results if r.get("store_damaged")]
    if unreadable:
        document["unreadable"] = unreadable
    return document


def cmd_eligibility(args):
    results = _subject_results(args)
    rows = screening_decisions(results)
    if args.csv:
        write_csv(args.csv, ELIGIBILITY_COLUMNS, rows)
    if args.json:
        json.dump(_unreadable(args, results, _document(args, {"subjects": rows})), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(f"{'subject':10s} {'verdict':14s} {'B cells/uL [95% CI]':26s} {'events':>6s}  deciding tube")
        for row in rows:
            value = "" if row["value"] is None else f"{format_sig(row['value'])} {interval_text(row['ci95'])}"
            events = "" if row["events"] is None else str(row["events"])
            print(f"{printable(row['subject_id']):10s} {row['verdict']:14s} {value:26s} {events:>6s}  "
                  f"{printable(Path(row['file']).name)}")
            for reason in row["reasons"]:
                print(f"{'':12s}- {printable(reason)}")
        print(f"\n{len(rows)} subjects; rule: {rows[0]['rule'] if rows else ''}")
    return _exit_code(results)


def cmd_persistence(args):
    results = _subject_results(args)
    subjects = persistence(results, AplasiaRule(threshold_cells_per_ul=args.aplasia_threshold),
                           carry_shape=not args.own_shape_only)
    figures_failed = False
    if args.plots:
        for subject in subjects:
            try:
                subject["kinetics_figure"] = str(save_kinetics_figure(subject, args.plots))
            except Exception as exc:  # one figure that cannot be written loses neither the others nor the CSV/JSON
                if args.debug:
                    raise
                figures_failed = True
                subject["kinetics_figure_error"] = f"{type(exc).__name__}: {exc}".splitlines()[0]
                print(printable(f"error: {args.plots}: kinetics figure of subject {subject['subject_id']} not "
                                f"written ({subject['kinetics_figure_error']})"), file=sys.stderr)
    code = EXIT_SAMPLE_FAILED if figures_failed else _exit_code(results)
    if args.csv:
        write_csv(args.csv, PERSISTENCE_COLUMNS, persistence_csv_rows(subjects))
    if args.json:
        json.dump(_unreadable(args, results, _document(args, {"subjects": subjects})), sys.stdout, indent=2)
        sys.stdout.write("\n")
        return code
    for subject in subjects:
        print(f"subject {printable(subject['subject_id'])}")
        print(f"  {'day':>5s}  {'CAR+ T/uL [95% CI]':28s} {'B cells/uL':12s} flags")
        for point in subject["timeline"]:
            car, b = point.get("car_t"), point.get("b_cells")
            car_text, b_text = count_text(car), count_text(b, interval=False)
            flags = printable("; ".join(point["qc_flags"]))[:60]
            print(f"  {printable(point['study_day']):>5s}  {car_text:28s} {b_text:12s} {flags}")
        cmax = "none quantifiable" if subject["cmax"] is None else \
            f"{format_sig(subject['cmax'])}/uL on day {subject['tmax_day']}"
        auc = "-" if subject["auc_0_28"] is None else f"{format_sig(subject['auc_0_28'], 4)} cells/uL x day"
        last = "-" if subject["clast"] is None else f"{format_sig(subject['clast'])}/uL on day {subject['tlast_day']}"
        print(f"  Cmax {cmax}; AUC(0-28 d) {auc}; last quantifiable {last}")
        onset = subject["aplasia_onset_day"]
        if onset is None:
            print(f"  B-cell aplasia ({subject['aplasia_rule']['definition']}): not seen")
        else:
            end = "ongoing at the last visit" if subject["aplasia_ongoing"] else \
                f"recovery on day {subject['aplasia_recovery_day']}"
            print(f"  B-cell aplasia ({subject['aplasia_rule']['definition']}): from day {onset}, {end} "
                  f"({subject['aplasia_duration_days']} days)")
        for point in subject["timeline"]:
            for check in point.get("t_cell_crosscheck") or []:
                print(f"  {printable(crosscheck_text(check))}")
    return code


def inspect_file(path):
    """What ``cytometry inspect --json`` prints for one file (raises FcsError)."""
    sample = read_fcs(path)
    channels = []
    for i, (name, marker) in enumerate(zip(sample.pnn, sample.pns)):
        channels.append({"name": name, "marker": marker or None, "range": sample.ranges[i],
                         "bits": sample.keywords.get(f"p{i + 1}b"), "data_type": sample.datatype,
                         "resolved_marker": match_marker(marker) if marker else None})
    try:
        panel = resolve_panel(sample.pnn, sample.pns)
        panel_info = panel.as_dict()
        panel_error = None
    except PanelError as exc:
        panel_info, panel_error = None, str(exc)
    keys = ("cyt", "cytnum", "date", "btim", "etim", "fil", "src", "tube name", "op", "inst", "sys",
            "timestep", "vol", "experiment name")
    keywords = {k: sample.keywords[k] for k in keys if k in sample.keywords}
    return {"file": str(path), "sha256": sample.sha256, "fcs_version": sample.fcs_version,
            "events": sample.n_events, "datatype": sample.datatype, "channels": channels,
            "spillover": sample.spillover is not None,
            "spillover_keyword": sample.spillover.source if sample.spillover else None,
            "vol_nl": sample.vol_nl, "panel": panel_info, "panel_error": panel_error, "keywords": keywords}


def cmd_inspect(args):
    try:
        info = inspect_file(args.file)
    except FcsError as exc:
        print(printable(f"error: {exc}"), file=sys.stderr)
        return EXIT_SAMPLE_FAILED
    if args.json:
        json.dump(info, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return EXIT_OK
    print(f"file        {printable(info['file'])}")
    print(f"sha256      {info['sha256']}")
    print(f"FCS version {info['fcs_version']}   events {info['events']}   $DATATYPE {info['datatype']}")
    spill = info["spillover_keyword"] or "none"
    vol = f"{info['vol_nl']:g} nL" if info["vol_nl"] is not None else "absent"
    print(f"spillover   {spill}   $VOL {vol}")
    print("channels:")
    width = max(len(printable(c["name"])) for c in info["channels"])
    for i, c in enumerate(info["channels"], start=1):
        resolved = f"-> {c['resolved_marker']}" if c["resolved_marker"] else ""
        print(f"  P{i:<3} {printable(c['name']).ljust(width)}  {printable(c['marker'] or '').ljust(18)} "
              f"range {c['range']:<9g} {printable(resolved)}")
    if info["panel"]:
        markers = ", ".join(f"{m}={ch}" for m, ch in info["panel"]["markers"].items())
        print(printable(f"panel       {info['panel']['name'].upper()}: {markers}"))
    else:
        print(printable(f"panel       not resolved: {info['panel_error']}"))
    for key, value in info["keywords"].items():
        print(printable(f"  {key.upper():<16} {value}"))
    return EXIT_OK


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Help with each option's default (when it has one) and the epilog's examples kept as written."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if "default" in text or default in (None, False, [], ()) or default is argparse.SUPPRESS \
                or not action.option_strings or action.nargs == 0:
            return text
        return f"{text} (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _add_run_options(command, from_store=False):
    """Inputs and counting options shared by analyze, eligibility and persistence."""
    command.add_argument("inputs", nargs="*" if from_store else "+", metavar="FILE_OR_DIR",
                         help="FCS files or directories of them")
    if from_store:
        command.add_argument("--store", metavar="STORE", help="read the results of an earlier "
                                                             "`cytometry analyze --out STORE` instead of FCS files")
    command.add_argument("--manifest", help="sample sheet CSV (file, subject_id, visit, study_day, tube, "
                                            "beads_per_test, sample_volume_ul)")
    command.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    command.add_argument("--beads-per-test", type=float, help="beads in the tube (overrides the manifest)")
    command.add_argument("--sample-volume-ul", type=float, help="uL of blood in the tube (overrides the manifest)")
    command.add_argument("--method", choices=["auto", "beads", "volumetric", "dual-platform"], default=None,
                         help="counting method (default auto: beads, else volumetric from $VOL, else dual-platform)")
    command.add_argument("--dilution-factor", type=float,
                         help="stained sample / blood volume, for volumetric counting (overrides the manifest)")
    command.add_argument("--lymphocytes-per-ul", type=float,
                         help="haematology analyser lymphocytes/uL, for dual-platform counting (overrides the manifest)")
    command.add_argument("--compensation", metavar="MATRIX.csv", help="spillover matrix to use instead of the file's")
    command.add_argument("--panel", metavar="PANEL.csv", help="marker,channel overrides for panel resolution")
    command.add_argument("--panels", metavar="DIR", action="append", default=[],
                         help="a folder (or file) of extra panel definitions, JSON with markers, aliases and a "
                              "gating plan (repeatable; also CYTOMETRY_PANELS)")
    command.add_argument("--device", choices=["auto", "cpu", "gpu"], default=None,
                         help="where the gating kernels run (default: $CYTOMETRY_DEVICE or auto)")
    command.add_argument("--lloq-events", type=int, default=25, help="events below which a count is < LLOQ")
    command.add_argument("--lod-events", type=int, default=3, help="events below which a population is not detected")
    command.add_argument("--min-bead-events", type=int, default=1000, help="bead events below which a tube fails QC")
    command.add_argument("--workers", type=int, default=None,
                         help="local worker processes (default: the number of cores)")
    command.add_argument("--scheduler", metavar="ADDRESS",
                         help="run the per-sample work on a Dask distributed cluster (address or scheduler file)")
    command.add_argument("--allow-unlisted", action="store_true",
                         help="analyse FCS files the manifest does not list (refused by default: a misspelt "
                              "name would analyse a file without its subject, day and bead constants)")
    command.add_argument("--debug", action="store_true", help="show tracebacks (runs in this process)")
    _add_logging_options(command)


def _add_logging_options(command):
    group = command.add_mutually_exclusive_group()
    group.add_argument("-v", "--verbose", action="count", default=0,
                       help="log what each step does on stderr (-vv: debug detail); default: warnings only")
    group.add_argument("-q", "--quiet", action="store_true", help="log errors only on stderr")


class _PrintableFormatter(logging.Formatter):
    """Log lines with control and bidi characters escaped (messages name files and subjects), lines kept."""

    def format(self, record):
        return "\n".join(printable(line) for line in super().format(record).splitlines())


def _configure_logging(args):
    """One stderr handler on the package loggers, at the level ``--verbose``/``--quiet`` ask for."""
    verbose = getattr(args, "verbose", 0) or 0
    level = logging.ERROR if getattr(args, "quiet", False) else \
        logging.DEBUG if verbose > 1 else logging.INFO if verbose == 1 else logging.WARNING
    handler = logging.StreamHandler(sys.stderr)  # the stderr of this call (tests capture it)
    handler.setFormatter(_PrintableFormatter("%(levelname)s %(name)s: %(message)s"))
    handler._cytometry_cli = True
    for name in ("cytometry", "gating"):
        package = logging.getLogger(name)
        for old in [h for h in package.handlers if getattr(h, "_cytometry_cli", False)]:
            package.removeHandler(old)
        package.addHandler(handler)
        package.setLevel(level)
        package.propagate = False


_EXAMPLES = {
    "analyze": """examples:
  cytometry analyze sample_fcs/ --manifest sample_fcs/manifest.csv
  cytometry analyze sample_fcs/ --manifest sample_fcs/manifest.csv --out run.store --csv samples.csv
  cytometry analyze sample_fcs/ --manifest sample_fcs/manifest.csv --out run.store --lloq-events 10 --replace
  cytometry analyze sample_fcs/S01_screening_TBNK.fcs --beads-per-test 50120 --sample-volume-ul 50 --json""",
    "eligibility": """examples:
  cytometry eligibility sample_fcs/ --manifest sample_fcs/manifest.csv
  cytometry eligibility --store run.store --csv eligibility.csv""",
    "persistence": """examples:
  cytometry persistence sample_fcs/ --manifest sample_fcs/manifest.csv
  cytometry persistence --store run.store --plots kinetics/ --csv kinetics.csv""",
    "report": """example:
  cytometry analyze sample_fcs/ --manifest sample_fcs/manifest.csv --out run.store
  cytometry report run.store --out qc/""",
    "gates": """example (the review loop):
  cytometry analyze sample_fcs/ --manifest sample_fcs/manifest.csv --out run.store
  cytometry gates run.store S03_screening_TBNK.fcs --out review/
  cytometry analyze sample_fcs/S03_screening_TBNK.fcs --manifest sample_fcs/manifest.csv --out run.store \\
      --gates review/S03_screening_TBNK.gating.xml""",
    "inspect": """example:
  cytometry inspect sample_fcs/S01_day010_CAR.fcs --json""",
}


def build_parser():
    parser = _Parser(prog="cytometry", description="CD19+ B-cell and CAR+ T-cell absolute counts from FCS files.",
                     epilog="example:\n  cytometry analyze sample_fcs/ --manifest sample_fcs/manifest.csv\n\n"
                            "`cytometry COMMAND --help` shows each command's options and examples.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    analyze = sub.add_parser("analyze", help="gate and count FCS files (cells/uL with 95%% intervals)",
                             description="gate and count FCS files (cells/uL with 95%% intervals)", epilog=_EXAMPLES["analyze"])
    _add_run_options(analyze)
    analyze.add_argument("--plots", dest="gating_plots", metavar="DIR",
                         help="write a gating figure per sample (DIR/<file>.gating.png)")
    analyze.add_argument("--gatingml", metavar="DIR",
                         help="write each sample's automatic gates as GatingML 2.0 (DIR/<file>.gating.xml)")
    analyze.add_argument("--out", metavar="STORE", help="results store folder: one HDF5 file per sample, written "
                                                         "atomically; a re-run skips what is done")
    analyze.add_argument("--store-events", action="store_true", help="also keep the transformed events in the store")
    analyze.add_argument("--lock-timeout", type=float, default=10.0, metavar="SECONDS",
                         help="wait this long for another run writing --out STORE to finish, then refuse "
                              "(one writer per store)")
    analyze.add_argument("--replace", action="store_true",
                         help="discard the results already in --out STORE and analyse again (needed when this "
                              "run's parameters differ from the store's: a store holds one parameter set)")
    analyze.add_argument("--gates", metavar="REVIEWED", help="count from a reviewer's corrected gates instead of "
                                                             "the automatic ones: GatingML 2.0 (as --gatingml or "
                                                             "`cytometry gates` writes it, edited) or a FlowJo .wsp; "
                                                             "one file (the manifest column gates for several)")
    analyze.add_argument("--gate-map", metavar="MAP.csv", help="population,gate lines naming the reviewer's gate "
                                                               "of each population (a name, a path 'A > B', or - "
                                                               "for not gated); default: gates named as the "
                                                               "populations (manifest column gate_map)")
    analyze.add_argument("--csv", metavar="FILE", help="also write one row per sample as CSV (file, subject, day, "
                                                       "tube, panel, B cells/uL and CAR+ T/uL with 95%% CI, beads, "
                                                       "verdict, flags)")
    analyze.set_defaults(func=cmd_analyze)

    eligibility = sub.add_parser("eligibility", help="screening verdict per subject (CD19+ B cells > 5 cells/uL)",
                             description="screening verdict per subject (CD19+ B cells > 5 cells/uL)", epilog=_EXAMPLES["eligibility"])
    _add_run_options(eligibility, from_store=True)
    eligibility.add_argument("--csv", metavar="FILE", help="also write the table as CSV (units in column names)")
    eligibility.set_defaults(func=cmd_eligibility)

    kinetics = sub.add_parser("persistence", help="CAR+ T kinetics and B-cell aplasia per subject",
                              description="CAR+ T kinetics and B-cell aplasia per subject",
                              epilog=_EXAMPLES["persistence"])
    _add_run_options(kinetics, from_store=True)
    kinetics.add_argument("--aplasia-threshold", type=float, default=1.0,
                          help="B-cell aplasia: CD19+ B cells below this many cells/uL (default 1)")
    kinetics.add_argument("--own-shape-only", action="store_true",
                          help="count every CAR visit from its own tube alone (default: with the CAR signal's "
                               "log-SD its subject's earlier visits measured)")
    kinetics.add_argument("--plots", metavar="DIR", help="write a kinetics plot per subject (DIR/<subject>.kinetics.png)")
    kinetics.add_argument("--csv", metavar="FILE", help="also write the timelines as CSV (units in column names)")
    kinetics.set_defaults(func=cmd_persistence)

    gates = sub.add_parser("gates", help="export one sample's stored automatic gates as GatingML, for review",
                           description="export one sample's stored automatic gates as GatingML 2.0 "
                                       "(DIR/<file>.gating.xml), to correct and re-count with analyze --gates",
                           epilog=_EXAMPLES["gates"])
    gates.add_argument("store", metavar="STORE")
    gates.add_argument("sample", metavar="SAMPLE", help="the FCS file name (or its SHA-256)")
    gates.add_argument("--out", required=True, metavar="DIR", help="folder for the GatingML file")
    gates.add_argument("--debug", action="store_true")
    _add_logging_options(gates)
    gates.set_defaults(func=cmd_gates)

    report = sub.add_parser("report", help="write a self-contained HTML QC report of a results store",
                             description="write a self-contained HTML QC report of a results store", epilog=_EXAMPLES["report"])
    report.add_argument("store", metavar="STORE")
    report.add_argument("--out", required=True, metavar="DIR", help="folder for report.html")
    report.add_argument("--no-thumbnails", action="store_true", help="skip the gating figures (faster)")
    report.add_argument("--debug", action="store_true")
    _add_logging_options(report)
    report.set_defaults(func=cmd_report)

    inspect = sub.add_parser("inspect", help="show what an FCS file holds before analysing it",
                             description="show what an FCS file holds before analysing it", epilog=_EXAMPLES["inspect"])
    inspect.add_argument("file")
    inspect.add_argument("--json", action="store_true")
    inspect.add_argument("--debug", action="store_true")
    _add_logging_options(inspect)
    inspect.set_defaults(func=cmd_inspect)
    return parser


def main(argv=None):
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version and usage errors end here
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if not getattr(args, "command", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    _configure_logging(args)
    try:
        return args.func(args)
    except UsageError as exc:
        # A usage error may list one problem a line (a manifest's): each line escaped, the lines kept.
        print("\n".join(printable(line) for line in f"cytometry: error: {exc}".splitlines()), file=sys.stderr)
        return EXIT_USAGE
    except _Failed as exc:
        print(f"cytometry: error: {exc}", file=sys.stderr)
        return EXIT_SAMPLE_FAILED
    except KeyboardInterrupt:
        print("cytometry: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and closed: not an error
        sys.stderr.close()
        return EXIT_OK
    except Exception as exc:  # last resort: one line unless --debug
        if getattr(args, "debug", False):
            raise
        print(printable(f"cytometry: error: {type(exc).__name__}: {exc}".splitlines()[0]), file=sys.stderr)
        return EXIT_SAMPLE_FAILED


if __name__ == "__main__":
    sys.exit(main())
