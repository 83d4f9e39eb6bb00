"""Benchmark the gpu/ kernels against the peers a Python user would reach for.

Prints one table: for each kernel and size, the median time of ours and of
the peer measured in the same run, and their ratio. The machine is shared
and noisy: compare ratios, not absolute times across runs.

    python benchmarks/bench_kernels.py                 # 100k and 1M events
    python benchmarks/bench_kernels.py --sizes 1e5,1e6,1e7 --repeats 3
    python benchmarks/bench_kernels.py --device gpu    # on a CUDA machine

Peers (install with ``pip install -r benchmarks/requirements.txt``; a peer
that is not installed is reported as such): scikit-learn ``KMeans`` and
``GaussianMixture``, the Python ``FlowSOM`` package, ``numpy.histogram2d``,
flowutils' logicle.

Targets (issue 3, this 2-core machine): k-means (k = 32) per Lloyd
iteration at 1M × 10 no slower than scikit-learn with peak memory under 3×
the data; GMM (12 components, full covariance) per EM iteration at
1M × 10 at least 3× faster than scikit-learn; 2-D density + smoothing +
watershed + labels for 1M events under 30 ms; logicle on 1M × 8 at least 15×
faster than flowutils.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import tracemalloc
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu import get_array_module  # noqa: E402
from gpu.grid import segment_events_2d  # noqa: E402
from gpu.kmeans import kmeans  # noqa: E402
from gpu.logicle import logicle  # noqa: E402
from gpu.mixture import fit_gaussian_mixture  # noqa: E402


def median_time(function, repeats, sync=lambda: None):
    """Median wall time (s) of ``function()`` over ``repeats`` runs, and its last result."""
    times, result = [], None
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        result = function()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def clustered_data(n, d, k, seed=0):
    """``n`` events in ``d`` dimensions from ``k`` Gaussian clusters of uneven size."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 4, (k, d))
    sizes = rng.dirichlet(np.ones(k)) * n
    labels = np.repeat(np.arange(k), np.maximum(1, sizes.astype(int)))[:n]
    labels = np.concatenate([labels, rng.integers(0, k, n - labels.size)])
    return centers[labels] + rng.normal(0, 1, (n, d)), labels


def row(table, kernel, n, ours, peer_name, peer, note=""):
    ratio = f"{peer / ours:6.1f}x" if ours and peer else "   -"
    table.append((kernel, f"{n:,}", f"{ours * 1000:10.1f}" if ours else "-", peer_name,
                  f"{peer * 1000:10.1f}" if peer else "-", ratio, note))


def bench_kmeans(table, data, xp, repeats, sync):
    n = data.shape[0]
    k, iters = 32, 20
    rng = np.random.default_rng(1)
    init = data[rng.choice(n, k, replace=False)]
    device_data = xp.asarray(data)
    ours, result = median_time(lambda: kmeans(device_data, k, init=xp.asarray(init), max_iter=iters, tol=0),
                               repeats, sync)
    per_iter = ours / result.n_iter
    tracemalloc.start()
    kmeans(data, k, init=init, max_iter=2, tol=0)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    memory = f"peak extra memory {peak / data.nbytes:.2f}x data (CPU)"
    peer = None
    try:
        from sklearn.cluster import KMeans

        def fit_sklearn():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return KMeans(k, init=init, n_init=1, max_iter=iters, tol=0, algorithm="lloyd").fit(data)

        peer_total, fitted = median_time(fit_sklearn, repeats)
        peer = peer_total / fitted.n_iter_
    except ImportError:
        memory += "; scikit-learn not installed"
    row(table, "k-means k=32, per Lloyd iteration", n, per_iter, "sklearn KMeans", peer, memory)


