"""Two-dimensional grid kernels: binning, smoothing, watershed segmentation, contours.

Events (pairs of coordinates ``x``, ``y``) are binned on a regular grid, the
counts smoothed into a density, the density cut into basins around its
peaks, and the basin labels mapped back to the events. Level sets of the
density can be traced as closed polygons in data units.

Everything per event (binning, mapping labels back) runs on the device of
the input (NumPy or CuPy, through ``xp``); the grid is small (256 x 256 by
default) and the watershed and the contour tracing run on the host, because
scikit-image has no GPU implementation.

Grid conventions, shared by every function here: ``counts[i, j]`` counts the
events with ``x`` in bin ``i`` and ``y`` in bin ``j`` (the layout of
``np.histogram2d``); bins are half-open ``[edge, next edge)`` except the last,
which also holds its top edge; the flat bin index of an event is
``i * bins_y + j``, and events outside the grid get the index
``bins_x * bins_y``.
"""
from __future__ import annotations

import numpy as np

from .density import _xp
from .device import to_numpy

__all__ = [
    "bin_indices_2d",
    "histogram_2d",
    "smooth_2d",
    "watershed_density",
    "labels_to_events",
    "density_contour",
    "segment_events_2d",
]


def _bins_pair(bins):
    """``(bins_x, bins_y)`` from an int or a pair of ints."""
    if np.ndim(bins) == 0:
        pair = (bins, bins)
    else:
        pair = tuple(bins)
        if len(pair) != 2:
            raise ValueError(f"bins must be an int or a pair of ints, not {bins!r}")
    out = []
    for b in pair:
        if isinstance(b, (bool, np.bool_)) or int(b) != b:
            raise ValueError(f"bins must be whole numbers, not {bins!r}")
        if int(b) < 1:
            raise ValueError(f"bins must be positive, not {bins!r}")
        out.append(int(b))
    return tuple(out)


def _as_events(values, xp, name):
    """``values`` as a 1-D array on ``xp``, with NaN refused."""
    values = xp.asarray(values)
    if values.ndim != 1:
        values = values.reshape(-1)
    if values.dtype.kind not in "fiub":
        raise ValueError(f"{name} must be numeric, not {values.dtype}")
    if values.dtype.kind == "f" and values.size and bool(xp.isnan(values).any()):
        raise ValueError(f"{name} contains NaN; drop or replace NaN events before binning")
    return values


def _resolve_range(values, value_range, name):
    """``(lo, hi)`` as Python floats, following ``np.histogram2d``.

    ``None`` takes the data's minimum and maximum ((0, 1) for no data); a
    zero-width range is widened by 0.5 on each side.
    """
    if value_range is None:
        if values.size == 0:
            lo, hi = 0.0, 1.0
        else:
            lo, hi = float(values.min()), float(values.max())
            if not (np.isfinite(lo) and np.isfinite(hi)):
                raise ValueError(f"autodetected range of {name}, [{lo}, {hi}], is not finite; "
                                 f"give {name}_range explicitly")
    else:
        if len(value_range) != 2:
            raise ValueError(f"{name}_range must be a pair (low, high), not {value_range!r}")
        lo, hi = float(value_range[0]), float(value_range[1])
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise ValueError(f"{name}_range [{lo}, {hi}] is not finite")
        if lo > hi:
            raise ValueError(f"{name}_range must have low <= high, not [{lo}, {hi}]")
    if lo == hi:
        lo, hi = lo - 0.5, hi + 0.5
    if not np.isfinite(hi - lo):
        raise ValueError(f"{name} range [{lo}, {hi}] is too wide to bin")
    return lo, hi


# Events are binned in chunks of this many on the CPU, so the scratch arrays
# stay in cache and no event-sized temporaries are allocated (first touches
# of fresh memory cost more than the arithmetic); CuPy takes all at once.
_CPU_CHUNK = 1 << 17


