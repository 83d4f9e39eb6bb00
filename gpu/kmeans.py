"""k-means clustering (k-means++ seeding, Lloyd iterations), written once for NumPy and CuPy.

Distances
    Rows are processed in chunks; for each chunk the squared distances to
    every center come from one matrix product (BLAS on the CPU, cuBLAS on
    the GPU),

        ||x - c||^2 = ||x - o||^2 - 2 (x - o).(c - o) + ||c - o||^2,

    where ``o`` is the centers' mean: each chunk is centered as it is read
    (and, if float32, converted), which keeps the expansion accurate for
    data far from the origin. The argmin does not need the per-row
    constant ``||x - o||^2``. The block is laid out centers x rows, so that the
    per-row minimum is a vectorised reduction (NumPy's ``argmin`` over
    short rows is slow). The distance reported for an event (inertia,
    :func:`assign_labels`) is recomputed exactly as ``sum((x - c)**2)``.

Memory
    No n x k matrix is held: by default a chunk's k x n_chunk distance
    block is about 4 MB on the CPU (cache-sized: measured faster than
    larger blocks) and 32 MB on the GPU. Beyond the data, a fit holds two
    label arrays (8 bytes per event each), during seeding a few float64
    values per event (2 + log k of them), and on the CPU the float32 copy
    described next (4 bytes per value plus 8 per event). At 1M x 10
    float64, k = 32, the peak of NumPy allocations is about 1.3x the data.

Precision
    Results are those of float64 arithmetic. float32 input is accepted as
    it is: chunks are converted to float64 as they are processed (the
    whole matrix is never upcast at once); other dtypes (integers, bool,
    float16) are converted to one float64 copy. On the CPU, the Lloyd
    iterations first label events in float32 (half the cost) from a
    float32 copy of the centered data, and keep a label only when its
    lead over the runner-up exceeds a rigorous bound on the float32
    rounding error; the rare others are labelled in float64. The labels
    are therefore those of the float64 computation (the tests check it).

Threads
    On the CPU, when ``threadpoolctl`` is installed, BLAS is held to one
    thread and blocks of rows are shared among one thread per core instead
    (the products here are thin, d deep, and a multithreaded BLAS spends
    more time synchronising than computing, badly so on a busy machine).
    Without ``threadpoolctl`` the blocks run in turn.

Determinism
    Random draws (k-means++ seeding, ``init="random"``) come from
    ``numpy.random.default_rng(seed)`` on the host, so the CPU and the GPU
    draw the same numbers. Each row's label does not depend on its chunk
    or thread, and per-cluster sums are accumulated block by block in
    block order (blocks of 32768 rows, fixed): on the CPU the same input
    and seed give identical labels and centers whatever ``chunk_size`` and
    the number of threads. After the first iteration the sums are updated
    from the events that changed cluster only. On the GPU the sums use
    atomic additions, so centers can differ from the CPU's in the last
    bits.
"""
from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from .density import _xp

# Target bytes for one chunk's float64 working set (its k x n_chunk distance
# block plus its centered float64 copy of the rows), by device.
_CPU_CHUNK_BYTES = 4 * 2**20
_GPU_CHUNK_BYTES = 32 * 2**20
# Largest magnitude accepted in the data: squares of larger values can
# overflow float64 in the distance expansion.
_MAX_ABS = 1e150
# Rows per block. On the CPU, work is split among threads by blocks, chunks
# never cross a block boundary, and per-cluster sums are accumulated block by
# block in block order: results do not depend on ``chunk_size`` or threads.
_BLOCK_ROWS = 2**15
# Most CPU threads the chunk loops use.
_MAX_WORKERS = 8
# Unit roundoff of float32, for the error bound of the screened assignment.
_U32 = 2.0**-24
# Whether Lloyd iterations on the CPU screen in float32 (see _screened_chunk).
_SCREEN = True


@dataclass
class KMeansResult:
    """A k-means clustering (arrays live on the device of the input).

    Attributes
    ----------
    centers : array of float64, shape (k, d)
    labels : array of int64, shape (n,)
        Index of each event's center (the nearest one).
    inertia : float
        Sum over events of the (weighted) squared distance to their center.
    n_iter : int
        Lloyd iterations run (of the best of the ``n_init`` runs).
    converged : bool
        Whether the run stopped before ``max_iter`` because the labels
        stopped changing or the centers moved less than the tolerance.
    """

    centers: object
    labels: object
    inertia: float
    n_iter: int
    converged: bool

    def predict(self, data, *, chunk_size=None):
        """Index of the nearest center for each row of ``data``."""
        return assign_labels(data, self.centers, chunk_size=chunk_size)[0]


# --------------------------------------------------------------------------
# Validation and small helpers


def _as_data(data):
    """(xp, 2-D float32 or float64 array on its device), or ValueError."""
    xp = _xp(data)
    data = xp.asarray(data)
    if data.ndim != 2:
        raise ValueError(f"data must be a 2-D array (events x dimensions); got shape {tuple(data.shape)}. "
                         "Reshape a single dimension with data.reshape(-1, 1).")
    if data.dtype != xp.float32 and data.dtype != xp.float64:
        data = data.astype(xp.float64)
    n, d = data.shape
    if n == 0:
        raise ValueError("data has no events (zero rows)")
    if d == 0:
        raise ValueError("data has no dimensions (zero columns)")
    return xp, data


