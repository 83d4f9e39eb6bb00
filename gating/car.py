"""CAR+ T cells counted against the subject's pre-infusion tube, normalised to the follow-up tube first.

The pre-infusion tube's T cells are the CAR-negative reference: their
CAR-reagent values describe how far negatives reach into the positive
range. Months later the follow-up tube may be acquired at another detector
setting, and a reference used as acquired then reads a wider (or narrower)
negative tail as CAR+ cells (or misses them). Before counting, the
reference is therefore **normalised to the follow-up tube** in linear,
compensated units:

1. **Gain ratio, from two anchors.**
   *Beads* — the counting beads are in every tube and are a fluorescence
   standard: the ratio of their median in the CAR channel between the two
   tubes is the gain ratio. Unusable when either tube has too few beads or
   the beads sit at the top of the channel's range (saturated).
   *CAR-negative T cells* — the ratio of the negatives' medians (the
   follow-up's positives taken out). Unusable when the negatives sit so
   close to zero (within one spread of it) that their level says more about
   noise and offsets than about gain.
2. **Map**: the reference's events become ``a·(x − m_ref) + m_follow``, ``a``
   the gain ratio (beads first), ``m`` the negatives' medians: the
   negatives' centre is taken from the follow-up tube itself (activation,
   offsets), their spread from the gain.
3. **Noise that does not scale with gain.** Electronic noise is the same at
   any gain, so a reference scaled down by ``a < 1`` is narrower than the
   follow-up's negatives really are — and a too-narrow reference reads
   negatives as CAR+ (false persistence). The follow-up negatives' lower
   flank (free of CAR+ cells) measures their real spread; where it is wider
   than the mapped reference's by more than sampling noise, Gaussian noise
   making up the difference is added (stratified normal values, so the
   result is deterministic). A mapped reference that is *wider* than the
   follow-up's negatives (a reference acquired at a lower gain: its
   electronic noise scaled up with it) over-states the negatives above any
   cut and under-counts; noise cannot be taken out of its events, so the
   follow-up tube's events are given the Gaussian noise they lack instead
   (``sample_noise_sd``), and the count stays in the tube's own events.
4. **Uncertainty.** Where both anchors are usable the count is also made
   with the other anchor's ratio; half the difference is added to the
   count's standard deviation, and a difference beyond the count's own
   noise is flagged. Where neither is usable the ratio is the one that
   matches the negatives' spreads, the count is also made with the
   reference as acquired, and the interval covers both (flagged).

The counting itself is :func:`gating.auto.reference_subtraction_count`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.special import ndtr, ndtri

from gpu.logicle import logicle, logicle_inverse

from .engine import LOWER_FLANK_QUANTILE

#: Share of a normal population below its mean − 1 SD: the lower flank's quantile.
LOWER_FLANK = LOWER_FLANK_QUANTILE
#: ... and below its mean − 2 SD: where the lower tail's weight is read.
DEEP_TAIL = float(ndtr(-2.0))
#: The asymptotic SD of (median − 15.9th percentile) of n normal values is
#: about 1.49 σ/√n (quantile variances and covariance), so relative 1.49/√n.
FLANK_SPREAD_SE = 1.49
#: The asymptotic SD of a normal sample's 2.3 % quantile is about 2.76 σ/√n
#: (√(p(1 − p)) / φ(2)).
DEEP_TAIL_SE = 2.76
#: Noise replicates per event when noise is added (stratified normal values,
#: :func:`normal_replicates`: enough that the tail is smooth, deterministic).
NOISE_REPLICATES = 8
#: Fewest beads whose median can serve as a fluorescence standard (their
#: median's relative error is then below ~1.3 CV/√25, a fraction of a per cent).
MIN_ANCHOR_BEADS = 25
#: A bead population with more than this share of events in the top 10 % of
#: the channel's range is at the detector's ceiling: its median is not a gain.
SATURATED_SHARE = 0.01


def normal_replicates(n, replicates=NOISE_REPLICATES):
    """``n`` rows of ``replicates`` standard normal values: stratified, deterministic, with full tails.

    Row ``i`` holds the normal quantiles at ``(j + u_i) / replicates``,
    ``u_i`` the golden-ratio sequence: each row covers every stratum once,
    and across rows the strata are filled evenly out to the extreme tails
    (fixed mid-stratum quantiles would stop at ±1.5 SD with 8 replicates,
    and noise without tails under-states the negatives above a cut).

    Examples
    --------
    >>> z = normal_replicates(5000)
    >>> z.shape, bool(abs(z.std() - 1) < 0.01), bool(z.max() > 3.5)
    ((5000, 8), True, True)
    """
    offsets = np.modf((np.arange(n) + 1) * 0.6180339887498949)[0]
    return ndtri((np.arange(replicates)[None, :] + offsets[:, None]) / replicates)


def _median_and_flank(values):
    """Median and lower-flank spread (median − 15.9th percentile) of linear values."""
    low, median = np.quantile(values, [LOWER_FLANK, 0.5])
    return float(median), float(max(median - low, 1e-9))


@dataclass
class BeadLevel:
    """The counting beads' level in one channel of one tube (linear, compensated)."""

    median: float
    robust_cv: float
    events: int
    saturated: bool

    @classmethod
    def of(cls, values, top):
        """Bead level of bead events ``values`` (linear) in a channel whose range is ``top``.

        Examples
        --------
        >>> rng = np.random.default_rng(0)
        >>> level = BeadLevel.of(rng.normal(90000, 3600, 800), 262144)
        >>> round(level.median, -3), level.saturated
        (90000.0, False)
        """
        values = np.asarray(values, dtype=np.float64)
        if values.size == 0:
            return cls(float("nan"), float("nan"), 0, False)
        q16, median, q84 = np.quantile(values, [LOWER_FLANK, 0.5, 1 - LOWER_FLANK])
        cv = float((q84 - q16) / 2 / median) if median > 0 else float("inf")
        saturated = bool(np.mean(values >= 0.9 * top) > SATURATED_SHARE)
        return cls(float(median), cv, int(values.size), saturated)

    def problem(self):
        """Why this level cannot serve as a gain standard (``None`` when it can)."""
        if self.events < MIN_ANCHOR_BEADS:
            return f"{self.events} beads < {MIN_ANCHOR_BEADS}"
        if self.saturated:
            return "beads at the top of the channel's range (saturated)"
        if not self.median > 0:
            return "bead median not above zero"
        return None

    def as_dict(self):
        return {"median": round(self.median, 2), "robust_cv": round(self.robust_cv, 4), "events": self.events,
                "saturated": self.saturated}


