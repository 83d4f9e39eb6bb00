"""Automatic gating of TBNK and CAR tubes.

The strategy, each step data-driven (no fixed channel values)::

    beads (bright in every fluorescence channel) ─┬─ singlet beads (FSC-A/FSC-H)
    other events ─ singlets ─ CD45+ leukocytes (valley against debris)
                 ─ live (viability dye, when the tube has one)
                 ─ lymphocytes / monocytes / granulocytes (mixture on CD45 × log SSC)
    lymphocytes ─ T (CD3+, valley) ─ CD4 / CD8 ─ CAR+ (against the pre-infusion tube, else
                                                   the negative mode of the same sample)
                ─ B (CD3− CD19+, threshold from the T cells as CD19-negative reference)
                ─ NK (CD3− CD16/56+, same reference)

Rare populations (B cells near the eligibility threshold, CAR+ cells late
after infusion) are gated from the positive region of their marker against
a negative reference, never by a cluster vote, so "absent" is a legitimate
answer: a tube without B cells gives ~0, not the nearest blob.

Doublets: cells and beads are both counted as singlets. Coincidence takes
cells and beads at the same rate, so the singlet-cell / singlet-bead ratio is
unbiased while a count of singlet cells over all beads would be ~4–5% low.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from gpu import fit_gaussian_mixture, get_array_module, histogram_2d, to_numpy
from gpu.density import find_peaks_1d, gaussian_smooth_1d, histogram_1d, robust_location_scale, valley_between

from .geometry import Dimension, Gate, gate_contains


@dataclass
class GatingParams:
    """Tunable parameters of the automatic gating (recorded with every result).

    Attributes
    ----------
    bins : int
        Histogram bins over each 1-D range.
    smooth_bins : float
        Least Gaussian smoothing (in bins) before looking for peaks and
        valleys; wider for few events (half Silverman's bandwidth).
    min_prominence : float
        Peaks smaller than this fraction of the tallest are noise.
    negative_reference_sd : float
        A marker is positive above centre + this many robust SDs of its
        negative reference population (B/NK: the T cells), measured as
        84th percentile − median; 5 SD keeps false positives far below one
        event per tube.
    negative_mode_sd : float
        Same, when the reference is the negative mode of the population
        itself (CAR, viability), measured on the mode's right flank.
    singlet_sd : float
        Events whose log(FSC-A/FSC-H) exceeds the median by this many
        robust SDs are doublets.
    region_mahalanobis2 : float
        Lymphocyte, monocyte and granulocyte regions end at this squared
        Mahalanobis distance from their component (13.8: the 99.9% ellipse).
    bead_max_scatter_ratio : float
        Beads may have up to this multiple of the beads' median scatter (a
        bead with a speck of debris) but not a cell's (≥ 2×).
    car_reference : array or None
        CAR-reagent values of a CAR-negative reference (the subject's
        pre-infusion T cells, on the same transformed scale); ``None`` uses
        the negative mode of the sample itself.
    car_reference_source : str
        Where ``car_reference`` came from (file name), recorded with the gate;
        without a reference, why the linked one could not serve (or empty).
    mixture_bins : int
        The lymphocyte/monocyte/granulocyte mixture is fitted on a
        ``mixture_bins``² histogram of CD45 × log SSC.
    min_valley_depth : float
        A valley shallower than this (1 − valley / lower peak) is a dip in
        one noisy mode, not a gap between populations (CD3, CD4, CD8).
    min_positive_events : float
        A mixture's positive component must hold about this many events to
        be taken as a population (CAR+).
    min_peak_events : float
        On log densities, a mode must hold about this many events to count
        as a population.
    bead_gap_depth : float
        How empty (on log density) the gap between cells and beads must be
        for the bright mode to count as beads.
    bead_scatter_sd : float
        Bead events must lie within this many robust SDs of the beads'
        median log FSC-A and log SSC-A (bead–cell coincidences do not).
    car_reference_max_shift : float
        A CAR reference whose negatives had to be moved further than this
        (logicle units; 0.04 is a ~1.5× detector gain on the 4.5-decade
        scale) was acquired at another gain: the count is flagged as less
        certain. Drift between visits is a few hundredths of that.
    seed : int
        Seed for the mixture model (results are deterministic).
    """

    bins: int = 256
    smooth_bins: float = 2.0
    min_prominence: float = 0.05
    negative_reference_sd: float = 5.0
    negative_mode_sd: float = 3.5
    singlet_sd: float = 4.0
    min_peak_events: float = 12.0
    min_positive_events: float = 5.0
    min_valley_depth: float = 0.5
    mixture_bins: int = 128
    region_mahalanobis2: float = 13.8
    bead_max_scatter_ratio: float = 1.6
    car_reference: object = None
    car_reference_source: str = ""
    bead_gap_depth: float = 0.8
    bead_scatter_sd: float = 5.0
    car_reference_max_shift: float = 0.04
    seed: int = 0

    def as_dict(self):
        out = asdict(self)
        if self.car_reference is not None:
            out["car_reference"] = f"{len(self.car_reference)} events"
        return out


@dataclass
class GatingResult:
    """Masks per population, the gates that made them, and gating QC flags."""

    masks: dict
    gates: list
    qc_flags: list
    device: str
    params: GatingParams

    def events(self, population):
        return int(self.masks[population].sum())


def _probe(values, size=40000):
    """A regular subsample for quantiles of large arrays: the same to a bin, a fraction of the cost."""
    return values if len(values) <= size else values[::len(values) // size]


def _density(values, params, log_counts=False, with_sigma=False):
    """Smoothed histogram of ``values`` over their 0.05–99.95 percentile range.

    The range ignores the few extreme events (compensated outliers far below
    zero) that would otherwise squeeze every population into a few bins.
    """
    values = np.asarray(values, dtype=np.float64)
    lo, hi = (float(v) for v in np.percentile(_probe(values), [0.05, 99.95]))
    if hi - lo < 1e-9:
        hi = lo + 1e-3
    pad = 0.05 * (hi - lo)
    counts, edges = histogram_1d(values, params.bins, (lo - pad, hi + pad))
    # Few events need wider smoothing or noise makes modes: half of
    # Silverman's bandwidth (which over-smooths multimodal data at full size).
    q25, q75 = np.percentile(values, [25, 75])
    spread = min(float(np.std(values)), float(q75 - q25) / 1.34) or float(np.std(values))
    bandwidth = 0.5 * 0.9 * spread * max(values.size, 1) ** -0.2
    sigma_bins = max(params.smooth_bins, bandwidth / (edges[1] - edges[0]))
    smoothed = to_numpy(gaussian_smooth_1d(counts, sigma_bins))
    if log_counts:
        smoothed = np.log1p(smoothed)
    centers = 0.5 * (edges[:-1] + edges[1:])
    return (smoothed, centers, sigma_bins) if with_sigma else (smoothed, centers)


def _real_peaks(density, params, prominence, log_counts, sigma_bins=2.0):
    """Peaks of a smoothed density that hold real events.

    On a log density a bump made by two stray events can look as prominent
    as a population; such bumps are dropped by requiring the peak to hold
    about ``min_peak_events`` events (its smoothed height times the width of
    the smoothing kernel, √(2π)·sigma bins).
    """
    peaks = find_peaks_1d(density, prominence)
    if not log_counts:
        return peaks
    linear = np.expm1(density)
    least_height = params.min_peak_events / (np.sqrt(2 * np.pi) * sigma_bins)
    return [p for p in peaks if linear[p] >= least_height]


def valley_threshold(values, params, log_counts=False, between="deepest"):
    """Threshold at the valley between two modes of ``values``.

    ``between="deepest"`` cuts at the deepest valley between neighbouring
    modes (a marker with a negative and a positive population, e.g. CD4 in
    T cells);
    ``"lowest"`` at the deepest point between the lowest-valued mode and
    the tallest mode above it (a small negative population below several
    positive ones, e.g. debris on CD45).
    With ``log_counts`` the modes are found on log(1 + density), which lets
    a small population stand out next to a large one.

    Returns ``(threshold, depth)`` or ``(None, 0.0)`` when the values are
    unimodal. ``depth`` is 1 − valley height / lower of the two peaks.
    """
    if len(values) < 10:
        return None, 0.0
    density, centers, sigma = _density(values, params, log_counts=log_counts, with_sigma=True)
    peaks = _real_peaks(density, params, params.min_prominence, log_counts, sigma)
    if len(peaks) < 2:
        return None, 0.0
    if between == "lowest":
        # The deepest point between the lowest mode and the tallest mode above
        # it, so a noisy negative population split into bumps is cut as one.
        left = peaks[0]
        right = max(peaks[1:], key=lambda p: density[p])
        valley = valley_between(density, left, right)
        depth = 1.0 - density[valley] / max(min(density[left], density[right]), 1e-12)
        return float(centers[valley]), float(depth)
    # The deepest valley between neighbouring modes: a noisy mode split in two
    # has a shallow dip, two populations a deep one.
    best = None
    for left, right in zip(peaks[:-1], peaks[1:]):
        valley = valley_between(density, left, right)
        depth = 1.0 - density[valley] / max(min(density[left], density[right]), 1e-12)
        if best is None or depth > best[1]:
            best = (float(centers[valley]), float(depth))
    return best


def _upper_spread(density, centers, mode_index, direction=1):
    """SD of the mode's right flank: where the density falls to e^(-1/2) of the mode.

    For a Gaussian that point is one SD from the mode. Only the flank next to
    the mode is used, so a positive population further right (as long as it
    is not larger than the negatives at one SD) does not inflate it.
    """
    height = density[mode_index]
    level = height * np.exp(-0.5)
    edge = mode_index
    while 0 < edge < len(density) - 1 and density[edge] > level:
        edge += direction
    spread = abs(centers[edge] - centers[mode_index])
    return float(max(spread, centers[1] - centers[0]))


def positive_threshold(values, params, reference=None):
    """Threshold above which a marker is positive, and how it was found.

    Parameters
    ----------
    values : ndarray
        The marker in the parent population.
    params : GatingParams
    reference : ndarray, optional
        The same marker in a population known to be negative (the T cells
        for CD19 and CD16/56, a pre-infusion tube for the CAR reagent).

    Returns
    -------
    threshold : float
    info : dict
        ``method``, the negative centre and spread, and the valley when used.

    Notes
    -----
    With a reference: its median + ``negative_reference_sd`` × its upper
    robust SD (84th percentile − median; the upper side, because the
    logicle scale is not symmetric). Without: the dominant (negative) mode
    of ``values`` + ``negative_mode_sd`` × the SD of its right flank, or the
    valley to the right of it when the values are bimodal and the valley
    lies beyond two SDs (a real second population, not a shoulder). A
    single mode is a legitimate "no positives" answer.
    """
    values = np.asarray(values, dtype=np.float64)
    if reference is not None:
        reference = np.asarray(reference, dtype=np.float64)
        median, upper = (float(v) for v in np.percentile(reference, [50, 84.13]))
        spread = max(upper - median, 1e-6)
        return median + params.negative_reference_sd * spread, {
            "method": "negative reference: median + k x upper SD",
            "negative_center": round(median, 6), "negative_sd": round(spread, 6), "reference_events": int(reference.size)}
    density, centers = _density(values, params)
    mode_index = int(np.argmax(density))
    mode = float(centers[mode_index])
    spread = _upper_spread(density, centers, mode_index)
    info = {"negative_center": round(mode, 6), "negative_sd": round(spread, 6)}
    threshold = mode + params.negative_mode_sd * spread
    peaks = [p for p in find_peaks_1d(density, params.min_prominence) if p > mode_index]
    if peaks:
        valley = valley_between(density, mode_index, peaks[0])
        if centers[valley] > mode + 2 * spread:
            info.update(method="valley right of the negative mode", valley=round(float(centers[valley]), 6))
            return float(centers[valley]), info
    info["method"] = "negative mode + k x right-flank SD"
    return threshold, info


def _negative_quantiles(ordered, probabilities, positive_fraction=0.0, positive_center=None, positive_sd=None):
    """Quantiles of the negatives in ``ordered`` (sorted values), the positives' share taken out.

    The mixture's empirical CDF minus ``positive_fraction`` × the positives'
    Gaussian CDF, rescaled to the negatives' share, inverted at
    ``probabilities``. With no positives it is the plain quantile.
    """
    from scipy.special import ndtr

    cdf = (np.arange(1, ordered.size + 1) - 0.5) / ordered.size
    if positive_fraction > 0 and positive_center is not None:
        cdf = (cdf - positive_fraction * ndtr((ordered - positive_center) / positive_sd)) / (1.0 - positive_fraction)
    return np.interp(probabilities, np.maximum.accumulate(cdf), ordered)


def _extrapolate_positives(descending, cut, excess):
    """Scale the ``excess`` positives seen above ``cut`` to all positives.

    A Gaussian truncated at ``cut`` is fitted by maximum likelihood to the
    ``excess`` brightest events (the events just above the cut that are
    expected to be negatives are left out), with its centre held at or
    above the cut: a population mostly below the counting cut cannot be
    extrapolated from its upper part. Its share above the cut scales the
    excess. The share's standard deviation comes from the fit's observed
    information (the curvature of the likelihood), by the delta method.

    Returns ``(share_above, centre, σ, share_sd, positives)``.
    """
    from scipy.optimize import minimize
    from scipy.special import log_ndtr, ndtr

    bright = descending[:max(int(round(excess)), 2)]
    bright = bright[bright >= cut]

    def negative_log_likelihood(parameters):
        center, log_sd = parameters
        z = (bright - center) / np.exp(log_sd)
        return 0.5 * float(np.sum(z * z)) + bright.size * (log_sd + float(log_ndtr((center - cut) / np.exp(log_sd))))

    start = [max(float(np.median(bright)), cut), float(np.log(max(np.std(bright), 1e-3)))]
    fit = minimize(negative_log_likelihood, start, method="L-BFGS-B", bounds=[(cut, None), (np.log(1e-3), None)])
    center, log_sd = (float(v) for v in fit.x)
    spread = float(np.exp(log_sd))
    z = (cut - center) / spread
    share_above = float(1.0 - ndtr(z))
    # Observed information by central differences; its inverse is the
    # covariance of (centre, log σ).
    steps = np.array([0.02 * spread, 0.02])
    hessian = np.empty((2, 2))
    for i in range(2):
        for j in range(2):
            def shifted(di, dj):
                point = np.array([center, log_sd])
                point[i] += di * steps[i]
                point[j] += dj * steps[j]
                return negative_log_likelihood(point)
            hessian[i, j] = (shifted(1, 1) - shifted(1, -1) - shifted(-1, 1) + shifted(-1, -1)) / (4 * steps[i] * steps[j])
    density = float(np.exp(-0.5 * z * z) / np.sqrt(2 * np.pi))
    gradient = np.array([density / spread, density * z])
    try:
        covariance = np.linalg.inv(hessian)
        share_var = float(gradient @ covariance @ gradient)
    except np.linalg.LinAlgError:
        share_var = float("nan")
    if not np.isfinite(share_var) or share_var < 0:
        share_var = (0.5 * share_above) ** 2   # an ill-posed fit: say so in the interval
    return share_above, center, spread, float(np.sqrt(share_var)), excess / share_above


def reference_subtraction_count(values, reference, tail=0.001, min_tail_events=5, min_shape_events=30,
                                iterations=6):
    """Number of positive events in ``values``, the negatives known from a reference.

    For a dim positive population (CAR+ T cells) whose lower tail runs into
    the negatives. ``reference`` holds the same marker in a known-negative
    sample (the subject's pre-infusion T cells), possibly acquired at a
    slightly different detector gain.

    1. **Align**: the reference is shifted so that its core quantiles
       (30th–95th percentile) match those of the negatives in ``values``
       (the positives' share, as estimated so far, taken out of the CDF).
       On the logicle scale a gain change moves the negatives' bright side
       by a constant; a shape fit would instead read the reference's
       sampling noise as positives.
    2. **Subtract**: above ``c``, the aligned reference's *k*-th largest
       value (*k* = ``tail`` × its size, at least ``min_tail_events``),
       ``A`` events are seen and ``E = n_neg·k/(n_ref + 1)`` negatives are
       expected; ``A − E`` positives lie above ``c``.
    3. **Extrapolate**: the positives' centre and spread come from their
       upper half (never touched by the negatives); the share of a Gaussian
       of that shape above ``c`` scales ``A − E`` to all positives.

    Repeated ``iterations`` times, since step 1 needs the positives' share.

    Parameters
    ----------
    values : ndarray
        The marker in the parent population (T cells), transformed.
    reference : ndarray
        The marker in the known-negative reference, same scale.
    tail : float
        Share of the reference above ``c``; ``c`` rests on at least
        ``min_tail_events`` reference events whatever its size.
    min_tail_events : int
    min_shape_events : int
        Below this many positives above ``c`` their shape is not estimated
        and no extrapolation is made (``A − E`` is the estimate).

    Returns
    -------
    positives : float
        Estimated positive events (≥ 0).
    info : dict
        The alignment shift, ``c``, ``A``, ``E``, the positives' centre,
        spread and share above ``c``, and ``count_sd``: the estimate's
        standard deviation beyond the Poisson noise of the positives
        themselves (negatives above ``c``, the reference's own tail, the
        extrapolation).

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> reference = rng.normal(0.26, 0.05, 4000)
    >>> values = np.concatenate([rng.normal(0.25, 0.05, 4000), rng.normal(0.5, 0.09, 200)])
    >>> positives, info = reference_subtraction_count(values, reference)
    >>> bool(abs(positives - 200) < 3 * (np.sqrt(200) + info["count_sd"]))
    True
    """

    values = np.asarray(values, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    n = values.size
    tail_events = max(int(round(tail * reference.size)), min_tail_events)
    reference_descending = np.sort(reference)[::-1]
    probabilities = np.linspace(0.30, 0.95, 14)
    reference_quantiles = np.quantile(reference, probabilities)
    ascending = np.sort(values)
    descending = ascending[::-1]
    fraction, center, spread = 0.0, None, None
    for _ in range(iterations):
        shift = float(np.median(_negative_quantiles(ascending, probabilities, fraction, center, spread)
                                - reference_quantiles))
        cut = float(reference_descending[tail_events - 1]) + shift
        above = int(n - np.searchsorted(ascending, cut, side="left"))
        # A sample's share above its k-th largest value is k / (size + 1)
        # on average (order statistics), not k / size.
        expected_negatives = (1.0 - fraction) * n * tail_events / (reference.size + 1)
        excess = max(above - expected_negatives, 0.0)
        share_above, center, spread, share_sd = 1.0, None, None, 0.0
        positives = excess
        if excess >= min_shape_events:
            share_above, center, spread, share_sd, positives = _extrapolate_positives(descending, cut, excess)
        fraction = min(positives / n, 0.99)
    variance = positives * (1.0 - share_above) / share_above + (positives * share_sd / share_above) ** 2 + \
        (expected_negatives + expected_negatives ** 2 / tail_events) / share_above ** 2
    info = {"reference_shift": round(shift, 6), "counting_cut": round(cut, 6), "events_above_cut": above,
            "expected_negatives_above_cut": round(expected_negatives, 2),
            "positive_share_above_cut": round(share_above, 4), "positive_events": round(positives, 2),
            "count_sd": round(float(np.sqrt(variance)), 3)}
    if center is not None:
        info.update(positive_center=round(center, 6), positive_sd=round(spread, 6))
    return positives, info


def balanced_positive_threshold(values, params, reference=None):
    """Threshold for a dim positive population that overlaps its negatives.

    CAR+ cells are a continuum: any cut misses the dimmest positives and
    takes the brightest negatives, so the cut is placed where the *count*
    above it is unbiased (the cut that maximises F1 would undercount).

    With a ``reference`` of at least 200 events (a known-negative sample,
    e.g. the subject's pre-infusion T cells) the positives are counted
    against it by :func:`reference_subtraction_count` and the cut leaves
    exactly that many events above it. Without one, a two-component mixture
    is fitted to the marker (log density of the parent, histogram-weighted);
    when it finds a real positive component, the cut is placed where the
    expected number of negatives above it equals the expected number of
    positives below it. Without a real positive component the answer is
    :func:`positive_threshold` (zero, or a handful of events, is a
    legitimate answer).

    Returns ``(threshold, info)`` as :func:`positive_threshold` does.
    """
    from scipy.special import ndtr

    values = np.asarray(values, dtype=np.float64)
    fallback, info = positive_threshold(values, params, reference=reference)
    if reference is not None and len(reference) >= 20:
        # A measured negative sample: above its top 1/n quantile about one
        # reference-sized batch of negatives gives a single false positive.
        quantile = float(np.quantile(reference, 1.0 - 1.0 / len(reference)))
        fallback = min(fallback, max(quantile, info["negative_center"]))
        info["method"] = "negative reference: its 1 - 1/n quantile"
    if values.size < 50:
        return fallback, info
    if reference is not None and len(reference) >= 200:
        # A measured negative sample: count the positives against it and
        # cut where exactly that many events lie above, so the gate's count
        # is the estimate (see reference_subtraction_count).
        positives, estimate = reference_subtraction_count(values, reference)
        n_positive = int(round(positives))
        ordered = np.sort(values)
        # Midway between the last event in and the first one out, so that a
        # reviewer's software, recomputing the transform to within 1e-7,
        # gates the same events.
        if n_positive == 0:
            threshold = float(ordered[-1]) + 1e-4
        elif n_positive >= values.size:
            threshold = float(ordered[0]) - 1e-4
        else:
            threshold = 0.5 * float(ordered[values.size - n_positive] + ordered[values.size - n_positive - 1])
        info.update(estimate, method="cut leaving above it the positives counted against the reference "
                                     "(aligned, subtracted, extrapolated)")
        return threshold, info
    counts, edges = histogram_1d(values, params.bins, tuple(np.percentile(values, [0.01, 99.99])))
    centres = 0.5 * (edges[1:] + edges[:-1])
    keep = counts > 0
    negative_center = info["negative_center"]
    init = np.array([[negative_center], [max(fallback, float(np.percentile(values, 99.5)))]])
    fit = fit_gaussian_mixture(centres[keep, None], 2, init_means=init, weights=counts[keep], reg_covar=1e-6,
                               max_iter=200)
    means = to_numpy(fit.means)[:, 0]
    sds = np.sqrt(to_numpy(fit.covariances)[:, 0, 0])
    weights = to_numpy(fit.weights)
    neg, pos = (0, 1) if means[0] <= means[1] else (1, 0)
    n_total = values.size
    n_pos = weights[pos] * n_total
    separated = (means[pos] - means[neg]) > 3.0 * sds[neg] and n_pos >= params.min_positive_events
    one_component = fit_gaussian_mixture(centres[keep, None], 1, weights=counts[keep], reg_covar=1e-6)
    better = fit.bic() < one_component.bic() - 10.0
    if not (separated and better):
        info["mixture"] = "no positive component (one mode)"
        return fallback, info
    n_neg = n_total - n_pos
    # The negatives' right flank decides the false positives; a symmetric fit
    # is widened by their long left tail (compensated negatives on a logicle
    # scale), so take the flank's own width when narrower.
    sds[neg] = min(sds[neg], info["negative_sd"]) if reference is None else sds[neg]
    if reference is not None:
        reference = np.sort(np.asarray(reference, dtype=np.float64))

        def negatives_above(t):
            return n_neg * (reference.size - np.searchsorted(reference, t, side="left")) / reference.size
    else:
        def negatives_above(t):
            return n_neg * (1.0 - ndtr((t - means[neg]) / sds[neg]))

    def positives_below(t):
        return n_pos * ndtr((t - means[pos]) / sds[pos])

    low, high = means[neg], means[pos]
    for _ in range(60):
        middle = 0.5 * (low + high)
        if negatives_above(middle) > positives_below(middle):
            low = middle
        else:
            high = middle
    threshold = 0.5 * (low + high)
    info.update(method="count-balanced cut between the negative and positive mixture components",
                negative_center=round(float(means[neg]), 6), negative_sd=round(float(sds[neg]), 6),
                positive_center=round(float(means[pos]), 6), positive_sd=round(float(sds[pos]), 6),
                positive_fraction=round(float(weights[pos]), 6),
                expected_misclassified=round(float(positives_below(threshold)), 2))
    return float(threshold), info


def _leukocyte_starting_means(features, params):
    """Starting means (CD45, log SSC) for lymphocytes, monocytes, granulocytes.

    Taken from the modes of log SSC (lowest = lymphocytes, highest =
    granulocytes, the tallest in between = monocytes, or the midpoint when
    monocytes show no mode of their own), so EM starts from the right
    populations whatever their proportions.
    """
    density, centers = _density(features[:, 1], params)
    peaks = find_peaks_1d(density, params.min_prominence)
    if len(peaks) >= 2:
        low, high = centers[peaks[0]], centers[peaks[-1]]
        middle = [p for p in peaks[1:-1]]
        mid = centers[max(middle, key=lambda p: density[p])] if middle else 0.5 * (low + high)
    else:
        low, mid, high = np.percentile(features[:, 1], [10, 50, 90])
    starts = []
    width = 0.1 * (features[:, 1].max() - features[:, 1].min() + 1e-9)
    for ssc in (low, mid, high):
        near = np.abs(features[:, 1] - ssc) < width
        cd45 = np.median(features[near, 0]) if near.any() else np.median(features[:, 0])
        starts.append([cd45, ssc])
    return np.array(starts)


class _GateBuilder:
    """Adds gates in order and keeps every gate's event mask."""

    def __init__(self, data, channels):
        self.data, self.channels = data, channels
        self.gates, self.masks = [], {}

    def add(self, gate):
        self.masks[gate.name] = gate_contains(gate, self.data, self.channels, self.masks)
        self.gates.append(gate)
        return self.masks[gate.name]

    def values(self, channel, transform="logicle"):
        from .geometry import axis_values

        return axis_values(self.data, self.channels, Dimension(channel, transform))


def _range_gate(name, parent, channel, *, minimum=None, maximum=None, transform="logicle", method="", extra=None):
    return Gate(name, parent, "rectangle", [Dimension(channel, transform, minimum, maximum)], method=method,
                extra=extra or {})


def _region_polygons(fit, features, params, n_grid=160):
    """Polygons of the lymphocyte, monocyte and granulocyte regions in (CD45, log SSC).

    Each grid cell takes the component of highest posterior, provided the
    cell lies within the 99.9% ellipse of that component (Mahalanobis² ≤
    13.8 for 2 dimensions), so far outliers — debris tails, doublets — stay
    out of every region. The largest connected piece of each region becomes
    a polygon (its contour, simplified to half a grid cell).
    """
    from skimage.measure import approximate_polygon, find_contours, label

    means = to_numpy(fit.means)
    covariances = to_numpy(fit.covariances)
    lo = np.percentile(_probe(features), 0.01, axis=0)
    hi = np.percentile(_probe(features), 99.99, axis=0)
    span = hi - lo
    lo, hi = lo - 0.1 * span, hi + 0.1 * span
    gx = np.linspace(lo[0], hi[0], n_grid)
    gy = np.linspace(lo[1], hi[1], n_grid)
    grid = np.column_stack([np.repeat(gx, n_grid), np.tile(gy, n_grid)])
    log_prob = to_numpy(fit._log_prob(grid))
    best = log_prob.argmax(axis=1)
    maha = np.empty(grid.shape[0])
    for j in range(means.shape[0]):
        rows = best == j
        diff = grid[rows] - means[j]
        maha[rows] = np.einsum("ij,jk,ik->i", diff, np.linalg.inv(covariances[j]), diff)
    best = np.where(maha <= params.region_mahalanobis2, best, -1).reshape(n_grid, n_grid)
    step = np.array([gx[1] - gx[0], gy[1] - gy[0]])
    polygons = []
    for j in range(means.shape[0]):
        pieces = label(best == j, connectivity=1)
        if pieces.max() == 0:
            polygons.append(None)
            continue
        # The piece holding the component's mean (else the largest).
        cell = np.clip(np.round((means[j] - lo) / step).astype(int), 0, n_grid - 1)
        keep = pieces[cell[0], cell[1]] or np.argmax(np.bincount(pieces.ravel())[1:]) + 1
        padded = np.pad((pieces == keep).astype(float), 1)
        contours = find_contours(padded, 0.5)
        contour = max(contours, key=len)
        contour = approximate_polygon(contour, tolerance=0.5)
        xy = (contour - 1.0) * step + lo  # padded grid index → data coordinates
        polygons.append([(float(x), float(y)) for x, y in xy[:-1]])
    return polygons


def auto_gate(data, channels, panel, *, params=None, device=None):
    """Gate a transformed event matrix into the standard populations.

    Parameters
    ----------
    data : ndarray, shape (n_events, n_channels)
        Compensated events; fluorescence channels logicle-transformed to the
        0–1 scale, scatter channels linear divided by their range.
    channels : dict
        Marker or scatter name → column of ``data``. Markers use the
        canonical names of :mod:`cytometry.panel` (``CD45``, ``CD3``,
        ``CD19``, ``CAR``, ``VIABILITY``...); scatter ``FSC-A``, ``FSC-H``,
        ``SSC-A``.
    panel : {"tbnk", "car"}
    params : GatingParams, optional
    device : {"auto", "cpu", "gpu"}, optional
        Where the clustering runs.

    Returns
    -------
    GatingResult
        Boolean masks (NumPy) for ``beads``, ``leukocytes``, ``lymphocytes``,
        ``monocytes``, ``granulocytes``, ``t_cells``, ``b_cells`` and, when
        the panel has their markers, ``cd4_t``, ``cd8_t``, ``nk_cells``,
        ``car_t``; every mask is the evaluation of the gates in
        ``GatingResult.gates`` (see :mod:`gating.geometry`).

    Examples
    --------
    >>> result = auto_gate(data, {"CD45": 4, ...}, "tbnk")  # doctest: +SKIP
    >>> result.events("b_cells")  # doctest: +SKIP
    612
    """
    params = params or GatingParams()
    xp, device_name = get_array_module(device)
    data = np.asarray(data, dtype=np.float64)
    n = data.shape[0]
    build = _GateBuilder(data, channels)
    flags = []
    fluorescence = [name for name in channels if name not in ("FSC-A", "FSC-H", "SSC-A", "Time")]

    # Beads: bright in every fluorescence channel, so the dimmest channel of an
    # event separates them from cells (no cell is positive for all markers).
    # On log density a few hundred beads stand out beside 10^5 cells. Cells
    # (and debris) are the lowest mode; beads sit across a nearly empty gap
    # above them. The deepest point between the lowest and the brightest mode
    # is that gap; modes among cells are separated by shallow dips only, so a
    # tube without beads finds no deep gap and reports none.
    bead_score = data[:, [channels[c] for c in fluorescence]].min(axis=1)
    density, centers, sigma = _density(bead_score, params, log_counts=True, with_sigma=True)
    peaks = _real_peaks(density, params, 0.2, True, sigma)
    bead_threshold = None
    if len(peaks) >= 2:
        valley = valley_between(density, peaks[0], peaks[-1])
        depth = 1.0 - density[valley] / max(min(density[peaks[0]], density[peaks[-1]]), 1e-12)
        if depth >= params.bead_gap_depth:
            bead_threshold = float(centers[valley])
    if bead_threshold is None:
        flags.append("beads: no bead population found (no bright mode in every fluorescence channel)")
        bead_threshold = float(np.max(bead_score)) + 1.0  # a gate no event passes
    bright = build.add(Gate("bead_bright", None, "rectangle",
                            [Dimension(c, "logicle", bead_threshold, None) for c in fluorescence],
                            method="above the valley between the cells' mode and the bright mode of the "
                                   "dimmest fluorescence channel"))

    # Singlet beads: a tight, low scatter. A bead stuck to a cell has a cell's
    # scatter (>= 2x a bead's) and is neither a bead nor a cell; a bead with a
    # speck of debris still counts, as a cell with one does (their pulses
    # barely change), which keeps the cell/bead ratio unbiased in dirty tubes.
    scatter_dims = []
    for key in ("FSC-A", "SSC-A"):
        if key in channels and bright.sum() >= 5:
            values = build.values(key, "linear")[bright]
            positive = values[values > 0]
            center, scale = robust_location_scale(np.log(positive)) if positive.size else (0.0, 0.0)
            spread = params.bead_scatter_sd * max(scale, 1e-3)
            scatter_dims.append(Dimension(key, "linear", float(np.exp(center - spread)),
                                          float(np.exp(center + max(spread, np.log(params.bead_max_scatter_ratio))))))
    build.add(Gate("beads", "bead_bright", "rectangle", scatter_dims,
                   method="bead scatter: median / e^(k·SD) to median × max(e^(k·SD), "
                          f"{params.bead_max_scatter_ratio}) on FSC-A and SSC-A",
                   extra={"k": params.bead_scatter_sd}))

    # Cells: not bright in every channel; singlets by FSC-A against FSC-H.
    build.add(Gate("not_beads", None, "not", complement_of="bead_bright",
                   method="events not bright in every fluorescence channel"))
    if "FSC-A" in channels and "FSC-H" in channels:
        fsc_a = build.values("FSC-A", "linear")
        fsc_h = build.values("FSC-H", "linear")
        usable = build.masks["not_beads"] & (fsc_a > 0) & (fsc_h > 0)
        log_ratio = np.log(fsc_a[usable]) - np.log(fsc_h[usable])
        center, scale = robust_location_scale(_probe(log_ratio)) if log_ratio.size else (0.0, 0.0)
        ratio = float(np.exp(center + params.singlet_sd * max(scale, 1e-3)))
        # FSC-A <= ratio × FSC-H as a polygon (a wedge) in the FSC-A × FSC-H plane.
        wedge = [(-1.0, -1.0 / ratio), (4.0 * ratio, 4.0), (-1.0, 4.0)]
        build.add(Gate("singlets", "not_beads", "polygon",
                       [Dimension("FSC-A", "linear"), Dimension("FSC-H", "linear")], vertices=wedge,
                       method="FSC-A / FSC-H below median + k·robust SD (log ratio) of non-bead events",
                       extra={"max_area_to_height": ratio, "k": params.singlet_sd}))
    else:
        flags.append("singlets: no FSC-A/FSC-H pair, doublets not excluded")
        build.add(Gate("singlets", "not_beads", "rectangle", [], method="no FSC-H: all non-bead events"))
    cells = build.masks["singlets"]

    # CD45+ leukocytes against debris: the deepest valley between neighbouring
    # modes of the log density is the nearly empty gap below the dimmest
    # leukocytes (granulocytes); valleys among leukocyte modes are shallow.
    cd45 = build.values("CD45")
    threshold, depth = valley_threshold(cd45[cells], params, log_counts=True)
    method = "deepest valley of the log density (debris gap)"
    if threshold is None or depth < params.bead_gap_depth:
        # Too little debris to form a mode: cut below the dimmest leukocyte mode.
        density, centers, sigma = _density(cd45[cells], params, log_counts=True, with_sigma=True)
        peaks = _real_peaks(density, params, params.min_prominence, True, sigma) or [int(np.argmax(density))]
        lowest = peaks[0]
        linear = np.expm1(density)
        spread = _upper_spread(linear, centers, lowest, direction=-1)
        threshold = float(centers[lowest] - params.negative_reference_sd * spread)
        method = "no debris gap: below the dimmest CD45 mode by k x its left-flank SD"
        flags.append("leukocytes: no debris mode on CD45; cut below the dimmest leukocyte mode")
    leukocytes = build.add(_range_gate("leukocytes", "singlets", "CD45", minimum=threshold, method=method,
                                       extra={"valley_depth": depth}))
    parent = "leukocytes"
    if "VIABILITY" in channels:
        viability = build.values("VIABILITY")
        live_cut, info = positive_threshold(viability[leukocytes], params)
        leukocytes = build.add(_range_gate("live", "leukocytes", "VIABILITY", maximum=live_cut,
                                           method=info.pop("method"), extra=info))
        parent = "live"

    # Lymphocytes / monocytes / granulocytes: a 3-component mixture on CD45 × log SSC,
    # drawn as polygons so the gates can be exported and re-applied.
    ssc_log = build.values("SSC-A", "log")
    features = np.column_stack([cd45[leukocytes], ssc_log[leukocytes]])
    features = features[np.isfinite(features).all(axis=1)]
    population_gates = {"lymphocytes": None, "monocytes": None, "granulocytes": None}
    if features.shape[0] >= 30:
        init = _leukocyte_starting_means(features, params)
        # Fit on the 2-D histogram (bin centres weighted by counts): the cost no
        # longer grows with the number of events, and the fit barely changes.
        counts, x_edges, y_edges = histogram_2d(features[:, 0], features[:, 1], bins=params.mixture_bins)
        gx, gy = np.meshgrid(0.5 * (x_edges[1:] + x_edges[:-1]), 0.5 * (y_edges[1:] + y_edges[:-1]),
                             indexing="ij")
        occupied = counts.ravel() > 0
        centres = np.column_stack([gx.ravel()[occupied], gy.ravel()[occupied]])
        fit = fit_gaussian_mixture(xp.asarray(centres), 3, init_means=xp.asarray(init), seed=params.seed,
                                   weights=xp.asarray(counts.ravel()[occupied]), reg_covar=1e-5)
        order = np.argsort(to_numpy(fit.means)[:, 1])  # by SSC: lymphocytes, monocytes, granulocytes
        polygons = _region_polygons(fit, features, params)
        means = to_numpy(fit.means)
        for name, component in zip(population_gates, order):
            if polygons[component] is None:
                flags.append(f"{name}: no region found in CD45 x SSC")
                continue
            population_gates[name] = Gate(
                name, parent, "polygon", [Dimension("CD45", "logicle"), Dimension("SSC-A", "log")],
                vertices=polygons[component],
                method="3-component Gaussian mixture on CD45 x log SSC: region of highest posterior "
                       "within the component's 99.9% ellipse",
                extra={"component_mean": means[component].tolist(),
                       "component_weight": float(to_numpy(fit.weights)[component])})
    else:
        flags.append(f"lymphocytes: only {features.shape[0]} leukocyte events, cannot gate")
    for name, gate in population_gates.items():
        if gate is None:
            gate = Gate(name, parent, "rectangle", [Dimension("CD45", "logicle", np.inf, None)],
                        method="not gated")
        build.add(gate)
    lymph, mono, gran = (build.masks[k] for k in ("lymphocytes", "monocytes", "granulocytes"))

    # T cells: CD3 is bimodal in lymphocytes (T cells are most of them).
    cd3 = build.values("CD3")
    cd3_cut, depth = valley_threshold(cd3[lymph], params, log_counts=True) if lymph.sum() >= 10 else (None, 0.0)
    if cd3_cut is not None and depth < params.min_valley_depth:
        cd3_cut = None  # a dip inside one noisy mode, not a gap between two populations
    cd3_info = {"method": "valley (log density)", "valley_depth": depth}
    myeloid = mono | gran
    if cd3_cut is None and myeloid.sum() >= 20:
        # Too few CD3- lymphocytes to form a mode (B-cell aplasia, few NK):
        # monocytes and granulocytes are CD3-negative and carry at least the
        # lymphocytes' autofluorescence, so they bound the negatives from above.
        cd3_cut, cd3_info = positive_threshold(cd3[lymph], params, reference=cd3[myeloid])
        cd3_info["reference"] = "monocytes and granulocytes of the same sample"
    if cd3_cut is None:
        flags.append("t_cells: CD3 not bimodal in lymphocytes and no CD3-negative reference; "
                     "T/non-T not separated")
        cd3_cut = float("inf")
    method = cd3_info.pop("method")
    t_cells = build.add(_range_gate("t_cells", "lymphocytes", "CD3", minimum=cd3_cut, method=method, extra=cd3_info))
    build.add(_range_gate("cd3_negative", "lymphocytes", "CD3", maximum=cd3_cut, method=method))

    def reference_cut(marker, population):
        values = build.values(marker)
        if t_cells.sum() < 20:
            flags.append(f"{population}: too few T cells ({int(t_cells.sum())}) as {marker}-negative reference")
            return float("inf"), {"method": "no reference"}
        cut, info = positive_threshold(values[build.masks["cd3_negative"]], params, reference=values[t_cells])
        info["reference"] = "T cells of the same sample"
        return cut, info

    cd19_cut, info = reference_cut("CD19", "b_cells")
    build.add(_range_gate("b_cells", "cd3_negative", "CD19", minimum=cd19_cut, method=info.pop("method"), extra=info))
    if "CD16+56" in channels:
        nk_cut, info = reference_cut("CD16+56", "nk_cells")
        build.add(Gate("nk_cells", "cd3_negative", "rectangle",
                       [Dimension("CD16+56", "logicle", nk_cut, None), Dimension("CD19", "logicle", None, cd19_cut)],
                       method=info.pop("method") + "; CD19-negative", extra=info))

    if "CD4" in channels and "CD8" in channels and t_cells.sum() >= 10:
        cuts = {}
        for marker in ("CD4", "CD8"):
            values = build.values(marker)
            cut, depth = valley_threshold(values[t_cells], params, log_counts=True)
            if cut is not None and depth < params.min_valley_depth:
                cut = None
            info = {"method": "valley (log density)", "valley_depth": depth}
            if cut is None and gran.sum() >= 20:
                # Few T cells: granulocytes are CD4- and CD8-, a negative reference.
                cut, info = positive_threshold(values[t_cells], params, reference=values[gran])
                info["reference"] = "granulocytes of the same sample"
            if cut is None:
                flags.append(f"{marker.lower()}_t: {marker} not bimodal in T cells")
                cut = float("inf")
            cuts[marker] = (cut, info)
        (cd4_cut, cd4_info), (cd8_cut, cd8_info) = cuts["CD4"], cuts["CD8"]
        build.add(Gate("cd4_t", "t_cells", "rectangle",
                       [Dimension("CD4", "logicle", cd4_cut, None), Dimension("CD8", "logicle", None, cd8_cut)],
                       method=f"CD4+ ({cd4_info.pop('method')}), CD8-", extra={"CD4": cd4_info}))
        build.add(Gate("cd8_t", "t_cells", "rectangle",
                       [Dimension("CD8", "logicle", cd8_cut, None), Dimension("CD4", "logicle", None, cd4_cut)],
                       method=f"CD8+ ({cd8_info.pop('method')}), CD4-", extra={"CD8": cd8_info}))

    if "CAR" in channels:
        car = build.values("CAR")
        if t_cells.sum() >= 20:
            reference = params.car_reference
            cut, info = balanced_positive_threshold(car[t_cells], params, reference=reference)
            info["reference"] = params.car_reference_source if reference is not None else \
                "negative mode of the same sample"
            shift = info.get("reference_shift")
            if shift is not None and abs(shift) > params.car_reference_max_shift:
                flags.append(f"car_t: the pre-infusion reference's CAR negatives sit {shift:+.3f} logicle units "
                             f"from this tube's (detector gain about {10 ** (abs(shift) * 4.5):.1f}x different); "
                             f"CAR+ count less certain")
        else:
            flags.append(f"car_t: too few T cells ({int(t_cells.sum())}) to set a CAR threshold")
            cut, info = float("inf"), {"method": "no threshold"}
        build.add(_range_gate("car_t", "t_cells", "CAR", minimum=cut, method=info.pop("method"), extra=info))

    return GatingResult(masks=build.masks, gates=build.gates, qc_flags=flags, device=device_name, params=params)