def _check_finite(xp, data):
    """Refuse NaN or infinite values (counting the offending rows) and absurd magnitudes."""
    n = data.shape[0]
    bad = 0
    largest = 0.0
    for start in range(0, n, _BLOCK_ROWS):
        block = data[start:start + _BLOCK_ROWS]
        top = float(xp.abs(block).max())  # NaN if any NaN, inf if any inf
        if math.isfinite(top):
            largest = max(largest, top)
        else:
            bad += int((~xp.isfinite(block).all(axis=1)).sum())
    if bad:
        raise ValueError(f"data contains NaN or infinite values in {bad} of {n} rows; "
                         "remove or impute them before clustering")
    if largest > _MAX_ABS:
        raise ValueError(f"data contains values of magnitude {largest:.3g}, beyond {_MAX_ABS:g}: "
                         "squared distances would overflow; rescale the data")


def _check_n_clusters(n_clusters, n):
    if isinstance(n_clusters, bool) or not isinstance(n_clusters, (int, np.integer)):
        raise ValueError(f"n_clusters must be an integer; got {n_clusters!r}")
    k = int(n_clusters)
    if k < 1 or k > n:
        raise ValueError(f"n_clusters must be between 1 and the number of events ({n}); got {k}")
    return k


def _as_weights(xp, sample_weight, n):
    if sample_weight is None:
        return None
    w = _on_device(xp, sample_weight, xp.float64)
    if w.shape != (n,):
        raise ValueError(f"sample_weight must have shape ({n},), one weight per event; got {tuple(w.shape)}")
    if not bool(xp.isfinite(w).all()) or bool((w < 0).any()):
        raise ValueError("sample_weight must be finite and non-negative")
    if not float(w.sum()) > 0:
        raise ValueError("sample_weight sums to zero")
    return w


