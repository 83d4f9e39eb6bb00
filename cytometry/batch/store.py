"""The results store: one HDF5 file per analysed sample, written atomically.

HDF5 has no journal: a process killed while writing can leave a file that
does not open. The store therefore never writes in place. A store is a
folder::

    STORE/
      parameters.json                  the store's one parameter set (hash and options)
      writer.lock                      held (``fcntl.flock``) by the one run writing the store
      samples/<sha256>-<params>.h5     one finished sample each
      samples/.tmp-*-<pid>             in flight (ignored; removed once process <pid> is gone)
      samples/damaged/                 entries that failed verification, moved aside (never deleted)

Each sample is built in memory (HDF5 never writes to the disk itself, so a
full disk is a plain ``OSError``, never a crash inside the HDF5 library),
written to a temporary file in the same folder, flushed to disk and renamed
into place (``os.replace``, atomic on POSIX). A crash at any moment
therefore loses at most the samples in flight; everything else opens. A
write that fails (``ENOSPC``, any ``OSError``) removes its temporary file
and raises :class:`StoreWriteError` (one line): nothing half-written is
left. There is no study file to corrupt: the index is rebuilt by listing
``samples/``.

Verification
    Every entry is sealed: its first :data:`USERBLOCK` bytes (an HDF5 user
    block, which HDF5 leaves to the application) say ``cytometry-counts
    store entry``, the SHA-256 of every byte after them and their number
    (:func:`entry_seal`). Reading an entry hashes the whole file (one
    sequential read) and compares. An entry that does not open
    (truncated, zeroed, not HDF5) or whose payload does not match its
    seal (truncated, changed) is *damaged*: it is moved to ``samples/damaged/``
    and read as an error result naming it, until a new entry for the same FCS
    file supersedes it; a run re-analyses that sample. Entries written before
    seals were written are read when every dataset in them reads.

One writer per store
    :meth:`ResultStore.lock` takes an exclusive ``flock`` on
    ``writer.lock`` (released by the kernel when the process dies, even by
    SIGKILL); a second writer waits up to its timeout, then gets
    :class:`StoreLocked` naming the holder. Temporary files are removed only
    under the lock and only when the process named in them is gone; damaged
    entries are moved aside only under the lock (a reader that cannot take
    it reports them and leaves them in place).

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

import contextlib
import datetime as _dt
import errno
import hashlib
import io
import json
import logging
import os
import secrets
import time
from dataclasses import asdict, replace
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

try:
    import fcntl
except ImportError:  # Windows: no flock, so one writer per store is not enforced there (logged when locking)
    fcntl = None

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


class StoreLocked(StoreError):
    """Another process holds the store's writer lock (one line naming it)."""


class DamagedEntry(StoreError):
    """A store entry that does not open or does not match its checksum (moved aside; one line)."""

    def __init__(self, message, entry=None, reason=None, moved_to=None, file_name=None):
        super().__init__(message)
        self.entry, self.reason, self.moved_to, self.file_name = entry, reason, moved_to, file_name


class StoreWriteError(OSError):
    """Writing to the store failed (full disk, permissions...); nothing half-written is left (one line)."""

    def __str__(self):
        return self.strerror or super().__str__()


