"""The results store: one HDF5 file per analysed sample, written atomically.

HDF5 has no journal: a process killed while writing can leave a file that
does not open. The store therefore never writes in place. A store is a
folder::

    STORE/
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
* optionally ``events``: the compensated, transformed events (float32).

A sample is identified by the SHA-256 of its FCS file and a hash of every
parameter that can change its result; re-running the same command skips
what is done, and a changed parameter analyses again.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import os
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

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
    from . import __version__

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
    from gating.panels import PanelDefinitionError, load_panels

    try:
        panels = {name: panel.as_dict() for name, panel in load_panels(options.panel_dirs).items()}
        for definition in panels.values():
            definition.pop("source", None)
    except PanelDefinitionError as exc:
        panels = str(exc)
    values["panel_definitions"] = panels
    text = json.dumps({"options": values, "software": __version__}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class ResultStore:
    """A folder of per-sample HDF5 files (see the module docstring).

    Parameters
    ----------
    path : str or Path
        Created when missing.

    Examples
    --------
    >>> store = ResultStore("run.store")  # doctest: +SKIP
    >>> store.results()[0]["populations"]["b_cells"]["cells_per_ul"]  # doctest: +SKIP
    114.3
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

    def entry_path(self, sha256, params):
        return self.samples / f"{sha256}-{params}.h5"

    def has(self, sha256, params):
        """Whether this file was analysed with these parameters (a finished entry exists)."""
        return self.entry_path(sha256, params).exists()

    def write(self, result, params, *, masks=None, gatingml=None, keywords=None, events=None):
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
        events : ndarray, optional
        """
        import h5py

        sha = result.get("sha256") or hashlib.sha256(str(result["file"]).encode()).hexdigest()
        target = self.entry_path(sha, params)
        temporary = self.samples / f".tmp-{sha}-{params}-{os.getpid()}"
        source = Path(result["file"])
        with h5py.File(temporary, "w") as h5:
            h5.attrs["result"] = json.dumps(result, default=_json_default)
            h5.attrs["sha256"] = sha
            h5.attrs["params_hash"] = params
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
            if events is not None:
                h5.create_dataset("events", data=np.asarray(events, dtype=np.float32), compression="gzip")
            h5.flush()
        with open(temporary, "rb+") as fh:  # the bytes are on disk before the name appears
            os.fsync(fh.fileno())
        os.replace(temporary, target)
        return target

    def entries(self):
        """Paths of the finished entries, oldest first."""
        return sorted(self.samples.glob("*.h5"), key=lambda p: p.stat().st_mtime)

    def results(self, params=None):
        """The JSON results of every entry (optionally only those with ``params``).

        An entry that does not open (which the atomic write should make
        impossible) is reported as an error result, never dropped silently.
        """
        import h5py

        out = []
        for entry in self.entries():
            if params is not None and not entry.stem.endswith(f"-{params}"):
                continue
            try:
                with h5py.File(entry, "r") as h5:
                    result = json.loads(h5.attrs["result"])
                    result["store_entry"] = entry.name
                    out.append(result)
            except Exception as exc:
                out.append({"file": entry.name, "status": "error", "error": f"store entry unreadable: {exc}",
                            "populations": {}, "eligibility": None, "qc_flags": []})
        return out

    def results_for(self, entry):
        """The JSON result of one entry (a path or a name)."""
        import h5py

        entry = self.samples / Path(entry).name
        with h5py.File(entry, "r") as h5:
            result = json.loads(h5.attrs["result"])
        result["store_entry"] = entry.name
        return result

    def masks(self, entry_name):
        """The event masks of one entry, unpacked (population → bool array)."""
        import h5py

        with h5py.File(self.samples / entry_name, "r") as h5:
            return {name: np.unpackbits(data[()])[:data.attrs["n_events"]].astype(bool)
                    for name, data in h5["masks"].items()}

    def gatingml(self, entry_name):
        """The GatingML text of one entry."""
        import h5py

        with h5py.File(self.samples / entry_name, "r") as h5:
            return bytes(h5["gatingml"][()]).decode()

    def table(self, params=None):
        """One row per sample and population, as a pandas DataFrame (for notebooks).

        Columns: ``file, subject_id, study_day, panel, status, population,
        events, cells_per_ul, ci95_low, ci95_high, below_lloq, method``.
        """
        import pandas as pd

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
    from .analysis import export_gating

    buffer = io.BytesIO()
    export_gating(gated, buffer)
    return buffer.getvalue()