def _chunk_rows(xp, chunk_size, n, k, d):
    """Rows per chunk: ``chunk_size``, or a working set near 4 MB (CPU) or 32 MB (GPU)."""
    if chunk_size is None:
        if xp is np:
            rows = _CPU_CHUNK_BYTES // (8 * (k + d))
            rows = -(-_BLOCK_ROWS // -(-_BLOCK_ROWS // max(rows, 1)))  # equal chunks per block
        else:
            rows = _GPU_CHUNK_BYTES // (8 * (k + d))
    else:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer; got {chunk_size!r}")
        rows = int(chunk_size)
    return max(1, min(int(rows), n))


def _to_host(array):
    return array.get() if hasattr(array, "get") else np.asarray(array)


def _on_device(xp, array, dtype):
    """``array`` as an ``xp`` array of ``dtype`` (a CuPy array is brought to the host for NumPy)."""
    if xp is np:
        return np.asarray(_to_host(array), dtype=dtype)
    return xp.asarray(array, dtype=dtype)


def _chunk_reader(xp, data, rows, offset):
    """A function ``read(start, stop)`` giving ``data[start:stop] - offset`` as float64.

    Written into one buffer of ``rows`` rows (call once per thread); float32
    rows are converted on the way, so the whole matrix is never upcast.
    """
    buf = xp.empty((min(rows, data.shape[0]), data.shape[1]), dtype=xp.float64)

    def read(start, stop):
        chunk = buf[:stop - start]
        xp.subtract(data[start:stop], offset, out=chunk)
        return chunk

    return read


def _distance_operand(xp, centers, offset):
    """``(shifted, operand_t, bias_col)`` for distances about ``offset`` (o).

    With ``c' = c - o`` (``shifted``), ``operand_t = -2 c'`` (k, d) and
    ``bias_col = ||c'||^2`` (k, 1): for a centered row ``x - o``,
    ``operand_t @ (x - o) + bias_col = ||x - c||^2 - ||x - o||^2``.
    """
    shifted = xp.asarray(centers, dtype=xp.float64) - offset
    operand_t = xp.ascontiguousarray(-2.0 * shifted)
    bias_col = (shifted * shifted).sum(axis=1)[:, None]
    return shifted, operand_t, bias_col


def _distance_block(xp, chunk, operand_t, bias_col, out):
    """``out`` (k, m) = ``operand^T @ chunk^T + bias``: column i holds row i's distances.

    Centers along the first axis, so that the per-row minimum is a
    reduction over contiguous rows of length m (vectorised), not over
    short rows of length k.
    """
    xp.matmul(operand_t, chunk.T, out=out)
    out += bias_col
    return out


def _argmin_columns(xp, block, out, scratch=None):
    """Row of the smallest entry of each column of ``block`` (k, m) into ``out``, lowest on ties.

    NumPy's ``argmin`` over short rows is branchy and slow on real data;
    this is the same answer from vectorised passes: the column minimum,
    the entries equal to it, and the first of those found as a maximum of
    ``equal * (k - j)``. ``scratch``: reusable buffers (CPU).
    """
    if xp is not np:
        out[...] = block.argmin(axis=0)
        return
    k, m = block.shape
    if scratch is None or scratch["equal"].shape[0] != k or scratch["equal"].shape[1] < m:
        scratch = _argmin_scratch(k, m)
    minimum = np.minimum.reduce(block, axis=0, out=scratch["minimum"][:m])
    equal = np.equal(block, minimum, out=scratch["equal"][:, :m])
    key = np.multiply(equal, scratch["weight"], out=scratch["key"][:, :m])
    first = np.maximum.reduce(key, axis=0, out=scratch["first"][:m])
    np.subtract(k, first, out=out, casting="unsafe")


def _argmin_scratch(k, m, dtype=np.float64):
    """Buffers for :func:`_argmin_columns` on the CPU, for blocks of up to m columns."""
    small = np.int8 if k < 128 else np.int16 if k < 32768 else np.int64
    return {"minimum": np.empty(m, dtype=dtype), "equal": np.empty((k, m), dtype=bool),
            "key": np.empty((k, m), dtype=small), "first": np.empty(m, dtype=small),
            "weight": (k - np.arange(k)).astype(small)[:, None]}


@contextmanager
def _workers(xp):
    """``(thread pool, worker count)`` for the chunk loops, or None to run them in turn.

    CPU only, and only with ``threadpoolctl`` (BLAS is held to one thread
    meanwhile) and more than one core.
    """
    if xp is not np:
        yield None
        return
    try:
        count = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        count = os.cpu_count() or 1
    count = min(count, _MAX_WORKERS)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        count = 1
    if count < 2:
        yield None
        return
    with threadpool_limits(limits=1, user_api="blas"), ThreadPoolExecutor(count) as pool:
        yield pool, count


def _block_rows(xp, n):
    """Rows per block: fixed on the CPU; one block on the GPU (no threads, no order to keep)."""
    return _BLOCK_ROWS if xp is np else max(n, 1)


def _map_blocks(workers, n, block_rows, task):
    """Run ``task(first_block, stop_block)`` over contiguous groups of blocks.

    ``task`` returns a list with one entry per block; the lists are joined
    in block order. With ``workers`` each thread takes one group, so a
    thread allocates its buffers once.
    """
    n_blocks = -(-n // block_rows)
    if workers is None or n_blocks < 2:
        return task(0, n_blocks)
    pool, count = workers
    per = -(-n_blocks // count)
    futures = [pool.submit(task, first, min(first + per, n_blocks)) for first in range(0, n_blocks, per)]
    return [result for future in futures for result in future.result()]


# --------------------------------------------------------------------------
# Assignment


def _assign(xp, data, centers, rows, labels, want_dist=False, workers=None, block_fn=None, screen=None):
    """Nearest center per row into ``labels``, block by block, chunk by chunk.

    Returns ``(min_dist, block_results)``: the exact squared distances if
    ``want_dist`` (else None), and ``block_fn(start, stop)`` for each block,
    called as soon as the block's labels are known (its rows still in
    cache), in block order. ``screen`` (CPU): the output of
    :func:`_screen_data`, to label by :func:`_screened_chunk`.
    """
    n, d = data.shape
    k = centers.shape[0]
    offset = centers.mean(axis=0)
    shifted, operand_t, bias_col = _distance_operand(xp, centers, offset)
    min_dist = xp.empty(n, dtype=xp.float64) if want_dist else None
    block_rows = _block_rows(xp, n)
    size = min(rows, block_rows, n)
    screened = _screen_operand(centers, screen) if screen is not None else None

    def exact(chunk, out):
        # ||x - c||^2 less the per-row constant ||x - o||^2: enough for the argmin.
        return _distance_block(xp, chunk, operand_t, bias_col, out)

    def task(first_block, stop_block):
        if screened is None:
            read = _chunk_reader(xp, data, size, offset)
            block = xp.empty((k, size), dtype=xp.float64)
            scratch = _argmin_scratch(k, size) if xp is np else None
        else:
            block = np.empty((k, size), dtype=np.float32)
            scratch = _screen_scratch(k, size)
        results = []
        for b in range(first_block, stop_block):
            block_start = b * block_rows
            block_stop = min(block_start + block_rows, n)
            for start in range(block_start, block_stop, size):
                stop = min(start + size, block_stop)
                out = block if stop - start == size else xp.empty((k, stop - start), dtype=block.dtype)
                nearest = labels[start:stop]
                if screened is not None:
                    _screened_chunk(data, screen, screened, start, stop, out, nearest, scratch,
                                    lambda rows, out: exact(rows - offset, out))
                    continue
                chunk = read(start, stop)
                _argmin_columns(xp, exact(chunk, out), nearest, scratch)
                if want_dist:
                    # Exact (x - c)^2 for the chosen center, not the cancelling expansion.
                    diff = chunk - shifted[nearest]
                    min_dist[start:stop] = xp.einsum("ij,ij->i", diff, diff)
            if block_fn is not None:
                results.append(block_fn(block_start, block_stop))
        return results

    return min_dist, _map_blocks(workers, n, block_rows, task)


# The screened assignment (CPU). The thin float64 product dominates a Lloyd
# iteration; in float32 it costs half, and so do the passes over its result.
# Each event's float32 nearest center is kept when the gap to its second
# nearest exceeds a rigorous bound on the float32 rounding error (then the
# float64 computation, far more precise, must pick the same center);
# otherwise, which is rare, the event is labelled in float64. Labels are
# therefore those of the float64 computation. Costs a float32 copy of the
# centered data and one float64 norm per event, made once per fit.


def _screen_data(data, offset):
    """``(offset, x32, norms)``: float32 ``data - offset`` and its row norms (float64 array).

    The norms only scale the error bound, which has a factor 2 to spare:
    float32 precision is ample for them. (Sequential: in threads this is
    slower, the einsum holding the interpreter lock.)
    """
    n, d = data.shape
    x32 = np.empty((n, d), dtype=np.float32)
    norms = np.empty(n, dtype=np.float64)
    for start in range(0, n, _BLOCK_ROWS):
        block = x32[start:start + _BLOCK_ROWS]
        np.subtract(data[start:start + _BLOCK_ROWS], offset, out=block, casting="unsafe")
        np.sqrt(np.einsum("ij,ij->i", block, block), out=norms[start:start + _BLOCK_ROWS])
    return offset, x32, norms


def _screen_operand(centers, screen):
    """float32 ``-2 (c - o)`` (k, d), float32 ``||c - o||^2`` (k, 1), and the error-bound terms.

    For an event ``x`` with ``r = ||x - o||`` and ``C = max ||c - o||``, every
    float32 value ``-2 (x - o).(c - o) + ||c - o||^2`` (roundings of x, c and
    the square, a d-term dot product in any order, the final addition) is
    within ``E = 1.1 u ((d + 5) 2 C r + 2 C^2)`` of the exact one (u = 2^-24).
    A float32 winner whose lead over the runner-up exceeds 2E is the exact
    winner; the threshold used is ``alpha r + beta`` = 4E, twice that.
    """
    offset = screen[0]
    shifted = centers - offset
    squares = (shifted * shifted).sum(axis=1)
    reach = float(np.sqrt(squares.max()))
    d = centers.shape[1]
    alpha = 4.4 * _U32 * (d + 5) * 2.0 * reach
    beta = 4.4 * _U32 * 2.0 * reach * reach
    return ((-2.0 * shifted).astype(np.float32), squares.astype(np.float32)[:, None], alpha, beta)


def _screen_scratch(k, m):
    scratch = _argmin_scratch(k, m, np.float32)
    scratch.update(second=np.empty(m, dtype=np.float32), flat=np.empty(m, dtype=np.int64),
                   columns=np.arange(m), gap=np.empty(m), threshold=np.empty(m), sure=np.empty(m, dtype=bool))
    return scratch


def _screened_chunk(data, screen, screened, start, stop, out, nearest, scratch, exact):
    """Label rows start:stop in float32, certify, and relabel the uncertain ones in float64."""
    _, x32, norms = screen
    operand32, bias32, alpha, beta = screened
    m = stop - start
    np.matmul(operand32, x32[start:stop].T, out=out)
    out += bias32
    _argmin_columns(np, out, nearest, scratch)
    best = scratch["minimum"][:m]
    # Knock out each column's winner; the column minimum is then the runner-up
    # (equal to the winner on a tie, leaving no lead).
    flat = np.multiply(nearest, m, out=scratch["flat"][:m])
    flat += scratch["columns"][:m]
    out.ravel()[flat] = np.inf
    second = np.minimum.reduce(out, axis=0, out=scratch["second"][:m])
    gap = np.subtract(second, best, out=scratch["gap"][:m], dtype=np.float64)
    threshold = np.multiply(norms[start:stop], alpha, out=scratch["threshold"][:m])
    threshold += beta
    sure = np.greater(gap, threshold, out=scratch["sure"][:m])  # False for NaN (overflow)
    unsure = np.flatnonzero(~sure)
    if unsure.size:
        rows = data[start:stop][unsure].astype(np.float64)
        nearest[unsure] = exact(rows, np.empty((out.shape[0], unsure.size))).argmin(axis=0)


def assign_labels(data, centers, *, chunk_size=None):
    """Nearest center for every row, computed chunk by chunk.

    For each chunk of rows one matrix product gives the squared distances
    to all centers (expanded as ``||x||^2 - 2 x.c + ||c||^2`` about the
    centers' mean) and an argmin picks the nearest; no n x k matrix larger
    than one chunk is ever held. The returned distance of each row to its
    center is then computed exactly as ``sum((x - c)**2)``.

    Parameters
    ----------
    data : array, shape (n, d)
        NumPy or CuPy, float32 or float64 (float32 is upcast chunk by chunk).
    centers : array, shape (k, d)
    chunk_size : int, optional
        Rows per chunk; by default a chunk's distance block is about 4 MB
        (CPU) or 32 MB (GPU).

    Returns
    -------
    labels : array of int64, shape (n,)
        Index of the nearest center. Between centers at the same distance
        (within rounding of the expansion, about 1e-16 of the squared
        norms), the choice follows the rounding, as in scikit-learn.
    min_sq_dist : array of float64, shape (n,)
        Squared Euclidean distance to that center.

    Examples
    --------
    >>> data = np.array([[0.0, 0.0], [0.9, 0.0], [10.0, 10.0]])
    >>> labels, dist = assign_labels(data, np.array([[0.0, 0.0], [10.0, 10.0]]))
    >>> labels.tolist(), [round(float(v), 6) for v in dist]
    ([0, 0, 1], [0.0, 0.81, 0.0])
    """
    xp, data = _as_data(data)
    _check_finite(xp, data)
    n, d = data.shape
    centers = _on_device(xp, centers, xp.float64)
    if centers.ndim != 2 or centers.shape[1] != d or centers.shape[0] < 1:
        raise ValueError(f"centers must have shape (k, {d}) with k >= 1; got {tuple(centers.shape)}")
    if not bool(xp.isfinite(centers).all()):
        raise ValueError("centers contain NaN or infinite values")
    rows = _chunk_rows(xp, chunk_size, n, centers.shape[0], d)
    labels = xp.empty(n, dtype=xp.int64)
    with _workers(xp) as workers:
        min_dist, _ = _assign(xp, data, centers, rows, labels, want_dist=True, workers=workers)
    return labels, min_dist


# --------------------------------------------------------------------------
# Seeding


def _sq_dist_to_points(xp, data, points, offset, row_sq, rows, out_fn, workers):
    """Squared distances from every row to each of ``points`` (t, d), by chunk.

    ``row_sq`` holds ``||x - offset||^2`` per row; ``out_fn(start, stop, dist)``
    receives each chunk's (t, n_chunk) block, clipped at zero.
    """
    n, d = data.shape
    t = points.shape[0]
    _, operand_t, bias_col = _distance_operand(xp, points, offset)
    block_rows = _block_rows(xp, n)
    size = min(rows, block_rows, n)

    def task(first_block, stop_block):
        read = _chunk_reader(xp, data, size, offset)
        block = xp.empty((t, size), dtype=xp.float64)
        for start in range(first_block * block_rows, min(stop_block * block_rows, n), size):
            stop = min(start + size, (start // block_rows + 1) * block_rows, n)
            out = block if stop - start == size else xp.empty((t, stop - start), dtype=xp.float64)
            dist = _distance_block(xp, read(start, stop), operand_t, bias_col, out)
            dist += row_sq[None, start:stop]
            xp.maximum(dist, 0.0, out=dist)
            out_fn(start, stop, dist)
        return []

    _map_blocks(workers, n, block_rows, task)


def _weighted_pick(xp, mass, draws):
    """Indices whose cumulative ``mass`` first exceeds ``draws`` × total (host ints)."""
    cumulative = xp.cumsum(mass)
    total = float(cumulative[-1])
    targets = xp.asarray(np.asarray(draws, dtype=np.float64) * total)
    index = xp.searchsorted(cumulative, targets, side="right")
    return np.minimum(_to_host(index).astype(np.int64), mass.shape[0] - 1), total


def kmeans_plus_plus(data, n_clusters, rng, *, n_local_trials=None, sample_weight=None, chunk_size=None):
    """k-means++ seeding: ``n_clusters`` rows of ``data`` chosen far apart.

    The first center is a random event; each next one is drawn with
    probability proportional to the (weighted) squared distance to the
    nearest center chosen so far. With ``n_local_trials`` > 1 this is the
    greedy variant (as in scikit-learn): that many candidates are drawn and
    the one that most reduces the total squared distance is kept.

    All random draws come from ``rng`` on the host, so the choice is
    deterministic for a seed and the same on CPU and GPU (up to rounding of
    distances at a draw's boundary). When the data hold fewer distinct
    points than ``n_clusters``, the surplus centers repeat data points.

    Parameters
    ----------
    data : array, shape (n, d)
        NumPy or CuPy; NaN or infinite values are refused.
    n_clusters : int
        1 <= n_clusters <= n.
    rng : numpy.random.Generator or int
        An int is passed to ``numpy.random.default_rng``.
    n_local_trials : int, optional
        Candidates per step; default ``2 + int(log(n_clusters))``; 1 gives
        classic k-means++.
    sample_weight : array, shape (n,), optional
    chunk_size : int, optional
        Rows per chunk of the distance computation.

    Returns
    -------
    centers : array of float64, shape (n_clusters, d)
        On the device of ``data``.

    Examples
    --------
    >>> data = np.array([[0.0], [0.1], [10.0], [10.1]])
    >>> centers = kmeans_plus_plus(data, 2, np.random.default_rng(0))
    >>> sorted(round(float(c)) for c in centers[:, 0])
    [0, 10]
    """
    xp, data = _as_data(data)
    _check_finite(xp, data)
    n, d = data.shape
    k = _check_n_clusters(n_clusters, n)
    weights = _as_weights(xp, sample_weight, n)
    trials = 2 + int(math.log(k)) if n_local_trials is None else int(n_local_trials)
    if trials < 1:
        raise ValueError(f"n_local_trials must be at least 1; got {n_local_trials!r}")
    rows = _chunk_rows(xp, chunk_size, n, trials, d)
    with _workers(xp) as workers:
        return _seed_plus_plus(xp, data, k, np.random.default_rng(rng), trials, weights, rows, workers)


def _seed_plus_plus(xp, data, k, rng, trials, weights, rows, workers):
    n, d = data.shape
    if weights is None:
        first = int(rng.integers(n))
    else:
        first = int(_weighted_pick(xp, weights, [rng.random()])[0][0])
    centers = xp.empty((k, d), dtype=xp.float64)
    centers[0] = data[first]
    # Distances are expanded about the first center (a data point, so near
    # the data); the distance to it is then ||x - offset||^2 itself.
    offset = centers[0].copy()
    row_sq = xp.empty(n, dtype=xp.float64)
    for start in range(0, n, _BLOCK_ROWS):
        diff = data[start:start + _BLOCK_ROWS] - offset
        row_sq[start:start + _BLOCK_ROWS] = xp.einsum("ij,ij->i", diff, diff)
    closest = row_sq.copy()
    candidate_closest = xp.empty((trials, n), dtype=xp.float64) if trials > 1 else None

    def update(start, stop, dist):
        xp.minimum(closest[start:stop], dist[0], out=closest[start:stop])

    def store(start, stop, dist):
        xp.minimum(dist, closest[None, start:stop], out=candidate_closest[:, start:stop])

    for c in range(1, k):
        mass = closest if weights is None else closest * weights
        if float(mass.sum()) > 0:
            ids, _ = _weighted_pick(xp, mass, rng.random(trials))
        else:  # every event sits on a center already: duplicates are all that is left
            ids = rng.integers(n, size=trials).astype(np.int64)
        candidates = data[xp.asarray(ids)].astype(xp.float64)
        if trials == 1:
            _sq_dist_to_points(xp, data, candidates, offset, row_sq, rows, update, workers)
            best = 0
        else:
            _sq_dist_to_points(xp, data, candidates, offset, row_sq, rows, store, workers)
            if weights is None:
                potential = candidate_closest.sum(axis=1)
            else:
                potential = candidate_closest @ weights
            best = int(_to_host(potential).argmin())
            closest = candidate_closest[best].copy()
        centers[c] = candidates[best]
    return centers


# --------------------------------------------------------------------------
# Lloyd iterations


def _block_sums_xp(xp, data, labels, weights, k):
    """Per-cluster (weighted) sums of the rows of ``data``, (k, d): ``bincount`` per dimension."""
    d = data.shape[1]
    sums = xp.empty((k, d), dtype=xp.float64)
    for j in range(d):
        column = data[:, j].astype(xp.float64)
        if weights is not None:
            column *= weights
        sums[:, j] = xp.bincount(labels, weights=column, minlength=k)
    return sums


def _block_sums_numpy(data, labels, weights, k):
    """As :func:`_block_sums_xp`, by a (k x m) one-nonzero-per-column sparse product.

    A scatter-add in compiled code (scipy's CSC matrix times dense), several
    times faster than ``bincount`` per dimension; float32 rows are upcast
    by scipy, a block at a time.
    """
    from scipy.sparse import csc_matrix

    m = data.shape[0]
    values = np.ones(m, dtype=np.float64) if weights is None else weights
    onehot = csc_matrix((values, labels, np.arange(m + 1)), shape=(k, m))
    return onehot @ data


def _block_sums(xp, data, labels, weights, k):
    if xp is np:
        return _block_sums_numpy(data, labels, weights, k)
    return _block_sums_xp(xp, data, labels, weights, k)


def _tally(xp, data, labels, weights, k):
    """Per cluster: (weighted sums of rows (k, d), weight (k,), count of rows with weight > 0 (k,))."""
    sums = _block_sums(xp, data, labels, weights, k)
    if weights is None:
        count = xp.bincount(labels, minlength=k)
        mass = count.astype(xp.float64)
    else:
        mass = xp.bincount(labels, weights=weights, minlength=k)
        count = xp.bincount(labels[weights > 0], minlength=k)
    return sums, mass, count


def _moved_rows(xp, labels, previous, start):
    """Indices (offset by ``start``) of the rows whose label differs from ``previous``, or None."""
    moved = xp.flatnonzero(labels != previous)
    return moved + start if moved.size else None


def _update_tally(xp, data, labels, previous, weights, k, moved, tally):
    """Move the ``moved`` rows from their ``previous`` clusters to their new ones in ``tally``."""
    rows = data[moved]
    w = None if weights is None else weights[moved]
    gained = _tally(xp, rows, labels[moved], w, k)
    lost = _tally(xp, rows, previous[moved], w, k)
    for total, plus, minus in zip(tally, gained, lost):
        total += plus - minus


def _assigned_sq_dist(xp, data, centers, labels):
    """Exact squared distance of each row to its assigned center."""
    n = data.shape[0]
    out = xp.empty(n, dtype=xp.float64)
    for start in range(0, n, _BLOCK_ROWS):
        stop = min(start + _BLOCK_ROWS, n)
        diff = data[start:stop] - centers[labels[start:stop]]
        out[start:stop] = xp.einsum("ij,ij->i", diff, diff)
    return out


def _relocate_empty(xp, data, centers, labels, weights, sums, mass, count, empty):
    """Re-seed each empty cluster at the event farthest from its assigned center.

    Deterministic: clusters are filled in index order, each with the
    farthest remaining event (lowest index among ties). An event is only
    moved if its cluster keeps another (weighted) event and it is not
    already on its center; when no such event is left (fewer distinct
    points than clusters), the remaining clusters stay empty and keep
    their centers. Updates ``sums``, ``mass``, ``count`` and ``labels`` in
    place.
    """
    dist = _assigned_sq_dist(xp, data, centers, labels)
    positive = None if weights is None else weights > 0
    for j in empty:
        movable = count[labels] > 1
        if positive is not None:
            movable &= positive
        candidate = xp.where(movable, dist, -1.0)
        index = int(candidate.argmax())
        if not float(candidate[index]) > 0:
            break
        source = int(labels[index])
        weight = 1.0 if weights is None else weights[index]
        point = data[index].astype(xp.float64) * weight
        sums[source] -= point
        mass[source] -= weight
        count[source] -= 1
        sums[j] = point
        mass[j] = weight
        count[j] = 1
        labels[index] = j
        dist[index] = -1.0


def _column_mean(xp, data):
    """float64 mean of each column, summed block by block."""
    n, d = data.shape
    total = xp.zeros(d, dtype=xp.float64)
    for start in range(0, n, _BLOCK_ROWS):
        total += data[start:start + _BLOCK_ROWS].sum(axis=0, dtype=xp.float64)
    return total / n


def _data_tolerance(xp, data, tol, mean):
    """``tol`` times the mean per-dimension variance (scikit-learn's convention)."""
    if tol == 0:
        return 0.0
    n, d = data.shape
    square = xp.zeros(d, dtype=xp.float64)
    for start in range(0, n, _BLOCK_ROWS):
        diff = data[start:start + _BLOCK_ROWS] - mean
        square += (diff * diff).sum(axis=0)
    return float(tol) * float((square / n).mean())


def _lloyd(xp, data, centers, weights, max_iter, tol_abs, rows, workers, screen=None):
    n, d = data.shape
    k = centers.shape[0]
    labels = xp.empty(n, dtype=xp.int64)
    previous = None
    converged = False
    iteration = 0
    for iteration in range(1, max_iter + 1):
        # Run by the thread that has just labelled rows start:stop (still in cache).
        # First pass: the per-cluster tally of each block; then only the rows
        # whose label changed, to update the tally (few, after a few passes).
        if previous is None:
            def block_fn(start, stop, labels=labels):
                return _tally(xp, data[start:stop], labels[start:stop],
                              None if weights is None else weights[start:stop], k)
        else:
            def block_fn(start, stop, labels=labels, previous=previous):
                return _moved_rows(xp, labels[start:stop], previous[start:stop], start)

        _, results = _assign(xp, data, centers, rows, labels, workers=workers, block_fn=block_fn, screen=screen)
        if previous is None:
            sums = xp.zeros((k, d), dtype=xp.float64)
            mass = xp.zeros(k, dtype=xp.float64)
            count = xp.zeros(k, dtype=xp.int64)
            for block_sums, block_mass, block_count in results:  # in block order: deterministic
                sums += block_sums
                mass += block_mass
                count += block_count
            changed = True
        else:
            moved = [m for m in results if m is not None]
            changed = bool(moved)
            if changed:
                moved = xp.concatenate(moved) if len(moved) > 1 else moved[0]
                _update_tally(xp, data, labels, previous, weights, k, moved, (sums, mass, count))
        empty = np.flatnonzero(_to_host(count) == 0)
        if empty.size:
            sums[xp.asarray(empty)] = 0.0  # exactly, whatever the updates left
            mass[xp.asarray(empty)] = 0.0
            _relocate_empty(xp, data, centers, labels, weights, sums, mass, count, empty.tolist())
            changed = True
        filled = count > 0
        new_centers = xp.where(filled[:, None], sums / xp.where(filled, mass, 1.0)[:, None], centers)
        shift = float(((new_centers - centers) ** 2).sum())
        centers = new_centers
        if not changed:
            converged = True  # the partition repeated: the centers are fixed
            break
        if shift <= tol_abs:
            converged = True
            break
        if previous is None:
            previous = xp.empty_like(labels)
        previous, labels = labels, previous
    # Labels and exact distances for the final centers.
    min_dist, _ = _assign(xp, data, centers, rows, labels, want_dist=True, workers=workers)
    inertia = float(min_dist.sum() if weights is None else weights @ min_dist)
    return KMeansResult(centers=centers, labels=labels, inertia=inertia, n_iter=iteration, converged=converged)


def kmeans(data, n_clusters, *, seed=0, max_iter=100, tol=1e-4, init="k-means++", n_init=1,
           chunk_size=None, sample_weight=None):
    """k-means clustering: k-means++ seeding, then Lloyd iterations.

    Each iteration assigns every event to its nearest center (chunked
    distance products, see :func:`assign_labels`) and moves each center to
    the (weighted) mean of its events. A cluster left without events is
    re-seeded at the event farthest from its current center, so with at
    least ``n_clusters`` distinct points every cluster ends non-empty.
    With fewer distinct points than clusters the run still succeeds: the
    surplus centers duplicate data points and their clusters stay empty
    (no label refers to them).

    Stops when the partition repeats, when the total squared movement of
    the centers is at most ``tol`` times the mean per-dimension variance
    of the data (scikit-learn's convention), or after ``max_iter``
    iterations. The returned labels and inertia are those of the returned
    centers.

    Parameters
    ----------
    data : array, shape (n, d)
        NumPy or CuPy; the clustering runs on that device. float32 input is
        not upcast as a whole (each chunk is, as it is processed); other
        dtypes are converted to float64. NaN or infinite values are refused.
    n_clusters : int
        1 <= n_clusters <= n.
    seed : int
        Seeds ``numpy.random.default_rng`` for the host-side random draws.
    max_iter : int
    tol : float
        Relative tolerance on the center shift; 0 stops only when the
        partition repeats (or at ``max_iter``).
    init : {"k-means++", "random"} or array of shape (n_clusters, d)
        Greedy k-means++ (:func:`kmeans_plus_plus`), distinct random events,
        or given starting centers (then ``n_init`` is ignored: one run).
    n_init : int
        Runs from different seedings (the first with ``seed`` itself, the
        others with ``default_rng([seed, i])``); the lowest inertia wins.
    chunk_size : int, optional
        Rows per chunk of the distance computation; by default a chunk's
        distance block is about 4 MB (CPU) or 32 MB (GPU). Does not change
        the result on the CPU.
    sample_weight : array, shape (n,), optional
        Non-negative per-event weights (for pre-binned data).

    Returns
    -------
    KMeansResult

    Raises
    ------
    ValueError
        For 1-D or empty data, NaN or infinite values, ``n_clusters`` < 1 or
        greater than the number of events, or malformed options.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> x = np.vstack([rng.normal(0, 1, (500, 2)), rng.normal(8, 1, (300, 2))])
    >>> fit = kmeans(x, 2, seed=1)
    >>> sorted(int(round(float(c))) for c in fit.centers[:, 0])
    [0, 8]
    >>> np.bincount(fit.labels).tolist() in ([500, 300], [300, 500]), fit.converged
    (True, True)
    """
    xp, data = _as_data(data)
    _check_finite(xp, data)
    n, d = data.shape
    k = _check_n_clusters(n_clusters, n)
    if isinstance(max_iter, bool) or not isinstance(max_iter, (int, np.integer)) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive integer; got {max_iter!r}")
    if isinstance(n_init, bool) or not isinstance(n_init, (int, np.integer)) or n_init < 1:
        raise ValueError(f"n_init must be a positive integer; got {n_init!r}")
    if not (np.isfinite(tol) and tol >= 0):
        raise ValueError(f"tol must be a finite non-negative number; got {tol!r}")
    weights = _as_weights(xp, sample_weight, n)
    rows = _chunk_rows(xp, chunk_size, n, k, d)
    mean = _column_mean(xp, data)
    tol_abs = _data_tolerance(xp, data, tol, mean)

    if isinstance(init, str):
        if init not in ("k-means++", "random"):
            raise ValueError(f"init must be 'k-means++', 'random' or an array of centers; got {init!r}")
        runs = [np.random.default_rng(seed if run == 0 else [seed, run]) for run in range(int(n_init))]
    else:
        given = _on_device(xp, init, xp.float64)
        if given.shape != (k, d):
            raise ValueError(f"init centers must have shape ({k}, {d}); got {tuple(given.shape)}")
        if not bool(xp.isfinite(given).all()):
            raise ValueError("init centers contain NaN or infinite values")
        runs = [None]

    trials = 2 + int(math.log(k))
    best = None
    with _workers(xp) as workers:
        starts = []  # all seedings first: their scratch is freed before the float32 copy is made
        for rng in runs:
            if rng is None:
                starts.append(given.copy())
            elif init == "k-means++":
                starts.append(_seed_plus_plus(xp, data, k, rng, trials, weights,
                                              _chunk_rows(xp, chunk_size, n, trials, d), workers))
            else:
                starts.append(data[xp.asarray(rng.choice(n, size=k, replace=False))].astype(xp.float64))
        # On the CPU (only: a GPU may round float32 products more coarsely),
        # iterations screen in float32; see _screened_chunk.
        screen = _screen_data(data, mean) if xp is np and _SCREEN and k > 1 else None
        for start in starts:
            result = _lloyd(xp, data, start, weights, int(max_iter), tol_abs, rows, workers, screen)
            if best is None or result.inertia < best.inertia:
                best = result
    return best
