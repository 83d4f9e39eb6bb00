"""A subject's CAR signal shape, carried from earlier visits to a later one.

A CAR+ count extrapolates the positives below its counting cut from the
shape of those above it (:func:`gating.auto.reference_subtraction_count`).
The shape's log-SD is what that extrapolation's error mostly follows, and a
tube with few positives above the cut estimates it poorly or not at all.
The log-SD does not change with detector gain, and a subject's CAR+ cells
are one product stained by one reagent: the visits with many CAR+ cells
measure it well. Here each later visit's count is re-read with the log-SD
its subject's **earlier** visits measured (never later ones: a reported
visit does not change when a visit is added), combined with the visit's
own evidence through the shape profile its analysis stored.

* **Prior**: the earlier visits' fitted log-SDs pooled by inverse
  variance, with the between-visit variance of DerSimonian and Laird (a
  product whose expression drifts between visits widens the prior instead
  of being averaged away); the prior for a new visit is the pooled value ±
  ``sqrt(SE² + τ²)``.
* **Posterior**: the visit's profile likelihood over the log-SD (its
  negative log-likelihood at each profile point, interpolated) times the
  prior; the count is the posterior mean of the profile's counts and its
  SD the posterior spread plus the fit's own SD at fixed log-SD.
* **Consistency**: a visit whose own fitted log-SD differs from the prior
  by more than 3 combined SDs keeps its own count and says so.

The interval and the LLOQ decision follow the analysis' rules
(:func:`cytometry.analysis.widen_for_overlap`, a CV of at most 20 %,
the tube's LLOQ in events); only bead-counted tubes are re-read.
"""
from __future__ import annotations

import math

import numpy as np
from scipy.interpolate import PchipInterpolator

from cytometry.analysis import widen_for_overlap
from cytometry.counts import LLOQ_CV, bead_count

#: A visit's own log-SD this many combined SDs from its prior: the shape differs, the prior is not used.
SHAPE_CONSISTENCY_Z = 3.0


def pooled_shape(levels):
    """Pool fitted log-SDs (``(log_sd, se)`` pairs) into a prior for another visit.

    Returns ``None`` without a usable pair, else a dict with ``log_sd``
    (inverse-variance mean, the between-visit variance included),
    ``sd`` (the prior's SD: the mean's SE and the between-visit SD
    together), ``tau`` (between-visit SD) and ``visits``.

    Examples
    --------
    >>> p = pooled_shape([(0.90, 0.04), (0.86, 0.05), (0.88, 0.04)])
    >>> round(p["log_sd"], 3), p["tau"], p["visits"]
    (0.883, 0.0, 3)
    >>> pooled_shape([(0.7, 0.02), (1.1, 0.02)])["tau"] > 0.1      # visits that disagree widen the prior
    True
    """
    pairs = [(float(s), float(e)) for s, e in levels if s is not None and e is not None and e > 0]
    if not pairs:
        return None
    values = np.array([s for s, _ in pairs])
    weights = 1.0 / np.array([e for _, e in pairs]) ** 2
    mean = float(np.sum(weights * values) / np.sum(weights))
    tau2 = 0.0
    if len(pairs) > 1:
        q = float(np.sum(weights * (values - mean) ** 2))
        scale = float(np.sum(weights) - np.sum(weights ** 2) / np.sum(weights))
        tau2 = max(0.0, (q - (len(pairs) - 1)) / scale) if scale > 0 else 0.0
    random_weights = 1.0 / (1.0 / weights + tau2)
    mean = float(np.sum(random_weights * values) / np.sum(random_weights))
    se2 = 1.0 / float(np.sum(random_weights))
    return {"log_sd": mean, "sd": math.sqrt(se2 + tau2), "tau": math.sqrt(tau2), "visits": len(pairs)}