@dataclass
class CarReference:
    """A CAR-negative reference: a pre-infusion tube's T cells and beads in the CAR channel.

    Attributes
    ----------
    t_cells : ndarray
        The reference T cells' CAR-reagent values, compensated, **linear**
        (not transformed: the follow-up tube's scale is applied after
        normalisation).
    beads : BeadLevel or None
        The reference tube's counting beads in the CAR channel.
    source : str
        Where the reference came from (file name), recorded with the gate.

    Examples
    --------
    >>> rng = np.random.default_rng(1)
    >>> reference = CarReference(rng.normal(160, 70, 3000), BeadLevel.of(rng.normal(9e4, 3e3, 500), 262144),
    ...                          "pre-infusion tube S01_day000_CAR.fcs")
    >>> reference.describe()["t_cells"]
    3000
    """

    t_cells: np.ndarray
    beads: BeadLevel | None = None
    source: str = ""
    negatives: tuple = field(init=False, repr=False)

    def __post_init__(self):
        self.t_cells = np.asarray(self.t_cells, dtype=np.float64)
        self.negatives = _median_and_flank(self.t_cells) if self.t_cells.size else (float("nan"), float("nan"))

    def __len__(self):
        return int(self.t_cells.size)

    def describe(self):
        """A short summary for the recorded parameters (not the events themselves)."""
        return {"t_cells": len(self), "source": self.source,
                "beads": self.beads.as_dict() if self.beads is not None else None,
                "negative_median": round(self.negatives[0], 3), "negative_flank_sd": round(self.negatives[1], 3)}

    def __repr__(self):
        beads = f", beads median {self.beads.median:.0f}" if self.beads is not None else ""
        return f"CarReference({len(self)} T cells{beads}, source={self.source!r})"