class _Axis:
    """How to bin values along one axis: range, edges, working precision."""

    def __init__(self, lo, hi, n):
        self.lo, self.hi, self.n = lo, hi, n
        self.edges = np.linspace(lo, hi, n + 1)  # as np.histogram2d: edges[0] == lo, edges[-1] == hi
        self.scale = n / (hi - lo)
        # Worst-case rounding error of a value's scaled position (and of the
        # edges), in bins, per unit roundoff; generous by a factor of 4 or more.
        spread = 4.0 * (n + 1) * (4.0 + (abs(lo) + abs(hi)) / (hi - lo))
        single = max(abs(lo), abs(hi)) < 1e30 and 1e-30 < self.scale < 1e30  # no float32 overflow
        if single and spread * 2.0 ** -24 < 1e-3:
            self.dtype, self.tol = np.float32, spread * 2.0 ** -24
        elif spread * 2.0 ** -53 < 0.25:
            self.dtype, self.tol = np.float64, spread * 2.0 ** -53
        else:  # a range too narrow for its magnitude: compare every value with the edges
            self.dtype, self.tol = np.float64, None

    def index(self, values, out, scratch, near, xp):
        """Write the bin index of ``values`` to ``out`` (floats): 0..n-1 inside, -1 below, n above.

        The bin is decided exactly as ``np.histogram2d`` decides it, against
        the float64 edges: the fast path is ``floor((value - lo) * scale)``
        in the working precision, and the values whose scaled position lies
        within rounding error of a whole number (a bin edge, the ends of the
        range included) are settled by comparing them with that edge.
        """
        n = self.n
        if self.tol is None:
            v = values.astype(np.float64, copy=False)  # compared in float64, as the edges
            fixed = xp.searchsorted(xp.asarray(self.edges), v, side="right") - 1
            fixed = xp.where(v == self.hi, n - 1, fixed)
            out[...] = xp.clip(fixed, -1, n)
            return
        xp.subtract(values, self.lo, out=scratch, dtype=scratch.dtype)
        scratch *= scratch.dtype.type(self.scale)
        xp.clip(scratch, -0.5, n + 0.5, out=scratch)  # infinities; -0.5 and n + 0.5 floor to -1 and n
        xp.floor(scratch, out=out)
        scratch -= out  # fractional part, in [0, 1)
        scratch -= scratch.dtype.type(0.5)
        xp.abs(scratch, out=scratch)
        xp.greater(scratch, 0.5 - self.tol, out=near)
        if not bool(near.any()):
            return
        which = xp.flatnonzero(near)
        v = values[which].astype(np.float64, copy=False)  # compared in float64, as the edges
        position = v - self.lo
        position *= self.scale
        edge = xp.clip(xp.rint(position), 0, n).astype(np.intp)
        # Within rounding error of edge e, a value is in bin e or e - 1.
        fixed = edge - (v < xp.asarray(self.edges)[edge])
        fixed = xp.where(v == self.hi, n - 1, fixed)  # the top edge belongs to the last bin
        out[which] = xp.clip(fixed, -1, n)