#: Bytes at the start of every entry holding its seal (an HDF5 user block: HDF5 starts after it).
USERBLOCK = 512
ENTRY_MAGIC = b"cytometry-counts store entry\n"
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


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
        self._lock_fd = None
        with self._exclusive() as held:
            if held:  # no writer is running: leftovers of killed processes can go
                self._clean_leftovers()

    @property
    def record_path(self):
        return self.path / "parameters.json"

    @property
    def lock_path(self):
        return self.path / "writer.lock"

    @property
    def damaged_dir(self):
        return self.samples / "damaged"

    # -- one writer per store -------------------------------------------------------------------------

    def lock(self, timeout=0.0):
        """Take the store's writer lock (one writer per store, across processes).

        The lock is an exclusive ``fcntl.flock`` on ``STORE/writer.lock``,
        which the kernel releases when the process ends however it ends; the
        file says which process holds it. Taking it also removes temporary
        files whose process is gone (see :meth:`clean_leftovers`).

        Parameters
        ----------
        timeout : float
            Seconds to wait for another writer to finish (0: do not wait).

        Raises
        ------
        StoreLocked
            One line naming the process that holds the store.
        StoreWriteError
            The lock file cannot be created (read-only or full file system).

        Examples
        --------
        >>> import tempfile
        >>> path = tempfile.mkdtemp()
        >>> first, second = ResultStore(path), ResultStore(path)
        >>> first.lock()
        >>> second.lock(timeout=0)
        Traceback (most recent call last):
        ...
        cytometry.batch.store.StoreLocked: ...: another run (pid ...) holds this store; wait for it to finish...
        >>> first.unlock(); second.lock(); second.unlock()
        """
        if self._lock_fd is not None:
            return
        try:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StoreWriteError(f"{self.lock_path}: cannot create the store's lock file "
                                  f"({exc.strerror or exc})") from None
        if fcntl is None:
            logger.warning("%s: no flock on this platform; make sure no other run writes this store", self.path)
            self._lock_fd = fd
            self._clean_leftovers()
            return
        deadline = time.monotonic() + max(0.0, float(timeout))
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    os.close(fd)
                    raise StoreWriteError(f"{self.lock_path}: cannot lock ({exc.strerror or exc})") from None
                if time.monotonic() >= deadline:
                    holder = self._holder(fd)
                    os.close(fd)
                    waited = f" after waiting {timeout:g} s" if timeout else ""
                    raise StoreLocked(f"{self.path}: another run ({holder}) holds this store{waited}; wait for it "
                                      "to finish, or give another --out folder") from None
                time.sleep(min(0.2, max(0.01, deadline - time.monotonic())))
        self._lock_fd = fd
        try:  # who holds it, for the message a second run prints; best effort (a full disk still locks)
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": os.uname().nodename,
                                      "since": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
                                     ).encode(), 0)
        except OSError:
            pass
        self._clean_leftovers()

    def unlock(self):
        """Release the writer lock taken by :meth:`lock` (a no-op when not held)."""
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            try:
                if fcntl is not None:
                    fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)

    @contextlib.contextmanager
    def writer(self, timeout=0.0):
        """``with store.writer(timeout):`` holds the writer lock for the block (see :meth:`lock`).

        Examples
        --------
        >>> import tempfile
        >>> path = tempfile.mkdtemp()
        >>> with ResultStore(path).writer():
        ...     ResultStore(path).clean_leftovers()    # another opener changes nothing meanwhile
        []
        """
        held = self._lock_fd is not None
        self.lock(timeout)
        try:
            yield self
        finally:
            if not held:
                self.unlock()

    def _holder(self, fd):
        try:
            record = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
            return f"pid {record['pid']} on {record['host']}, since {record['since']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "pid unknown"

    @contextlib.contextmanager
    def _exclusive(self):
        """Yield whether this process may change the store now: it holds the lock, or takes it without waiting."""
        if self._lock_fd is not None or fcntl is None:
            yield True
            return
        try:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:  # a read-only store: read it, change nothing
            yield False
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def clean_leftovers(self):
        """Remove temporary files no live process owns, when no other process writes the store.

        A temporary file's name ends with its writer's process id. Under the
        writer lock no other run is writing, so a temporary file whose process
        is gone (killed in flight) can never be renamed into place. Files of
        live processes are left alone.

        Returns
        -------
        list of Path
            The files removed.

        Examples
        --------
        >>> import subprocess, sys, tempfile
        >>> store = ResultStore(tempfile.mkdtemp())
        >>> ended = subprocess.Popen([sys.executable, "-c", "pass"]); _ = ended.wait()   # a writer that has ended
        >>> (store.samples / f".tmp-x.h5-00ff00ff-{ended.pid}").write_bytes(b"killed in flight")
        16
        >>> (store.samples / f".tmp-y.h5-00ff00ff-{os.getpid()}").write_bytes(b"mine")
        4
        >>> [p.name.split("-")[1] for p in store.clean_leftovers()]
        ['x.h5']
        """
        with self._exclusive() as held:
            return self._clean_leftovers() if held else []

    def _clean_leftovers(self):
        removed = []
        for leftover in [*self.samples.glob(".tmp-*"), *self.path.glob(".tmp-*")]:
            pid = _owner_pid(leftover.name)
            if pid is not None and (pid == os.getpid() or _alive(pid)):
                continue  # in flight in a live process
            try:
                leftover.unlink()
                removed.append(leftover)
            except OSError:
                pass
        return removed

    # -- atomic writes --------------------------------------------------------------------------------

    def _write_atomically(self, target, data, what):
        """Write ``data`` to ``target`` via a temporary file (fsync, rename); on failure remove the temporary file."""
        target = Path(target)
        temporary = target.parent / f".tmp-{target.name}-{secrets.token_hex(4)}-{os.getpid()}"
        try:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                _write_fully(fd, data)
                os.fsync(fd)  # the bytes are on disk before the name appears
            finally:
                os.close(fd)
            os.replace(temporary, target)
        except OSError as exc:
            with contextlib.suppress(OSError):
                temporary.unlink()
            raise StoreWriteError(exc.errno, f"{target}: {what} not written "
                                             f"({exc.strerror or type(exc).__name__})") from None
        _fsync_folder(target.parent)
        return target

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
        self._write_atomically(self.record_path, json.dumps(record, indent=2, sort_keys=True).encode(),
                               "the parameter-set record")
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
            newest entry when a file has several within the set), then an
            error result (``"store_damaged": true``) for each damaged entry
            not re-analysed since (see :meth:`read`), so that no subject or
            visit disappears without a word.

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
        sets, by_file, loaded, unreadable, moved = {}, {}, {}, [], {}
        for entry in self.entries():
            try:  # every entry is read and verified once; a damaged one is an error result, never dropped
                result, value = self._verified(entry)
            except FileNotFoundError:  # replaced by its writer meanwhile
                continue
            except _Damage:
                try:
                    self.read(entry)  # moves it aside
                except DamagedEntry as exc:
                    if exc.moved_to is None:  # left in place; moved ones are listed with damaged_entries()
                        unreadable.append(self._damaged_result(entry, exc))
                    else:
                        moved[Path(exc.moved_to)] = exc
                except FileNotFoundError:
                    pass
                continue
            result["store_entry"] = entry.name
            loaded[entry] = result
            sets.setdefault(value or recorded or UNRECORDED_SET, []).append(entry)
            sha = entry.stem.rsplit("-", 1)[0]
            by_file.setdefault(sha, []).append(entry)
        unreadable += [self._damaged_result(path, moved.get(path)) for path in self.damaged_entries()]
        if not sets:
            return recorded, unreadable
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
        return name, [loaded[entry] for entry in loaded if entry in newest] + unreadable

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
        source = Path(result["file"])
        # Built in memory: the HDF5 library never writes to the disk itself, so a full disk is a plain
        # OSError in _write_atomically (HDF5 failing inside its own writes crashed the process).
        buffer = io.BytesIO()
        with h5py.File(buffer, "w", userblock_size=USERBLOCK) as h5:
            h5.attrs["result"] = json.dumps(result, default=_json_default)
            h5.attrs["sha256"] = sha
            h5.attrs["params_hash"] = params
            if parameter_set is not None:
                h5.attrs["parameter_set"] = parameter_set
            h5.attrs["software_version"] = str(result.get("software_version"))
            h5.attrs["file_name"] = source.name
            try:
                h5.attrs["file_size"] = source.stat().st_size
            except OSError:
                h5.attrs["file_size"] = -1
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
        data = buffer.getbuffer()
        seal = entry_seal(data[USERBLOCK:])
        data[:len(seal)] = seal  # into the user block, which HDF5 left zeroed
        self._write_atomically(target, data, f"store entry of {source.name}")
        if parameter_set is not None:  # one entry per file within the set
            for earlier in self.samples.glob(f"{sha}-*.h5"):
                # the automatic and the reviewed result are kept side by side
                if earlier != target and is_reviewed_entry(earlier) == is_reviewed_entry(target):
                    logger.info("%s: replaces %s", target.name, earlier.name)
                    earlier.unlink(missing_ok=True)
        return target

    def entries(self):
        """Paths of the finished entries, oldest first."""
        stamped = []
        for entry in self.samples.glob("*.h5"):
            try:
                stamped.append((entry.stat().st_mtime, entry.name, entry))
            except FileNotFoundError:  # replaced or moved aside by the writer meanwhile
                continue
        return [entry for _, _, entry in sorted(stamped)]

    def results(self, params=None):
        """The JSON results of every entry (optionally only those with ``params``).

        Each entry is verified; a damaged one is moved aside (:meth:`read`)
        and reported as an error result naming it, never dropped silently,
        as are entries moved aside earlier and not yet re-analysed
        (:meth:`damaged_entries`).
        """
        out = [self._read(entry) for entry in self.entries()
               if params is None or entry.stem.endswith(f"-{params}")]
        return out + [self._damaged_result(path) for path in self.damaged_entries()
                      if params is None or path.name.split(".", 1)[0].endswith(f"-{params}")]

    def _read(self, entry):
        """The verified result of one entry, or an error result naming it when it is damaged."""
        try:
            return self.read(entry)
        except DamagedEntry as exc:
            return self._damaged_result(exc.entry, exc)

    def read(self, entry):
        """The JSON result of one entry, after verifying all of it; a damaged entry is moved aside.

        Parameters
        ----------
        entry : str or Path
            An entry's path or name.

        Returns
        -------
        dict
            The result, with ``store_entry`` (the entry's name).

        Raises
        ------
        DamagedEntry
            One line: the entry, what is wrong (does not open, not HDF5,
            truncated, checksum mismatch) and where it was moved.

        Examples
        --------
        >>> import tempfile
        >>> from cytometry.batch.run import run_batch
        >>> from cytometry.loading.manifest import read_manifest
        >>> d = tempfile.TemporaryDirectory()
        >>> _ = run_batch(["sample_fcs/S03_screening_TBNK.fcs"], read_manifest("sample_fcs/manifest.csv"),
        ...               store=f"{d.name}/run.store", workers=1)
        >>> store = ResultStore(f"{d.name}/run.store")
        >>> entry = store.entries()[0]
        >>> store.read(entry)["populations"]["b_cells"]["events"]
        26
        >>> with open(entry, "r+b") as fh:          # damage it: zero its first 4 KiB
        ...     _ = fh.write(bytes(4096))
        >>> store.read(entry)
        Traceback (most recent call last):
        ...
        cytometry.batch.store.DamagedEntry: ...: damaged store entry (not an HDF5 file...); moved to .../damaged/...
        >>> [p.parent.name for p in store.damaged_entries()]
        ['damaged']
        >>> d.cleanup()
        """
        entry = self.samples / Path(entry).name
        try:
            result, _ = self._verified(entry)
        except _Damage as damage:
            moved = self._quarantine(entry)
            where = f"moved to {moved}" if moved else "left in place (another process holds the store)"
            name = f" ({damage.file_name})" if damage.file_name else ""
            raise DamagedEntry(f"{entry}{name}: damaged store entry ({damage}); {where}", entry=entry,
                               reason=str(damage), moved_to=moved, file_name=damage.file_name) from None
        result["store_entry"] = entry.name
        return result

    def _verified(self, path):
        """Check one entry's seal and read its result; raises _Damage saying what is wrong."""
        try:
            sealed = _check_seal(path)
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise _Damage(f"unreadable: {exc.strerror or exc}") from None
        except _Damage as damage:
            damage.file_name = _file_name_hint(path)
            raise
        file_name = None
        try:
            with h5py.File(path, "r") as h5:
                file_name = _text(h5.attrs.get("file_name"))
                if not sealed:  # written before seals: at least every part of it must read
                    h5.visititems(lambda name, obj: obj[()] if isinstance(obj, h5py.Dataset) else None)
                result = json.loads(h5.attrs["result"])
                parameter_set = _text(h5.attrs.get("parameter_set"))
        except Exception as exc:  # h5py raises OSError, KeyError, RuntimeError, ValueError... for a broken file
            if not path.exists():  # replaced by its writer while being read: not damaged
                raise FileNotFoundError(path) from None
            text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise _Damage(f"does not read: {text}", file_name) from None
        if not isinstance(result, dict):
            raise _Damage("its result is not a JSON object", file_name)
        return result, parameter_set

    def _quarantine(self, entry):
        """Move a damaged entry to ``samples/damaged/`` (never deleted); its new path, or None when not moved."""
        with self._exclusive() as held:
            if not held:
                return None
            try:
                self.damaged_dir.mkdir(exist_ok=True)
                target = self.damaged_dir / entry.name
                if target.exists():  # damaged before, re-analysed, damaged again: keep both
                    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S%f")
                    target = self.damaged_dir / f"{entry.stem}.{stamp}.h5"
                os.rename(entry, target)
            except FileNotFoundError:  # replaced meanwhile by a new entry of its writer
                return None
            except OSError as exc:
                logger.warning("%s: damaged, and could not be moved aside (%s)", entry, exc.strerror or exc)
                return None
        logger.info("%s: damaged; moved to %s", entry.name, target)
        return target

    def damaged_entries(self):
        """Entries moved to ``samples/damaged/`` whose FCS file has no entry since (not re-analysed yet).

        One per FCS file (the one moved aside last); the others stay in the
        folder.

        Returns
        -------
        list of Path
        """
        if not self.damaged_dir.is_dir():
            return []
        latest = {}  # one per FCS file: the entry moved aside last (a rename sets its ctime)
        for path in self.damaged_dir.glob("*.h5"):
            sha = path.name.split("-", 1)[0]
            try:
                moved_at = path.stat().st_ctime
            except FileNotFoundError:
                continue
            if sha not in latest or moved_at >= latest[sha][0]:
                latest[sha] = (moved_at, path)
        return sorted(path for sha, (_, path) in latest.items() if not any(self.samples.glob(f"{sha}-*.h5")))

    def _damaged_result(self, path, damage=None):
        """An error result for a damaged entry (the CLI contract), naming the entry and what became of it.

        ``file`` is the entry's path as it is now (in ``samples/damaged/``
        once moved); ``error`` says which FCS file it held when that can
        still be read, what is wrong and how to analyse it again.
        """
        path = Path(path)
        if damage is None:  # moved aside earlier: say again what is wrong with it
            try:
                self._verified(path)
                reason, file_name = "moved aside earlier", None
            except _Damage as exc:
                reason, file_name = str(exc), exc.file_name
            except FileNotFoundError:
                reason, file_name = "moved aside earlier", None
            where = "not re-analysed since"
        else:
            reason, file_name = damage.reason, damage.file_name
            where = "moved aside" if damage.moved_to else "left in place (another process holds the store)"
            path = Path(damage.moved_to or path)
        of = f" of {file_name}" if file_name else ""
        return {"file": str(path), "status": "error",
                "error": f"damaged store entry{of} ({reason}); {where}; `cytometry analyze ... --out {self.path}` "
                         "analyses the sample again",
                "populations": {}, "eligibility": None, "qc_flags": [], "store_entry": path.name,
                "store_damaged": True}

    def results_for(self, entry):
        """The JSON result of one entry (a path or a name), verified: :meth:`read`."""

        return self.read(entry)

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