def _negatives_of(ascending, fraction, center, spread, top):
    """Median and lower-flank spread (linear) of the negatives among the follow-up T cells.

    ``ascending`` are the T cells' logicle values; the positives' share
    (``fraction``, a Gaussian of ``center``/``spread`` on the same scale)
    is taken out of their CDF before the quantiles are read.
    """
    from .auto import _negative_quantiles

    quantiles = _negative_quantiles(ascending, np.array([DEEP_TAIL, LOWER_FLANK, 0.5]), fraction, center, spread)
    deep, low, median = (float(v) for v in logicle_inverse(quantiles, t=top))
    return median, max(median - low, 1e-9), max(median - deep, 1e-9)


def normalise_reference(reference, ratio, negatives, negative_events, top, stretch=None):
    """The reference mapped onto the follow-up tube, on its logicle scale.

    The reference's events become ``m + λ·a·(x − m_ref) + σ·z``: ``a`` the
    gain ratio, ``m`` the follow-up negatives' median. Where the
    follow-up's negatives are wider (their lower flank, free of CAR+ cells)
    than ``a`` alone makes the reference, the difference is made up by
    Gaussian noise ``σ`` (electronic noise, which does not scale with gain)
    and a stretch ``λ ≥ 1`` (spreading from other detectors whose gains
    changed differently, heavier-tailed than Gaussian): of the pairs that
    match the lower flank, the one that also matches the lower tail (the
    2.3 % quantile) is used. Both are read on the lower side, where no
    CAR+ cell is, and applied to both sides; the noise is solved for
    numerically (the flank of a sum of non-Gaussian parts is not their
    quadrature sum). Where the mapped reference is instead wider than the
    follow-up's negatives by more than sampling noise, it is returned as
    mapped and ``sample_noise_sd`` says how much Gaussian noise the
    follow-up's events need to match it (added by
    :func:`count_against_reference`).

    Parameters
    ----------
    reference : CarReference
    ratio : float
        Gain ratio follow-up / reference.
    negatives : tuple of float
        The follow-up negatives' median, lower-flank spread (median − 15.9th
        percentile) and, optionally, lower-tail spread (median − 2.3th
        percentile), linear.
    negative_events : float
        How many negatives those were measured on.
    top : float
        The follow-up CAR channel's range (``$PnR``).
    stretch : float, optional
        Use this λ (where noise is made up) instead of choosing it.

    Returns
    -------
    values : ndarray
        Normalised reference (logicle scale), ``replicates`` values per event.
    info : dict
        ``added_noise_sd`` (linear units, 0 when none), ``sample_noise_sd``
        (noise for the follow-up's events, linear units, 0 when none), ``stretch`` (λ used),
        ``best_stretch`` (the λ matching the lower tail best, used only when
        its match is significantly better than λ = 1) and ``replicates``.

    Examples
    --------
    >>> rng = np.random.default_rng(2)
    >>> reference = CarReference(160 * rng.lognormal(0, 0.35, 4000) + rng.normal(0, 65, 4000))
    >>> follow_up = 80 * rng.lognormal(0, 0.35, 4000) + rng.normal(0, 65, 4000)   # half the gain
    >>> _, info = normalise_reference(reference, 0.5, _median_and_flank(follow_up), 4000, 262144)
    >>> info["replicates"], bool(40 < info["added_noise_sd"] < 80)   # the electronic noise, ~65 x sqrt(1 - 0.25)
    (8, True)
    """
    reference_median, reference_flank = reference.negatives
    median, flank = negatives[0], negatives[1]
    deep = negatives[2] if len(negatives) > 2 else None
    deviations = ratio * (reference.t_cells - reference_median)
    mapped_flank = ratio * reference_flank
    tolerance = FLANK_SPREAD_SE * np.sqrt(1.0 / max(negative_events, 1.0) + 1.0 / max(len(reference), 1))
    info = {"added_noise_sd": 0.0, "stretch": 1.0, "best_stretch": 1.0, "replicates": 1, "sample_noise_sd": 0.0}
    if flank < mapped_flank * (1.0 - 2.0 * tolerance):
        # Wider than the follow-up's negatives beyond sampling noise: the
        # reference's electronic noise scaled up with a > 1 (or more
        # spreading from detectors whose gains changed otherwise). Noise
        # cannot be taken out of the reference's events, so the follow-up
        # tube is given the noise it lacks instead (Gaussian, its lower
        # flank matched to the mapped reference's): negatives and
        # reference then agree, and the positives' dimmer side that the
        # noise pushes below the cut is what the extrapolation models
        # (count_against_reference).
        info["sample_noise_sd"] = round(float(np.sqrt(mapped_flank ** 2 - flank ** 2)), 3)
        return logicle(deviations + median, t=top), info
    if not flank > mapped_flank * (1.0 + 2.0 * tolerance):
        return logicle(deviations + median, t=top), info
    z = normal_replicates(deviations.size)
    # The noise is solved for on a subsample (the deviations' quantiles):
    # the flank of a sum is not the quadrature sum of flanks when the
    # negatives are not Gaussian.
    picked = np.round(np.linspace(0, deviations.size - 1, min(deviations.size, 1000))).astype(int)
    order = np.argsort(deviations)
    sample, sample_z = deviations[order][picked], z[order][picked]

    def noise_for(stretch):
        low, high = 0.0, float(flank)
        for _ in range(30):
            middle = 0.5 * (low + high)
            trial = (stretch * sample[:, None] + middle * sample_z).ravel()
            q16, q50 = np.quantile(trial, [LOWER_FLANK, 0.5])
            if q50 - q16 < flank:
                low = middle
            else:
                high = middle
        return 0.5 * (low + high)

    def made_up(stretch):
        noise = noise_for(stretch)
        candidate = (stretch * deviations[:, None] + noise * z).ravel()
        mismatch = 0.0 if deep is None else abs(-float(np.quantile(candidate, DEEP_TAIL)) - deep)
        return mismatch, float(stretch), noise, candidate

    # Gaussian noise alone is what a gain change does (electronic noise is
    # the same at any gain); a stretch only where the lower tail says so
    # beyond its sampling error (a 2.3 % quantile's SD is ~2.76 σ/√n). The
    # best-matching stretch is reported either way, so that its effect on
    # the count can widen the interval (count_against_reference).
    plain = made_up(1.0)
    best = plain
    if deep is not None:
        for candidate_stretch in np.linspace(1.0, flank / mapped_flank, 11)[1:]:
            candidate = made_up(candidate_stretch)
            if candidate[0] < best[0]:
                best = candidate
    deep_se = DEEP_TAIL_SE * np.sqrt(flank ** 2 / max(negative_events, 1.0) + mapped_flank ** 2 / max(len(reference), 1))
    info["best_stretch"] = round(best[1], 4)
    if stretch is not None:
        chosen = made_up(float(stretch))
    else:
        chosen = best if plain[0] > 2.0 * deep_se else plain
    _, used, noise, candidate = chosen
    info.update(added_noise_sd=round(noise, 3), stretch=round(float(used), 4), replicates=NOISE_REPLICATES)
    return logicle(candidate + median, t=top), info