def _event_bins(x, y, x_axis, y_axis, xp):
    """Flat bin index ``ix * by + iy`` of each event, ``bx * by`` outside the grid (intp)."""
    n = x.size
    bx, by = x_axis.n, y_axis.n
    outside_index = bx * by
    flat = xp.empty(n, dtype=np.intp)
    if n == 0:
        return flat
    dtype = np.result_type(x_axis.dtype, y_axis.dtype)
    if (bx + 1) * (by + 1) >= 2 ** 24:  # whole numbers stay exact in float32 below 2**24
        dtype = np.float64
    chunk = min(n, _CPU_CHUNK) if xp is np else n
    scratch = xp.empty(chunk, dtype=dtype)
    ix = xp.empty(chunk, dtype=dtype)
    iy = xp.empty(chunk, dtype=dtype)
    near = xp.empty(chunk, dtype=bool)
    outside = xp.empty(chunk, dtype=bool)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        m = stop - start
        if m < chunk:
            scratch, ix, iy, near, outside = scratch[:m], ix[:m], iy[:m], near[:m], outside[:m]
        with np.errstate(over="ignore"):  # far-out values overflowing float32 become infinite: outside
            x_axis.index(x[start:stop], ix, scratch, near, xp)
            y_axis.index(y[start:stop], iy, scratch, near, xp)
        xp.less(ix, 0, out=outside)
        xp.greater_equal(ix, bx, out=near)
        outside |= near
        xp.less(iy, 0, out=near)
        outside |= near
        xp.greater_equal(iy, by, out=near)
        outside |= near
        ix *= by
        ix += iy
        if bool(outside.any()):
            ix[outside] = outside_index
        flat[start:stop] = ix
    return flat


def _binned(x, y, bins, x_range, y_range):
    """Flat bin index per event (``bins_x * bins_y`` outside), shape, edges."""
    xp = _xp(x)
    x = _as_events(x, xp, "x")
    y = _as_events(y, xp, "y")
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same length, not {x.size} and {y.size}")
    bx, by = _bins_pair(bins)
    x_axis = _Axis(*_resolve_range(x, x_range, "x"), bx)
    y_axis = _Axis(*_resolve_range(y, y_range, "y"), by)
    flat = _event_bins(x, y, x_axis, y_axis, xp)
    return flat, (bx, by), x_axis.edges, y_axis.edges


def bin_indices_2d(x, y, bins, x_range, y_range):
    """Flat grid bin of each event, and which events fall inside the grid.

    Bins follow ``np.histogram2d`` exactly: equal bins over each range, each
    half-open ``[edge, next edge)`` except the last, which includes the top
    edge; events outside the range are outside the grid.

    Parameters
    ----------
    x, y : array, shape (n,)
        Event coordinates (NumPy or CuPy). NaN is refused.
    bins : int or (int, int)
        Bins along x and y.
    x_range, y_range : (float, float) or None
        Grid extent; ``None`` takes the data's minimum and maximum. A
        zero-width range is widened by 0.5 on each side (as ``np.histogram2d``).

    Returns
    -------
    flat_index : array of intp, shape (n,)
        ``ix * bins_y + iy`` for events inside the grid, ``bins_x * bins_y``
        (one past the last bin) for events outside. On the device of ``x``.
    inside : array of bool, shape (n,)

    Raises
    ------
    ValueError
        For NaN values, a non-finite range, or mismatched lengths.

    Examples
    --------
    >>> flat, inside = bin_indices_2d(np.array([0.1, 0.9, 1.0, 1.5]), np.array([0.1, 0.1, 1.0, 0.5]),
    ...                               2, (0.0, 1.0), (0.0, 1.0))
    >>> flat.tolist(), inside.tolist()
    ([0, 2, 3, 4], [True, True, True, False])
    """
    flat, (bx, by), _, _ = _binned(x, y, bins, x_range, y_range)
    return flat, flat < bx * by


