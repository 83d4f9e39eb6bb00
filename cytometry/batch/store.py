"""The results store: one HDF5 file per analysed sample, written atomically.

HDF5 has no journal: a process killed while writing can leave a file that
does not open. The store therefore never writes in place. A store is a
folder::

    STORE/
      parameters.json                  the store's one parameter set (hash and options)
      samples/<sha256>-<params>.h5     one finished sample each
      samples/.tmp-*                   in flight (ignored, cleaned on open)

Each sample is written to a temporary file in the same folder, flushed to
disk and renamed into place (``os.replace``, atomic on POSIX). A crash at
any moment therefore loses at most the samples in flight; everything else
opens. There is no study file to corrupt: the index is rebuilt by listing
``samples/`` (cheap: a few attributes per file).

Each sample file holds:

* attributes ``result`` (the JSON result of the CLI contract, as text — no
  pickled objects), ``sha256``, ``params_hash``, ``software_version``,
  ``file_name``, ``file_size``, ``written_at``, and the FCS keywords an
  auditor needs (instrument, acquisition date and times, tube name);
* ``masks/<population>``: bit-packed event masks (``numpy.packbits``,
  gzip), so every count can be reproduced from the file;
* ``gatingml``: the automatic gates as GatingML 2.0 text;
* ``events``: the compensated, transformed events (float32) the report
  draws its figures from — a random subsample of at most
  :data:`REPORT_EVENTS` events by default (``event_index`` holds their rows
  in the file, so the full-file ``masks`` select them), every event with
  ``--store-events``; the dataset's ``columns`` attribute names each column
  (marker or scatter name, else ``$PnN``) and ``tops`` gives each one's
  ``$PnR`` (the logicle T, for axes in decades). An entry written before
  this has no names and no event rows: the report says so and draws nothing
  for it.

A sample is identified by the SHA-256 of its FCS file and a hash of every
parameter that can change its result; re-running the same command skips
what is done.

One parameter set per store
    A store holds the results of **one** parameter set, so that its
    subject tables never count a visit twice. The set is
    :func:`parameter_set_hash` of the run's options, recorded in
    ``parameters.json`` when the store is first written and in each entry's
    ``parameter_set`` attribute. A run with other options is refused
    (:class:`ParameterSetMismatch`) unless it replaces the store's results
    (:meth:`ResultStore.clear`, ``--replace``). Within the set a file has
    one entry: writing a file's entry removes its earlier one (e.g. after
    its CAR reference tube changed). A file re-counted from a reviewer's
    gates has a second, reviewed entry (:data:`REVIEWED_MARK`) beside its
    automatic one; neither replaces the other, and readers take the
    reviewed one. Readers take exactly one set
    (:meth:`ResultStore.one_parameter_set`). A store written before sets were
    recorded (no ``parameters.json``) is read when every file in it has
    one entry, as the set ``unrecorded``; when a file has several (several
    parameter sets mixed) it is refused with a message saying to re-run
    with ``--replace``.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import logging
import os
from dataclasses import asdict, replace
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from cytometry._version import __version__
from cytometry.analysis import export_gating
from gating.panels import PanelDefinitionError, load_panels

#: Events kept per sample for the report's figures when not every event is stored. 20,000 events of
#: 10-11 channels cost about 0.6 MB per sample (float32, gzip); the counts come from the full-file masks
#: whatever the subsample, which only thins the dots drawn.
REPORT_EVENTS = 20_000

logger = logging.getLogger(__name__)

#: The name a store written before parameter sets were recorded reads as.
UNRECORDED_SET = "unrecorded"

#: Marks the entry of a sample counted from a reviewer's gates (``<sha256>-<params>_reviewed_<digest>.h5``);
#: it lives beside the sample's automatic entry, and readers take it in place of that one.
REVIEWED_MARK = "_reviewed_"


def is_reviewed_entry(entry):
    """Whether a store entry (path or name) holds a result counted from reviewed gates.

    Examples
    --------
    >>> is_reviewed_entry("ab12-0123456789abcdef_reviewed_fedcba9876543210.h5"), is_reviewed_entry("ab12-0123.h5")
    (True, False)
    """
    return REVIEWED_MARK in Path(entry).stem


class StoreError(ValueError):
    """A store that cannot be read as one parameter set (one line)."""


class ParameterSetMismatch(StoreError):
    """A run's parameters differ from the store's (one line saying how to proceed)."""


AUDIT_KEYWORDS = ("cyt", "cytnum", "date", "btim", "etim", "tube name", "src", "fil", "op", "inst")


def params_hash(options):
    """Short hash of everything in :class:`AnalysisOptions` that can change a result.

    Examples
    --------
    >>> from cytometry.analysis import AnalysisOptions
    >>> params_hash(AnalysisOptions()) == params_hash(AnalysisOptions())
    True
    >>> params_hash(AnalysisOptions()) == params_hash(AnalysisOptions(lloq_events=20))
    False
    """

    reference = options.gating.car_reference
    values = asdict(replace(options, gating=replace(options.gating, car_reference=None)))
    values.pop("device", None)  # the device does not change the result
    if reference is not None:  # events: hash their bytes, not their repr
        events = getattr(reference, "t_cells", reference)
        digest = hashlib.sha256(np.asarray(events, dtype=np.float64).tobytes())
        describe = getattr(reference, "describe", None)
        if describe is not None:
            digest.update(json.dumps(describe(), sort_keys=True, default=str).encode())
        values["gating"]["car_reference"] = digest.hexdigest()
    for name in ("compensation", "panel_file"):
        path = values.get(name)
        if path and Path(path).is_file():
            values[name] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    # The panels and their gating plans are data: an edited plan (built in,
    # in CYTOMETRY_PANELS or in panel_dirs) must analyse the samples again.

    try:
        panels = {name: panel.as_dict() for name, panel in load_panels(options.panel_dirs).items()}
        for definition in panels.values():
            definition.pop("source", None)
    except PanelDefinitionError as exc:
        panels = str(exc)
    values["panel_definitions"] = panels
    text = json.dumps({"options": values, "software": __version__}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def parameter_set_hash(options):
    """The store-level parameter set of a run: :func:`params_hash` of its options without a CAR reference.

    Each stored entry is keyed by :func:`params_hash` of the options that
    analysed it, which for a CAR tube include its subject's pre-infusion
    reference (filled in per sample by :class:`cytometry.analysis.CarReferences`
    from the manifest, and keyed by the reference file's SHA-256), so CAR
    tubes of one run have different entry hashes. The set a store holds is
    the same hash computed with ``gating.car_reference`` and
    ``gating.car_reference_source`` cleared: the options a run was given,
    identical for every tube of the run whatever its reference. Everything
    else (counting constants, limits, gating parameters, panel files and
    their contents, software version) is in it; the device is not.

    Parameters
    ----------
    options : cytometry.analysis.AnalysisOptions

    Returns
    -------
    str
        16 hex digits.

    Examples
    --------
    >>> import numpy as np
    >>> from cytometry.analysis import AnalysisOptions, with_car_reference
    >>> base = AnalysisOptions()
    >>> car = with_car_reference(base, np.linspace(0, 1, 300), "pre-infusion tube S01_day000_CAR.fcs")
    >>> params_hash(car) == params_hash(base), parameter_set_hash(car) == parameter_set_hash(base)
    (False, True)
    >>> parameter_set_hash(base) == parameter_set_hash(AnalysisOptions(lloq_events=10))
    False
    """
    gating = replace(options.gating, car_reference=None, car_reference_source=None)
    return params_hash(replace(options, gating=gating))


def describe_options(options):
    """The options as JSON-ready values (for ``parameters.json``; the CAR reference left out)."""
    gating = replace(options.gating, car_reference=None, car_reference_source=None)
    return json.loads(json.dumps(asdict(replace(options, gating=gating)), default=str))


class ResultStore:
    """A folder of per-sample HDF5 files (see the module docstring).

    Parameters
    ----------
    path : str or Path
        Created when missing.

    Examples
    --------
    >>> import tempfile
    >>> from cytometry.batch.run import run_batch
    >>> from cytometry.loading.manifest import read_manifest
    >>> d = tempfile.TemporaryDirectory()
    >>> _ = run_batch(["sample_fcs/S01_screening_TBNK.fcs"], read_manifest("sample_fcs/manifest.csv"),
    ...               store=f"{d.name}/run.store", workers=1)
    >>> store = ResultStore(f"{d.name}/run.store")
    >>> store.results()[0]["populations"]["b_cells"]["cells_per_ul"]
    114.471
    >>> d.cleanup()
    """

    def __init__(self, path):
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"{self.path}: a results store is a folder, and this is a file")
        self.samples = self.path / "samples"
        self.samples.mkdir(parents=True, exist_ok=True)
        for leftover in self.samples.glob(".tmp-*"):
            # In flight when a previous run was killed: never renamed, never valid.
            try:
                leftover.unlink()
            except OSError:
                pass

    @property
    def record_path(self):
        return self.path / "parameters.json"

    def recorded_parameter_set(self):
        """The parameter set recorded in ``parameters.json`` (a dict), or ``None``."""
        try:
            record = json.loads(self.record_path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise StoreError(f"{self.record_path}: unreadable ({exc})") from None
        if not isinstance(record, dict) or not isinstance(record.get("parameter_set"), str):
            raise StoreError(f"{self.record_path}: no parameter_set in it")
        return record

    def record_parameter_set(self, set_hash, options=None):
        """Write ``parameters.json`` atomically (the store's one parameter set)."""
        record = {"parameter_set": set_hash, "software_version": __version__,
                  "written_at": _dt.datetime.now(_dt.timezone.utc).isoformat(),
                  "options": describe_options(options) if options is not None else None}
        temporary = self.path / f".tmp-parameters-{os.getpid()}"
        temporary.write_text(json.dumps(record, indent=2, sort_keys=True))
        os.replace(temporary, self.record_path)
        return record

    def claim(self, options, entry_keys=(), replace_results=False):
        """Make the store hold the parameter set of ``options``, or refuse.

        Parameters
        ----------
        options : cytometry.analysis.AnalysisOptions
            The run's options (before per-sample CAR references).
        entry_keys : iterable of str
            The entry names (``<sha256>-<params>``) this run would write;
            a store written before sets were recorded is adopted when each of
            its entries is one of them (same parameters by construction).
        replace_results : bool
            Discard the store's results first (``--replace``).

        Returns
        -------
        str
            The parameter set's hash.

        Raises
        ------
        ParameterSetMismatch
            One line: the store holds another set; use ``--replace`` or
            another store.

        Examples
        --------
        >>> import tempfile
        >>> from cytometry.analysis import AnalysisOptions
        >>> store = ResultStore(tempfile.mkdtemp())
        >>> store.claim(AnalysisOptions()) == parameter_set_hash(AnalysisOptions())
        True
        >>> store.claim(AnalysisOptions(lloq_events=10))
        Traceback (most recent call last):
        ...
        cytometry.batch.store.ParameterSetMismatch: ...
        """
        wanted = parameter_set_hash(options)
        if replace_results:
            self.clear()
        record = self.recorded_parameter_set()
        how = (f"use --replace to discard its {len(self.entries())} results and analyse again, or another "
               f"--out folder")
        if record is not None:
            if record["parameter_set"] != wanted:
                raise ParameterSetMismatch(
                    f"{self.path}: this store holds results of parameter set {record['parameter_set']}, and "
                    f"this run's parameters are set {wanted}; {how}")
            return wanted
        entries = self.entries()
        keys = set(entry_keys)
        foreign = [e for e in entries if e.stem not in keys]
        if foreign:
            raise ParameterSetMismatch(
                f"{self.path}: this store was written without a recorded parameter set and {len(foreign)} of "
                f"its results are not this run's parameters; {how}")
        self.record_parameter_set(wanted, options)
        logger.info("%s: parameter set %s", self.path, wanted)
        return wanted

    def clear(self):
        """Discard every result and the recorded parameter set (``--replace``)."""
        for entry in self.entries():
            entry.unlink()
        try:
            self.record_path.unlink()
        except FileNotFoundError:
            pass
        logger.info("%s: results discarded", self.path)

    def one_parameter_set(self):
        """The store's parameter set and its results: one result per file, never two sets.

        Returns
        -------
        (str, list of dict)
            The set's hash (``"unrecorded"`` for a store written before
            sets were recorded) and the results, one per FCS file (the
            newest entry when a file has several within the set).

        Raises
        ------
        StoreError
            One line, when the entries belong to several parameter sets.

        Examples
        --------
        >>> import tempfile
        >>> ResultStore(tempfile.mkdtemp()).one_parameter_set()
        (None, [])
        """

        record = self.recorded_parameter_set()
        recorded = record["parameter_set"] if record else None
        sets, by_file = {}, {}
        for entry in self.entries():
            try:
                with h5py.File(entry, "r") as h5:
                    value = h5.attrs.get("parameter_set")
            except Exception:
                value = None  # unreadable: reported as an error result below
            name = value.decode() if isinstance(value, bytes) else value
            sets.setdefault(name or recorded or UNRECORDED_SET, []).append(entry)
            sha = entry.stem.rsplit("-", 1)[0]
            by_file.setdefault(sha, []).append(entry)
        if not sets:
            return recorded, []
        names = sorted(sets)
        if len(names) > 1 or (recorded is not None and names != [recorded]):
            listing = ", ".join(f"{name} ({len(sets[name])} results)" for name in names)
            raise StoreError(f"{self.path}: results of several parameter sets ({listing}); re-run "
                             "`cytometry analyze ... --out STORE --replace` with the parameters wanted, or read "
                             "another store")
        name = names[0]
        if name == UNRECORDED_SET and any(len(entries) > 1 for entries in by_file.values()):
            doubled = sum(len(entries) > 1 for entries in by_file.values())
            raise StoreError(f"{self.path}: written without a recorded parameter set, and {doubled} files have "
                             "results of several parameter sets; re-run `cytometry analyze ... --out STORE "
                             "--replace` with the parameters wanted")
        # entries() is oldest first; a reviewed result is in effect over its file's automatic one
        newest = {([e for e in entries if is_reviewed_entry(e)] or entries)[-1] for entries in by_file.values()}
        return name, [self._read(entry) for entry in self.entries() if entry in newest]

    def entry_path(self, sha256, params):
        return self.samples / f"{sha256}-{params}.h5"

    def has(self, sha256, params):
        """Whether this file was analysed with these parameters (a finished entry exists)."""
        return self.entry_path(sha256, params).exists()

    def write(self, result, params, *, masks=None, gatingml=None, keywords=None, events=None, parameter_set=None):
        """Write one sample atomically; returns the entry's path.

        Parameters
        ----------
        result : dict
            The JSON result (``status`` may be ``"error"``).
        params : str
            :func:`params_hash` of the options used.
        masks : dict of bool arrays, optional
        gatingml : bytes, optional
        keywords : dict, optional
            FCS keywords (lower case); the audit ones are kept.
        events : ndarray or dict, optional
            The events as an array (columns unnamed), or the dict of
            :func:`event_sample` (events, column names, channel tops and the
            rows kept), which the report can draw from.
        """

        sha = result.get("sha256") or hashlib.sha256(str(result["file"]).encode()).hexdigest()
        target = self.entry_path(sha, params)
        temporary = self.samples / f".tmp-{sha}-{params}-{os.getpid()}"
        source = Path(result["file"])
        with h5py.File(temporary, "w") as h5:
            h5.attrs["result"] = json.dumps(result, default=_json_default)
            h5.attrs["sha256"] = sha
            h5.attrs["params_hash"] = params
            if parameter_set is not None:
                h5.attrs["parameter_set"] = parameter_set
            h5.attrs["software_version"] = str(result.get("software_version"))
            h5.attrs["file_name"] = source.name
            h5.attrs["file_size"] = source.stat().st_size if source.exists() else -1
            h5.attrs["written_at"] = _dt.datetime.now(_dt.timezone.utc).isoformat()
            audit = {k: v for k, v in (keywords or {}).items() if k in AUDIT_KEYWORDS}
            h5.attrs["fcs_keywords"] = json.dumps(audit)
            if masks:
                group = h5.create_group("masks")
                for name, mask in masks.items():
                    mask = np.asarray(mask, dtype=bool)
                    data = group.create_dataset(name, data=np.packbits(mask), compression="gzip")
                    data.attrs["n_events"] = mask.size
            if gatingml is not None:
                h5.create_dataset("gatingml", data=np.frombuffer(gatingml, dtype=np.uint8), compression="gzip")
            if isinstance(events, dict):
                data = h5.create_dataset("events", data=np.asarray(events["events"], dtype=np.float32),
                                         compression="gzip")
                data.attrs["columns"] = json.dumps(list(events["columns"]))
                data.attrs["tops"] = json.dumps([float(t) for t in events["tops"]])
                data.attrs["n_events"] = int(events["n_events"])
                if events.get("index") is not None:
                    h5.create_dataset("event_index", data=np.asarray(events["index"], dtype=np.int64),
                                      compression="gzip")
            elif events is not None:
                h5.create_dataset("events", data=np.asarray(events, dtype=np.float32), compression="gzip")
            h5.flush()
        with open(temporary, "rb+") as fh:  # the bytes are on disk before the name appears
            os.fsync(fh.fileno())
        os.replace(temporary, target)
        if parameter_set is not None:  # one entry per file within the set
            for earlier in self.samples.glob(f"{sha}-*.h5"):
                # the automatic and the reviewed result are kept side by side
                if earlier != target and is_reviewed_entry(earlier) == is_reviewed_entry(target):
                    logger.info("%s: replaces %s", target.name, earlier.name)
                    earlier.unlink(missing_ok=True)
        return target

    def entries(self):
        """Paths of the finished entries, oldest first."""
        return sorted(self.samples.glob("*.h5"), key=lambda p: p.stat().st_mtime)

    def results(self, params=None):
        """The JSON results of every entry (optionally only those with ``params``).

        An entry that does not open (which the atomic write should make
        impossible) is reported as an error result, never dropped silently.
        """
        return [self._read(entry) for entry in self.entries()
                if params is None or entry.stem.endswith(f"-{params}")]

    def _read(self, entry):
        try:
            with h5py.File(entry, "r") as h5:
                result = json.loads(h5.attrs["result"])
        except Exception as exc:
            return {"file": entry.name, "status": "error", "error": f"store entry unreadable: {exc}",
                    "populations": {}, "eligibility": None, "qc_flags": [], "store_entry": entry.name}
        result["store_entry"] = entry.name
        return result

    def results_for(self, entry):
        """The JSON result of one entry (a path or a name)."""
        entry = self.samples / Path(entry).name
        with h5py.File(entry, "r") as h5:
            result = json.loads(h5.attrs["result"])
        result["store_entry"] = entry.name
        return result

    def masks(self, entry_name):
        """The event masks of one entry, unpacked (population → bool array)."""
        with h5py.File(self.samples / entry_name, "r") as h5:
            return {name: np.unpackbits(data[()])[:data.attrs["n_events"]].astype(bool)
                    for name, data in h5["masks"].items()}

    def gatingml(self, entry_name):
        """The GatingML text of one entry."""
        with h5py.File(self.samples / entry_name, "r") as h5:
            return bytes(h5["gatingml"][()]).decode()

    def table(self, params=None):
        """One row per sample and population, as a pandas DataFrame (for notebooks).

        Columns: ``file, subject_id, study_day, panel, status, population,
        events, cells_per_ul, ci95_low, ci95_high, below_lloq, method``.
        """

        rows = []
        for result in self.results(params):
            base = {k: result.get(k) for k in ("file", "subject_id", "study_day", "panel", "status")}
            populations = result.get("populations") or {}
            if not populations:
                rows.append({**base, "population": None})
            for name, count in populations.items():
                ci95 = count.get("ci95") or [None, None]
                rows.append({**base, "population": name, "events": count["events"],
                             "cells_per_ul": count.get("cells_per_ul"), "ci95_low": ci95[0],
                             "ci95_high": ci95[1], "below_lloq": count.get("below_lloq"),
                             "method": count.get("method"), "reliable": count.get("reliable", True)})
        return pd.DataFrame(rows)


    def events(self, entry_name):
        """The stored events of one entry and what the report needs to draw them, or ``None``.

        Returns
        -------
        dict or None
            ``events`` (float32, rows × columns), ``columns`` (name → column:
            marker or scatter name, else ``$PnN``), ``tops`` (name → ``$PnR``,
            the logicle T), ``index`` (rows of the file the events are; all
            rows when every event was kept) and ``n_events`` (events in the
            file). ``None`` when the entry holds no events, or events without
            column names (written before names were stored).

        Examples
        --------
        >>> import tempfile
        >>> from cytometry.batch.run import run_batch
        >>> from cytometry.loading.manifest import read_manifest
        >>> d = tempfile.TemporaryDirectory()
        >>> _ = run_batch(["sample_fcs/S01_screening_TBNK.fcs"], read_manifest("sample_fcs/manifest.csv"),
        ...               store=f"{d.name}/run.store", workers=1)
        >>> store = ResultStore(f"{d.name}/run.store")
        >>> stored = store.events(store.entries()[0].name)
        >>> stored["events"].shape[0] <= REPORT_EVENTS, sorted(stored["columns"])[:2]
        (True, ['CD16+56', 'CD19'])
        >>> d.cleanup()
        """

        with h5py.File(self.samples / Path(entry_name).name, "r") as h5:
            if "events" not in h5 or "columns" not in h5["events"].attrs:
                return None
            data = h5["events"]
            names = json.loads(data.attrs["columns"])
            tops = json.loads(data.attrs["tops"])
            events = data[()]
            n_events = int(data.attrs["n_events"])
            index = h5["event_index"][()] if "event_index" in h5 else np.arange(events.shape[0])
        return {"events": events, "columns": {name: i for i, name in enumerate(names)},
                "tops": dict(zip(names, tops)), "index": index, "n_events": n_events}

    def provenance(self, entry_name):
        """What the store recorded about one entry's file and run, for an audit trail.

        Returns
        -------
        dict
            ``sha256``, ``params_hash``, ``software_version``, ``file_name``,
            ``file_size``, ``written_at`` and ``fcs_keywords`` (the audit
            keywords of :data:`AUDIT_KEYWORDS` the file had: instrument
            ``cyt``, acquisition ``date``, ``btim``/``etim``…).

        Examples
        --------
        >>> import tempfile
        >>> from cytometry.batch.run import run_batch
        >>> from cytometry.loading.manifest import read_manifest
        >>> d = tempfile.TemporaryDirectory()
        >>> _ = run_batch(["sample_fcs/S01_screening_TBNK.fcs"], read_manifest("sample_fcs/manifest.csv"),
        ...               store=f"{d.name}/run.store", workers=1)
        >>> store = ResultStore(f"{d.name}/run.store")
        >>> store.provenance(store.entries()[0].name)["fcs_keywords"]["cyt"]
        'FACSCanto II'
        >>> d.cleanup()
        """

        with h5py.File(self.samples / Path(entry_name).name, "r") as h5:
            out = {key: h5.attrs[key] for key in ("sha256", "params_hash", "software_version", "file_name",
                                                  "file_size", "written_at") if key in h5.attrs}
            out["fcs_keywords"] = json.loads(h5.attrs.get("fcs_keywords", "{}"))
        return {key: value.item() if isinstance(value, np.generic) else value for key, value in out.items()}


def event_sample(gated, limit=REPORT_EVENTS, seed=0):
    """The events of a gated sample the store keeps for the report, with their column names.

    Parameters
    ----------
    gated : cytometry.analysis.GatedSample
    limit : int or None
        Keep at most this many events, chosen at random (``None``: all).
        The rows kept are sorted, so the file's order (and its time axis)
        is kept.
    seed : int
        The subsample is a function of the file alone, so re-running gives
        the same figure.

    Returns
    -------
    dict
        ``events``, ``columns`` (one name per column), ``tops`` (``$PnR`` per
        column), ``index`` (rows kept, ``None`` when all) and ``n_events``:
        what :meth:`ResultStore.write` takes as ``events``.

    Examples
    --------
    >>> from cytometry.analysis import gate_file
    >>> kept = event_sample(gate_file("sample_fcs/S01_screening_TBNK.fcs"), limit=1000)
    >>> kept["events"].shape[0], kept["n_events"]
    (1000, 24123)
    """

    data = gated.data
    names = list(gated.sample.pnn)
    for name, column in gated.channels.items():
        names[column] = name  # the marker or scatter name the gates use
    tops = [gated.sample.channel_top(i) for i in range(data.shape[1])]
    index = None
    if limit is not None and data.shape[0] > limit:
        index = np.sort(np.random.default_rng(seed).choice(data.shape[0], size=limit, replace=False))
        data = data[index]
    return {"events": data, "columns": names, "tops": tops, "index": index, "n_events": gated.data.shape[0]}


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def gatingml_bytes(gated):
    """GatingML text of a gated sample (for the store)."""
    buffer = io.BytesIO()
    export_gating(gated, buffer)
    return buffer.getvalue()
