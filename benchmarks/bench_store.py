"""What verifying the store costs: writing and reading one entry, checked against the unchecked way.

Per committed sample tube (gated once), the median over ``--repeats`` runs of

* writing its entry with :meth:`ResultStore.write` (built in memory, sealed
  with the SHA-256 of its bytes, temporary file, fsync, rename) against the peer measured
  in the same run: the earlier way, h5py writing the same datasets straight
  into the temporary file, fsync, rename, no checksum;
* reading it back with :meth:`ResultStore.read` (the whole file hashed and
  compared with its seal) against opening it and parsing the ``result`` attribute alone
  (what a run's skip check and the subject commands did before).

    python benchmarks/bench_store.py [--repeats 7] [--store-events]

Measured on the 2-core shared machine (load ~9), median of 5: writing 68-127 ms
against 52-114 ms unchecked; reading with verification 1.4-1.7 ms against
0.4-0.6 ms for the result attribute alone (a first version that re-read and
hashed every dataset's values took 40-66 ms per read).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cytometry.analysis import AnalysisOptions  # noqa: E402
from cytometry.batch.run import analyze_one  # noqa: E402
from cytometry.batch.store import ResultStore, params_hash  # noqa: E402
from cytometry.loading.manifest import read_manifest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TUBES = ["S01_screening_TBNK.fcs", "S01_day010_CAR.fcs", "S03_screening_TBNK.fcs"]


def direct_write(path, result, extras):
    """The unchecked peer: h5py writes the file itself (as the store did before issue 15)."""
    temporary = path.with_name(f".tmp-peer-{os.getpid()}")
    with h5py.File(temporary, "w") as h5:
        h5.attrs["result"] = json.dumps(result, default=str)
        group = h5.create_group("masks")
        for name, mask in extras["masks"].items():
            mask = np.asarray(mask, dtype=bool)
            group.create_dataset(name, data=np.packbits(mask), compression="gzip").attrs["n_events"] = mask.size
        h5.create_dataset("gatingml", data=np.frombuffer(extras["gatingml"], dtype=np.uint8), compression="gzip")
        events = extras["events"]
        h5.create_dataset("events", data=np.asarray(events["events"], dtype=np.float32), compression="gzip")
        if events.get("index") is not None:
            h5.create_dataset("event_index", data=np.asarray(events["index"], dtype=np.int64), compression="gzip")
    with open(temporary, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(temporary, path)


def result_only(path):
    with h5py.File(path, "r") as h5:
        return json.loads(h5.attrs["result"])


def median_ms(function, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--store-events", action="store_true", help="every event in the entry, not 20,000")
    args = parser.parse_args()
    manifest = read_manifest(ROOT / "sample_fcs" / "manifest.csv")
    options = AnalysisOptions()
    params = params_hash(options)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        store = ResultStore(Path(scratch) / "store")
        for name in TUBES:
            path = ROOT / "sample_fcs" / name
            result, extras = analyze_one(path, manifest.lookup(path), manifest, options, keep=True,
                                         keep_events=args.store_events)
            entry = store.write(result, params, **extras)
            peer = Path(scratch) / f"peer-{name}.h5"
            write = median_ms(lambda: store.write(result, params, **extras), args.repeats)
            write_peer = median_ms(lambda: direct_write(peer, result, extras), args.repeats)
            read = median_ms(lambda: store.read(entry), args.repeats)
            read_peer = median_ms(lambda: result_only(entry), args.repeats)
            rows.append((name, extras["events"]["events"].shape[0], entry.stat().st_size, write, write_peer, read,
                         read_peer))
    print(f"store entry write and read, median of {args.repeats} (ms); peer = unchecked, measured in the same run")
    print(f"{'tube':24s} {'events kept':>11s} {'entry KB':>9s} {'write':>8s} {'peer':>8s} {'read+verify':>12s} "
          f"{'result only':>12s}")
    for name, kept, size, write, write_peer, read, read_peer in rows:
        print(f"{name:24s} {kept:11,d} {size / 1024:9.0f} {write:8.1f} {write_peer:8.1f} {read:12.1f} "
              f"{read_peer:12.1f}")


if __name__ == "__main__":
    main()
