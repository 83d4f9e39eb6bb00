"""Absolute counts (cells/µL) with exact 95% intervals.

Single-platform bead counting::

    cells/µL = (cell events / bead events) × (beads per test / sample volume µL)

Both event counts are Poisson. Conditional on their sum ``n``, the cell
events are Binomial(n, p) with ``p = λc / (λc + λb)``, so an exact interval
for ``p`` (Clopper–Pearson) maps to an exact interval for the ratio
``λc / λb = p / (1 − p)`` and, times the bead constant, for cells/µL.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial

from scipy.stats import beta, chi2

from cytometry.outputs.formatting import count_text

#: Fewer events than this and a count is "below LLOQ" (CV ≈ 1/√25 = 20%).
DEFAULT_LLOQ_EVENTS = 25
#: The CV a count may have at the LLOQ (the usual bioanalytical acceptance).
LLOQ_CV = 0.20


def clopper_pearson(successes, trials, confidence=0.95):
    """Exact (Clopper–Pearson) interval for a binomial proportion.

    Parameters
    ----------
    successes, trials : int
    confidence : float

    Returns
    -------
    (float, float)

    Examples
    --------
    >>> lo, hi = clopper_pearson(0, 10)
    >>> lo, round(hi, 4)
    (0.0, 0.3085)
    """
    if trials < 0 or successes < 0 or successes > trials:
        raise ValueError(f"need 0 <= successes <= trials, got {successes} of {trials}")
    if trials == 0:
        return 0.0, 1.0
    alpha = 1.0 - confidence
    lower = 0.0 if successes == 0 else float(beta.ppf(alpha / 2, successes, trials - successes + 1))
    upper = 1.0 if successes == trials else float(beta.ppf(1 - alpha / 2, successes + 1, trials - successes))
    return lower, upper


def poisson_ratio_interval(numerator, denominator, confidence=0.95):
    """Exact interval for the ratio of two Poisson rates from their counts.

    Parameters
    ----------
    numerator, denominator : int
        Observed counts (cells, beads). ``denominator`` must be positive.

    Returns
    -------
    (float, float)
        Interval for rate(numerator) / rate(denominator); the upper bound
        is ``inf`` only if ``denominator`` is 0, which is refused.

    Examples
    --------
    >>> lo, hi = poisson_ratio_interval(100, 1000)
    >>> round(lo, 4), round(hi, 4)
    (0.0806, 0.1229)
    """
    if denominator <= 0:
        raise ValueError("the reference count (beads) must be positive")
    lower_p, upper_p = clopper_pearson(numerator, numerator + denominator, confidence)
    lower = lower_p / (1.0 - lower_p)
    upper = upper_p / (1.0 - upper_p) if upper_p < 1.0 else float("inf")
    return lower, upper


@dataclass
class Count:
    """An absolute count of one population, always with its events and interval.

    Attributes
    ----------
    events : int
    cells_per_ul : float
    ci95 : (float, float)
    below_lloq : bool
        Fewer than ``lloq_events`` events: report as "< LLOQ" with the value.
    method : str
        ``"beads"`` for single-platform bead counting.
    rescaled : callable or None
        ``rescaled(k)`` is the count from ``k`` times the blood if the value
        holds (every Poisson count behind it times ``k``); set by the
        counting functions, ``None`` for a count made by hand.
    """

    events: int
    cells_per_ul: float
    ci95: tuple
    below_lloq: bool
    method: str = "beads"
    # A partial of a module function, not a lambda: a Count still pickles into and out of worker processes.
    rescaled: object = field(default=None, repr=False, compare=False)

    def acquired_times(self, factor):
        """The count ``factor`` times the volume acquired would give, if the value holds; ``None`` if unknown.

        Examples
        --------
        >>> bead_count(26, 4751, 50120, 50.0).acquired_times(4.0).events
        104
        """
        return None if self.rescaled is None else self.rescaled(factor)

    def as_dict(self):
        return {"events": int(self.events), "cells_per_ul": round(float(self.cells_per_ul), 4),
                "ci95": [round(float(self.ci95[0]), 4), round(float(self.ci95[1]), 4)],
                "below_lloq": bool(self.below_lloq), "method": self.method}

    def describe(self):
        """Short text for tables: ``12.3 [10.1–15.0]`` or ``< LLOQ (0.8 [0.2–2.0])``."""
        return count_text(self.as_dict())


def bead_count(cell_events, bead_events, beads_per_test, sample_volume_ul, *,
               lloq_events=DEFAULT_LLOQ_EVENTS, confidence=0.95):
    """Cells/µL by single-platform bead counting, with an exact interval.

    Parameters
    ----------
    cell_events : int
        Events of the population.
    bead_events : int
        Singlet bead events (must be > 0).
    beads_per_test : float
        Beads in the tube (lot-specific, from the label).
    sample_volume_ul : float
        µL of blood in the tube.
    lloq_events : int
        Counts from fewer events are flagged ``below_lloq``.

    Returns
    -------
    Count

    Examples
    --------
    >>> c = bead_count(120, 5000, 50000, 50.0)
    >>> c.cells_per_ul, c.below_lloq
    (24.0, False)
    """
    if bead_events <= 0:
        raise ValueError("no bead events: the count cannot be computed")
    if beads_per_test <= 0 or sample_volume_ul <= 0:
        raise ValueError("beads per test and sample volume must be positive")
    scale = beads_per_test / sample_volume_ul
    lower, upper = poisson_ratio_interval(int(cell_events), int(bead_events), confidence)
    return Count(
        events=int(cell_events),
        cells_per_ul=cell_events / bead_events * scale,
        ci95=(lower * scale, upper * scale),
        below_lloq=cell_events < lloq_events,
        method="beads",
        rescaled=partial(_bead_count_times, int(cell_events), int(bead_events), beads_per_test, sample_volume_ul,
                         lloq_events, confidence),
    )


def _bead_count_times(cell_events, bead_events, beads_per_test, sample_volume_ul, lloq_events, confidence, factor):
    """``factor`` times the blood through the same tube: cell and bead events both scale."""
    return bead_count(round(cell_events * factor), max(1, round(bead_events * factor)), beads_per_test,
                      sample_volume_ul, lloq_events=lloq_events, confidence=confidence)


#: Events at which a population is "detected" (Poisson: P(0 | 3 expected) ≈ 5%).
DEFAULT_LOD_EVENTS = 3


def poisson_interval(events, confidence=0.95):
    """Exact (Garwood) interval for a Poisson mean from an observed count.

    Examples
    --------
    >>> lo, hi = poisson_interval(0)
    >>> lo, round(hi, 3)
    (0.0, 3.689)
    """

    if events < 0:
        raise ValueError("events must be non-negative")
    alpha = 1.0 - confidence
    lower = 0.0 if events == 0 else float(chi2.ppf(alpha / 2, 2 * events) / 2)
    upper = float(chi2.ppf(1 - alpha / 2, 2 * events + 2) / 2)
    return lower, upper


def volumetric_count(cell_events, vol_nl, dilution_factor=1.0, *, lloq_events=DEFAULT_LLOQ_EVENTS,
                     confidence=0.95):
    """Cells/µL of blood from an instrument that measured the volume analysed.

    ``cells/µL = events / ($VOL nL / 1000) × dilution factor``, with an exact
    Poisson interval for the events.

    Parameters
    ----------
    cell_events : int
    vol_nl : float
        ``$VOL``: nanolitres of stained sample analysed.
    dilution_factor : float
        Stained sample volume / blood volume (e.g. (50 + 20 + 450) / 50 for a
        lyse-no-wash tube).

    Examples
    --------
    >>> c = volumetric_count(200, 100000.0, 10.4)
    >>> round(c.cells_per_ul, 2), c.method
    (20.8, 'volumetric')
    """
    if not vol_nl or vol_nl <= 0:
        raise ValueError("$VOL must be a positive number of nanolitres")
    if dilution_factor <= 0:
        raise ValueError("dilution factor must be positive")
    scale = dilution_factor / (vol_nl / 1000.0)
    lower, upper = poisson_interval(int(cell_events), confidence)
    return Count(events=int(cell_events), cells_per_ul=cell_events * scale, ci95=(lower * scale, upper * scale),
                 below_lloq=cell_events < lloq_events, method="volumetric",
                 rescaled=partial(_volumetric_count_times, int(cell_events), vol_nl, dilution_factor, lloq_events,
                                  confidence))


def _volumetric_count_times(cell_events, vol_nl, dilution_factor, lloq_events, confidence, factor):
    """``factor`` times the volume analysed: the events and ``$VOL`` both scale."""
    return volumetric_count(round(cell_events * factor), vol_nl * factor, dilution_factor, lloq_events=lloq_events,
                            confidence=confidence)


def dual_platform_count(cell_events, lymphocyte_events, lymphocytes_per_ul, *, lymphocytes_cv=None,
                        lloq_events=DEFAULT_LLOQ_EVENTS, confidence=0.95):
    """Cells/µL from the haematology analyser's lymphocyte count.

    ``cells/µL = population events / lymphocyte events × lymphocytes/µL``.
    The interval is the exact (Clopper–Pearson) interval of the proportion,
    times the lymphocyte count; when the analyser's coefficient of variation
    is known (``lymphocytes_cv``, e.g. 0.05) its uncertainty is added on the
    log scale (the two are independent), otherwise the interval treats the
    lymphocyte count as exact and the method says so.

    Examples
    --------
    >>> c = dual_platform_count(100, 2000, 1500.0)
    >>> c.cells_per_ul, c.method
    (75.0, 'dual-platform (lymphocyte count taken as exact)')
    """

    if lymphocyte_events <= 0:
        raise ValueError("no lymphocyte events: a dual-platform count is impossible")
    if lymphocytes_per_ul is None or lymphocytes_per_ul <= 0:
        raise ValueError("the lymphocytes/uL from the haematology analyser must be positive")
    proportion = cell_events / lymphocyte_events
    lower_p, upper_p = clopper_pearson(int(cell_events), int(lymphocyte_events), confidence)
    lower, upper = lower_p * lymphocytes_per_ul, upper_p * lymphocytes_per_ul
    method = "dual-platform (lymphocyte count taken as exact)"
    if lymphocytes_cv:
        # Independent relative errors combine on the log scale.
        z = 1.959963984540054
        widen = math.exp(z * lymphocytes_cv)
        lower, upper = lower / widen, upper * widen
        method = f"dual-platform (lymphocyte count CV {lymphocytes_cv:g} included)"
    return Count(events=int(cell_events), cells_per_ul=proportion * lymphocytes_per_ul, ci95=(lower, upper),
                 below_lloq=cell_events < lloq_events, method=method,
                 rescaled=partial(_dual_platform_count_times, int(cell_events), int(lymphocyte_events),
                                  lymphocytes_per_ul, lymphocytes_cv, lloq_events, confidence))


def _dual_platform_count_times(cell_events, lymphocyte_events, lymphocytes_per_ul, lymphocytes_cv, lloq_events,
                               confidence, factor):
    """``factor`` times the events acquired; the analyser's own uncertainty does not shrink with them."""
    return dual_platform_count(round(cell_events * factor), max(1, round(lymphocyte_events * factor)),
                               lymphocytes_per_ul, lymphocytes_cv=lymphocytes_cv, lloq_events=lloq_events,
                               confidence=confidence)