class _Damage(Exception):
    """What is wrong with an entry (internal; :class:`DamagedEntry` is what callers see)."""

    def __init__(self, message, file_name=None):
        super().__init__(message)
        self.file_name = file_name


def entry_seal(payload):
    """The seal written into an entry's user block: magic line, SHA-256 and length of the bytes after it.

    Parameters
    ----------
    payload : bytes-like
        The entry's bytes after the first :data:`USERBLOCK` bytes.

    Returns
    -------
    bytes
        At most :data:`USERBLOCK` bytes.

    Examples
    --------
    >>> magic, digest, length = entry_seal(b"abc").decode().splitlines()
    >>> magic, digest[:20], length
    ('cytometry-counts store entry', 'sha256 ba7816bf8f01c', 'bytes 3')
    """
    payload = memoryview(payload).cast("B")
    return ENTRY_MAGIC + f"sha256 {hashlib.sha256(payload).hexdigest()}\nbytes {payload.nbytes}\n".encode()


def _check_seal(path, chunk=1 << 20):
    """True when ``path`` is a sealed entry whose bytes match its seal, False for an older, unsealed one.

    Raises _Damage for an empty file, a file that is not HDF5, a seal that
    does not match (truncated, extended or changed bytes).
    """
    with open(path, "rb") as fh:
        head = fh.read(USERBLOCK)
        if not head:
            raise _Damage("empty file")
        if not head.startswith(ENTRY_MAGIC):
            if head.startswith(HDF5_SIGNATURE):
                return False  # written before entries were sealed
            zeroed = ", zeroed" if not head.strip(b"\0") else ""
            raise _Damage(f"not an HDF5 file: no store seal and no HDF5 signature{zeroed}")
        try:
            fields = dict(line.split(" ", 1) for line in head[len(ENTRY_MAGIC):].split(b"\0", 1)[0].decode()
                          .splitlines())
            wanted, length = fields["sha256"], int(fields["bytes"])
        except (ValueError, KeyError, UnicodeDecodeError):
            raise _Damage("its seal is unreadable") from None
        digest, size = hashlib.sha256(), 0
        while block := fh.read(chunk):
            digest.update(block)
            size += len(block)
    if size != length:
        raise _Damage(f"truncated: {size:,} of {length:,} bytes" if size < length else
                      f"changed after it was written: {size:,} bytes where {length:,} were written")
    if digest.hexdigest() != wanted:
        raise _Damage("checksum mismatch: its contents changed after it was written")
    return True


def _file_name_hint(path):
    """The FCS file name a damaged entry says it holds, when that much still reads (for the message)."""
    try:
        with h5py.File(path, "r") as h5:
            return _text(h5.attrs.get("file_name"))
    except Exception:
        return None


def _text(value):
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else (None if value is None else str(value))


def _write_fully(fd, data):
    """``os.write`` until every byte is written (a short write is not an error)."""
    view = memoryview(data).cast("B")
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _fsync_folder(folder):
    """Make a rename durable (best effort: not every file system lets a folder be fsynced)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _owner_pid(name):
    """The process id a temporary file's name ends with (``.tmp-...-<pid>``), or None."""
    tail = name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else None


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    except OSError:
        return False
    return True


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