def histogram_2d(x, y, bins=256, x_range=None, y_range=None, weights=None):
    """Counts of events on a regular 2-D grid (``np.histogram2d``, computed by ``bincount``).

    One pass over the events for the bin indices, then ``bincount`` with
    ``minlength = bins_x * bins_y``: no sorting and no searching, on NumPy
    or CuPy alike. The counts equal ``np.histogram2d``'s for the same bins
    and ranges, events on the top edge in the last bin and events outside
    the ranges dropped.

    Parameters
    ----------
    x, y : array, shape (n,)
        Event coordinates (NumPy or CuPy). NaN is refused.
    bins : int or (int, int)
    x_range, y_range : (float, float) or None
        ``None`` takes the data's minimum and maximum.
    weights : array, shape (n,), optional
        Weight of each event (default 1).

    Returns
    -------
    counts : array of float64, shape (bins_x, bins_y)
        ``counts[i, j]`` holds events with x in bin ``i`` and y in bin ``j``;
        on the device of ``x``.
    x_edges, y_edges : ndarray of float64, shapes (bins_x + 1,), (bins_y + 1,)
        ``np.linspace`` over each range, always NumPy.

    Examples
    --------
    >>> counts, x_edges, y_edges = histogram_2d(np.array([0.1, 0.9, 1.0, 1.5]),
    ...                                         np.array([0.1, 0.1, 1.0, 0.5]), 2, (0.0, 1.0), (0.0, 1.0))
    >>> counts.tolist(), x_edges.tolist()
    ([[1.0, 0.0], [1.0, 1.0]], [0.0, 0.5, 1.0])
    """
    flat, (bx, by), x_edges, y_edges = _binned(x, y, bins, x_range, y_range)
    xp = _xp(flat)
    if weights is not None:
        weights = xp.asarray(weights).reshape(-1)
        if weights.shape != flat.shape:
            raise ValueError(f"weights must have one value per event ({flat.size}), not {weights.size}")
    counts = xp.bincount(flat, weights=weights, minlength=bx * by + 1)[: bx * by]
    counts = counts.astype(np.float64, copy=False).reshape(bx, by)
    return counts, x_edges, y_edges


def smooth_2d(counts, sigma_bins):
    """Gaussian-smoothed copy of a 2-D grid, with mirrored edges.

    ``scipy.ndimage.gaussian_filter`` on the CPU and
    ``cupyx.scipy.ndimage.gaussian_filter`` for CuPy arrays (kernel truncated
    at 4 sigma). The edges are mirrored (half-sample symmetric), so mass the
    kernel spreads past an edge comes back: the total is kept.

    Parameters
    ----------
    counts : array, shape (bx, by)
    sigma_bins : float or (float, float)
        Standard deviation of the kernel in bins, along x and y; 0 copies.

    Returns
    -------
    array of float64, shape (bx, by), on the device of ``counts``.

    Examples
    --------
    >>> grid = np.zeros((9, 9))
    >>> grid[4, 4] = 10.0
    >>> smoothed = smooth_2d(grid, 1.0)
    >>> round(float(smoothed.sum()), 9), [int(i) for i in np.unravel_index(smoothed.argmax(), smoothed.shape)]
    (10.0, [4, 4])
    """
    xp = _xp(counts)
    counts = xp.asarray(counts, dtype=np.float64)
    if counts.ndim != 2:
        raise ValueError(f"counts must be a 2-D grid, not shape {counts.shape}")
    sigma = tuple(float(s) for s in np.broadcast_to(np.asarray(sigma_bins, dtype=float), (2,)))
    if min(sigma) < 0 or not all(np.isfinite(sigma)):
        raise ValueError(f"sigma_bins must be finite and >= 0, not {sigma_bins!r}")
    if max(sigma) == 0 or counts.size == 0:
        return counts.copy()
    if xp is np:
        from scipy.ndimage import gaussian_filter
    else:
        from cupyx.scipy.ndimage import gaussian_filter
    return gaussian_filter(counts, sigma, mode="reflect", truncate=4.0)