def detection_limits(background_events=0.0, background_variance=None, *, lod_events=DEFAULT_LOD_EVENTS,
                     lloq_events=DEFAULT_LLOQ_EVENTS, lloq_cv=LLOQ_CV):
    """A tube's limits of detection and quantification, in events.

    Where a population is counted net of a background (CAR+ events above a
    cut that some negatives also pass), the limits rise with that
    background's noise:

    * **LOD** (Currie): the net count detected with 95 % power when the
      decision level leaves 5 % false detections,
      ``L_D = 2.71 + 3.29·σ₀``, σ₀² the variance of the net count when
      nothing is there (the background's Poisson noise plus the error of
      its estimate from the reference).
    * **LLOQ**: the smallest net count whose CV is at most ``lloq_cv``
      (20 %, the usual bioanalytical acceptance at the LLOQ): the root of
      ``lloq_cv²·P² = P + σ₀²``. Without background this is 1/CV² = 25
      events.

    Neither falls below the configured floors ``lod_events`` and
    ``lloq_events``.

    Parameters
    ----------
    background_events : float
        Expected negatives above the cut.
    background_variance : float, optional
        σ₀²; default ``background_events`` (a known background).
    lod_events, lloq_events : int
        Floors (the options').
    lloq_cv : float

    Returns
    -------
    (float, float)
        LOD and LLOQ in events.

    Examples
    --------
    >>> detection_limits()             # no background: the floors
    (3, 25)
    >>> lod, lloq = detection_limits(5.2, 5.2 + 5.2 ** 2 / 5)   # 0.1 % of 5,200 T cells, a 5-event reference tail
    >>> round(lod, 1), round(lloq, 1)
    (13.4, 33.0)
    """

    variance = background_events if background_variance is None else background_variance
    if variance <= 0:
        return lod_events, lloq_events
    lod = 2.71 + 3.29 * math.sqrt(variance)
    lloq = (1.0 + math.sqrt(1.0 + 4.0 * lloq_cv ** 2 * variance)) / (2.0 * lloq_cv ** 2)
    return max(lod, lod_events), max(lloq, lloq_events, lod)
