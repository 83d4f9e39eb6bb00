"""One-dimensional density kernels: binning, smoothing, peaks and valleys.

All functions accept NumPy or CuPy arrays and return arrays of the same kind
(scalars and small index lists are returned as Python values).
"""
from __future__ import annotations

import numpy as np


def _xp(array):
    """The array namespace of ``array`` (``cupy`` for CuPy arrays, else ``numpy``)."""
    module = type(array).__module__
    if module.startswith("cupy"):
        import cupy

        return cupy
    return np


#: Values binned per step on the CPU by :func:`histogram_1d`.
HISTOGRAM_BLOCK = 1 << 16


def histogram_1d(values, bins, value_range):
    """Counts of ``values`` in ``bins`` equal bins over ``value_range``.

    Values outside the range are dropped. Uses bin indices and ``bincount``
    (one pass, no sorting), which is what makes it cheap on both devices.

    Parameters
    ----------
    values : array, shape (n,)
    bins : int
    value_range : (float, float)

    Returns
    -------
    counts : array of float, shape (bins,)
    edges : ndarray, shape (bins + 1,)

    Examples
    --------
    >>> counts, edges = histogram_1d(np.array([0.1, 0.2, 0.9]), 2, (0.0, 1.0))
    >>> counts.tolist(), edges.tolist()
    ([2.0, 1.0], [0.0, 0.5, 1.0])
    """
    xp = _xp(values)
    lo, hi = float(value_range[0]), float(value_range[1])
    if not hi > lo:
        raise ValueError(f"empty histogram range ({lo}, {hi})")
    values = xp.asarray(values).ravel()
    # On the CPU a block of values at a time: the float64 and index temporaries
    # of a 10-million-event column would be ~40 bytes an event. Counts add
    # exactly, so the result is the same.
    step = max(values.size, 1) if xp is not np else HISTOGRAM_BLOCK
    counts = xp.zeros(bins, dtype=xp.int64)
    for start in range(0, max(values.size, 1), step):
        chunk = xp.asarray(values[start:start + step], dtype=xp.float64)
        index = xp.floor((chunk - lo) * (bins / (hi - lo))).astype(xp.int64)
        index = xp.where(chunk == hi, bins - 1, index)  # the top edge belongs to the last bin
        keep = (index >= 0) & (index < bins)
        counts += xp.bincount(index[keep], minlength=bins)
    edges = np.linspace(lo, hi, bins + 1)
    return counts.astype(xp.float64), edges


def gaussian_smooth_1d(counts, sigma_bins):
    """Gaussian-smoothed copy of a 1-D histogram (mirrored edges).

    Examples
    --------
    >>> smoothed = gaussian_smooth_1d(np.array([0.0, 0.0, 10.0, 0.0, 0.0]), 1.0)
    >>> round(float(smoothed.sum()), 6), int(smoothed.argmax())
    (10.0, 2)
    """
    xp = _xp(counts)
    if sigma_bins <= 0:
        return xp.asarray(counts, dtype=xp.float64).copy()
    radius = int(np.ceil(4 * sigma_bins))
    offsets = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * (offsets / sigma_bins) ** 2)
    kernel = xp.asarray(kernel / kernel.sum())
    counts = xp.asarray(counts, dtype=xp.float64)
    # Mirror at the edges (half-sample symmetric), so mass that the kernel
    # spreads past an edge comes back: the smoothed histogram keeps its total.
    padded = xp.pad(counts, radius, mode="symmetric")
    return xp.convolve(padded, kernel, mode="valid")


def find_peaks_1d(density, min_prominence=0.05):
    """Indices of the local maxima of a smoothed density, by prominence.

    A peak's prominence is its height above the higher of the two lowest
    points separating it from a taller peak (or the edge); it is expressed
    as a fraction of the tallest peak. Peaks below ``min_prominence`` are
    noise and dropped.

    Parameters
    ----------
    density : array, shape (n,)
    min_prominence : float
        Fraction of the maximum.

    Returns
    -------
    list of int
        Peak indices, left to right.

    Examples
    --------
    >>> x = np.linspace(0, 1, 200)
    >>> d = np.exp(-((x - 0.2) / 0.05) ** 2) + 0.5 * np.exp(-((x - 0.7) / 0.05) ** 2)
    >>> [round(float(x[i]), 2) for i in find_peaks_1d(d)]
    [0.2, 0.7]
    """
    d = np.asarray(density.get() if hasattr(density, "get") else density, dtype=np.float64)
    n = d.size
    top = d.max() if n else 0.0
    if n < 3 or top <= 0:
        return []
    # Plateaus: a maximum is the first index of a run strictly higher than both neighbours' runs.
    candidates = []
    i = 1
    while i < n - 1:
        if d[i] > d[i - 1]:
            j = i
            while j + 1 < n and d[j + 1] == d[i]:
                j += 1
            if j + 1 == n or d[j + 1] < d[i]:
                candidates.append((i + j) // 2)
            i = j + 1
        else:
            i += 1
    if d[0] > d[1]:
        candidates.insert(0, 0)
    if d[-1] > d[-2]:
        candidates.append(n - 1)
    peaks = []
    for p in candidates:
        height = d[p]
        left = p
        left_min = height
        while left > 0 and d[left - 1] <= height:
            left -= 1
            left_min = min(left_min, d[left])
        reached_higher_left = left > 0
        right = p
        right_min = height
        while right < n - 1 and d[right + 1] <= height:
            right += 1
            right_min = min(right_min, d[right])
        reached_higher_right = right < n - 1
        bases = []
        if reached_higher_left:
            bases.append(left_min)
        if reached_higher_right:
            bases.append(right_min)
        base = max(bases) if bases else min(left_min, right_min)
        if (height - base) / top >= min_prominence:
            peaks.append(p)
    return peaks


def valley_between(density, left, right):
    """Index of the lowest point of ``density`` strictly between two peaks.

    Examples
    --------
    >>> valley_between(np.array([5.0, 3.0, 1.0, 2.0, 6.0]), 0, 4)
    2
    """
    d = np.asarray(density.get() if hasattr(density, "get") else density, dtype=np.float64)
    if right - left < 2:
        return (left + right) // 2
    segment = d[left + 1:right]
    # The middle of a flat bottom, so a wide empty valley is cut in its centre.
    low = segment.min()
    flat = np.flatnonzero(segment <= low + 1e-12)
    return int(left + 1 + flat[len(flat) // 2])


def robust_location_scale(values):
    """Median and MAD-based standard deviation (1.4826 × MAD) of ``values``.

    Examples
    --------
    >>> robust_location_scale(np.array([1.0, 2.0, 3.0, 4.0, 100.0]))
    (3.0, 1.4826)
    """
    xp = _xp(values)
    values = xp.asarray(values, dtype=xp.float64).ravel()
    if values.size == 0:
        return float("nan"), float("nan")
    center = float(xp.median(values))
    mad = float(xp.median(xp.abs(values - center)))
    return center, 1.4826 * mad
