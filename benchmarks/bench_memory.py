"""Peak memory of ``cytometry analyze FILE --json`` on large tubes (issue 15, defect 10).

Simulates a CAR tube of 1 million and one of 10 million events once (kept in
a cache folder; the 10M tube is ten independently seeded 1M tubes with the
same spillover matrix and gains, written as one FCS file), then runs the
command in a fresh subprocess per measurement and reads that process's peak
resident set size from ``os.wait4`` (``ru_maxrss``, which includes any worker
it reaped). The peer, measured in the same run on the same file, is the
field's reference reader alone: ``flowkit.Sample(path)``, no compensation,
transform or gating.

    python benchmarks/bench_memory.py [--sizes 1000000,10000000] [--repeats 3]
                                      [--limit-gb 4] [--cache DIR] [--profile]

Columns: events; file MB; event data MB (n_events x n_channels x 4 bytes,
the float32 data); peak RSS MB; ratio = peak RSS / event data; wall s (median
of ``--repeats`` runs for tubes under 5M events, one run above, which the
table says); whether the same command completes under an address-space limit
of ``--limit-gb`` (``RLIMIT_AS``, as ``prlimit --as`` sets it); and a
checksum of the population event counts, so a before/after comparison shows
the counts did not change. Target: ratio <= 3 at 10M events.

``--profile`` adds, for the smallest tube, the peak traced allocation
(tracemalloc: NumPy registers its buffers with it) of each stage run in this
process: read, compensate + transform, gate, count.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cytometry.loading.fcs import parse_spillover  # noqa: E402
from cytometry.simulation.simulate import SimulatedTube, default_concentrations, simulate_tube, write_tube  # noqa: E402

CHUNK_EVENTS = 1_000_000
COUNTING = ["--beads-per-test", "50000", "--sample-volume-ul", "50"]


def _chunk(seed, events, spillover=None):
    conc = default_concentrations("car", car_t=40.0)
    per_ul = sum(v for k, v in conc.items() if k in ("granulocytes", "monocytes", "lymphocytes", "dead_cells"))
    return simulate_tube("car", seed=seed, concentrations=conc, blood_volume_ul=events / (per_ul + 1070),
                         spillover=spillover)


def make_tube(cache, events):
    """The cached FCS file of about ``events`` events (simulated on first use)."""
    path = Path(cache) / f"car_{events}.fcs"
    if path.exists():
        return path
    chunks = max(1, round(events / CHUNK_EVENTS))
    first = _chunk(7_000, events / chunks)
    spill = parse_spillover(first.metadata["$SPILLOVER"], first.pnn).matrix
    tubes = [first] + [_chunk(7_000 + i, events / chunks, spillover=spill) for i in range(1, chunks)]
    metadata = dict(first.metadata)
    if "$VOL" in metadata:  # the volume analysed grows with the events
        metadata["$VOL"] = f"{float(metadata['$VOL']) * chunks:g}"
    tube = SimulatedTube(events=np.concatenate([t.events for t in tubes]), pnn=first.pnn, pns=first.pns,
                         metadata=metadata, labels=np.concatenate([t.labels for t in tubes]),
                         truth={"chunks": chunks, "seeds": [7_000 + i for i in range(chunks)]})
    del tubes, first
    tmp = path.with_name(path.name + ".tmp.fcs")
    write_tube(tube, tmp)
    tmp.replace(path)
    return path


def _channels(path):
    with open(path, "rb") as fh:
        header = fh.read(58)
        start, end = int(header[10:18]), int(header[18:26])
        fh.seek(start)
        text = fh.read(end - start + 1).decode("latin-1")
    fields = text[1:].split(text[0])
    keywords = {fields[i].upper(): fields[i + 1] for i in range(0, len(fields) - 1, 2)}
    return int(keywords["$TOT"]), int(keywords["$PAR"])


def measure(command, limit_bytes=None):
    """(peak RSS in bytes, wall seconds, return code, stdout) of ``command`` in a fresh process."""

    def limit():
        if limit_bytes:
            resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))

    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(command, stdout=out, stderr=err, preexec_fn=limit, cwd=ROOT,
                                env=dict(os.environ, PYTHONPATH=str(ROOT)))
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    if proc.returncode != 0 and not limit_bytes:
        raise RuntimeError(f"{' '.join(map(str, command))} exited {proc.returncode}: {stderr.strip()[-500:]}")
    return usage.ru_maxrss * 1024, wall, proc.returncode, stdout


def counts_checksum(stdout):
    """Population events of the JSON document, and a short hash of them (to compare runs)."""
    sample = json.loads(stdout)["samples"][0]
    if sample["status"] != "ok":
        return f"error: {sample['error']}", {}
    events = {name: entry["events"] for name, entry in sorted(sample["populations"].items())}
    return hashlib.sha256(json.dumps(events).encode()).hexdigest()[:12], events


def profile(path):
    """Peak traced bytes of each stage, run in this process (tracemalloc)."""
    from cytometry.analysis import AnalysisOptions, GatedSample, analyze_gated, prepare_events
    from cytometry.decisions.qc import saturated_events
    from cytometry.loading.fcs import read_fcs
    from cytometry.loading.panel import resolve_panel
    from gating import auto_gate

    rows = []
    tracemalloc.start()

    def stage(name, function):
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        start = time.perf_counter()
        value = function()
        wall = time.perf_counter() - start
        now, peak = tracemalloc.get_traced_memory()
        rows.append((name, (peak - before) / 1e6, (now - before) / 1e6, wall))
        return value

    options = AnalysisOptions(beads_per_test=50000, sample_volume_ul=50)
    sample = stage("read_fcs", lambda: read_fcs(path))
    panel = resolve_panel(sample.pnn, sample.pns)
    raw_dtype = sample.events.dtype
    saturated = stage("saturated events (QC)", lambda: saturated_events(sample, panel))
    # as gate_file(keep_raw=False), the CLI's path: the raw array is transformed in place
    data, channels = stage("compensate + transform", lambda: prepare_events(sample, panel, sample.spillover,
                                                                            in_place=True))
    gating = stage("gate", lambda: auto_gate(data, channels, panel.name, params=options.gating))
    gated = GatedSample(sample=sample, panel=panel, spillover=sample.spillover, data=data, channels=channels,
                        gating=gating, flags=list(gating.flags), saturated=saturated)
    stage("count + QC", lambda: analyze_gated(gated, None, options))
    tracemalloc.stop()
    return rows, raw_dtype, data.dtype


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1000000,10000000")
    parser.add_argument("--repeats", type=int, default=3, help="runs per tube under 5M events (median)")
    parser.add_argument("--limit-gb", type=float, default=4.0)
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "cytometry-bench-memory"))
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--no-peer", action="store_true")
    args = parser.parse_args(argv)
    Path(args.cache).mkdir(parents=True, exist_ok=True)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    limit = int(args.limit_gb * (1 << 30))
    rows = []
    for size in sizes:
        path = make_tube(args.cache, size)
        n_events, n_channels = _channels(path)
        data_mb = n_events * n_channels * 4 / 1e6
        repeats = args.repeats if size < 5_000_000 else 1
        command = [sys.executable, "-m", "cytometry", "analyze", str(path), "--json", *COUNTING]
        runs = [measure(command) for _ in range(repeats)]
        peak = statistics.median(r[0] for r in runs)
        wall = statistics.median(r[1] for r in runs)
        checksum, events = counts_checksum(runs[0][3])
        _, _, code, _ = measure(command, limit_bytes=limit)
        peer = None
        if not args.no_peer:
            peer_cmd = [sys.executable, "-c", "import sys, flowkit; flowkit.Sample(sys.argv[1])", str(path)]
            peer = statistics.median(measure(peer_cmd)[0] for _ in range(repeats))
        rows.append((n_events, n_channels, path.stat().st_size / 1e6, data_mb, peak / 1e6, peak / 1e6 / data_mb,
                     wall, repeats, code == 0, peer, checksum, events))
    print("\ncytometry analyze FILE --json (peak RSS of the process, os.wait4); peer: flowkit.Sample(FILE) alone\n")
    print(f"{'events':>11} {'ch':>3} {'file MB':>8} {'data MB':>8} {'peak MB':>8} {'ratio':>6} {'wall s':>7} "
          f"{'runs':>4} {'<' + format(args.limit_gb, 'g') + ' GB AS':>8} {'peer MB':>8} {'peer ratio':>10}  counts")
    for (n, c, file_mb, data_mb, peak, ratio, wall, repeats, fits, peer, checksum, _) in rows:
        peer_text = f"{peer / 1e6:8.0f} {peer / 1e6 / data_mb:10.2f}" if peer else f"{'-':>8} {'-':>10}"
        print(f"{n:>11,} {c:>3} {file_mb:8.0f} {data_mb:8.0f} {peak:8.0f} {ratio:6.2f} {wall:7.1f} {repeats:>4} "
              f"{'yes' if fits else 'NO':>8} {peer_text}  {checksum}")
    print("\nwall s and peak MB: median of 'runs' runs (one run for 5M events and more).")
    for row in rows:
        print(f"  {row[0]:,} events: " + ", ".join(f"{k} {v}" for k, v in row[-1].items()))
    if args.profile:
        path = make_tube(args.cache, min(sizes))
        stages, raw_dtype, data_dtype = profile(path)
        print(f"\nstages of {path.name} in this process (tracemalloc; raw events {raw_dtype}, gated data {data_dtype})")
        print(f"{'stage':<24} {'peak MB':>8} {'kept MB':>8} {'wall s':>7}")
        for name, peak, kept, wall in stages:
            print(f"{name:<24} {peak:8.0f} {kept:8.0f} {wall:7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