def _merge_shallow_basins(density, labels, count, min_drop):
    """Merge basins whose peak rises less than ``min_drop[label]`` above their saddle to a higher basin.

    Topological persistence on the grid (as in ToMATo clustering): the
    boundaries between touching basins are visited from the highest saddle
    down, and at each the basin group with the lower peak is absorbed into
    the other when its peak is less than ``min_drop`` above that saddle.
    Groups left apart whose peak is below their ``min_drop`` (their rise
    from an empty background) become background, except the highest.
    Labels are renumbered 1, 2, ... from the highest peak down.
    """
    flat_labels = labels.ravel()
    peak = np.full(count + 1, -np.inf)
    np.maximum.at(peak, flat_labels, density.ravel())
    firsts, seconds, saddles = [], [], []
    for axis in (0, 1):
        a = labels[:-1, :] if axis == 0 else labels[:, :-1]
        b = labels[1:, :] if axis == 0 else labels[:, 1:]
        touching = (a != b) & (a > 0) & (b > 0)
        if touching.any():
            da = density[:-1, :] if axis == 0 else density[:, :-1]
            db = density[1:, :] if axis == 0 else density[:, 1:]
            firsts.append(np.minimum(a[touching], b[touching]))
            seconds.append(np.maximum(a[touching], b[touching]))
            saddles.append(np.minimum(da[touching], db[touching]))
    parent = list(range(count + 1))
    if firsts:
        first, second, saddle = (np.concatenate(v) for v in (firsts, seconds, saddles))
        # The saddle of a pair of basins is the highest of their boundary's crossings.
        order = np.argsort(-saddle, kind="stable")
        first, second, saddle = first[order], second[order], saddle[order]
        _, unique = np.unique(first.astype(np.int64) * (count + 1) + second, return_index=True)
        unique.sort()  # back to descending saddle
        top = peak.tolist()
        need = np.asarray(min_drop, dtype=np.float64).tolist()

        def root(i):
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        for a, b, s in zip(first[unique].tolist(), second[unique].tolist(), saddle[unique].tolist()):
            ra, rb = root(a), root(b)
            if ra == rb:
                continue
            low, high = (ra, rb) if (top[ra], -ra) < (top[rb], -rb) else (rb, ra)
            if top[low] - s < need[low]:
                parent[low] = high
        parent = [root(i) for i in range(count + 1)]
    parent = np.asarray(parent)
    roots = np.flatnonzero(parent[1:] == np.arange(1, count + 1)) + 1
    roots = roots[np.lexsort((roots, -peak[roots]))]  # highest peak first
    # A basin touching no higher one rises from the empty background: below its floor it is noise.
    roots = roots[np.r_[True, peak[roots[1:]] >= min_drop[roots[1:]]]]
    renumber = np.zeros(count + 1, dtype=np.int32)
    renumber[roots] = np.arange(1, len(roots) + 1, dtype=np.int32)
    return renumber[parent][labels]


def _kernel_square_sum(sigma_bins):
    """Sum of the squared weights of the 2-D kernel of :func:`smooth_2d` (variance gain for Poisson counts)."""
    total = 1.0
    for sigma in np.broadcast_to(np.asarray(sigma_bins, dtype=float), (2,)):
        if sigma > 0:
            radius = int(4.0 * sigma + 0.5)  # scipy's truncation at 4 sigma
            weights = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
            total *= float(np.sum((weights / weights.sum()) ** 2))
    return total