def bench_gmm(table, data, xp, repeats, sync, with_peer):
    n = data.shape[0]
    k, iters = 12, 3
    rng = np.random.default_rng(2)
    init = data[rng.choice(n, k, replace=False)]
    device_data = xp.asarray(data)
    ours, result = median_time(
        lambda: fit_gaussian_mixture(device_data, k, init_means=xp.asarray(init), max_iter=iters, tol=0),
        repeats, sync)
    per_iter = ours / result.n_iter
    peer, note = None, ""
    if not with_peer:
        note = "peer skipped at this size (minutes per run)"
    else:
        try:
            from sklearn.mixture import GaussianMixture

            def fit_sklearn():
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    return GaussianMixture(k, covariance_type="full", means_init=init, max_iter=iters, tol=0).fit(data)

            peer_total, fitted = median_time(fit_sklearn, repeats)
            peer = peer_total / fitted.n_iter_
        except ImportError:
            note = "scikit-learn not installed"
    row(table, "GMM 12 full-cov, per EM iteration", n, per_iter, "sklearn GaussianMixture", peer, note)


def bench_grid(table, data, xp, repeats, sync):
    n = data.shape[0]
    x, y = xp.asarray(data[:, 0]), xp.asarray(data[:, 1])
    ours, _ = median_time(lambda: segment_events_2d(x, y, bins=256), repeats, sync)
    peer, _ = median_time(lambda: np.histogram2d(data[:, 0], data[:, 1], bins=256), repeats)
    row(table, "2-D density+smooth+watershed+labels", n, ours, "np.histogram2d (binning only)", peer)


def bench_logicle(table, n, xp, repeats, sync):
    rng = np.random.default_rng(3)
    values = np.concatenate([rng.normal(0, 300, n * 4), np.exp(rng.uniform(0, np.log(262144), n * 4))])
    values = values.reshape(n, 8)
    device_values = xp.asarray(values)
    ours, _ = median_time(lambda: logicle(device_values), repeats, sync)
    peer = None
    note = ""
    try:
        from flowutils.transforms import logicle as flowutils_logicle

        peer, _ = median_time(lambda: flowutils_logicle(values, list(range(8)), t=262144, m=4.5, w=0.5, a=0),
                              repeats)
    except ImportError:
        note = "flowutils not installed"
    row(table, "logicle, n x 8 values", n, ours, "flowutils logicle", peer, note)


def bench_flowsom(table, data, repeats):
    n = data.shape[0]
    try:
        from flowsom.models import FlowSOMEstimator
    except ImportError:
        table.append(("FlowSOM 10x10, 20 metaclusters", f"{n:,}", "-", "flowsom", "-", "   -",
                      "FlowSOM not installed"))
        return
    peer, _ = median_time(lambda: FlowSOMEstimator(xdim=10, ydim=10, n_clusters=20, seed=1).fit_predict(data),
                          repeats)
    table.append(("FlowSOM 10x10, 20 metaclusters (whole fit)", f"{n:,}", "-", "flowsom", f"{peer * 1000:10.1f}",
                  "   -", "the clustering a Python user would run today"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1e5,1e6", help="comma-separated event counts (e.g. 1e5,1e6,1e7)")
    parser.add_argument("--dims", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "gpu"])
    parser.add_argument("--peer-limit", type=float, default=2e6,
                        help="largest size at which the slow peers (sklearn GMM, FlowSOM) run")
    args = parser.parse_args(argv)
    xp, device = get_array_module(args.device)
    sync = (lambda: xp.cuda.Stream.null.synchronize()) if device == "gpu" else (lambda: None)
    table = []
    for size in [int(float(s)) for s in args.sizes.split(",")]:
        repeats = args.repeats if size <= 2_000_000 else 1
        data, _ = clustered_data(size, args.dims, 12)
        bench_kmeans(table, data, xp, repeats, sync)
        bench_gmm(table, data, xp, repeats, sync, with_peer=size <= args.peer_limit)
        bench_grid(table, data, xp, repeats, sync)
        bench_logicle(table, size, xp, repeats, sync)
        if size <= args.peer_limit:
            bench_flowsom(table, data, 1)
        del data
    headers = ("kernel", "events", "ours ms", "peer", "peer ms", "peer/ours", "note")
    widths = [max(len(str(r[i])) for r in table + [headers]) for i in range(len(headers))]
    print(f"device: {device}; medians of {args.repeats} runs (1 run above 2M events); {args.dims} dimensions")
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
    print("  ".join("-" * w for w in widths))
    for r in table:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))


if __name__ == "__main__":
    main()
