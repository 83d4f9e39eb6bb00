"""End-to-end batch throughput: simulated 100,000-event tubes into a results store.

Prints tubes per minute with 1 and 2 local workers (store writes included),
the median per-stage times of one tube (load, compensate + transform, gate,
count + QC, store write), and, measured in the same run on a few tubes, the
peer a Python user would assemble today: flowkit load + compensation +
logicle, then FlowSOM (10x10 grid, 20 metaclusters) per tube.

Targets (issue 6, 2-core machine): at least 10x faster per tube than the
peer, and at least 200 tubes/min with 2 workers.

    python benchmarks/bench_batch.py [--tubes 200] [--peer-tubes 5]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_gating import flowkit_preprocess  # noqa: E402  (same folder)
from bench_gating import stage_times as gating_stage_times  # noqa: E402
from cytometry.analysis import AnalysisOptions  # noqa: E402
from cytometry.batch.run import run_batch  # noqa: E402
from cytometry.simulation.simulate import default_concentrations, simulate_tube, write_tube  # noqa: E402
from cytometry.batch.store import ResultStore, gatingml_bytes, params_hash  # noqa: E402


def make_tubes(folder, n, events):
    paths = []
    for i in range(n):
        panel = "car" if i % 4 == 3 else "tbnk"
        conc = default_concentrations(panel, car_t=40.0) if panel == "car" else \
            default_concentrations("tbnk", b_cells=5.0 + 3 * (i % 40))
        per_ul = sum(v for k, v in conc.items() if k in ("granulocytes", "monocytes", "lymphocytes", "dead_cells"))
        tube = simulate_tube(panel, seed=10_000 + i, concentrations=conc, blood_volume_ul=events / (per_ul + 1070))
        paths.append(write_tube(tube, Path(folder) / f"tube{i:04d}.fcs"))
    return paths


def stage_times(path, options, store):
    """bench_gating's stage times of one tube, plus writing it to the store."""
    times, gated, result = gating_stage_times(path, options)
    times.pop("compensate")  # measured inside "compensate + transform" too
    start = time.perf_counter()
    store.write(result, params_hash(options), masks=gated.gating.masks, gatingml=gatingml_bytes(gated),
                keywords=gated.sample.keywords)
    times["store (masks + GatingML)"] = time.perf_counter() - start
    return times


def peer_seconds(path, entry_point="FlowSOM"):
    """flowkit load + compensation + logicle, then FlowSOM 10x10 / 20 metaclusters.

    ``entry_point="FlowSOM"`` is the package's documented ``flowsom.FlowSOM``
    class (what a user calls); ``"estimator"`` only its ``FlowSOMEstimator``
    (the clustering alone: the stricter comparison).
    """
    import logging
    import warnings

    import anndata
    import flowsom
    import numpy as np
    from flowsom.models import FlowSOMEstimator

    logging.disable(logging.CRITICAL)
    start = time.perf_counter()
    events, labels, fluorescence = flowkit_preprocess(path)
    if entry_point == "estimator":
        FlowSOMEstimator(xdim=10, ydim=10, n_clusters=20, seed=1).fit_predict(events)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            data = anndata.AnnData(np.asarray(events, dtype=np.float32))
            data.var_names = labels
            columns = [labels.index(label) for label in fluorescence]
            flowsom.FlowSOM(data, cols_to_use=columns, xdim=10, ydim=10, n_clusters=20, seed=1)
    return time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tubes", type=int, default=200)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--peer-tubes", type=int, default=5)
    args = parser.parse_args(argv)
    options = AnalysisOptions(beads_per_test=50000, sample_volume_ul=50)
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        print(f"simulating {args.tubes} tubes of ~{args.events:,} events ...", flush=True)
        tubes = make_tubes(scratch / "fcs", args.tubes, args.events)
        rates = {}
        for workers in (1, 2):
            start = time.perf_counter()
            results = run_batch(tubes, None, options, store=scratch / f"store{workers}", workers=workers,
                                progress=False)
            elapsed = time.perf_counter() - start
            failed = sum(r["status"] != "ok" for r in results)
            rates[workers] = (len(tubes) / elapsed * 60, elapsed / len(tubes), failed)
        store = ResultStore(scratch / "stages")
        stages = [stage_times(path, options, store) for path in tubes[:20]]
        medians = {name: statistics.median(s[name] for s in stages) for name in stages[0]}
        peers = {}
        try:
            for entry_point in (("FlowSOM", "estimator") if args.peer_tubes > 0 else ()):
                peers[entry_point] = [peer_seconds(path, entry_point) for path in tubes[:args.peer_tubes]]
        except ImportError:
            pass
    print(f"\nend to end into the store ({args.tubes} tubes, ~{args.events:,} events each)")
    for workers, (per_minute, per_tube, failed) in rates.items():
        print(f"  {workers} worker{'s' if workers > 1 else ' '}: {per_minute:7.1f} tubes/min  "
              f"({per_tube * 1000:6.1f} ms per tube wall clock, {failed} failed)")
    print(f"\nper-stage medians over {min(20, len(tubes))} tubes (1 process)")
    for name, seconds in medians.items():
        print(f"  {name:28s} {seconds * 1000:8.1f} ms")
    print(f"  {'total':28s} {sum(medians.values()) * 1000:8.1f} ms")
    if peers:
        ours = rates[1][1]
        print("\npeer: flowkit load + compensation + logicle, then FlowSOM 10x10 / 20 metaclusters "
              f"(median of {args.peer_tubes} tubes, 1 process)")
        for entry_point, label in (("FlowSOM", "flowsom.FlowSOM (documented entry point)"),
                                   ("estimator", "FlowSOMEstimator only (clustering alone)")):
            peer_median = statistics.median(peers[entry_point])
            print(f"  {label:42s} {peer_median * 1000:7.0f} ms per tube;  ours (1 worker, incl. store) is "
                  f"{peer_median / ours:5.1f}x faster, with 2 workers {peer_median / rates[2][1]:5.1f}x")
    else:
        print("\npeer not measured (pip install -r benchmarks/requirements.txt)")


if __name__ == "__main__":
    main()