def watershed_density(density, *, min_distance=3, threshold_rel=0.05, min_prominence=0.05, min_rise=None,
                      markers=None, background_rel=1e-3):
    """Cut a 2-D density into basins, one per significant peak (watershed on ``-density``).

    Markers are the local maxima of the density
    (``skimage.feature.peak_local_max``, borders included); every bin whose
    density is above ``background_rel`` times the maximum is flooded from
    them by ``skimage.segmentation.watershed`` on ``-density`` (4-connected)
    and gets the label of its basin; the background below that gets 0.
    Basins whose peak rises less than ``min_prominence`` (a fraction of the
    maximum) above the highest saddle joining them to a basin with a higher
    peak are merged into it, so that counting noise on a single population
    does not split it (the 2-D counterpart of the prominence of
    :func:`~gpu.density.find_peaks_1d`). Labels are numbered 1, 2, ... from
    the highest peak down.

    The watershed runs on the host (scikit-image has no GPU implementation):
    a CuPy grid is copied to the host with ``.get()`` (a 256 x 256 grid is
    half a megabyte) and the labels copied back to the device.

    Parameters
    ----------
    density : array, shape (bx, by)
        A smoothed density (NumPy or CuPy), e.g. from :func:`smooth_2d`.
    min_distance : int
        Peaks closer than this many bins (Chebyshev distance) to a higher
        peak are not separate basins.
    threshold_rel : float
        Peaks below this fraction of the maximum are not separate basins.
    min_prominence : float
        Fraction of the maximum a peak must rise above its saddle to a
        higher peak to keep its own basin; 0 keeps every peak.
    min_rise : float or array, shape (bx, by), optional
        A further floor on that rise, in the units of ``density``: one value,
        or one per bin read at each peak (e.g. a multiple of the noise's
        standard deviation there, as :func:`segment_events_2d` passes).
    markers : array of int, shape (bx, by), optional
        Seeds to flood from instead of the peaks: 0 for none, a positive
        label per seed. Given markers are kept as they are: no merging,
        no renumbering.
    background_rel : float
        Bins with density at or below this fraction of the maximum are
        background (label 0).

    Returns
    -------
    labels : array of int32, shape (bx, by)
        0 for background, 1..k for basins; on the device of ``density``.

    Examples
    --------
    >>> i, j = np.meshgrid(np.arange(40), np.arange(30), indexing="ij")
    >>> density = np.exp(-((i - 10) ** 2 + (j - 10) ** 2) / 20) + 0.5 * np.exp(-((i - 30) ** 2 + (j - 20) ** 2) / 20)
    >>> labels = watershed_density(density)
    >>> int(labels[10, 10]), int(labels[30, 20]), int(labels[0, 29])
    (1, 2, 0)
    """
    from skimage.feature import peak_local_max
    from skimage.segmentation import watershed

    on_device = not isinstance(density, np.ndarray) and hasattr(density, "get")
    host = np.asarray(to_numpy(density), dtype=np.float64)
    if host.ndim != 2:
        raise ValueError(f"density must be a 2-D grid, not shape {host.shape}")
    labels = np.zeros(host.shape, dtype=np.int32)
    top = float(host.max()) if host.size else 0.0
    if not np.isfinite(top):
        raise ValueError("density contains non-finite values")
    if top > 0:
        mask = host > background_rel * top
        if markers is None:
            peaks = peak_local_max(host, min_distance=int(min_distance), threshold_rel=threshold_rel,
                                   exclude_border=False)
            seeds = np.zeros(host.shape, dtype=np.int32)
            seeds[peaks[:, 0], peaks[:, 1]] = np.arange(1, len(peaks) + 1, dtype=np.int32)
        else:
            seeds = np.asarray(to_numpy(markers))
            if seeds.shape != host.shape:
                raise ValueError(f"markers must have the shape of density {host.shape}, not {seeds.shape}")
            seeds = seeds.astype(np.int32, copy=False)
        if seeds.any():
            labels = watershed(-host, seeds, mask=mask).astype(np.int32, copy=False)
            if markers is None and len(peaks) > 1:
                need = np.full(len(peaks) + 1, min_prominence * top)
                if min_rise is not None:
                    rise = np.broadcast_to(np.asarray(to_numpy(min_rise), dtype=np.float64), host.shape)
                    need[1:] = np.maximum(need[1:], rise[peaks[:, 0], peaks[:, 1]])
                labels = _merge_shallow_basins(host, labels, len(peaks), need)
    if on_device:
        return _xp(density).asarray(labels)
    return labels