def _count(values, reference, ratio, negatives, negative_events, top, stretch=None, shape_profile=None):
    """CAR+ events of ``values`` against ``reference`` normalised with gain ``ratio`` (and the details)."""
    from .auto import reference_subtraction_count

    normalised, info = normalise_reference(reference, ratio, negatives, negative_events, top, stretch=stretch)
    scale = (lambda v: logicle(np.asarray(v, dtype=np.float64), t=top),
             lambda v: logicle_inverse(np.asarray(v, dtype=np.float64), t=top))
    sample_replicates = 1
    if info["sample_noise_sd"] > 0:
        # The follow-up given the noise the wider reference has (fixed
        # normal quantiles: deterministic); counts stay in its own events.
        values = np.asarray(values, dtype=np.float64)
        values = logicle((logicle_inverse(values, t=top)[:, None]
                          + info["sample_noise_sd"] * normal_replicates(values.size)).ravel(), t=top)
        sample_replicates = NOISE_REPLICATES
    positives, estimate = reference_subtraction_count(values, normalised, align=False, iterations=2,
                                                      replicates=info["replicates"], scale=scale,
                                                      sample_replicates=sample_replicates,
                                                      shape_profile=shape_profile)
    estimate.update(info)
    return positives, estimate


def count_against_reference(values, reference, bead_values, top, iterations=4, shape_profile=True):
    """CAR+ events among the follow-up T cells, the reference first normalised to this tube.

    Parameters
    ----------
    values : ndarray
        The follow-up tube's T cells' CAR values (logicle scale of this tube).
    reference : CarReference
    bead_values : ndarray or None
        The follow-up tube's counting beads' CAR values (logicle scale).
    top : float
        The follow-up CAR channel's range (``$PnR``), for the scale.
    iterations : int
        Rounds of (negatives' centre and spread → count → positives' share).
    shape_profile : bool
        Also fit the positives at each log-SD of
        :data:`gating.auto.SHAPE_PROFILE_LOG_SDS` (``info["shape_profile"]``,
        what :func:`cytometry.decisions.subjects.persistence` combines with a
        subject's earlier visits; about 0.1–0.5 s).

    Returns
    -------
    positives : float
    info : dict
        The counting details of :func:`gating.auto.reference_subtraction_count`
        and ``normalisation``: the gain ratio used and its ``source``, both
        anchors' ratios (or why one was unusable), the noise added, the
        counts with the alternatives and ``count_sd`` including what the
        normalisation's uncertainty does to the count (its share beyond the
        count's own, ``normalisation["count_sd_normalisation"]``),
        ``shape_profile`` (:data:`gating.auto.SHAPE_PROFILE_LOG_SDS`, where
        enough positives lie above the cut); ``flags``: (code, message)
        pairs for the gate.

    Examples
    --------
    >>> rng = np.random.default_rng(3)
    >>> pre = 160 * rng.lognormal(0, 0.35, 5000) + rng.normal(0, 65, 5000)
    >>> beads = lambda gain, n: logicle(rng.normal(9e4 * gain, 3e3 * gain, n))
    >>> reference = CarReference(pre, BeadLevel.of(logicle_inverse(beads(1.0, 600)), 262144))
    >>> gain = 0.5      # the follow-up acquired at half the reference's gain, no CAR+ cells
    >>> follow_up = logicle(gain * 160 * rng.lognormal(0, 0.35, 5000) + rng.normal(0, 65, 5000))
    >>> positives, info = count_against_reference(follow_up, reference, beads(gain, 600), 262144)
    >>> info["normalisation"]["source"], round(info["normalisation"]["gain_ratio"], 2), positives < 13
    ('beads', 0.5, True)
    """
    values = np.asarray(values, dtype=np.float64)
    ascending = np.sort(values)
    n = values.size
    normalisation, flags = {}, []
    bead_ratio = None
    if reference.beads is None:
        normalisation["bead_problem"] = "the reference's beads were not recorded"
    else:
        here = BeadLevel.of(logicle_inverse(np.asarray(bead_values, dtype=np.float64), t=top), top) \
            if bead_values is not None else BeadLevel(float("nan"), float("nan"), 0, False)
        problem = reference.beads.problem() or here.problem()
        normalisation.update(reference_beads=reference.beads.as_dict(), follow_up_beads=here.as_dict())
        if problem is None:
            bead_ratio = here.median / reference.beads.median
            normalisation["bead_ratio"] = round(bead_ratio, 4)
        else:
            normalisation["bead_problem"] = problem
    reference_median, reference_flank = reference.negatives
    fraction, center, spread = 0.0, None, None
    from .auto import SHAPE_PROFILE_LOG_SDS

    for round_ in range(iterations):
        negatives = _negatives_of(ascending, fraction, center, spread, top)
        negative_events = n * (1.0 - fraction)
        negative_ratio = None
        if reference_median > reference_flank and negatives[0] > 0:
            negative_ratio = negatives[0] / reference_median
        if bead_ratio is not None:
            ratio, source = bead_ratio, "beads"
        elif negative_ratio is not None:
            ratio, source = negative_ratio, "CAR-negative T cells"
        else:
            ratio, source = negatives[1] / reference_flank, "negatives' spread (no anchor usable)"
        # the shape's profile once, with the count reported
        profile = SHAPE_PROFILE_LOG_SDS if shape_profile and round_ == iterations - 1 else None
        positives, estimate = _count(values, reference, ratio, negatives, negative_events, top,
                                     shape_profile=profile)
        fraction = min(positives / n, 0.99)
        center, spread = estimate.get("positive_center"), estimate.get("positive_sd")
    normalisation.update(gain_ratio=round(ratio, 4), source=source, added_noise_sd=estimate["added_noise_sd"],
                         stretch=estimate["stretch"],
                         follow_up_negative_median=round(negatives[0], 3),
                         follow_up_negative_flank_sd=round(negatives[1], 3),
                         reference_negative_median=round(reference_median, 3),
                         reference_negative_flank_sd=round(reference_flank, 3))
    if negative_ratio is not None:
        normalisation["negative_ratio"] = round(negative_ratio, 4)
    else:
        normalisation["negative_problem"] = ("the CAR-negative T cells sit within one spread of zero: their "
                                             "level does not measure a gain")
    alternatives = {}
    if bead_ratio is not None and negative_ratio is not None:
        alternatives["CAR-negative T cells"] = negative_ratio
    elif bead_ratio is None and negative_ratio is None:
        alternatives["reference as acquired"] = 1.0
    count_sd = float(estimate["count_sd"])
    if alternatives:
        (name, alternative), = alternatives.items()
        other, _ = _count(values, reference, alternative, negatives, negative_events, top)
        difference = abs(other - positives)
        normalisation["alternative"] = {"source": name, "gain_ratio": round(alternative, 4),
                                        "positive_events": round(other, 2)}
        own_noise = np.sqrt(max(positives, 1.0) + count_sd ** 2)
        # Half the difference as one more SD: the 95 % interval then reaches
        # about as far as the other count.
        count_sd = float(np.sqrt(count_sd ** 2 + (difference / 2.0) ** 2))
        if bead_ratio is None:
            flags.append(("reference_not_normalised",
                          f"neither beads ({normalisation['bead_problem']}) nor the CAR-negative T cells can "
                          f"give the gain between the pre-infusion reference and this tube; the spreads' ratio "
                          f"({ratio:.2f}x) was used and the interval widened to cover the reference as acquired "
                          f"({positives:.0f} vs {other:.0f} events)"))
        elif difference > 1.96 * own_noise:
            flags.append(("reference_anchors_disagree",
                          f"beads give a gain ratio of {bead_ratio:.2f}x to the pre-infusion reference, the "
                          f"CAR-negative T cells {negative_ratio:.2f}x; CAR+ {positives:.0f} vs {other:.0f} "
                          f"events, interval widened to cover both"))
    if estimate["best_stretch"] != estimate["stretch"]:
        # The lower tail favours another stretch (not significantly, or
        # significantly over none): the count with it is the other
        # candidate, and half the difference one more SD.
        other_stretch = estimate["best_stretch"] if estimate["stretch"] == 1.0 else 1.0
        other, _ = _count(values, reference, ratio, negatives, negative_events, top, stretch=other_stretch)
        normalisation["alternative_stretch"] = {"stretch": other_stretch, "positive_events": round(other, 2)}
        count_sd = float(np.sqrt(count_sd ** 2 + ((other - positives) / 2.0) ** 2))
    normalisation["count_sd_normalisation"] = round(float(np.sqrt(max(count_sd ** 2 - estimate["count_sd"] ** 2,
                                                                       0.0))), 3)
    estimate["count_sd"] = round(count_sd, 3)
    estimate["reference_events"] = len(reference)
    estimate["normalisation"] = normalisation
    estimate["flags"] = flags
    return positives, estimate


def cut_leaving(values, positives):
    """A cut with exactly ``round(positives)`` of ``values`` at or above it.

    Midway between the last event in and the first one out, so that a
    reviewer's software, recomputing the transform to within 1e-7, gates
    the same events.

    Examples
    --------
    >>> cut_leaving(np.array([0.1, 0.2, 0.3, 0.4]), 2.2)
    0.25
    """
    n_positive = int(round(positives))
    ordered = np.sort(np.asarray(values, dtype=np.float64))
    if n_positive <= 0:
        return float(ordered[-1]) + 1e-4
    if n_positive >= ordered.size:
        return float(ordered[0]) - 1e-4
    return 0.5 * float(ordered[ordered.size - n_positive] + ordered[ordered.size - n_positive - 1])

