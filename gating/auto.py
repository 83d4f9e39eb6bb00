"""Automatic gating of TBNK and CAR tubes.

The strategy, each step data-driven (no fixed channel values)::

    beads (bright in every fluorescence channel) ─┬─ singlet beads (FSC-A/FSC-H)
    other events ─ singlets ─ CD45+ leukocytes (valley against debris)
                 ─ live (viability dye, when the tube has one)
                 ─ lymphocytes / monocytes / granulocytes (mixture on CD45 × log SSC)
    lymphocytes ─ T (CD3+, valley) ─ CD4 / CD8 ─ CAR+ (negative mode of the same sample)
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

from dataclasses import asdict, dataclass, field

import numpy as np

from gpu import fit_gaussian_mixture, get_array_module, histogram_2d, to_numpy
from gpu.density import find_peaks_1d, gaussian_smooth_1d, histogram_1d, robust_location_scale, valley_between


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
    mixture_bins : int
        The lymphocyte/monocyte/granulocyte mixture is fitted on a
        ``mixture_bins``² histogram of CD45 × log SSC.
    min_peak_events : float
        On log densities, a mode must reach this many events per bin
        (after smoothing) to count as a population.
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
    min_peak_events: float = 3.0
    mixture_bins: int = 128
    bead_gap_depth: float = 0.8
    bead_scatter_sd: float = 5.0
    seed: int = 0

    def as_dict(self):
        return asdict(self)


@dataclass
class Gate:
    """One gate as applied: what it cut, where, and how the cut was found.

    Attributes
    ----------
    population : str
        The population it defines (or ``"<population>:<marker>"`` for a cut
        that feeds several populations).
    parent : str
    channel : str
        Marker or scatter name the cut is on.
    kind : str
        ``"above"``/``"below"`` a threshold, ``"mixture"`` component, ``"ratio"``.
    threshold : float or None
        On the transformed (logicle 0–1) scale.
    method : str
        How the threshold was found (``valley``, ``negative reference``…).
    """

    population: str
    parent: str
    channel: str
    kind: str
    threshold: float | None
    method: str
    extra: dict = field(default_factory=dict)

    def as_dict(self):
        out = asdict(self)
        if out["threshold"] is not None:
            out["threshold"] = round(float(out["threshold"]), 6)
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


def _density(values, params, log_counts=False):
    """Smoothed histogram of ``values`` over their 0.05–99.95 percentile range.

    The range ignores the few extreme events (compensated outliers far below
    zero) that would otherwise squeeze every population into a few bins.
    """
    values = np.asarray(values, dtype=np.float64)
    lo, hi = (float(v) for v in np.percentile(values, [0.05, 99.95]))
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
    return smoothed, centers


def _real_peaks(density, params, prominence, log_counts):
    """Peaks of a smoothed density that hold real events.

    On a log density a bump made by two stray events can look as prominent
    as a population; such bumps are dropped by requiring a smoothed height
    of at least ``min_peak_events`` events per bin.
    """
    peaks = find_peaks_1d(density, prominence)
    if not log_counts:
        return peaks
    linear = np.expm1(density)
    return [p for p in peaks if linear[p] >= params.min_peak_events]


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
    density, centers = _density(values, params, log_counts=log_counts)
    peaks = _real_peaks(density, params, params.min_prominence, log_counts)
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


def _upper_spread(density, centers, mode_index):
    """SD of the mode's right flank: where the density falls to e^(-1/2) of the mode.

    For a Gaussian that point is one SD from the mode. Only the flank next to
    the mode is used, so a positive population further right (as long as it
    is not larger than the negatives at one SD) does not inflate it.
    """
    height = density[mode_index]
    level = height * np.exp(-0.5)
    right = mode_index
    while right < len(density) - 1 and density[right] > level:
        right += 1
    spread = centers[right] - centers[mode_index]
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


def _singlet_mask(log_ratio, group, params):
    """Singlets within ``group``: log(FSC-A/FSC-H) not above median + k·SD of the group."""
    mask = np.zeros_like(group)
    if group.sum() < 5:
        return mask | group, None
    center, scale = robust_location_scale(log_ratio[group])
    cut = center + params.singlet_sd * max(scale, 1e-3)
    mask[group] = log_ratio[group] <= cut
    return mask, cut


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
        ``car_t``.

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
    gates, flags = [], []
    masks = {}
    fluorescence = [c for name, c in channels.items() if name not in ("FSC-A", "FSC-H", "SSC-A", "Time")]

    # Beads: bright in every fluorescence channel, so the dimmest channel of an
    # event separates them from cells (no cell is positive for all markers).
    bead_score = data[:, fluorescence].min(axis=1)
    density, centers = _density(bead_score, params, log_counts=True)
    # On log density a few hundred beads stand out beside 10^5 cells. Cells
    # (and debris) are the lowest mode; beads sit across a nearly empty gap
    # above them. The deepest point between the lowest and the brightest mode
    # is that gap; modes among cells are separated by shallow dips only, so a
    # tube without beads finds no deep gap and reports none. Bead doublets,
    # brighter still, stay in the region and go at the singlet gate.
    peaks = _real_peaks(density, params, 0.2, log_counts=True)
    bead_region = np.zeros(n, dtype=bool)
    bead_threshold = None
    if len(peaks) >= 2:
        valley = valley_between(density, peaks[0], peaks[-1])
        depth = 1.0 - density[valley] / max(min(density[peaks[0]], density[peaks[-1]]), 1e-12)
        if depth >= params.bead_gap_depth:
            bead_threshold = float(centers[valley])
            bead_region = bead_score > bead_threshold
    gates.append(Gate("bead_region", "all", "min(fluorescence)", "above", bead_threshold,
                      "valley between the cells' mode and the bright mode of the dimmest channel"
                      if bead_threshold is not None else "no bead mode found"))
    if bead_threshold is None:
        flags.append("beads: no bead population found")

    # Singlets by FSC-A/FSC-H, estimated separately for beads and for the rest.
    # Beads have a tight, low scatter; an event bright in every channel but
    # with a cell's scatter is a bead stuck to a cell, not a bead.
    bright_in_all = bead_region.copy()
    if bead_region.sum() >= 5:
        for key in ("FSC-A", "SSC-A"):
            if key in channels:
                log_scatter = np.log(np.clip(data[:, channels[key]], 1e-6, None))
                center, scale = robust_location_scale(log_scatter[bead_region])
                bead_region &= np.abs(log_scatter - center) <= params.bead_scatter_sd * max(scale, 1e-3)
        gates.append(Gate("bead_region", "bead_region", "log FSC-A, log SSC-A", "within", None,
                          "median ± k·robust SD of the bright events' scatter",
                          {"k": params.bead_scatter_sd}))

    if "FSC-A" in channels and "FSC-H" in channels:
        fsc_a = np.clip(data[:, channels["FSC-A"]], 1e-6, None)
        fsc_h = np.clip(data[:, channels["FSC-H"]], 1e-6, None)
        log_ratio = np.log(fsc_a) - np.log(fsc_h)
        bead_singlets, bead_cut = _singlet_mask(log_ratio, bead_region, params)
        cell_singlets, cell_cut = _singlet_mask(log_ratio, ~bright_in_all, params)
        singlets = bead_singlets | cell_singlets
        gates.append(Gate("singlets", "all", "log(FSC-A/FSC-H)", "below", cell_cut,
                          "median + k·robust SD of non-bead events", {"bead_cut": bead_cut}))
    else:
        singlets = np.ones(n, dtype=bool)
        flags.append("singlets: no FSC-A/FSC-H pair, doublets not excluded")
    masks["beads"] = bead_region & singlets
    masks["bead_doublets"] = bead_region & ~singlets

    # CD45+ leukocytes against debris.
    # Bead–cell coincidences are neither: they count as neither cells nor beads.
    cells = ~bright_in_all & singlets
    cd45 = data[:, channels["CD45"]]
    threshold, depth = valley_threshold(cd45[cells], params, log_counts=True, between="lowest")
    method = "valley against debris"
    if threshold is None:
        center, scale = robust_location_scale(cd45[cells])
        threshold = center - 4 * scale
        method = "single mode: all but its far left tail"
        flags.append("leukocytes: no debris mode on CD45; events below the CD45 mode's tail excluded")
    leukocytes = cells & (cd45 > threshold)
    gates.append(Gate("leukocytes", "singlets", "CD45", "above", threshold, method, {"valley_depth": depth}))

    if "VIABILITY" in channels:
        viability = data[:, channels["VIABILITY"]]
        live_cut, info = positive_threshold(viability[leukocytes], params)
        gates.append(Gate("live", "leukocytes", "VIABILITY", "below", live_cut, info.pop("method"), info))
        leukocytes = leukocytes & (viability <= live_cut)
    masks["leukocytes"] = leukocytes

    # Lymphocytes / monocytes / granulocytes: a 3-component mixture on CD45 × log SSC.
    ssc = np.log(np.clip(data[:, channels["SSC-A"]], 1e-4, None))
    features = np.column_stack([cd45[leukocytes], ssc[leukocytes]])
    lymph = np.zeros(n, dtype=bool)
    mono = np.zeros(n, dtype=bool)
    gran = np.zeros(n, dtype=bool)
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
        labels = to_numpy(fit.predict(xp.asarray(features)))
        by_ssc = np.argsort(to_numpy(fit.means)[:, 1])
        leuko_index = np.flatnonzero(leukocytes)
        lymph[leuko_index[labels == by_ssc[0]]] = True
        mono[leuko_index[labels == by_ssc[1]]] = True
        gran[leuko_index[labels == by_ssc[2]]] = True
        gates.append(Gate("lymphocytes", "leukocytes", "CD45 × log SSC", "mixture", None,
                          "3-component Gaussian mixture, lowest-SSC component",
                          {"means": np.round(to_numpy(fit.means)[by_ssc], 4).tolist()}))
    else:
        flags.append(f"lymphocytes: only {features.shape[0]} leukocyte events, cannot gate")
    masks["lymphocytes"], masks["monocytes"], masks["granulocytes"] = lymph, mono, gran

    # T cells: CD3 is bimodal in lymphocytes (T cells are most of them).
    cd3 = data[:, channels["CD3"]]
    cd3_cut, depth = valley_threshold(cd3[lymph], params, log_counts=True) if lymph.sum() >= 10 else (None, 0.0)
    cd3_info = {"method": "valley", "valley_depth": depth}
    myeloid = mono | gran
    if cd3_cut is None and myeloid.sum() >= 20:
        # Too few CD3- lymphocytes to form a mode (B-cell aplasia, few NK):
        # monocytes and granulocytes are CD3-negative and carry at least the
        # lymphocytes' autofluorescence, so they bound the negatives from above.
        cd3_cut, cd3_info = positive_threshold(cd3[lymph], params, reference=cd3[myeloid])
        cd3_info["reference"] = "monocytes and granulocytes of the same sample"
    if cd3_cut is None:
        flags.append("t_cells: CD3 not bimodal in lymphocytes and no CD3-negative reference; T/non-T not separated")
        cd3_cut = float("inf")
    t_cells = lymph & (cd3 > cd3_cut)
    non_t = lymph & (cd3 <= cd3_cut)
    gates.append(Gate("t_cells", "lymphocytes", "CD3", "above", cd3_cut if np.isfinite(cd3_cut) else None,
                      cd3_info.pop("method"), cd3_info))
    masks["t_cells"] = t_cells

    def negative_reference_gate(marker, population):
        values = data[:, channels[marker]]
        if t_cells.sum() < 20:
            flags.append(f"{population}: too few T cells ({int(t_cells.sum())}) as {marker}-negative reference")
            return np.zeros(n, dtype=bool)
        cut, info = positive_threshold(values[non_t], params, reference=values[t_cells])
        info["reference"] = "T cells of the same sample"
        gates.append(Gate(population, "lymphocytes CD3-", marker, "above", cut, info.pop("method"), info))
        return non_t & (values > cut)

    masks["b_cells"] = negative_reference_gate("CD19", "b_cells")
    if "CD16+56" in channels:
        masks["nk_cells"] = negative_reference_gate("CD16+56", "nk_cells") & ~masks["b_cells"]

    if "CD4" in channels and "CD8" in channels and t_cells.sum() >= 10:
        cuts = {}
        for marker in ("CD4", "CD8"):
            values = data[:, channels[marker]]
            cut, depth = valley_threshold(values[t_cells], params, log_counts=True)
            info = {"method": "valley", "valley_depth": depth}
            if cut is None and gran.sum() >= 20:
                # Few T cells: granulocytes are CD4- and CD8-, a negative reference.
                cut, info = positive_threshold(values[t_cells], params, reference=values[gran])
                info["reference"] = "granulocytes of the same sample"
            if cut is None:
                flags.append(f"{marker.lower()}_t: {marker} not bimodal in T cells")
                cut = float("inf")
            cuts[marker] = cut
            gates.append(Gate(f"t_cells:{marker}", "t_cells", marker, "above",
                              cut if np.isfinite(cut) else None, info.pop("method"), info))
        cd4_pos = data[:, channels["CD4"]] > cuts["CD4"]
        cd8_pos = data[:, channels["CD8"]] > cuts["CD8"]
        masks["cd4_t"] = t_cells & cd4_pos & ~cd8_pos
        masks["cd8_t"] = t_cells & cd8_pos & ~cd4_pos

    if "CAR" in channels:
        car = data[:, channels["CAR"]]
        if t_cells.sum() >= 20:
            cut, info = positive_threshold(car[t_cells], params)
            info["reference"] = "negative mode of the same sample"
            gates.append(Gate("car_t", "t_cells", "CAR", "above", cut, info.pop("method"), info))
            masks["car_t"] = t_cells & (car > cut)
        else:
            flags.append(f"car_t: too few T cells ({int(t_cells.sum())}) to set a CAR threshold")
            masks["car_t"] = np.zeros(n, dtype=bool)

    return GatingResult(masks=masks, gates=gates, qc_flags=flags, device=device_name, params=params)