def labels_to_events(grid_labels, flat_index, inside=None):
    """Label of each event: the label of its grid bin, 0 outside the grid.

    One ``take`` from the grid labels with one 0 appended, so the outside
    index ``bins_x * bins_y`` of :func:`bin_indices_2d` reads 0. Runs on the
    device of ``flat_index``; a host grid is copied there.

    Parameters
    ----------
    grid_labels : array of int, shape (bx, by)
    flat_index : array of int, shape (n,)
        From :func:`bin_indices_2d`: ``ix * by + iy``, ``bx * by`` outside.
    inside : array of bool, shape (n,), optional
        Only needed when ``flat_index`` does not mark outside events with
        ``bx * by``; events where it is False get 0.

    Returns
    -------
    array of grid_labels' dtype, shape (n,)

    Examples
    --------
    >>> labels_to_events(np.array([[1, 2], [0, 3]]), np.array([0, 1, 3, 4, 2])).tolist()
    [1, 2, 3, 0, 0]
    """
    xp = _xp(flat_index)
    grid = xp.asarray(grid_labels)
    size = grid.size
    table = xp.concatenate([grid.reshape(-1), xp.zeros(1, dtype=grid.dtype)])
    flat_index = xp.asarray(flat_index)
    if inside is not None:
        flat_index = xp.where(xp.asarray(inside), flat_index, size)
    return table.take(flat_index)


def density_contour(density, level, x_edges, y_edges):
    """Closed polygons where a 2-D density crosses ``level``, in data units.

    ``skimage.measure.find_contours`` (on the host) traces the level set on
    the grid of bin centres; a contour's fractional (row, column) position
    is mapped to (x, y) by linear interpolation between bin centres, so the
    vertices are in the units of the edges. The grid is padded just below
    ``level`` first, so a region that reaches the edge of the grid is closed
    along the grid's boundary (the histogram range) rather than left open.
    Each polygon ends with its first vertex.

    Parameters
    ----------
    density : array, shape (bx, by)
        NumPy or CuPy; ``density[i, j]`` belongs to x bin ``i``, y bin ``j``.
    level : float
        In the units of ``density``.
    x_edges, y_edges : array, shapes (bx + 1,), (by + 1,)
        Bin edges, as from :func:`histogram_2d`.

    Returns
    -------
    list of ndarray of float64, shape (m, 2)
        Columns x and y. Regions above ``level`` are outlined, holes in them
        are separate polygons; empty when nothing is above ``level``.

    Examples
    --------
    >>> density = np.zeros((5, 5))
    >>> density[1:4, 1:4] = 1.0
    >>> [polygon] = density_contour(density, 0.5, np.linspace(0, 50, 6), np.linspace(0, 5, 6))
    >>> polygon.min(axis=0).tolist(), polygon.max(axis=0).tolist(), bool((polygon[0] == polygon[-1]).all())
    ([10.0, 1.0], [40.0, 4.0], True)
    """
    from skimage.measure import find_contours

    host = np.asarray(to_numpy(density), dtype=np.float64)
    if host.ndim != 2:
        raise ValueError(f"density must be a 2-D grid, not shape {host.shape}")
    x_edges = np.asarray(to_numpy(x_edges), dtype=np.float64)
    y_edges = np.asarray(to_numpy(y_edges), dtype=np.float64)
    bx, by = host.shape
    if x_edges.shape != (bx + 1,) or y_edges.shape != (by + 1,):
        raise ValueError(f"edges of lengths {x_edges.size}, {y_edges.size} do not fit a {bx} x {by} grid")
    level = float(level)
    if host.size == 0 or not np.isfinite(level):
        return []
    # Just below the level, so a crossing into the padding lies at its far side, clipped to the boundary.
    padded = np.pad(host, 1, mode="constant", constant_values=np.nextafter(level, -np.inf))
    # Positions in padded bin units -> bin units, clipped to the grid's outer boundary.
    x_pos = np.concatenate([[x_edges[0]], 0.5 * (x_edges[:-1] + x_edges[1:]), [x_edges[-1]]])
    y_pos = np.concatenate([[y_edges[0]], 0.5 * (y_edges[:-1] + y_edges[1:]), [y_edges[-1]]])
    x_grid = np.concatenate([[-0.5], np.arange(bx, dtype=np.float64), [bx - 0.5]])
    y_grid = np.concatenate([[-0.5], np.arange(by, dtype=np.float64), [by - 0.5]])
    polygons = []
    for contour in find_contours(padded, level):
        rows = np.clip(contour[:, 0] - 1.0, -0.5, bx - 0.5)
        cols = np.clip(contour[:, 1] - 1.0, -0.5, by - 0.5)
        polygon = np.column_stack([np.interp(rows, x_grid, x_pos), np.interp(cols, y_grid, y_pos)])
        if len(polygon) and not (polygon[0] == polygon[-1]).all():
            polygon = np.vstack([polygon, polygon[:1]])
        polygons.append(polygon)
    return polygons


