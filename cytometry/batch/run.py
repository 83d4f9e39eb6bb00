"""Running a whole central-lab run: local worker processes or a Dask cluster, one store writer.

The per-sample work (:func:`analyze_one`) is a pure function of the file,
its manifest row and the options, so it runs the same in this process, in
local worker processes, or on a Dask ``distributed`` cluster; the driver
alone writes the results store, as results arrive, so a crash loses only
the samples in flight. Results come back in input order whatever the
number of workers.

Faults: the driver holds the store's writer lock for the whole run (a
second run into the same store waits ``lock_timeout`` seconds, then is
refused); a damaged entry found in the store is moved aside and its sample
analysed again; a sample whose entry, figure or GatingML cannot be written
(full disk, any ``OSError``) keeps its counts, says so in
``store_error``/``output_errors`` and the run goes on; local workers exit
when the driver dies (killed, even by SIGKILL), so nothing is left running.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import logging
import os
import secrets
import shutil
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from threadpoolctl import threadpool_limits
from tqdm import tqdm

from cytometry.analysis import AnalysisOptions, CarReferences, analyze_file, export_gating, reviewed_gates_of
from cytometry.batch.store import (REPORT_EVENTS, REVIEWED_MARK, DamagedEntry, ResultStore, StoreWriteError,
                                   event_sample, gatingml_bytes, parameter_set_hash, params_hash)
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
    Each file is written under a temporary name and renamed into place, so
    a full disk leaves no half-written figure or GatingML; what could not be
    written is listed in ``result["output_errors"]`` (one line each) and
    flagged.
    """

    path = gated.sample.path
    if plots_dir:
        try:
            figure = _save_atomically(plots_dir, lambda folder: save_gating_figure(gated, folder))
            result["gating_figure"] = str(figure)
        except Exception as exc:  # the counts stand; say what could not be written
            _output_failed(result, "gating figure", plots_dir, exc)
    if gatingml_dir:
        def write_gatingml(folder):
            target = Path(folder) / f"{safe_name(Path(path).stem)}.gating.xml"
            with open(target, "wb") as fh:
                export_gating(gated, fh)
            return target
        try:
            result["gatingml"] = str(_save_atomically(gatingml_dir, write_gatingml))
        except Exception as exc:
            _output_failed(result, "GatingML", gatingml_dir, exc)


def _save_atomically(out_dir, save):
    """Run ``save(folder)`` in a private folder inside ``out_dir``, then rename its one file into ``out_dir``.

    ``save`` chooses the file's name; whatever goes wrong, the private
    folder and anything half-written in it are removed.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    scratch = out_dir / f".tmp-{secrets.token_hex(4)}-{os.getpid()}"
    scratch.mkdir()
    try:
        written = Path(save(scratch))
        target = out_dir / written.name
        with open(written, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(written, target)
        return target
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _output_failed(result, what, folder, exc):
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else f"{type(exc).__name__}: {exc}"
    line = f"{what} not written to {folder} ({reason})"
    result.setdefault("output_errors", []).append(line)
    result["qc_flags"].append(f"output: {line}")


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
              replace=False, allow_unlisted=False, gates=None, gate_map=None, lock_timeout=0.0, on_notice=None):
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
    lock_timeout : float
        Seconds to wait for another run holding the store's writer lock
        (:meth:`cytometry.batch.store.ResultStore.lock`) before refusing.
    on_notice : callable, optional
        Called with a one-line message for each damaged entry found (moved
        aside; its sample is analysed again). Default: a logged warning.

    Raises
    ------
    cytometry.loading.manifest.ManifestError
        Every problem of the manifest, in one message.
    cytometry.batch.store.ParameterSetMismatch
        The store holds results of other parameters (one line).
    cytometry.batch.store.StoreLocked
        Another run holds the store (one line).
    cytometry.batch.store.StoreWriteError
        The store's parameter-set record cannot be written (one line).

    Returns
    -------
    list of dict
        One result per file, in the order of ``files``; skipped samples
        come from the store (with ``"skipped": true``). A result whose
        entry could not be written has ``store_error`` (one line); one
        whose figure or GatingML could not be written, ``output_errors``.

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
    with store.writer(lock_timeout) if store is not None else contextlib.nullcontext():
        return _run_batch(files, manifest, options, store, workers, scheduler, progress, keep_events, on_result,
                          plots_dir, gatingml_dir, raise_errors, replace, on_notice, gates, gate_map)


def _run_batch(files, manifest, options, store, workers, scheduler, progress, keep_events, on_result, plots_dir,
               gatingml_dir, raise_errors, replace, on_notice, gates, gate_map):
    """:func:`run_batch` once the store (when there is one) is this process's to write."""
    notice = on_notice or logger.warning
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
                try:
                    result = store.results_for(entry)
                except DamagedEntry as exc:  # moved aside: analysed again below, never a run that aborts
                    notice(f"{exc}; {Path(files[index]).name} is analysed again")
                    pending.append(index)
                    continue
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
            try:
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
            except StoreWriteError as exc:  # the counts stand; the next run analyses it again
                result["store_error"] = f"{exc}; analysed again on the next run"
                result["qc_flags"].append(f"store: not stored ({exc.strerror or exc})")
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


def _worker_init(driver, deathsig):
    """Worker initialiser: one BLAS/OpenMP thread per process, and exit when the driver dies.

    One thread per process, so N workers use N cores, not N². A worker
    whose driver is gone can deliver its result nowhere, and nothing else
    would ever stop it (it waits on its task queue for good): on Linux the
    kernel kills it with the driver (``PR_SET_PDEATHSIG``, asked for only
    when the pool was started from the main thread: the signal follows the
    thread that started the worker); everywhere, a watchdog thread polls
    for the driver and exits the process within half a second of its death.
    """
    threadpool_limits(1)
    if deathsig and sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):
            pass  # the watchdog still ends it
    parent = os.getppid()
    threading.Thread(target=_watch_driver, args=(driver, parent), name="driver-watchdog", daemon=True).start()


_PR_SET_PDEATHSIG = 1
_WATCH_INTERVAL_S = 0.5


def _watch_driver(driver, parent):
    # Re-parented (the parent died), or the driver gone (a forkserver parent outlives it briefly).
    while True:
        if os.getppid() != parent or not _alive(driver):
            os._exit(1)
        time.sleep(_WATCH_INTERVAL_S)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _run_local(workers, files, rows, manifest, options, extra, pending, finish, reviewed=None):
    deathsig = threading.current_thread() is threading.main_thread()
    with ProcessPoolExecutor(max_workers=workers, initializer=_worker_init,
                             initargs=(os.getpid(), deathsig)) as pool:
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
