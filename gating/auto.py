"""Gating parameters, results, and the CAR+ counting against a negative reference.

The gating itself is a panel's plan run by :mod:`gating.engine` (the
populations found from the sample's own valleys and negative
populations, named by phenotype, every gate checked); :func:`auto_gate` is
its entry point. This module keeps what the CAR step needs: counting a dim
positive population against a pre-infusion reference
(:func:`reference_subtraction_count`, :func:`balanced_positive_threshold`).

Doublets: cells and beads are both counted as singlets. Coincidence takes
cells and beads at the same rate, so the singlet-cell / singlet-bead ratio is
unbiased while a count of singlet cells over all beads would be ~4–5% low.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import numpy as np

from gpu import fit_gaussian_mixture, to_numpy
from gpu.density import find_peaks_1d, gaussian_smooth_1d, histogram_1d, valley_between

from .engine import _probe



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
    valley_z : float
        A valley between two modes is real when the lower peak stands above
        it by more than this many Poisson SDs (3: a dip that deep arises by
        chance about once in a thousand); see
        :func:`gating.engine.significant_modes`.
    tail_false_positives : float
        Where a marker shows no valley (positives absent or rare), the cut
        is set in the negatives' own tail so that this many of them are
        expected above it (0.05: a false positive in one tube in twenty).
    logicle_decades : float
        Decades the logicle scale spans (its M): one decade is
        ``1 / logicle_decades`` on the 0–1 scale.
    negative_reference_sd : float
        CAR fallback only: positive above the reference's median + this many
        robust SDs (84th percentile − median).
    negative_mode_sd : float
        CAR fallback only: the same from the negative mode's right flank.
    singlet_sd : float
        Events whose log(FSC-A/FSC-H) exceeds the median by this many
        robust SDs are doublets.
    bead_max_scatter_ratio : float
        Beads may have up to this multiple of the beads' median scatter (a
        bead with a speck of debris) but not a cell's (≥ 2×).
    car_reference : gating.car.CarReference, array or None
        A CAR-negative reference: the subject's pre-infusion T cells and
        beads in the CAR channel (linear), normalised to each follow-up tube
        before use (:mod:`gating.car`). A plain array is taken as T cells'
        values on the follow-up tube's own logicle scale (no bead anchor).
        ``None`` uses the negative mode of the sample itself.
    car_reference_source : str
        Where ``car_reference`` came from (file name), recorded with the gate;
        without a reference, why the linked one could not serve (or empty).
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
    valley_z: float = 3.0
    tail_false_positives: float = 0.05
    logicle_decades: float = 4.5
    bead_max_scatter_ratio: float = 1.6
    car_reference: object = None
    car_reference_source: str = ""
    bead_gap_depth: float = 0.8
    bead_scatter_sd: float = 5.0
    seed: int = 0

    def as_dict(self):
        out = asdict(replace(self, car_reference=None))
        if self.car_reference is not None:
            describe = getattr(self.car_reference, "describe", None)
            out["car_reference"] = describe() if describe else f"{len(self.car_reference)} events"
        return out


@dataclass
class GatingResult:
    """Masks per population, the gates that made them, and the gating's own checks.

    Attributes
    ----------
    masks : dict
        Population (and helper gate) name → boolean mask.
    gates : list of Gate
    flags : list of gating.flags.Flag
    device : str
    params : GatingParams
    parents : dict
        Gate name → parent gate name.
    unreliable : dict
        Population → reasons, for every population whose gate (or an
        ancestor's) failed its checks.
    populations : list of str
        The panel's reported populations, in order.
    panel : str
    """

    masks: dict
    gates: list
    flags: list
    device: str
    params: GatingParams
    parents: dict = field(default_factory=dict)
    unreliable: dict = field(default_factory=dict)
    populations: list = field(default_factory=list)
    panel: str = ""

    def events(self, population):
        return int(self.masks[population].sum())

    def __repr__(self):
        n = len(next(iter(self.masks.values()))) if self.masks else 0
        return (f"GatingResult(panel {self.panel!r}, {n:,} events, populations {self.populations}, "
                f"{len(self.flags)} flags, device {self.device!r})")

    @property
    def qc_flags(self):
        """The flags as one-line strings (``population: message``)."""
        return [str(flag) for flag in self.flags]

    def parent_of(self, population):
        """The nearest reported population above ``population`` (``None`` at the top)."""
        node = self.parents.get(population)
        while node is not None and node not in self.populations:
            node = self.parents.get(node)
        return node


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


def _central_hessian(function, point, steps):
    """Hessian of ``function`` at ``point`` by central differences of ``steps`` (the observed information
    of a negative log-likelihood, whose inverse is the fit's covariance).

    Examples
    --------
    >>> _central_hessian(lambda p: p[0] ** 2 + 3 * p[0] * p[1], (1.0, 2.0), np.array([1e-3, 1e-3])).round(6)
    array([[2., 3.],
           [3., 0.]])
    """
    n = len(point)
    hessian = np.empty((n, n))
    for i in range(n):
        for j in range(n):
            def shifted(di, dj):
                moved = np.array(point, dtype=float)
                moved[i] += di * steps[i]
                moved[j] += dj * steps[j]
                return function(moved)
            hessian[i, j] = (shifted(1, 1) - shifted(1, -1) - shifted(-1, 1) + shifted(-1, -1)) / (4 * steps[i] * steps[j])
    return hessian


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
    hessian = _central_hessian(negative_log_likelihood, (center, log_sd), steps)
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


#: Points of the negatives' distribution and of the signal's (fixed normal
#: quantiles) on which the convolved positives are evaluated: enough for a
#: share to ~0.3 %, few enough to fit in milliseconds; deterministic.
CONVOLUTION_POINTS = 400
SIGNAL_POINTS = 64


def _even_subsample(ascending, size):
    """``size`` values of a sorted array at evenly spaced ranks (its quantiles; all of it when smaller)."""
    if ascending.size <= size:
        return ascending
    return ascending[np.round(np.linspace(0, ascending.size - 1, size)).astype(int)]


def _fit_above_cut(descending, cut, expected_negatives, negatives_variance, reference_ascending, tail_events,
                   scale, sample_replicates=1, replicates=1, fixed_log_sd=None):
    """The positives above ``cut`` and their share of all positives, the negatives above it fitted too.

    Above the counting cut lie ``A`` events: the positives' bright part and
    some negatives, ``E`` expected from the reference's tail. ``E`` rests on
    the reference's few tail events (5-7 of them: off by half or twice as
    many), and negatives the positives' shape fit took for their dim side
    would inflate the extrapolation several times over. The events above
    the cut are therefore fitted as a mixture, on the linear scale: ``N``
    negatives, whose density falls off from the cut as the reference's own
    tail does (exponentially, at the mean excess of the reference's events
    above a threshold a little below the cut: a local property, resting on
    ~3 times as many reference events as ``E``), and ``A - N`` positives,
    truncated at the cut.

    A CAR+ cell is measured with everything that spreads a negative cell's
    value - electronic noise, the spreading of other detectors' light - on
    top of its own level (CAR-reagent signal and autofluorescence): on the
    linear scale a positive level (lognormal, median ``e^mu``, log-SD
    ``sigma``) plus a draw of the negatives' deviations about their median
    (the normalised reference's). Where the negatives spread widely
    (spillover spreading) this gives the positives the long dim side that a
    Gaussian on the display scale misses. The level's median is held at or
    above the cut (a population mostly below the cut cannot be extrapolated
    from its upper part); the model's share above the cut scales ``A - N``
    to all positives, and the SDs come from the observed information (the
    likelihood's curvature) by the delta method. ``N`` is free
    but held to ``E`` by a Gaussian prior of the reference's sampling
    variance ``negatives_variance``: where the events just above the cut
    pile up as negatives do, more of them are negatives than ``E`` says.

    ``descending`` holds ``sample_replicates`` noise replicates per event,
    ``reference_ascending`` ``replicates`` per reference event (normalised
    to this tube, display scale); ``expected_negatives`` and
    ``negatives_variance`` are in the tube's own events. With
    ``fixed_log_sd`` the signal's log-SD is held at that value and only its
    median and ``N`` are fitted (a point of the shape's profile
    likelihood, see :func:`reference_subtraction_count`).

    Returns ``(share_above, centre, σ_display, positives_above, negatives,
    positives_sd, level)`` in the tube's own events, ``positives_sd`` the
    fit's SD of all positives, ``(A − N) / share`` (shape and ``N``
    together), ``level`` the fitted CAR signal: its ``median`` (linear
    units), ``log_sd`` and that log-SD's standard error ``log_sd_se`` (from
    the same curvature). The log-SD does not change with detector gain, and
    its error is what the extrapolation's error mostly follows; ``nll``
    is the negative log-likelihood at the fit (comparable between fits of
    the same tube).

    Examples
    --------
    >>> rng = np.random.default_rng(6)
    >>> reference = np.sort(rng.normal(150.0, 90.0, 7000))
    >>> negatives = rng.normal(150.0, 90.0, 20000)            # as the reference
    >>> positives = 1800.0 * np.exp(0.9 * rng.standard_normal(150)) + rng.normal(0.0, 90.0, 150)
    >>> descending = np.sort(np.concatenate([negatives, positives]))[::-1]
    >>> cut = float(reference[-7])
    >>> expected = 20000 * 7 / 7001
    >>> share, _, _, above, found, _, level = _fit_above_cut(descending, cut, expected, expected + expected ** 2 / 7,
    ...                                                      reference, 7, (lambda v: v, lambda v: v))
    >>> true_above = int((positives >= cut).sum())
    >>> bool(abs(above - true_above) < 15), bool(abs(above / share - 150) < 30)
    (True, True)
    >>> bool(abs(level["log_sd"] - 0.9) < 3 * level["log_sd_se"])
    True
    """
    from scipy.optimize import minimize
    from scipy.special import ndtr, ndtri

    forward, inverse = scale
    r = float(sample_replicates)
    bright = descending[descending >= cut]
    total = bright.size / r
    y = inverse(_even_subsample(bright[::-1], CONVOLUTION_POINTS))
    weight = bright.size / max(y.size, 1) / r
    cut_linear = float(inverse(np.array([cut]))[0])
    # The negatives' fall-off above the cut: the reference's mean excess over
    # its (3k)-th largest value, k its tail events above the counting cut.
    reference_descending = inverse(reference_ascending[::-1])
    local = min(max(3 * int(tail_events), 20 * int(replicates)), reference_descending.size)
    threshold = float(reference_descending[local - 1])
    decay = max(float(np.mean(reference_descending[:local] - threshold)), 1e-6)
    negative_density = np.exp(-(y - cut_linear) / decay) / decay
    deviations = inverse(_even_subsample(reference_ascending, CONVOLUTION_POINTS))
    deviations = deviations - float(np.median(deviations))
    difference = y[:, None] - deviations[None, :]
    inside = difference > 0
    log_difference = np.log(np.where(inside, difference, 1.0))
    headroom = cut_linear - deviations
    log_headroom = np.log(np.where(headroom > 0, headroom, 1.0))

    def share(mu, log_sd):
        z = (log_headroom - mu) / np.exp(log_sd)
        return float(np.mean(np.where(headroom > 0, 1.0 - ndtr(z), 1.0)))

    # A Gaussian prior centred on E: where the events above the cut say
    # nothing about which are negatives, the estimate is E (a Gamma prior of
    # the same variance, the tail share's own skew, has its mode below E and
    # pulls the negatives down where the data are silent).
    prior_sd = float(np.sqrt(max(negatives_variance, 1e-9)))

    def negative_log_likelihood(parameters):
        mu, log_sd, negatives = parameters
        sd = np.exp(log_sd)
        z = (log_difference - mu) / sd
        density = np.where(inside, np.exp(-0.5 * z * z - log_difference), 0.0).mean(axis=1) / (sd * np.sqrt(2 * np.pi))
        rate = negatives * negative_density + max(total - negatives, 1e-9) * density / max(share(mu, log_sd), 1e-300)
        return -weight * float(np.sum(np.log(np.maximum(rate, 1e-300)))) + \
            0.5 * ((negatives - expected_negatives) / prior_sd) ** 2

    mu_floor = float(np.log(max(cut_linear, 1e-3)))
    level = np.log(np.maximum(y - float(np.median(inverse(reference_ascending))), 1.0))
    start = [max(float(np.median(level)), mu_floor), float(np.log(np.clip(np.std(level), 0.1, 2.0))),
             float(min(expected_negatives, 0.5 * total))]
    bounds = [(mu_floor, None), (np.log(0.02), np.log(5.0)), (0.0, 0.99 * total)]
    if fixed_log_sd is None:
        fit = minimize(negative_log_likelihood, start, method="L-BFGS-B", bounds=bounds)
        mu, log_sd, negatives = (float(v) for v in fit.x)
    else:
        log_sd = float(np.log(fixed_log_sd))
        fit = minimize(lambda p: negative_log_likelihood((p[0], log_sd, p[1])), [start[0], start[2]],
                       method="L-BFGS-B", bounds=[bounds[0], bounds[2]])
        mu, negatives = (float(v) for v in fit.x)
    share_above = share(mu, log_sd)
    above = total - negatives
    steps = np.array([0.02, 0.02, max(0.05 * prior_sd, 0.05)])
    share_gradient = np.array([(share(mu + steps[0], log_sd) - share(mu - steps[0], log_sd)) / (2 * steps[0]),
                               (share(mu, log_sd + steps[1]) - share(mu, log_sd - steps[1])) / (2 * steps[1])])
    # all positives = (A − N) / share: its gradient in (μ, log σ, N)
    gradient = np.append(-above / share_above ** 2 * share_gradient, -1.0 / share_above)
    if fixed_log_sd is None:
        hessian = _central_hessian(negative_log_likelihood, (mu, log_sd, negatives), steps)
    else:   # σ known: the curvature in (μ, N) alone
        hessian = _central_hessian(lambda p: negative_log_likelihood((p[0], log_sd, p[1])), (mu, negatives),
                                   steps[[0, 2]])
        gradient = gradient[[0, 2]]
    try:
        covariance = np.linalg.inv(hessian)
        positives_var = float(gradient @ covariance @ gradient)
        # log σ's variance times σ²: the delta method for σ itself
        log_sd_var = float(covariance[1, 1]) * np.exp(2 * log_sd) if fixed_log_sd is None else float("nan")
    except np.linalg.LinAlgError:
        positives_var = log_sd_var = float("nan")
    if not np.isfinite(positives_var) or positives_var < 0:
        positives_var = (0.5 * above / share_above) ** 2   # an ill-posed fit: say so in the interval
    z = ndtri((np.arange(SIGNAL_POINTS) + 0.5) / SIGNAL_POINTS)
    modelled = (deviations[:, None] + np.exp(mu + np.exp(log_sd) * z)[None, :]).ravel()
    low, median = forward(np.quantile(modelled, [ndtr(-1.0), 0.5]))
    level = {"median": round(float(np.exp(mu)), 3), "log_sd": round(float(np.exp(log_sd)), 4),
             "log_sd_se": (round(float(np.sqrt(log_sd_var)), 4) if np.isfinite(log_sd_var) and log_sd_var >= 0
                           else None), "nll": float(fit.fun)}
    return (share_above, float(median), float(max(median - low, 1e-6)), above, negatives,
            float(np.sqrt(positives_var)), level)


#: Fewest positives above the counting cut for a shape profile (the
#: positives' fit with the log-SD held at each of a grid of values).
MIN_PROFILE_EVENTS = 5
#: The log-SDs of the CAR signal a profile is taken at: 0.3 to 2.4 (8x) in
#: steps of ~21 % (a smooth profile, interpolated between them), wider
#: than any staining a lab would accept.
SHAPE_PROFILE_LOG_SDS = tuple(round(float(v), 4) for v in np.geomspace(0.3, 2.4, 12))

#: Share of the reference above the highest counting cut, and the fewest
#: reference events it rests on (the background the LOD/LLOQ are set by).
REFERENCE_TAIL_SHARE = 0.001
MIN_REFERENCE_TAIL_EVENTS = 5


def reference_subtraction_count(values, reference, tail=REFERENCE_TAIL_SHARE,
                                min_tail_events=MIN_REFERENCE_TAIL_EVENTS, min_shape_events=30, iterations=6,
                                align=True, replicates=1, scale=None, sample_replicates=1, shape_profile=None):
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
    align : bool
        Step 1 on (``True``); ``False`` when the reference has already been
        normalised to this tube (:func:`gating.car.normalise_reference`).
    replicates : int
        ``reference`` holds this many noise replicates of each measured
        event (a normalised reference): the tail rests on
        ``min_tail_events × replicates`` values, and its own sampling noise
        on ``1/replicates`` as many independent events.
    sample_replicates : int
        ``values`` holds this many noise replicates of each event (a
        follow-up given the noise a wider reference has): counts and their
        variance are reported in the tube's own events.
    scale : (callable, callable), optional
        The display transform of ``values`` and its inverse (to linear
        units). Given, steps 2 and 3 are one fit of the events above ``c``
        (:func:`_fit_above_cut`): the negatives there (``E`` their prior,
        the reference's sampling variance its spread) and the positives as
        the reference's negatives plus a lognormal signal on the linear
        scale (the dim side that spillover spreading gives them); without
        it, ``A − E`` is extrapolated by a Gaussian on the display scale.
    shape_profile : sequence of float, optional
        With ``scale``: log-SDs of the CAR signal at which the events above
        ``c`` are fitted again with the log-SD held there (from
        :data:`MIN_PROFILE_EVENTS` positives above ``c`` up, fewer than a
        shape needs on its own). The profile lets a shape known from
        outside the tube (the same subject's earlier visits:
        :func:`cytometry.decisions.subjects.persistence`) be combined with
        this tube's evidence without its events.

    Returns
    -------
    positives : float
        Estimated positive events (≥ 0).
    info : dict
        The alignment shift, ``c``, ``A``, ``E``, the positives' centre,
        spread and share above ``c``, and ``count_sd``: the estimate's
        standard deviation beyond the Poisson noise of the positives
        themselves (negatives above ``c``, the reference's own tail, the
        extrapolation); ``upper_positive_events``: with too few positives
        to extrapolate, twice ``A − E`` (half of a population centred at
        or above ``c`` may lie below it), else the estimate;
        ``fitted_negatives_above_cut``: the negatives above ``c`` by the
        fit (``None`` without ``scale`` or a shape); ``positive_level``
        (with ``scale`` and a shape): the fitted CAR signal's ``median``
        (linear), ``log_sd`` and ``log_sd_se`` (see :func:`_fit_above_cut`);
        ``shape_profile`` (when asked for): per log-SD the ``positives``,
        their ``positives_sd`` (the fit's, in events), the positives above
        ``c`` and the negative log-likelihood (``nll``, less its minimum).

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
    base_tail_events = max(int(round(tail * reference.size)), min_tail_events * replicates)
    reference_descending = np.sort(reference)[::-1]
    probabilities = np.linspace(0.30, 0.95, 14)
    reference_quantiles = np.quantile(reference, probabilities)
    ascending = np.sort(values)
    descending = ascending[::-1]
    fraction, center, spread = 0.0, None, None

    def at_cut(tail_events, shift, fraction):
        cut = float(reference_descending[tail_events - 1]) + shift
        above = int(n - np.searchsorted(ascending, cut, side="left"))
        # A sample's share above its k-th largest value is k / (size + 1)
        # on average (order statistics), not k / size.
        expected_negatives = (1.0 - fraction) * n * tail_events / (reference.size + 1)
        excess = max(above - expected_negatives, 0.0)
        share_above, center, spread, share_sd = 1.0, None, None, 0.0
        positives = excess
        fitted_negatives, fitted_sd, level = None, None, None
        own_expected = expected_negatives / sample_replicates
        background = own_expected + own_expected ** 2 / (tail_events / replicates)
        if excess >= min_shape_events * sample_replicates and scale is not None:
            share_above, center, spread, own_above, fitted_negatives, fitted_sd, level = _fit_above_cut(
                descending, cut, own_expected, background, reference_descending[::-1] + shift, tail_events, scale,
                sample_replicates, replicates)
            excess = own_above * sample_replicates
            positives = excess / share_above
        elif excess >= min_shape_events * sample_replicates:
            share_above, center, spread, share_sd, positives = _extrapolate_positives(descending, cut, excess)
        # in the tube's own events (values may hold noise replicates)
        own_positives = positives / sample_replicates
        if fitted_sd is not None:
            # the fit's SD covers the shape and the negatives above the cut
            statistical = own_positives * (1.0 - share_above) / share_above + fitted_sd ** 2
        else:
            statistical = own_positives * (1.0 - share_above) / share_above + \
                (own_positives * share_sd / share_above) ** 2 + background / share_above ** 2
        # The positives below the cut come from a model of their shape
        # (its dim side is what spreading widens most): half of them is one
        # more SD, so that the interval reaches from none to twice as many.
        model = ((positives - excess) / 2.0 / sample_replicates) ** 2
        return dict(tail_events=tail_events, cut=cut, above=above, expected_negatives=expected_negatives,
                    excess=excess, share_above=share_above, center=center, spread=spread,
                    positives=positives, variance=statistical + model, model_variance=model,
                    fitted_negatives=fitted_negatives, level=level, own_expected=own_expected, background=background)

    for _ in range(iterations):
        shift = float(np.median(_negative_quantiles(ascending, probabilities, fraction, center, spread)
                                - reference_quantiles)) if align else 0.0
        # (Lower cuts, where the reference's tail rests on more events, were
        # tried and read worse: the reference's tail shape differs from the
        # follow-up's by more than its sampling error once a few % of the
        # negatives lie above the cut.)
        chosen = base = at_cut(base_tail_events, shift, fraction)
        positives, center, spread = chosen["positives"], chosen["center"], chosen["spread"]
        fraction = min(positives / n, 0.99)
    r = float(sample_replicates)
    positives, excess = positives / r, chosen["excess"] / r
    # Too few positives above the cut to estimate their shape: the point
    # estimate is what the data show above the negatives (never more), but
    # up to as many again may lie below the cut (a population centred at or
    # above it, the bound the shape fit also keeps): the interval says so.
    upper = positives if excess >= min_shape_events else 2.0 * excess
    info = {"reference_shift": round(shift, 6), "counting_cut": round(chosen["cut"], 6),
            "events_above_cut": round(chosen["above"] / r, 2), "upper_positive_events": round(upper, 2),
            "expected_negatives_above_cut": round(chosen["expected_negatives"] / r, 2),
            "fitted_negatives_above_cut": (round(chosen["fitted_negatives"], 2)
                                           if chosen["fitted_negatives"] is not None else None),
            "reference_tail_events": round(chosen["tail_events"] / replicates, 2),
            "reference_tail_share": round(chosen["tail_events"] / reference.size, 5),
            # the counting cut's background: what the tube's LOD/LLOQ rest on
            "limit_expected_negatives": round(base["expected_negatives"] / r, 2),
            "limit_reference_tail_events": round(base["tail_events"] / replicates, 2),
            "positive_share_above_cut": round(chosen["share_above"], 4), "positive_events": round(positives, 2),
            "count_sd": round(float(np.sqrt(chosen["variance"])), 3),
            "count_sd_extrapolation": round(float(np.sqrt(chosen["model_variance"])), 3)}
    if center is not None:
        info.update(positive_center=round(center, 6), positive_sd=round(spread, 6))
    if chosen["level"] is not None:
        info["positive_level"] = {k: v for k, v in chosen["level"].items() if k != "nll"}
    if shape_profile is not None and scale is not None and chosen["excess"] >= MIN_PROFILE_EVENTS * r:
        own_expected, background = chosen["own_expected"], chosen["background"]
        rows = []
        for log_sd in shape_profile:
            share_k, _, _, above_k, _, sd_k, level_k = _fit_above_cut(
                descending, chosen["cut"], own_expected, background, reference_descending[::-1] + shift,
                chosen["tail_events"], scale, sample_replicates, replicates, fixed_log_sd=float(log_sd))
            rows.append((float(log_sd), above_k / share_k, sd_k, above_k, level_k["nll"]))
        lowest = min(row[4] for row in rows)
        info["shape_profile"] = {"log_sd": [round(row[0], 4) for row in rows],
                                 "positives": [round(row[1], 3) for row in rows],
                                 "positives_sd": [round(row[2], 3) for row in rows],
                                 "positives_above_cut": [round(row[3], 3) for row in rows],
                                 "nll": [round(row[4] - lowest, 4) for row in rows]}
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
        from .car import cut_leaving

        positives, estimate = reference_subtraction_count(values, reference)
        threshold = cut_leaving(values, positives)
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


def auto_gate(data, channels, panel, *, params=None, device=None, tops=None):
    """Gate a transformed event matrix by a panel's gating plan.

    Parameters
    ----------
    data : ndarray, shape (n_events, n_channels)
        Compensated events; fluorescence channels logicle-transformed to the
        0–1 scale, scatter channels linear divided by their range.
    channels : dict
        Marker or scatter name → column of ``data``. Markers use the
        canonical names of the panel (``CD45``, ``CD3``, ``CD19``, ``CAR``,
        ``VIABILITY``...); scatter ``FSC-A``, ``FSC-H``, ``SSC-A``.
    panel : str or gating.panels.GatingPanel
        A panel name (``"tbnk"``, ``"car"``, or one from a panel folder) or
        a loaded panel.
    params : GatingParams, optional
    device : {"auto", "cpu", "gpu"}, optional
        Where the density kernels run.
    tops : dict, optional
        Marker → the range (``$PnR``) its logicle scale was made with
        (default 262144); the CAR step works in linear units.

    Returns
    -------
    GatingResult
        Boolean masks (NumPy) for every population of the plan; every mask
        is the evaluation of the gates in ``GatingResult.gates`` (see
        :mod:`gating.geometry`); typed flags and the unreliable populations.

    Examples
    --------
    >>> from cytometry.analysis import gate_file
    >>> gated = gate_file("sample_fcs/S01_screening_TBNK.fcs")   # read, compensated, transformed
    >>> gated.channels["CD45"], gated.data.shape[1]
    (5, 10)
    >>> result = auto_gate(gated.data, gated.channels, "tbnk")
    >>> result.events("b_cells")
    551
    """
    from .engine import run_plan
    from .panels import load_panels

    params = params or GatingParams()
    if isinstance(panel, str):
        panels = load_panels()
        if panel not in panels:
            raise ValueError(f"unknown panel {panel!r} (known: {', '.join(panels)})")
        panel = panels[panel]
    return run_plan(data, channels, panel, params, device=device, tops=tops)