def segment_events_2d(x, y, *, bins=256, sigma_bins=2.0, x_range=None, y_range=None, min_distance=3,
                      threshold_rel=0.05, min_prominence=0.05, noise_z=3.0, background_rel=1e-3):
    """Cluster events by the basins of their smoothed 2-D density.

    The whole pipeline: :func:`histogram_2d`, :func:`smooth_2d`,
    :func:`watershed_density`, :func:`labels_to_events`. The binning and the
    mapping back run on the device of ``x``; the watershed on the host.

    Parameters
    ----------
    x, y : array, shape (n,)
        Event coordinates (NumPy or CuPy). NaN is refused.
    bins : int or (int, int)
    sigma_bins : float or (float, float)
        Smoothing, in bins.
    x_range, y_range : (float, float) or None
        Grid extent; ``None`` takes the data's minimum and maximum.
    min_distance, threshold_rel, min_prominence, background_rel
        As for :func:`watershed_density`.
    noise_z : float
        A peak must also rise this many standard deviations of counting
        noise above its saddle to a higher peak to keep its own basin. The
        smoothed count of a bin holding ``d`` events has a Poisson standard
        deviation of about ``sqrt(d * sum(kernel ** 2))``, roughly
        ``sqrt(d / (4 pi sigma_x sigma_y))``; 0 turns this off.

    Returns
    -------
    event_labels : array of int32, shape (n,)
        Basin of each event, 0 for background and outside the grid.
    grid_labels : array of int32, shape (bins_x, bins_y)
    x_edges, y_edges : ndarray of float64
    density : array of float64, shape (bins_x, bins_y)
        The smoothed counts (events per bin).

    Notes
    -----
    Basins are only as good as the counts per bin: on the default 256 x 256
    grid with ``sigma_bins=2`` a compact population needs 20,000 to 50,000 events
    to come out as one basin; with fewer, use fewer bins or a wider kernel.
    Sparse events whose islands of density do not rise above the noise floor
    are background (label 0).

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> x = np.concatenate([rng.normal(0, 1, 20000), rng.normal(8, 1, 10000)])
    >>> y = np.concatenate([rng.normal(0, 1, 20000), rng.normal(8, 1, 10000)])
    >>> labels, grid_labels, x_edges, y_edges, density = segment_events_2d(x, y, bins=64)
    >>> np.unique(labels[:20000]).tolist(), np.unique(labels[20000:]).tolist()
    ([0, 1], [0, 2])
    """
    flat, (bx, by), x_edges, y_edges = _binned(x, y, bins, x_range, y_range)
    xp = _xp(flat)
    counts = xp.bincount(flat, minlength=bx * by + 1)[: bx * by].astype(np.float64).reshape(bx, by)
    density = smooth_2d(counts, sigma_bins)
    min_rise = None
    if noise_z > 0:
        min_rise = noise_z * xp.sqrt(xp.maximum(density, 0.0) * _kernel_square_sum(sigma_bins))
    grid_labels = watershed_density(density, min_distance=min_distance, threshold_rel=threshold_rel,
                                    min_prominence=min_prominence, min_rise=min_rise,
                                    background_rel=background_rel)
    event_labels = labels_to_events(grid_labels, flat)
    return event_labels, grid_labels, x_edges, y_edges, density
