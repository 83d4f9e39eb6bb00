"""Running a whole central-lab run: local worker processes or a Dask cluster, one store writer.

The per-sample work (:func:`analyze_one`) is a pure function of the file,
its manifest row and the options, so it runs the same in this process, in
local worker processes, or on a Dask ``distributed`` cluster; the driver
alone writes the results store, as results arrive, so a crash loses only
the samples in flight. Results come back in input order whatever the
number of workers.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from threadpoolctl import threadpool_limits
from tqdm import tqdm

from cytometry.analysis import AnalysisOptions, CarReferences, analyze_file, export_gating, reviewed_gates_of
from cytometry.batch.store import (REPORT_EVENTS, REVIEWED_MARK, ResultStore, event_sample, gatingml_bytes,
                                   parameter_set_hash, params_hash)
from cytometry.loading.fcs import file_sha256
from cytometry.loading.manifest import check_manifest
from cytometry.outputs.formatting import safe_name
from cytometry.outputs.plots import save_gating_figure

logger = logging.getLogger(__name__)

_REFERENCES = {}


def _references(manifest, options):
    """CarReferences, cached per worker process (the reference tube is gated once)."""
    # Workers receive a fresh copy of the manifest with every task: key by its path.
    key = (str(manifest.path) if manifest is not None else None, params_hash(options))
    if key not in _REFERENCES:
        _REFERENCES.clear()
        _REFERENCES[key] = CarReferences(manifest, options)
    return _REFERENCES[key]


def write_artifacts(gated, result, plots_dir=None, gatingml_dir=None):
    """Gating figure and GatingML for one sample; a failure is a flag, not a lost result.

    File names come from the FCS file's name on disk, never from keywords.
    """

    path = gated.sample.path
    try:
        if plots_dir:

            result["gating_figure"] = str(save_gating_figure(gated, plots_dir))
        if gatingml_dir:
            out_dir = Path(gatingml_dir)
            out_dir.mkdir(parents=True, exist_ok=True)
            target = out_dir / f"{safe_name(Path(path).stem)}.gating.xml"
            with open(target, "wb") as fh:
                export_gating(gated, fh)
            result["gatingml"] = str(target)
    except Exception as exc:  # the counts stand; say what could not be written
        result["qc_flags"].append(f"output: could not write figure/GatingML ({type(exc).__name__}: {exc})")


def analyze_one(path, row, manifest, options, keep=False, keep_events=False, plots_dir=None, gatingml_dir=None,
                raise_errors=False, gates=None, gate_map=None):
    """Analyse one file; with ``keep`` also return what the store keeps.

    ``plots_dir``/``gatingml_dir`` write a gating figure / GatingML file per
    sample (on the machine that runs it). ``raise_errors`` is ``--debug``.
    ``gates``/``gate_map`` (or the row's ``gates``/``gate_map`` columns): a
    reviewer's corrected gates (:func:`cytometry.analysis.analyze_file`).

    Returns
    -------
    (result, extras)
        ``extras`` is ``None`` or a dict with ``masks``, ``gatingml``,
        ``keywords`` and optionally ``events``; with reviewed gates also
        ``automatic``: the automatic ``(result, extras)``, which the store
        keeps beside the reviewed one.
    """
    sample_options = _references(manifest, options).options_for(row)
    extras = {}
    by_source = {}

    def keep_artifacts(gated, result):
        source = result["gating"]["source"]
        kept = by_source.setdefault(source, (result, {}))[1]
        reviewing = source == "automatic" and reviewed_gates_of(row, gates, gate_map)[0] is not None
        if (plots_dir or gatingml_dir) and not reviewing:
            # The figure of the gates that made the counts; the reviewed gates' file is their GatingML.
            write_artifacts(gated, result, plots_dir, gatingml_dir if source == "automatic" else None)
        if not keep:
            return
        _keep(gated, result, kept, keep_events)

    wanted = keep or plots_dir or gatingml_dir
    result = analyze_file(path, row, sample_options, on_gated=keep_artifacts if wanted else None,
                          raise_errors=raise_errors, gates=gates, gate_map=gate_map)
    if result.get("gating", {}).get("source") == "reviewed" and "automatic" in by_source:
        extras = dict(by_source.get("reviewed", (None, {}))[1])
        extras["automatic"] = by_source["automatic"]
    elif "automatic" in by_source:
        extras = by_source["automatic"][1]
    return result, (extras or None)


def _keep(gated, result, extras, keep_events):
    """What the store keeps of one gated sample, into ``extras``.

    A reviewed sample keeps the reviewer's GatingML file as it came (a
    workspace is not GatingML: none is kept, its SHA-256 is in the result).
    """
    masks = {name: mask for name, mask in gated.gating.masks.items()}
    extras.update(masks=masks, keywords=gated.sample.keywords)
    review = result["gating"].get("reviewed_gates")
    try:
        if review is None:
            extras["gatingml"] = gatingml_bytes(gated)
        elif review["format"] == "gatingml":
            extras["gatingml"] = Path(review["path"]).read_bytes()
    except Exception as exc:  # the counts stand; say what could not be kept
        result["qc_flags"].append(f"store: GatingML not written ({type(exc).__name__}: {exc})")
    # The report draws its figures from the store alone: a bounded subsample by default, all with keep_events.
    extras["events"] = event_sample(gated, None if keep_events else REPORT_EVENTS)


def entry_params(options, row=None, reference_sha=None):
    """The store key's parameter part of one sample: its options, its manifest row, its CAR reference file.

    The manifest row is part of the key because it changes the result: a
    corrected bead lot (``beads_per_test``), blood volume, subject or study
    day analyses the sample again instead of returning the stale count (the
    store keeps one entry per file, so the stale one is replaced).

    Parameters
    ----------
    options : cytometry.analysis.AnalysisOptions
    row : cytometry.loading.manifest.ManifestRow, optional
    reference_sha : str, optional
        SHA-256 of the pre-infusion reference file a CAR tube is counted against.

    Examples
    --------
    >>> from cytometry.analysis import AnalysisOptions
    >>> from cytometry.batch.store import params_hash
    >>> entry_params(AnalysisOptions()) == params_hash(AnalysisOptions())
    True
    """
    base = params_hash(options)
    if row is None and reference_sha is None:
        return base
    parts = [base]
    if row is not None:
        # the reviewed-gates columns key the reviewed entry (reviewed_params), not the automatic one
        values = {k: (v.strip() if isinstance(v, str) else v) for k, v in row.values.items()
                  if k not in ("file", "gates", "gate_map")}
        parts.append(json.dumps(values, sort_keys=True, default=str))
    if reference_sha is not None:
        parts.append(reference_sha)
    return hashlib.sha256(":".join(parts).encode()).hexdigest()[:16]


def _entry_params(row, references, options):
    candidate = references.candidates.get(row.text("subject_id")) if row is not None else None
    reference_sha = None
    if candidate is not None and candidate[1] is not row:
        reference_path = candidate[1].path
        reference_sha = file_sha256(reference_path) if reference_path.exists() else "missing"
    return entry_params(options, row, reference_sha)


def reviewed_params(params, gates, gate_map=None):
    """The store key's parameter part for a sample counted from reviewed gates.

    The automatic entry's part, the reviewed file's and the mapping's
    SHA-256: a corrected file is a new entry, and the automatic entry
    (``params`` alone) is never overwritten by it.

    Examples
    --------
    >>> reviewed_params("0123456789abcdef", "sample_fcs/manifest.csv").startswith("0123456789abcdef_reviewed_")
    True
    """
    digests = [file_sha256(p) if Path(p).is_file() else "missing" for p in (gates, gate_map) if p is not None]
    return f"{params}{REVIEWED_MARK}{hashlib.sha256(':'.join(digests).encode()).hexdigest()[:16]}"


def _file_key(path):
    path = Path(path)
    try:
        return file_sha256(path)
    except OSError:
        return hashlib.sha256(str(path).encode()).hexdigest()


def run_batch(files, manifest=None, options=None, *, store=None, workers=1, scheduler=None, progress=None,
              keep_events=False, on_result=None, plots_dir=None, gatingml_dir=None, raise_errors=False,
              replace=False, allow_unlisted=False, gates=None, gate_map=None):
    """Analyse ``files``; with a ``store``, skip what is done and write the rest as it finishes.

    The manifest is checked first (:func:`cytometry.loading.manifest.check_manifest`):
    nothing is analysed when it has a problem. A store holds one parameter
    set (:mod:`cytometry.batch.store`): a run with other options into a store that
    holds results is refused unless ``replace``.

    Parameters
    ----------
    files : list of Path
    manifest : cytometry.loading.manifest.Manifest, optional
    options : AnalysisOptions, optional
    store : str, Path or ResultStore, optional
    workers : int
        Local worker processes (1: in this process).
    scheduler : str, optional
        Address (``tcp://host:8786``) or scheduler-file path of a Dask
        ``distributed`` cluster; the work runs there, the store is written here.
    progress : bool, optional
        Show a progress bar (default: when stderr is a terminal).
    keep_events : bool
        Store every compensated, transformed event (by default the store
        keeps a random subsample of :data:`cytometry.batch.store.REPORT_EVENTS`
        events, enough for the report's figures).
    on_result : callable, optional
        Called with each result as it arrives.
    plots_dir, gatingml_dir : str, optional
        Write a gating figure / GatingML file per sample there.
    raise_errors : bool
        Raise on the first failing sample (``--debug``; runs in this process).
    replace : bool
        Discard the store's results first (``--replace``).
    allow_unlisted : bool
        Analyse files the manifest does not list (``--allow-unlisted``).
    gates, gate_map : str, optional
        A reviewer's corrected gates (and their mapping) for every file
        (``--gates``, one file); else each row's ``gates``/``gate_map``
        columns. The store keeps the automatic entry beside the reviewed one
        (:func:`reviewed_params`); a file whose reviewed gates cannot be used
        is an error result, and its automatic entry is still written.

    Raises
    ------
    cytometry.loading.manifest.ManifestError
        Every problem of the manifest, in one message.
    cytometry.batch.store.ParameterSetMismatch
        The store holds results of other parameters (one line).

    Returns
    -------
    list of dict
        One result per file, in the order of ``files``; skipped samples
        come from the store (with ``"skipped": true``).

    Examples
    --------
    >>> import tempfile
    >>> from cytometry.loading.manifest import read_manifest
    >>> files = sorted(Path("sample_fcs").glob("S0[1-3]_screening_TBNK.fcs"))
    >>> manifest = read_manifest("sample_fcs/manifest.csv")
    >>> with tempfile.TemporaryDirectory() as d:
    ...     first = run_batch(files, manifest, store=Path(d) / "run.store", workers=1)
    ...     again = run_batch(files, manifest, store=Path(d) / "run.store", workers=1)
    >>> [r["eligibility"]["verdict"] for r in first]
    ['eligible', 'not_eligible', 'indeterminate']
    >>> [r.get("skipped", False) for r in again]     # the second run reads them from the store
    [True, True, True]
    """
    options = options or AnalysisOptions()
    if manifest is not None:
        check_manifest(manifest, files, options=options, allow_unlisted=allow_unlisted)
    if store is not None and not isinstance(store, ResultStore):
        store = ResultStore(store)
    references = CarReferences(manifest, options)
    rows = [manifest.lookup(path) if manifest is not None else None for path in files]
    results = [None] * len(files)
    pending = []
    keys = {}
    parameter_set = parameter_set_hash(options)
    if store is not None:
        for index, (path, row) in enumerate(zip(files, rows)):
            keys[index] = (_file_key(path), _entry_params(row, references, options))
            review = reviewed_gates_of(row, gates, gate_map)
            if review[0] is not None:
                keys[index] = (keys[index][0], reviewed_params(keys[index][1], *review), keys[index][1])
        store.claim(options, [f"{key[0]}-{part}" for key in keys.values() for part in key[1:]],
                    replace_results=replace)
        done = {entry.stem: entry for entry in store.entries()}
        for index in range(len(files)):
            key = keys[index]
            entry = done.get(f"{key[0]}-{key[1]}")
            if entry is not None:
                result = store.results_for(entry)
                result["skipped"] = True
                results[index] = result
                continue
            pending.append(index)
    else:
        pending = list(range(len(files)))
    keep = store is not None
    logger.info("%d files: %d to analyse, %d already in the store (parameter set %s)", len(files), len(pending),
                len(files) - len(pending), parameter_set)
    bar = _progress(len(pending), progress)

    def finish(index, outcome):
        result, extras = outcome
        if store is not None:
            extras = extras or {}
            automatic = extras.get("automatic") or (
                (result["automatic_result"], {}) if result.get("automatic_result") else None)
            if len(keys[index]) > 2 and automatic is not None:
                # The automatic result, beside the reviewed one: neither overwrites the other.
                auto_result, auto_extras = automatic
                store.write(auto_result, keys[index][2], masks=auto_extras.get("masks"),
                            gatingml=auto_extras.get("gatingml"), keywords=auto_extras.get("keywords"),
                            events=auto_extras.get("events"), parameter_set=parameter_set)
            if not result.get("automatic_result"):  # a reviewed file that failed leaves only the automatic entry
                store.write(result, keys[index][1], masks=extras.get("masks"), gatingml=extras.get("gatingml"),
                            keywords=extras.get("keywords"), events=extras.get("events"),
                            parameter_set=parameter_set)
        results[index] = result
        if on_result is not None:
            on_result(result)
        bar.update(1)

    extra = (keep, keep_events, plots_dir, gatingml_dir)
    reviewed = {"gates": gates, "gate_map": gate_map}
    try:
        if scheduler and not raise_errors:
            _run_dask(scheduler, files, rows, manifest, options, extra, pending, finish, reviewed)
        elif workers > 1 and len(pending) > 1 and not raise_errors:
            _run_local(workers, files, rows, manifest, options, extra, pending, finish, reviewed)
        else:
            for index in pending:
                finish(index, analyze_one(files[index], rows[index], manifest, options, *extra,
                                          raise_errors=raise_errors, **reviewed))
    finally:
        bar.close()
    return results


def _single_threaded():
    """Worker initialiser: one BLAS/OpenMP thread per process, so N workers use N cores, not N²."""
    threadpool_limits(1)


def _run_local(workers, files, rows, manifest, options, extra, pending, finish, reviewed=None):
    with ProcessPoolExecutor(max_workers=workers, initializer=_single_threaded) as pool:
        futures = {pool.submit(analyze_one, files[i], rows[i], manifest, options, *extra, **(reviewed or {})): i
                   for i in pending}
        for future in as_completed(futures):
            finish(futures[future], future.result())


def _run_dask(scheduler, files, rows, manifest, options, extra, pending, finish, reviewed=None):
    try:
        from dask.distributed import Client, as_completed
    except ImportError:
        raise RuntimeError("--scheduler needs dask.distributed: pip install 'cytometry-counts[dask]'") from None
    if os.path.isfile(scheduler):
        client = Client(scheduler_file=scheduler)
    else:
        client = Client(scheduler)
    try:
        futures = {}
        for i in pending:
            future = client.submit(analyze_one, str(files[i]), rows[i], manifest, options, *extra, pure=False,
                                   **(reviewed or {}))
            futures[future] = i
        for future in as_completed(list(futures)):
            finish(futures[future], future.result())
    finally:
        client.close()


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


def _progress(total, progress):
    if progress is None:
        progress = sys.stderr.isatty()
    if not progress or total == 0:
        return _NoBar()
    return tqdm(total=total, unit="tube", file=sys.stderr)


def default_workers():
    """One worker per core (the default of ``--workers``)."""
    return max(1, os.cpu_count() or 1)


__all__ = ["run_batch", "analyze_one", "default_workers", "write_artifacts"]