def count_with_shape(profile, prior_log_sd, prior_sd, grid_points=400):
    """Positives of a tube whose shape profile is combined with a prior on the log-SD.

    Parameters
    ----------
    profile : dict
        The tube's ``shape_profile`` (``log_sd``, ``positives``,
        ``positives_sd``, ``positives_above_cut``, ``nll``).
    prior_log_sd, prior_sd : float
        The prior (normal in the log-SD).

    Returns
    -------
    dict
        ``positives`` (posterior mean), ``shape_sd`` (posterior SD of the
        count over the log-SD), ``fit_sd`` (the fit's own SD at fixed
        log-SD, posterior-averaged), ``positives_above_cut`` and
        ``log_sd`` (posterior mean).

    Examples
    --------
    >>> profile = {"log_sd": [0.5, 0.7, 0.9, 1.1, 1.3], "positives": [120, 130, 150, 190, 260],
    ...            "positives_sd": [4, 5, 7, 12, 25], "positives_above_cut": [118, 120, 122, 123, 124],
    ...            "nll": [30, 8, 1, 0, 2]}
    >>> out = count_with_shape(profile, 0.9, 0.02)
    >>> 145 < out["positives"] < 155, out["shape_sd"] < 5
    (True, True)
    """
    log_sds = np.log(np.asarray(profile["log_sd"], dtype=float))
    fine = np.linspace(log_sds[0], log_sds[-1], grid_points)
    # PCHIP: no overshoot between profile points (the counts rise steeply with the log-SD)
    nll = PchipInterpolator(log_sds, np.asarray(profile["nll"], dtype=float))(fine)
    positives = PchipInterpolator(log_sds, np.asarray(profile["positives"], dtype=float))(fine)
    fit_var = PchipInterpolator(log_sds, np.asarray(profile["positives_sd"], dtype=float) ** 2)(fine)
    above = PchipInterpolator(log_sds, np.asarray(profile["positives_above_cut"], dtype=float))(fine)
    sigma = np.exp(fine)
    log_weight = -(nll - nll.min()) - 0.5 * ((sigma - prior_log_sd) / prior_sd) ** 2 + fine  # dσ = σ d(ln σ)
    weight = np.exp(log_weight - log_weight.max())
    weight /= weight.sum()
    mean = float(np.sum(weight * positives))
    return {"positives": mean, "shape_sd": float(np.sqrt(np.sum(weight * (positives - mean) ** 2))),
            "fit_sd": float(np.sqrt(np.sum(weight * np.maximum(fit_var, 0.0)))),
            "positives_above_cut": float(np.sum(weight * above)), "log_sd": float(np.sum(weight * sigma))}


def car_count_details(result):
    """The CAR gate's counting details of a result: ``(positive_level, shape_profile, normalisation SD)``."""
    gates = (result.get("gating") or {}).get("gates") or []
    extra = next((g.get("extra") or {} for g in gates if g.get("name") == "car_t"), {})
    normalisation = extra.get("normalisation") or (result.get("car_threshold") or {}).get("normalisation") or {}
    return extra.get("positive_level"), extra.get("shape_profile"), float(normalisation.get("count_sd_normalisation")
                                                                          or 0.0)


def reread_with_shape(result, entry, prior):
    """A visit's CAR+ entry re-read with its subject's earlier shape, or ``(None, why)``.

    ``entry`` is the visit's timeline entry (``cells_per_ul``, ``ci95``,
    ``below_lloq``, ``events``, ``lloq``); ``prior`` from
    :func:`pooled_shape`. Returns ``(new_entry, None)`` or ``(None, reason)``.
    """
    level, profile, normalisation_sd = car_count_details(result)
    if profile is None:
        return None, "too few CAR+ events above the cut for a shape profile"
    counting, beads = result.get("counting") or {}, result.get("beads") or {}
    if counting.get("method") != "beads" or not beads.get("events"):
        return None, "not bead-counted"
    if level is not None and level.get("log_sd_se"):
        z = (level["log_sd"] - prior["log_sd"]) / math.hypot(level["log_sd_se"], prior["sd"])
        if abs(z) > SHAPE_CONSISTENCY_Z:
            return None, (f"its own CAR signal log-SD {level['log_sd']:.2f} ± {level['log_sd_se']:.2f} differs from "
                          f"the earlier visits' {prior['log_sd']:.2f} ± {prior['sd']:.2f} (z = {z:+.1f}): own "
                          f"count kept")
    posterior = count_with_shape(profile, prior["log_sd"], prior["sd"])
    positives = posterior["positives"]
    # the same parts as the tube's own SD: the fit, the normalisation, and
    # half the positives below the cut as one more SD (the shape may differ)
    model_sd = max(positives - posterior["positives_above_cut"], 0.0) / 2.0
    gate_sd = math.sqrt(posterior["shape_sd"] ** 2 + posterior["fit_sd"] ** 2 + normalisation_sd ** 2
                        + model_sd ** 2)

    def count_for(events):
        return bead_count(int(events), int(beads["events"]), float(counting["beads_per_test"]),
                          float(counting["sample_volume_ul"]))

    events = int(round(positives))
    point = widen_for_overlap(count_for(events), gate_sd, count_for)
    lloq = float((entry.get("lloq") or {}).get("events", 25.0))
    lod = float((entry.get("lod") or {}).get("events", 3.0))
    cv = math.sqrt(positives + gate_sd ** 2) / positives if positives > 0 else float("inf")
    new = dict(entry, cells_per_ul=round(float(point.cells_per_ul), 4), events=events,
               ci95=[0.0 if positives < lod else round(float(point.ci95[0]), 4), round(float(point.ci95[1]), 4)],
               below_lloq=bool(positives < lloq or cv > LLOQ_CV))
    new["shape"] = {"log_sd": round(posterior["log_sd"], 4), "prior_log_sd": round(prior["log_sd"], 4),
                    "prior_sd": round(prior["sd"], 4), "prior_visits": prior["visits"],
                    "count_sd_events": round(gate_sd, 2), "cv": round(cv, 4)}
    return new, None
