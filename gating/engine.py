"""The gating engine: runs a panel's gating plan, step by step, and checks every gate.

Each plan step (see :mod:`gating.panels`) names a *step method*. The methods
find populations from what the sample itself shows, never from constants
fitted to one data source:

* ``positive`` — a marker's positive events in a parent. The cut is the
  clearest *real* valley of the marker's density in a search population
  (``find_in``, which must hold both negatives and positives: CD3 is cut
  on all leukocytes, where monocytes and granulocytes are the negatives).
  A valley is real when the lower peak stands above it by more than
  Poisson noise (:func:`significant_modes`); one whose positive side is
  another lineage (``exclusive_of``: NK or T cells spread into CD19) is
  not the population. Without one, the positives are absent or rare, and
  the cut is the negatives' own tail measured after compensation: the
  mode plus z spreads of its narrower flank, z the normal quantile that
  leaves 0.05 expected false positives (:func:`positive_cut`).
* ``leukocytes`` — CD45+ events: the CD45 modes within a decade of the
  lymphocytes' level (CD3+ events), cut at the valley below the dimmest.
* ``leukocyte_classes`` — lymphocytes, monocytes and granulocytes in CD45 ×
  SSC, *named by phenotype*: lymphocytes are where the lineage-positive
  events (CD3+, else CD19+) lie; their borders are real valleys, or the
  lymphocyte mode's own tails, refined by the lineage markers where the
  tube has them all; myeloid events above them are split across the
  k-means direction between monocytes and granulocytes when a valley is
  there. A file holding only lymphocytes (exported from a lymphocyte
  gate) gives no myeloid populations instead of three carved out of one.
* ``exclusive_pair`` — CD4+CD8− and CD8+CD4− T cells from two ``positive``
  cuts.
* ``negative_mode`` — events negative for a marker (live cells: viability
  dye negative).
* ``car_positive`` — CAR+ T cells counted against the pre-infusion tube,
  normalised to this tube first (:mod:`gating.car`).
* ``beads``, ``singlets`` — counting beads and FSC-A/FSC-H singlets.

After the plan, :func:`verify_gating` checks every gate (cut inside the
data, position consistent with the phenotype, back-gating of the
lymphocyte gate). A failing check is a ``fail`` :class:`~gating.flags.Flag`
and makes its population and everything below it unreliable.
"""
from __future__ import annotations

import numpy as np
from scipy.special import ndtr, ndtri

from gpu import get_array_module, to_numpy
from gpu.density import gaussian_smooth_1d, histogram_1d, robust_location_scale, valley_between

from .flags import Flag, unreliable_populations
from .geometry import Dimension, Gate, axis_values, gate_contains
from .panels import is_fluorescence

STEP_METHODS = {}


class StepMethod:
    """A registered step method: the function and the helper populations it makes."""

    def __init__(self, function, side=()):
        self.function, self.side = function, tuple(side)

    def side_populations(self, step):
        names = list(self.side)
        if step.args.get("negative"):
            names.append(step.args["negative"])
        return names


def step_method(name, side=()):
    """Register a function ``f(context, step)`` as the plan method ``name``."""
    def register(function):
        STEP_METHODS[name] = StepMethod(function, side)
        return function
    return register


# --------------------------------------------------------------------------- densities and cuts

def _probe(values, size=40000):
    """A regular subsample for quantiles of large arrays: the same to a bin, a fraction of the cost."""
    return values if len(values) <= size else values[::len(values) // size]


def smoothed_density(values, bins=256, xp=np):
    """Histogram of ``values`` smoothed by half Silverman's bandwidth (at least 2 bins).

    Over the 0.05–99.95 percentile range, so a few compensated outliers far
    from the data do not squeeze the populations into a few bins.

    Returns
    -------
    counts : ndarray
        Smoothed events per bin.
    centers : ndarray
    sigma_bins : float
        The smoothing kernel's SD in bins.
    """
    values = np.asarray(values)
    if values.dtype not in (np.float32, np.float64):
        values = values.astype(np.float64)
    # Quantiles on the float64 probe, histogram_1d in float64 blocks: the numbers of a float64 copy, without it.
    probe = np.asarray(_probe(values), dtype=np.float64)
    lo, hi, q25, q75 = (float(v) for v in np.percentile(probe, [0.05, 99.95, 25, 75]))
    if hi - lo < 1e-9:
        hi = lo + 1e-3
    pad = 0.05 * (hi - lo)
    counts, edges = histogram_1d(xp.asarray(values), bins, (lo - pad, hi + pad))
    spread = min(float(np.std(probe)), (q75 - q25) / 1.34) or float(np.std(probe)) or 1e-3
    bandwidth = 0.5 * 0.9 * spread * max(values.size, 1) ** -0.2
    sigma_bins = max(2.0, bandwidth / (edges[1] - edges[0]))
    smoothed = to_numpy(gaussian_smooth_1d(counts, sigma_bins))
    return smoothed, 0.5 * (edges[:-1] + edges[1:]), float(sigma_bins)


def _local_maxima(counts):
    """Indices of the local maxima of a smoothed histogram (plateaus give their middle)."""
    maxima = []
    n = len(counts)
    i = 0
    while i < n:
        j = i
        while j + 1 < n and counts[j + 1] == counts[i]:
            j += 1
        left = counts[i - 1] if i > 0 else -np.inf
        right = counts[j + 1] if j + 1 < n else -np.inf
        if counts[i] > left and counts[i] > right and counts[i] > 0:
            maxima.append((i + j) // 2)
        i = j + 1
    return maxima


def significant_modes(counts, sigma_bins, z=3.0):
    """Modes of a smoothed histogram that are separated by real valleys.

    Neighbouring modes are merged (the lower one dropped) while the valley
    between them is within Poisson noise of the lower peak: with ``P`` and
    ``V`` the events a kernel-wide window holds at the lower peak and at
    the valley, the valley is real when ``P − V > z·√(P + V)`` (``z = 3``:
    a dip that deep arises by chance about once in a thousand).

    Returns
    -------
    modes : list of int
        Bin indices of the surviving modes, in order.
    valleys : list of (int, float)
        For each neighbouring pair, the valley's bin and its z-score.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> values = np.concatenate([rng.normal(0, 1, 3000), rng.normal(6, 1, 1000)])
    >>> counts, centers, sigma = smoothed_density(values)
    >>> modes, valleys = significant_modes(counts, sigma)
    >>> len(modes), 2.5 < float(centers[valleys[0][0]]) < 4.5
    (2, True)
    """
    window = np.sqrt(2 * np.pi) * sigma_bins  # bins a kernel-wide window spans

    def valley_z(left, right):
        valley = valley_between(counts, left, right)
        peak = min(counts[left], counts[right]) * window
        low = counts[valley] * window
        return valley, (peak - low) / np.sqrt(max(peak + low, 1e-12))

    modes = _local_maxima(counts)
    while len(modes) >= 2:
        scored = [valley_z(a, b) for a, b in zip(modes[:-1], modes[1:])]
        weakest = int(np.argmin([s[1] for s in scored]))
        if scored[weakest][1] >= z:
            return modes, scored
        a, b = modes[weakest], modes[weakest + 1]
        modes.pop(weakest if counts[a] < counts[b] else weakest + 1)
    return modes, []


def _refine_valley(values, counts, centers, sigma_bins, left, right, xp=np):
    """The valley's bin between modes ``left`` and ``right`` on a density smoothed half as much.

    The smoothing that makes modes reliable also drags a valley towards the
    smaller population (the larger one's smoothed flank lifts the density on
    its side); between the same two modes the less smoothed density puts
    the minimum where the events are fewest.
    """
    from gpu.density import gaussian_smooth_1d as smooth

    width = centers[1] - centers[0]
    edges = np.concatenate([centers - 0.5 * width, [centers[-1] + 0.5 * width]])
    raw, _ = histogram_1d(xp.asarray(values), len(centers), (float(edges[0]), float(edges[-1])))
    finer = to_numpy(smooth(raw, max(1.0, 0.5 * sigma_bins)))
    return left + int(np.argmin(finer[left:right + 1]))


def _lineage_border(values, inside, lineage, lineage_share, centers, sigma_bins, start, stop, xp=np):
    """Where lymphocytes end and a lineage-negative neighbour begins, along one axis.

    Going from the lymphocytes' mode (bin ``start``) towards bin ``stop``,
    the first bin where the lineage-negative neighbour (monocytes,
    basophils) is more likely than a lymphocyte: its density is the
    lineage-negative events' minus the lymphocytes' own lineage-negative
    share (``1 − lineage_share`` of them, in proportion to the lineage-
    positive events), the lymphocytes' is the lineage-positive events' over
    ``lineage_share``. The Bayes border of the two, whatever their sizes.

    Returns the border's value, or ``None`` when the neighbour never wins.
    """
    positive = _smoothed_on(values[inside & lineage], centers, sigma_bins, xp)
    negative = _smoothed_on(values[inside & ~lineage], centers, sigma_bins, xp)
    lymphocytes = positive / max(lineage_share, 1e-9)
    neighbour = negative - (lymphocytes - positive)
    step = 1 if stop >= start else -1
    path = np.arange(start, stop + step, step)
    wins = np.flatnonzero(neighbour[path] > lymphocytes[path])
    return float(centers[path[wins[0]]]) if wins.size else None


def _smoothed_on(values, centers, sigma_bins, xp=np):
    """Histogram of ``values`` on the bins of ``centers``, smoothed like the density they came from."""
    width = centers[1] - centers[0]
    counts, _ = histogram_1d(xp.asarray(values), len(centers),
                             (float(centers[0] - 0.5 * width), float(centers[-1] + 0.5 * width)))
    return to_numpy(gaussian_smooth_1d(counts, sigma_bins))


#: Share of a normal population below its mean − 1 SD (the lower flank's quantile).
LOWER_FLANK_QUANTILE = float(ndtr(-1.0))


def lower_flank_spread(values, mode):
    """SD of the population at ``mode`` from its lower flank alone.

    The 68.27th percentile of ``mode − x`` over the events below the mode
    (a half-normal's σ). Positives lie above the mode, so they do not
    inflate it.
    """
    below = mode - values[values < mode]
    if below.size < 5:
        return None
    return float(np.quantile(_probe(below), 0.6827))


def positive_cut(values, *, z=3.0, false_positives=0.05, bins=256, xp=np, accept=None):
    """Cut between a marker's negative and positive events, and how it was found.

    Parameters
    ----------
    values : ndarray
        The marker in a population holding the negatives (and the positives
        when there are any).
    z : float
        Significance of a real valley (:func:`significant_modes`).
    false_positives : float
        Without a valley: the expected number of negatives above the cut
        (0.05: a false positive in about one tube in twenty).
    accept : callable, optional
        ``accept(cut) -> bool``: whether the events above a valley have the
        population's phenotype (e.g. B cells are not NK-marker positive).
        Valleys are tried from the clearest down; when none is accepted,
        the positives are taken as absent (the negative tail).

    Returns
    -------
    cut : float or None
        ``None`` when there are too few events (< 10).
    info : dict
        ``method`` (``"valley"`` or ``"negative tail"``), ``valley_z``, the
        negatives' centre and lower-flank spread, and ``tail_z``.

    Notes
    -----
    With two or more real modes the cut is at the valley of the highest
    z-score: the clearest gap. With one, the dominant mode is the negatives
    and the cut is ``mode + q·σ`` with ``q = Φ⁻¹(1 − false_positives/n)`` and σ
    the spread of the narrower of the mode's flanks (68.27th percentile of
    the distance to the mode on that side):
    a Gaussian negative population of ``n`` events then puts
    ``false_positives`` events above the cut on average, and a population
    that is absent reads zero.

    Examples
    --------
    >>> rng = np.random.default_rng(1)
    >>> negatives = rng.normal(0.2, 0.05, 5000)
    >>> cut, info = positive_cut(np.concatenate([negatives, rng.normal(0.6, 0.05, 500)]))
    >>> info["method"], 0.3 < cut < 0.5
    ('valley', True)
    >>> cut, info = positive_cut(negatives)
    >>> info["method"], int((negatives >= cut).sum()) <= 3
    ('negative tail', True)
    """
    values = np.asarray(values)
    finite = np.isfinite(values)
    # float64 once, of the finite values only (the same numbers as converting first)
    values = np.asarray(values if finite.all() else values[finite], dtype=np.float64)
    del finite
    if values.size < 10:
        return None, {"method": "too few events", "events": int(values.size)}
    counts, centers, sigma = smoothed_density(values, bins, xp)
    modes, valleys = significant_modes(counts, sigma, z)
    rejected = []
    for best in sorted(range(len(valleys)), key=lambda i: -valleys[i][1]):
        score = valleys[best][1]
        valley = _refine_valley(values, counts, centers, sigma, modes[best], modes[best + 1], xp)
        if accept is not None and not accept(float(centers[valley])):
            rejected.append(round(float(centers[valley]), 4))
            continue
        mode = float(centers[modes[best]])
        below = values[values < float(centers[valley])]
        spread = lower_flank_spread(below, mode) or float(centers[1] - centers[0])
        return float(centers[valley]), {"method": "valley", "valley_z": round(float(score), 2),
                                        "negative_center": round(mode, 6), "negative_sd": round(spread, 6)}
    # One mode: the negatives'. Several, separated by valleys whose upper
    # side was rejected as not the population (spillover lobes of other
    # cells): all are negatives, and the tail is that of the highest lobe,
    # its lower flank measured inside its own basin.
    mode = float(centers[modes[-1]]) if modes else float(np.median(values))
    floor = float(centers[valleys[-1][0]]) if len(modes) >= 2 else -np.inf
    tail_z = float(ndtri(1.0 - false_positives / max(values.size, 1)))
    basin = values[values >= floor]
    # The narrower of the mode's two flanks. Compensated negatives are
    # skewed (photon-noise spreading stretches their low side on a logicle
    # scale), and positives too few to make a valley of their own still
    # stretch the high side; each inflates one flank only.
    upper = basin[basin > mode] - mode
    spreads = [float(np.quantile(_probe(upper), 0.6827))] if upper.size >= 5 else []
    lower = lower_flank_spread(basin, mode)
    if lower is not None:
        spreads.append(lower)
    spread = min(spreads) if spreads else None
    if spread is None:
        location, spread = robust_location_scale(values)
    spread = max(float(spread), float(centers[1] - centers[0]))
    info = {"method": "negative tail", "negative_center": round(mode, 6), "negative_sd": round(spread, 6),
            "tail_z": round(tail_z, 3)}
    if rejected:
        info["rejected_valleys"] = rejected
    return mode + tail_z * spread, info


def whole_population_tail(values, false_positives=0.05):
    """A tail cut from a population's median and narrower quantile flank (robust to rare positives).

    The density's mode can sit on a narrow sub-population of the negatives
    (in a CAR tube without an NK marker, NK cells whose CD8 spreads into
    CD19 beside cells it does not): a tail measured from that mode's flank
    falls inside the others. The median and the narrower of the 15.9–50 and
    50–84.1 percentile spreads describe the whole population, and a few
    per cent of positives move neither much.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> cut = whole_population_tail(rng.normal(0.2, 0.05, 2000))
    >>> bool(0.2 + 3.5 * 0.05 < cut < 0.2 + 4.5 * 0.05)
    True
    """
    values = np.asarray(values, dtype=np.float64)
    if values.size < 10:
        return -np.inf
    q16, median, q84 = (float(v) for v in np.quantile(_probe(values), [LOWER_FLANK_QUANTILE, 0.5,
                                                                        1.0 - LOWER_FLANK_QUANTILE]))
    tail_z = float(ndtri(1.0 - false_positives / values.size))
    return median + tail_z * min(median - q16, q84 - median)


# --------------------------------------------------------------------------- the context

class GatingContext:
    """What the plan's steps share: the data, the masks and gates made so far, the flags."""

    def __init__(self, data, channels, params, xp, device_name, tops=None):
        self.data, self.channels, self.params = data, channels, params
        self.tops = dict(tops or {})   # marker → the channel's range ($PnR), for linear units
        self.xp, self.device_name = xp, device_name
        self.gates, self.masks, self.parents, self.flags = [], {}, {}, []
        self.stand_ins = {}   # population of a skipped optional step → the population it stands for
        self.skipped = set()
        self.emptied = set()  # populations left empty because their parent held no events
        self._cuts = {}

    def resolve(self, name):
        while name in self.stand_ins:
            name = self.stand_ins[name]
        return name

    def add(self, gate):
        self.masks[gate.name] = gate_contains(gate, self.data, self.channels, self.masks)
        self.parents[gate.name] = gate.parent
        self.gates.append(gate)
        return self.masks[gate.name]

    def gate(self, name):
        return next((g for g in self.gates if g.name == name), None)

    def values(self, channel, transform="logicle"):
        return axis_values(self.data, self.channels, Dimension(channel, transform))

    def flag(self, population, code, severity, message):
        self.flags.append(Flag(population, code, severity, message))

    def cut(self, marker, search, accept=None):
        """:func:`positive_cut` of ``marker`` in population ``search`` (remembered: several steps ask)."""
        key = (marker, search)
        if accept is None and key in self._cuts:
            cut, info = self._cuts[key]
            return cut, dict(info)
        values = self.values(marker)[self.masks[search]]
        cut, info = positive_cut(values, z=self.params.valley_z, false_positives=self.params.tail_false_positives,
                                 bins=self.params.bins, xp=self.xp, accept=accept)
        if accept is None:
            self._cuts[key] = (cut, dict(info))
        return cut, info


def _describe(info, marker, search):
    if info["method"] == "valley":
        return f"{marker} valley in {search} (z = {info['valley_z']:.1f})"
    if info["method"] == "negative tail":
        return (f"{marker}: no valley in {search}; negatives' mode + {info['tail_z']:.2f} x flank SD "
                f"(the negatives' own tail)")
    return f"{marker}: {info['method']}"


# --------------------------------------------------------------------------- step methods

@step_method("positive")
def positive_step(context, step):
    """``population`` = events of ``parent`` at or above the marker's cut (see :func:`positive_cut`).

    Arguments: ``find_in`` (the population, or list of populations tried in
    order until one shows a real valley, whose density sets the cut;
    default the parent), ``negative`` (also make the parent's events below
    the cut under this name), ``and_below`` (populations whose own cut the
    events must lie below, e.g. NK cells CD19-negative), ``exclusive_of``
    (populations the positives must mostly not belong to: B cells are not
    CD16/56+), ``tail_floor: "parent"`` (without a valley, the cut is at
    least the parent's whole-population tail, :func:`whole_population_tail`).
    """
    marker = step.dimensions[0]
    parent = context.resolve(step.parent)
    searches = step.args.get("find_in") or [parent]
    searches = [context.resolve(s) for s in ([searches] if isinstance(searches, str) else searches)]
    # The first search population with a real valley sets the cut; a later
    # one holds more known negatives (e.g. the T cells for CD16/56, when the
    # CD3-negative lymphocytes are nearly all NK cells and form one mode).
    values = context.values(marker)
    parent_mask = context.masks[parent]
    exclusive = [p for p in step.args.get("exclusive_of", []) if p not in context.skipped and p in context.masks]
    other = np.zeros(values.shape, dtype=bool)
    for name in exclusive:
        other |= context.masks[name]
    parent_values = values[parent_mask & np.isfinite(values)]
    parent_modes = []  # the parent's own modes, found once however many valleys are tried

    def modes_of_parent():
        if not parent_modes:
            counts, centers, sigma = smoothed_density(parent_values, context.params.bins, context.xp)
            modes, _ = significant_modes(counts, sigma, context.params.valley_z)
            parent_modes.append([float(centers[m]) for m in modes])
        return parent_modes[0]

    def acceptor(search):
        def accept(cut):
            # The positives must not be another population: events above a
            # valley that are mostly (say) NK-marker positive are NK cells
            # whose spillover spreading makes lobes in this marker.
            above = context.masks[search] & (values >= cut)
            if exclusive and int((above & other).sum()) > 0.5 * max(int(above.sum()), 1):
                return False
            # A cut borrowed from a wider population must have a population
            # above it in the parent itself, not just the negatives' tail.
            if search != parent:
                if parent_values.size < 10:
                    return False
                return any(center > cut for center in modes_of_parent())
            return True
        return accept if (exclusive or search != parent) else None

    for search in searches:
        cut, info = context.cut(marker, search, acceptor(search))
        if info["method"] == "valley":
            break
    else:
        search = searches[0]
        cut, info = context.cut(marker, search, acceptor(search))
        # No valley: the cut is a tail. Where the plan says the parent holds
        # negatives of another kind that no marker of the tube removes (NK
        # cells in a CAR tube), their own spread (all of them, not the search
        # population's densest part) sets a floor under it. Not in general:
        # in a small parent rare positives would raise it.
        floor = (whole_population_tail(parent_values, context.params.tail_false_positives)
                 if step.args.get("tail_floor") == "parent" else -np.inf)
        if cut is not None and floor > cut:
            cut = floor
            info = dict(info, floor=f"the {parent}'s median + narrower quantile flank (their mode's flank "
                                    f"describes only part of them)")
    method = _describe(info, marker, search)
    if info.get("floor"):
        method += f"; floored at {info['floor']}"
    if info.get("rejected_valleys"):
        method += f" (valleys at {info['rejected_valleys']} rejected: positives there are {', '.join(exclusive)})"
    if cut is None:
        context.flag(step.population, "too_few_events", "fail",
                     f"{info.get('events', 0)} events in {search}, too few to find a {marker} cut")
        cut = np.inf
    info["found_in"] = search
    dims = [Dimension(marker, "logicle", cut, None)]
    for name in step.args.get("and_below", []):
        gate = context.gate(name)
        if gate is not None and gate.dimensions:
            dims.append(Dimension(gate.dimensions[0].channel, "logicle", None, gate.dimensions[0].minimum))
            method += f"; below the {name} cut on {gate.dimensions[0].channel}"
    context.add(Gate(step.population, parent, "rectangle", dims, method=method, extra=info))
    if step.args.get("negative"):
        context.add(Gate(step.args["negative"], parent, "rectangle", [Dimension(marker, "logicle", None, cut)],
                         method=f"below the {step.population} cut ({marker})", extra={"found_in": search}))


@step_method("leukocytes")
def leukocytes_step(context, step):
    """CD45+ leukocytes: above the CD45 valley below the dimmest leukocyte mode.

    Which CD45 modes are leukocytes is decided by phenotype: the lineage
    anchor (CD3+, else CD19+ events: lymphocytes, the CD45-brightest
    leukocytes) gives the lymphocytes' CD45 level; every leukocyte expresses
    CD45 within ``decades_below`` decades of it (granulocytes, the dimmest,
    at about a third to a half of the lymphocytes' level), while debris,
    red-cell ghosts and platelets are CD45-negative, two decades or more
    below. The cut is the real valley just below the dimmest leukocyte mode;
    without one there is no CD45-negative population and no cut.

    Arguments: ``anchors`` (markers), ``decades_below`` (default 1),
    ``negative`` (name for the events below the cut).
    """
    params = context.params
    marker = step.dimensions[0]
    parent = context.resolve(step.parent)
    inside = context.masks[parent]
    cd45 = context.values(marker)
    values = cd45[inside]
    level, anchor_name = None, None
    for anchor in step.args.get("anchors", []):
        if anchor not in context.channels:
            continue
        cut, info = context.cut(anchor, parent)
        if cut is not None and info["method"] == "valley":
            positive = inside & (context.values(anchor) >= cut)
            if positive.sum() >= 20:
                level, anchor_name = float(np.median(cd45[positive])), f"{anchor}+ events"
                break
    counts, centers, sigma = smoothed_density(values, params.bins, context.xp)
    modes, valleys = significant_modes(counts, sigma, params.valley_z)
    if level is None:
        level, anchor_name = float(centers[max(modes, key=lambda m: centers[m])]), "the CD45-brightest mode"
        context.flag(step.population, "no_lineage_anchor", "warning",
                     "no CD3+ or CD19+ mode; leukocytes' CD45 level taken from the brightest CD45 mode")
    floor = level - float(step.args.get("decades_below", 1.0)) / params.logicle_decades
    leukocyte_modes = [i for i, m in enumerate(modes) if centers[m] >= floor]
    first = leukocyte_modes[0] if leukocyte_modes else None
    info = {"found_in": parent, "lymphocyte_cd45": round(level, 6), "leukocyte_floor": round(floor, 6)}
    if first is not None and first > 0:
        valley = _refine_valley(values, counts, centers, sigma, modes[first - 1], modes[first], context.xp)
        cut = float(centers[valley])
        info.update(valley_z=round(float(valleys[first - 1][1]), 2), method="valley")
        method = (f"{marker} valley below the dimmest leukocyte mode (z = {valleys[first - 1][1]:.1f}); leukocyte "
                  f"modes lie within {step.args.get('decades_below', 1.0):g} decade of the {anchor_name}")
    else:
        cut = float(np.min(values)) - 1e-3 if values.size else -np.inf
        info.update(method="no CD45-negative mode")
        method = f"no {marker}-negative mode below the leukocytes: every event of {parent}"
        context.flag(step.population, "no_debris_mode", "info", f"no {marker}-negative population: every "
                                                                 f"{parent} event counted as a leukocyte")
    context.add(Gate(step.population, parent, "rectangle", [Dimension(marker, "logicle", cut, None)],
                     method=method, extra=info))
    if step.args.get("negative"):
        context.add(Gate(step.args["negative"], parent, "rectangle", [Dimension(marker, "logicle", None, cut)],
                         method=f"below the {step.population} cut ({marker})", extra={}))


@step_method("negative_mode")
def negative_mode_step(context, step):
    """``population`` = events of ``parent`` below the marker's cut (e.g. viability-dye-negative: live)."""
    marker = step.dimensions[0]
    parent = context.resolve(step.parent)
    cut, info = context.cut(marker, parent)
    if cut is None:
        context.flag(step.population, "too_few_events", "fail", f"too few events in {parent} for a {marker} cut")
        cut = -np.inf
    info["found_in"] = parent
    context.add(Gate(step.population, parent, "rectangle", [Dimension(marker, "logicle", None, cut)],
                     method=_describe(info, marker, parent) + "; events below it", extra=info))


@step_method("exclusive_pair")
def exclusive_pair_step(context, step):
    """Two populations A+B− and B+A− of ``parent`` (CD4 T and CD8 T), each cut found in ``find_in``."""
    parent = context.resolve(step.parent)
    search = context.resolve(step.args.get("find_in") or parent)
    if not all(m in context.channels for m in step.dimensions):
        return
    cuts = {}
    for population, marker in zip(step.populations, step.dimensions):
        cut, info = context.cut(marker, search)
        if cut is None:
            context.flag(population, "too_few_events", "fail", f"too few events in {search} for a {marker} cut")
            cut = np.inf
        info["found_in"] = search
        cuts[marker] = (cut, info)
    (first, second) = step.dimensions
    for population, marker, other in ((step.populations[0], first, second), (step.populations[1], second, first)):
        cut, info = cuts[marker]
        context.add(Gate(population, parent, "rectangle",
                         [Dimension(marker, "logicle", cut, None), Dimension(other, "logicle", None, cuts[other][0])],
                         method=f"{_describe(info, marker, search)}; {other}-negative", extra=dict(info)))


@step_method("car_positive")
def car_positive_step(context, step):
    """CAR+ T cells, counted against the pre-infusion reference when there is one.

    The reference is first normalised to this tube (beads and CAR-negative
    T cells as anchors, :func:`gating.car.count_against_reference`); the
    cut leaves exactly the counted positives above it. Without a reference
    (or one of fewer than 200 T cells) the cut comes from this tube alone
    (:func:`gating.auto.balanced_positive_threshold`).
    """
    from gpu.logicle import logicle_inverse

    from .auto import balanced_positive_threshold
    from .car import CarReference, count_against_reference, cut_leaving

    params = context.params
    marker = step.dimensions[0]
    parent = context.resolve(step.parent)
    values = context.values(marker)
    inside = context.masks[parent]
    top = context.tops.get(marker, 262144.0)
    reference = params.car_reference
    if reference is not None and not isinstance(reference, CarReference):
        # T cells' values on the (logicle) scale of this tube, no beads: no gain anchor but the negatives.
        reference = CarReference(logicle_inverse(np.asarray(reference, dtype=np.float64), t=top),
                                 source=params.car_reference_source)
    if reference is not None and len(reference) >= 200 and inside.sum() >= 50:
        beads = context.masks.get("beads")
        bead_values = values[beads] if beads is not None else None
        positives, info = count_against_reference(values[inside], reference, bead_values, top)
        cut = cut_leaving(values[inside], positives)
        info["method"] = ("cut leaving above it the positives counted against the reference (normalised to this "
                          "tube, subtracted, extrapolated)")
        info["reference"] = params.car_reference_source or reference.source
        for code, message in info.pop("flags"):
            context.flag(step.population, code, "warning", message)
    elif inside.sum() >= 20:
        cut, info = balanced_positive_threshold(values[inside], params, reference=None)
        info["reference"] = "negative mode of the same sample"
        _widen_for_cut_choice(context, step.population, values[inside], cut, info)
        if reference is not None:
            info["reference"] += f" (the reference has {len(reference)} T cells, fewer than 200)"
    else:
        context.flag(step.population, "too_few_parent_events", "warning",
                     f"too few T cells ({int(inside.sum())}) to set a CAR threshold")
        cut, info = float("inf"), {"method": "no threshold"}
    context.add(Gate(step.population, parent, "rectangle", [Dimension(marker, "logicle", cut, None)],
                     method=info.pop("method"), extra=info))


def _widen_for_cut_choice(context, population, values, cut, info):
    """Without a reference, carry the choice of the CAR cut into the count's uncertainty.

    Nothing in the tube says how many of its negatives lie above a cut in
    their own tail, nor how many positives below it: where CAR+ cells form
    a continuum with the negatives (spillover spreading), the count moves
    with the cut. The negatives' tail cut of every other marker
    (:func:`positive_cut`: ``tail_false_positives`` negatives expected above
    it) is the other defensible cut; half the difference of the two counts
    is one more SD of the count (``info["count_sd"]``), so that its 95 %
    interval reaches about as far as the other count, and a difference
    beyond counting noise is flagged.
    """
    params = context.params
    floor = info["negative_center"]   # a valley below the negatives separates no positives
    tail_cut, tail_info = positive_cut(values, z=params.valley_z, false_positives=params.tail_false_positives,
                                       bins=params.bins, accept=lambda c: c > floor)
    if tail_cut is None or not np.isfinite(cut):
        return
    events = int((values >= cut).sum())
    other = int((values >= tail_cut).sum())
    difference = abs(events - other)
    own_sd = float(np.sqrt(2.0 * float(info.get("expected_misclassified", 0.0) or 0.0)))
    info["count_sd"] = round(float(np.sqrt(own_sd ** 2 + (difference / 2.0) ** 2)), 3)
    method = tail_info["method"]
    if method == "negative tail":
        method += f" ({params.tail_false_positives:g} negatives expected above)"
    info["alternative_cut"] = {"method": method, "cut": round(float(tail_cut), 6), "events": other}
    if difference > 1.96 * np.sqrt(max(events, 1)):
        context.flag(population, "car_cut_uncertain", "warning",
                     f"without a reference the CAR+ count depends on the cut: {events} events above this "
                     f"sample's negative-mode cut, {other} above its negatives' tail cut; interval widened to "
                     f"cover both")


@step_method("beads", side=("bead_bright", "not_beads"))
def beads_step(context, step):
    """Counting beads: bright in every fluorescence channel, a bead's tight low scatter.

    The dimmest fluorescence channel of an event separates beads from cells
    (no cell is positive for every marker). On log density a few hundred
    beads stand out beside 10^5 cells across a nearly empty gap; a tube
    without beads finds no such gap and reports none. Bead doublets and
    bead–cell coincidences (a cell's scatter) are neither beads nor cells.
    """
    from .auto import _density, _real_peaks

    params, data, channels = context.params, context.data, context.channels
    fluorescence = [name for name in channels if is_fluorescence(name)]
    columns = [channels[c] for c in fluorescence]
    if len(columns) < 2:
        bead_score = data[:, columns].min(axis=1)
    else:
        # Column by column: no copy of every fluorescence column (min is exact: the same values).
        bead_score = data[:, columns[0]].copy()
        for column in columns[1:]:
            np.minimum(bead_score, data[:, column], out=bead_score)
    density, centers, sigma = _density(bead_score, params, log_counts=True, with_sigma=True)
    peaks = _real_peaks(density, params, 0.2, True, sigma)
    threshold = None
    if len(peaks) >= 2:
        # The beads are the tallest mode above the cells' mode, and
        # the cut is the gap just below them: a cell population positive for
        # every marker of a small panel (B cells in a CD45/CD19/CD20 tube)
        # forms a mode of its own between the other cells and the beads, and
        # bead doublets a small one above the beads.
        bounds = [0] + [valley_between(density, a, b) for a, b in zip(peaks[:-1], peaks[1:])] + [len(density)]
        linear = np.expm1(density)
        mass = [float(linear[lo:hi].sum()) for lo, hi in zip(bounds[:-1], bounds[1:])]
        cells = peaks[int(np.argmax(mass))]  # the mode holding the most events (beads are tall but few)
        brighter = [p for p in peaks if p > cells]
        bead_mode = max(brighter, key=lambda p: density[p]) if brighter else peaks[-1]
        below = peaks[peaks.index(bead_mode) - 1] if peaks.index(bead_mode) > 0 else peaks[0]
        valley = valley_between(density, below, bead_mode)
        depth = 1.0 - density[valley] / max(min(density[below], density[bead_mode]), 1e-12)
        if depth >= params.bead_gap_depth:
            threshold = float(centers[valley])
    if threshold is None:
        context.flag("beads", "no_beads", "info", "no bead population found (no bright mode in every "
                                                 "fluorescence channel)")
        threshold = float(np.max(bead_score)) + 1.0  # a gate no event passes
    bright = context.add(Gate("bead_bright", step.parent, "rectangle",
                              [Dimension(c, "logicle", threshold, None) for c in fluorescence],
                              method="above the valley between the cells' mode and the bright mode of the "
                                     "dimmest fluorescence channel"))
    scatter_dims = []
    for key in ("FSC-A", "SSC-A"):
        if key in channels and bright.sum() >= 5:
            values = context.values(key, "linear")[bright]
            positive = values[values > 0]
            center, scale = robust_location_scale(np.log(positive)) if positive.size else (0.0, 0.0)
            spread = params.bead_scatter_sd * max(scale, 1e-3)
            scatter_dims.append(Dimension(key, "linear", float(np.exp(center - spread)),
                                          float(np.exp(center + max(spread, np.log(params.bead_max_scatter_ratio))))))
    context.add(Gate(step.population, "bead_bright", "rectangle", scatter_dims,
                     method="bead scatter: median / e^(k·SD) to median × max(e^(k·SD), "
                            f"{params.bead_max_scatter_ratio}) on FSC-A and SSC-A", extra={"k": params.bead_scatter_sd}))
    context.add(Gate("not_beads", step.parent, "not", complement_of="bead_bright",
                     method="events not bright in every fluorescence channel"))


@step_method("singlets")
def singlets_step(context, step):
    """Singlets: FSC-A / FSC-H below the median + k robust SDs (log ratio); without FSC-H, said so."""
    params, channels = context.params, context.channels
    parent = context.resolve(step.parent)
    area, height = (step.dimensions + ["FSC-A", "FSC-H"])[:2]
    if area in channels and height in channels:
        fsc_a, fsc_h = context.values(area, "linear"), context.values(height, "linear")
        usable = context.masks[parent] & (fsc_a > 0) & (fsc_h > 0)
        log_ratio = np.log(fsc_a[usable]) - np.log(fsc_h[usable])
        center, scale = robust_location_scale(_probe(log_ratio)) if log_ratio.size else (0.0, 0.0)
        ratio = float(np.exp(center + params.singlet_sd * max(scale, 1e-3)))
        wedge = [(-1.0, -1.0 / ratio), (4.0 * ratio, 4.0), (-1.0, 4.0)]
        context.add(Gate(step.population, parent, "polygon", [Dimension(area, "linear"), Dimension(height, "linear")],
                         vertices=wedge, method="FSC-A / FSC-H below median + k·robust SD (log ratio)",
                         extra={"max_area_to_height": ratio, "k": params.singlet_sd}))
    else:
        context.flag(step.population, "no_fsc_h", "info", "no FSC-A/FSC-H pair in the file: doublets not excluded "
                                                          "(counts include cells in doublets)")
        context.add(Gate(step.population, parent, "rectangle", [], method="no FSC-H: all events of the parent"))


@step_method("leukocyte_classes")
def leukocyte_classes_step(context, step):
    """Lymphocytes, monocytes and granulocytes in CD45 × SSC, named by phenotype.

    1. **Anchor**: the first of ``anchors`` (CD3, then CD19) whose positive
       events form a real mode in the parent: those are lymphocytes, and the
       SSC mode nearest their median is the lymphocytes' mode.
    2. **SSC borders**: the real valleys of the parent's log-SSC density on
       each side of that mode; where a side has none, the mode's own flank
       (mode ± Φ⁻¹(1 − α/n) × that flank's spread). Where the tube carries
       every ``lineage`` marker (T, B and NK), the upper border moves to where
       lineage-negative events (monocytes) outnumber the lymphocytes
       (:func:`_lineage_border`).
    3. **CD45 border**: a real valley of CD45 below the lymphocytes' mode
       within their SSC window, moved (lineage markers permitting, axes in
       ``lineage_borders``) to where basophils outnumber lymphocytes.
    4. **Coincidences**: a larger forward-scatter mode above the dominant one
       inside the lymphocyte window is excluded.
    5. **Myeloid**: events above the lymphocytes' SSC border, when the SSC
       density has a mode there; split by a real valley across the k-means
       direction between two populations (:func:`split_in_plane`), the
       higher-SSC side named granulocytes; a single one named by its CD45
       (monocytes about as bright as lymphocytes, granulocytes dimmer). No
       mode above the lymphocytes: a file of lymphocytes only, and no
       myeloid populations are made up.
    """
    params = context.params
    names = dict(zip(("lymphocytes", "monocytes", "granulocytes"), step.populations))
    parent = context.resolve(step.parent)
    cd45_name, ssc_name = (step.dimensions + ["CD45", "SSC-A"])[:2]
    cd45 = context.values(cd45_name)
    ssc = context.values(ssc_name, "log")
    inside = context.masks[parent] & np.isfinite(ssc)
    dims = lambda lo45, lo, hi: [Dimension(cd45_name, "logicle", lo45, None), Dimension(ssc_name, "log", lo, hi)]

    def empty(name, why):
        context.add(Gate(name, parent, "rectangle", [Dimension(ssc_name, "log", np.inf, None)], method=why))

    if inside.sum() < 30:
        for name in names.values():
            context.flag(name, "too_few_events", "fail", f"only {int(inside.sum())} events in {parent}, cannot gate")
            empty(name, "not gated: too few events")
        return

    anchor, anchor_name = None, None
    for marker in step.args.get("anchors", []):
        if marker not in context.channels:
            continue
        cut, info = context.cut(marker, parent)
        if cut is None or info["method"] != "valley":
            continue
        positive = inside & (context.values(marker) >= cut)
        if positive.sum() >= 20:
            anchor, anchor_name = positive, f"{marker}+"
            break
    ssc_in = ssc[inside]
    counts, centers, sigma = smoothed_density(ssc_in, params.bins, context.xp)
    modes, valleys = significant_modes(counts, sigma, params.valley_z)
    if anchor is None:
        # No lineage marker forms a positive mode (a failed stain, a wrong
        # tube): lymphocytes are taken as the lowest-SSC mode, which is
        # exactly the assumption that fails after lymphodepletion, so the
        # gate cannot vouch for itself.
        anchor_ssc = ssc_in[np.abs(ssc_in - centers[modes[0]]) < 3 * sigma * (centers[1] - centers[0])] \
            if modes else ssc_in
        if anchor_ssc.size == 0:
            anchor_ssc = ssc_in
        anchor_name = "lowest-SSC mode"
        context.flag(names["lymphocytes"], "no_lineage_anchor", "fail",
                     "no CD3+ or CD19+ mode to locate the lymphocytes (stain failed?); took the lowest-SSC mode")
    else:
        anchor_ssc = ssc[anchor]
    a_median = float(np.median(anchor_ssc))
    # The mode holding the anchor, and the real valleys on each side of it.
    lymph_mode = min(range(len(modes)), key=lambda i: abs(centers[modes[i]] - a_median)) if modes else None
    # Where a side has no valley, the lymphocytes end where their own SSC
    # distribution does: the mode ± Φ⁻¹(1 − α/n) times that flank's spread
    # (68.27th percentile of the distance to the mode), measured on all the
    # parent's events of the mode's basin, not on the anchor alone (a few
    # odd anchor events must not move the lymphocytes' borders).
    basin_lo = float(centers[valleys[lymph_mode - 1][0]]) if lymph_mode else -np.inf
    basin_hi = float(centers[valleys[lymph_mode][0]]) if lymph_mode is not None and lymph_mode + 1 < len(modes) \
        else np.inf
    mode_ssc = float(centers[modes[lymph_mode]]) if lymph_mode is not None else a_median
    basin = ssc_in[(ssc_in >= basin_lo) & (ssc_in < basin_hi)]
    flank_low = mode_ssc - basin[basin < mode_ssc]
    flank_up = basin[basin > mode_ssc] - mode_ssc
    a_low = float(np.quantile(flank_low, 0.6827)) if flank_low.size >= 5 else 1e-3
    a_up = float(np.quantile(flank_up, 0.6827)) if flank_up.size >= 5 else 1e-3
    tail_z = float(ndtri(1.0 - params.tail_false_positives / max(basin.size, 1)))
    if lymph_mode is not None and lymph_mode > 0:
        lo, lo_how = basin_lo, "SSC valley below the lymphocytes"
    else:
        lo, lo_how = mode_ssc - tail_z * max(a_low, 1e-3), "the lymphocyte mode's lower SSC tail"
    # Lineage-positive events (CD3+, CD19+, CD16/56+) are lymphocytes; the
    # lineage-negative ones near them are monocytes (above in SSC) or
    # basophils (below in CD45), plus the lymphocytes' own small
    # lineage-negative share. Where the markers mark most lymphocytes, they
    # say where the lymphocytes end (see _lineage_border).
    lineage = np.zeros_like(inside)
    lineage_markers = step.args.get("lineage", [])
    for marker in lineage_markers:
        if marker in context.channels:
            cut, info = context.cut(marker, parent)
            if cut is not None and info["method"] == "valley":
                lineage |= inside & (context.values(marker) >= cut)
    core = inside & (ssc >= lo) & (ssc < centers[modes[lymph_mode]]) if modes else inside
    lineage_share = float((core & lineage).sum()) / max(int(core.sum()), 1)
    # Only a tube carrying every lymphocyte lineage the plan names (T, B and
    # NK: a TBNK tube, not a CAR tube without CD16/56) marks nearly all its
    # lymphocytes, so that what is lineage-negative next to them is not one.
    use_lineage = bool(lineage_markers) and all(m in context.channels for m in lineage_markers) \
        and lineage_share > 0.5
    lineage_axes = step.args.get("lineage_borders", [ssc_name, cd45_name]) if use_lineage else []
    if lymph_mode is not None and lymph_mode + 1 < len(modes):
        hi, hi_how = float(centers[valleys[lymph_mode][0]]), "SSC valley above the lymphocytes"
        if ssc_name in lineage_axes:
            # Up to the monocytes' mode: the two populations may cross on
            # either side of the valley of their sum.
            border = _lineage_border(ssc, inside, lineage, lineage_share, centers, sigma,
                                     modes[lymph_mode], modes[lymph_mode + 1], context.xp)
            if border is not None:
                hi, hi_how = border, "SSC above which monocytes outnumber lymphocytes (lineage markers)"
    else:
        hi, hi_how = mode_ssc + tail_z * max(a_up, 1e-3), "the lymphocyte mode's upper SSC tail"
    window = inside & (ssc >= lo) & (ssc < hi)
    lo45, lo45_how = None, "leukocyte CD45 cut"
    if window.sum() >= 30:
        c45, c45_centers, c45_sigma = smoothed_density(cd45[window], params.bins, context.xp)
        c45_modes, c45_valleys = significant_modes(c45, c45_sigma, params.valley_z)
        top = int(np.argmax([c45[m] for m in c45_modes])) if c45_modes else 0
        if top > 0:
            # The valley just below the tallest (lymphocyte) mode.
            lo45, lo45_how = float(c45_centers[c45_valleys[top - 1][0]]), "CD45 valley below the lymphocytes"
        if cd45_name in lineage_axes and c45_modes:
            # Basophils sit just below the lymphocytes in CD45, often without
            # a valley: below the lymphocyte mode, where lineage-negative
            # events outnumber the lymphocytes.
            floor = 0 if lo45 is None else int(np.searchsorted(c45_centers, lo45))
            border = _lineage_border(cd45, window, lineage, lineage_share, c45_centers, c45_sigma,
                                     c45_modes[top], floor, context.xp)
            if border is not None:
                lo45, lo45_how = border, "CD45 below which basophils outnumber lymphocytes (lineage markers)"
    # Lymphocytes are uniform in size: inside their window the forward-
    # scatter mode holding most events is theirs, and a second, larger mode
    # above it is coincident events (two cells in the beam at once raise the
    # pulse), not cells. (Not the anchor's mode: with few T cells left the
    # CD3+ coincidences would become the anchor.)
    lymph_dims = dims(lo45, lo, hi)
    size_how = ""
    for scatter in ("FSC-H", "FSC-A"):
        if scatter not in context.channels or window.sum() < 30:
            continue
        size = context.values(scatter, "linear")
        s_counts, s_centers, s_sigma = smoothed_density(size[window], params.bins, context.xp)
        s_modes, s_valleys = significant_modes(s_counts, s_sigma, params.valley_z)
        if len(s_modes) < 2:
            continue
        bounds = [0] + [v for v, _ in s_valleys] + [len(s_counts)]
        mass = [float(s_counts[a:b].sum()) for a, b in zip(bounds[:-1], bounds[1:])]
        own = int(np.argmax(mass))
        if own + 1 < len(s_modes):
            bound = float(s_centers[_refine_valley(size[window], s_counts, s_centers, s_sigma, s_modes[own],
                                                   s_modes[own + 1], context.xp)])
            lymph_dims.append(Dimension(scatter, "linear", None, bound))
            size_how = f"; below the {scatter} valley under a larger coincident-event mode"
            break
    context.add(Gate(names["lymphocytes"], parent, "rectangle", lymph_dims,
                     method=f"phenotype-named: located by {anchor_name} events; {lo_how}, {hi_how}; {lo45_how}"
                            f"{size_how}",
                     extra={"anchor": anchor_name, "anchor_events": int(anchor_ssc.size),
                            "anchor_ssc_median": round(a_median, 6), "ssc_modes": len(modes)}))

    above = inside & (ssc >= hi)
    has_myeloid = lymph_mode is not None and lymph_mode + 1 < len(modes) and above.sum() >= 20
    if not has_myeloid:
        context.flag(names["lymphocytes"], "lymphocytes_only", "info",
                     "no myeloid population above the lymphocytes in SSC (file exported from a lymphocyte gate?): "
                     "monocytes and granulocytes not gated")
        empty(names["monocytes"], "no myeloid mode above the lymphocytes")
        empty(names["granulocytes"], "no myeloid mode above the lymphocytes")
        return
    # Monocytes and granulocytes overlap on each axis alone (granulocytes
    # are the larger, CD45-dimmer, higher-SSC population), so they are
    # split in the plane: two k-means centres give the direction between the
    # populations, and a real valley of the events projected on it is the
    # border (a line across CD45 × SSC).
    box = (float(np.min(cd45[above])) - 0.05, float(np.max(cd45[above])) + 0.05, hi,
           float(np.max(ssc[above])) + 0.05)
    split = split_in_plane(np.column_stack([cd45[above], ssc[above]]), z=params.valley_z, seed=params.seed,
                           xp=context.xp, bins=params.bins)
    if split is not None:
        normal, offset, score = split
        high_side = clip_box_to_half_plane(box, normal, offset)
        low_side = clip_box_to_half_plane(box, -normal, -offset)
        # The side with the higher SSC is the granulocytes'.
        high_is_granulocytes = normal[1] > 0
        granulocyte_polygon, monocyte_polygon = (high_side, low_side) if high_is_granulocytes else (low_side, high_side)
        how = f"valley (z = {score:.1f}) across the k-means direction between the two myeloid populations"
        for name, polygon in (("monocytes", monocyte_polygon), ("granulocytes", granulocyte_polygon)):
            context.add(Gate(names[name], parent, "polygon", [Dimension(cd45_name, "logicle"),
                                                              Dimension(ssc_name, "log")],
                             vertices=polygon, method=f"above the lymphocytes in SSC; {how}",
                             extra={"valley_z": round(float(score), 2)}))
        return
    # One myeloid population: named by its CD45 (monocytes about as bright as
    # the lymphocytes, granulocytes dimmer; the nearer of the two).
    lymph_cd45 = float(np.median(cd45[context.masks[names["lymphocytes"]]]))
    myeloid_cd45 = float(np.median(cd45[above]))
    leuko_floor = float(np.quantile(cd45[inside], 0.01))
    is_monocyte = abs(myeloid_cd45 - lymph_cd45) < abs(myeloid_cd45 - leuko_floor)
    one, other = ("monocytes", "granulocytes") if is_monocyte else ("granulocytes", "monocytes")
    context.add(Gate(names[one], parent, "rectangle", dims(None, hi, None),
                     method=f"the one myeloid population above the lymphocytes, named {one} by its CD45"))
    empty(names[other], f"no second myeloid population (one, named {one})")
    context.flag(names[other], "not_found", "info", f"one myeloid population only, named {one} by its CD45")


def split_in_plane(points, *, z=3.0, seed=0, xp=np, bins=256, probe=20000):
    """A line splitting two overlapping populations of 2-D ``points``, if they are two.

    Each axis is scaled by its interquartile range; k-means with two
    centres (:func:`gpu.kmeans`) gives the direction from one population to
    the other; the points projected on that direction are split at their
    clearest real valley (:func:`significant_modes`).

    Returns
    -------
    (normal, offset, z_score) or None
        Points with ``points @ normal >= offset`` lie on the side the
        direction points to; ``None`` when the projection has one mode.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> a = rng.normal([0.0, 0.0], 0.3, (2000, 2)); b = rng.normal([1.0, 2.0], 0.3, (2000, 2))
    >>> normal, offset, score = split_in_plane(np.vstack([a, b]))
    >>> int(((b @ normal) >= offset).sum() if normal @ [1, 2] > 0 else ((a @ normal) >= offset).sum()) > 1950
    True
    """
    from gpu import kmeans

    points = np.asarray(points, dtype=np.float64)
    if points.shape[0] < 40:
        return None
    location = np.median(points, axis=0)
    scale = np.subtract(*np.percentile(points, [75, 25], axis=0))
    scale = np.where(scale > 0, scale, 1.0)
    standard = points - location
    standard /= scale  # in place: one n × 2 float64 temporary fewer, the same numbers
    del points  # (float64 copy of the caller's points; not needed again)
    # k-means++ draws events by index: put them in an order of their values
    # so that the file's event order cannot change the split. (The probe's
    # rows of that order, taken without sorting a copy of every point.)
    order = np.lexsort(standard.T[::-1])
    sample = standard[_probe(order, probe)]
    del order
    fit = kmeans(xp.asarray(sample), 2, seed=seed)
    centers = to_numpy(fit.centers)
    direction = centers[1] - centers[0]
    if not np.linalg.norm(direction) > 0:
        return None
    direction = direction / np.linalg.norm(direction)
    projected = standard @ direction
    counts, centres, sigma = smoothed_density(projected, bins, xp)
    modes, valleys = significant_modes(counts, sigma, z)
    if len(modes) < 2:
        return None
    best = max(range(len(valleys)), key=lambda i: valleys[i][1])
    valley = _refine_valley(projected, counts, centres, sigma, modes[best], modes[best + 1], xp)
    threshold = float(centres[valley])
    normal = direction / scale
    return normal, threshold + float(normal @ location), float(valleys[best][1])


def clip_box_to_half_plane(box, normal, offset):
    """Vertices of the part of the rectangle ``box`` = (x0, x1, y0, y1) where ``(x, y) @ normal >= offset``.

    Examples
    --------
    >>> clip_box_to_half_plane((0, 2, 0, 1), np.array([1.0, 0.0]), 1.0)
    [(1.0, 0.0), (2.0, 0.0), (2.0, 1.0), (1.0, 1.0)]
    """
    x0, x1, y0, y1 = box
    corners = [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
    inside = lambda p: p[0] * normal[0] + p[1] * normal[1] >= offset
    out = []
    for a, b in zip(corners, corners[1:] + corners[:1]):
        if inside(a):
            out.append(a)
        if inside(a) != inside(b):
            fa = a[0] * normal[0] + a[1] * normal[1] - offset
            fb = b[0] * normal[0] + b[1] * normal[1] - offset
            t = fa / (fa - fb)
            out.append((a[0] + t * (b[0] - a[0]), a[1] + t * (b[1] - a[1])))
    return [(float(x), float(y)) for x, y in out]


# --------------------------------------------------------------------------- checks

def verify_gating(data, channels, masks, gates):
    """Check every gate against the data it was drawn on; a list of :class:`Flag`.

    * **Cut inside the data**: a 1-D cut found in a population lies within
      that population's range, widened by one negative SD (a cut above every
      event of a population holding positives finds none of them).
    * **Phenotype position**: lymphocytes have lower SSC than monocytes and
      granulocytes, and at least the granulocytes' CD45.
    * **Back-gating**: most CD3+ leukocytes (T cells: CD3+ by the T-cell cut)
      fall inside the lymphocyte gate; most lymphocyte-gate events are
      positive for CD3, CD19 or CD16/56.

    Examples
    --------
    >>> verify_gating(np.zeros((0, 1)), {}, {}, [])
    []
    """
    flags = []
    by_name = {g.name: g for g in gates}
    for gate in gates:
        found_in = gate.extra.get("found_in") if isinstance(gate.extra, dict) else None
        if found_in not in masks or not gate.dimensions or gate.shape != "rectangle":
            continue
        dimension = gate.dimensions[0]
        cut = dimension.minimum if dimension.minimum is not None else dimension.maximum
        if cut is None:
            continue
        values = axis_values(data, channels, dimension)[masks[found_in]]
        values = values[np.isfinite(values)]
        if values.size == 0:
            continue
        counts, centers, sigma = smoothed_density(values)
        modes, _ = significant_modes(counts, sigma)
        low, high = float(values.min()), float(values.max())
        if "method" not in gate.extra:
            continue  # the complement of a gate checked here (same cut)
        separates = gate.extra.get("method") == "valley"
        if separates and len(modes) >= 2 and not centers[modes[0]] < cut < centers[modes[-1]]:
            flags.append(Flag(gate.name, "cut_outside_data", "fail",
                              f"{dimension.channel} cut {cut:.3g} lies outside the populations of {found_in} it "
                              f"should separate (modes {centers[modes[0]]:.3g} to {centers[modes[-1]]:.3g})"))
        elif not separates and modes and cut < centers[modes[-1]]:
            # A cut in the negatives' tail (no population above a valley)
            # must clear every mode, or it calls negatives positive.
            flags.append(Flag(gate.name, "cut_outside_data", "fail",
                              f"{dimension.channel} cut {cut:.3g} lies below a mode of {found_in} "
                              f"({centers[modes[-1]]:.3g}) although no positive population was found there"))
        elif cut > high + (high - low) or cut < low - (high - low):
            flags.append(Flag(gate.name, "cut_outside_data", "fail",
                              f"{dimension.channel} cut {cut:.3g} lies far outside the {found_in} events' range "
                              f"{low:.3g} to {high:.3g}"))
    lymph = masks.get("lymphocytes")
    if lymph is None or "CD45" not in channels or "SSC-A" not in channels:
        return flags
    cd45 = data[:, channels["CD45"]]
    ssc = axis_values(data, channels, Dimension("SSC-A", "log"))
    n_lymph = int(lymph.sum())
    if n_lymph == 0:
        leukocytes = masks.get("leukocytes")
        if leukocytes is not None and leukocytes.sum() >= 100:
            flags.append(Flag("lymphocytes", "empty_gate", "fail",
                              f"no lymphocytes among {int(leukocytes.sum())} leukocytes"))
        return flags
    for other in ("monocytes", "granulocytes"):
        mask = masks.get(other)
        if mask is None or mask.sum() < 20:
            continue
        if np.median(ssc[mask]) <= np.median(ssc[lymph]):
            flags.append(Flag("lymphocytes", "phenotype_position", "fail",
                              f"lymphocyte gate has higher SSC than the {other} gate (wrong cluster)"))
    gran = masks.get("granulocytes")
    if gran is not None and gran.sum() >= 20 and np.median(cd45[lymph]) < np.median(cd45[gran]):
        flags.append(Flag("lymphocytes", "phenotype_position", "fail",
                          "lymphocyte gate is CD45-dimmer than the granulocyte gate (wrong cluster)"))
    leukocytes = masks.get("leukocytes")
    if leukocytes is not None and "CD3" in channels and leukocytes.sum() >= 10:
        # Back-gating with the CD3+ leukocytes found afresh (a valley in all
        # leukocytes), not with the T-cell gate under test.
        cd3_cut, info = positive_cut(data[leukocytes, channels["CD3"]])
        if info["method"] == "valley":
            cd3_positive = leukocytes & (data[:, channels["CD3"]] >= cd3_cut)
            total = int(cd3_positive.sum())
            outside = int((cd3_positive & ~lymph).sum())
            if total >= 20 and outside > 0.5 * total:
                flags.append(Flag("lymphocytes", "lymphocytes_miss_t_cells", "fail",
                                  f"{outside} of {total} CD3+ leukocytes lie outside the lymphocyte gate"))
            lineage = data[:, channels["CD3"]] >= cd3_cut
            for population, marker in (("b_cells", "CD19"), ("nk_cells", "CD16+56")):
                gate = by_name.get(population)
                if gate is not None and marker in channels and gate.dimensions and gate.dimensions[0].minimum is not None:
                    lineage = lineage | (data[:, channels[marker]] >= gate.dimensions[0].minimum)
            negative = int((lymph & ~lineage).sum())
            if n_lymph >= 50 and negative > 0.5 * n_lymph:
                flags.append(Flag("lymphocytes", "lymphocytes_lineage_negative", "fail",
                                  f"{negative} of {n_lymph} lymphocyte-gate events are negative for every lineage "
                                  f"marker (CD3, CD19, CD16/56): not lymphocytes"))
    return flags


# --------------------------------------------------------------------------- running a plan

def _empty_step(context, step, parent):
    """A step whose parent holds no events: its populations are empty, and flagged ``fail``.

    Every density and threshold method needs events to work on (an empty
    singlet set has no percentiles); a count of 0 here is not a measurement,
    so the populations are marked unreliable rather than reported as absent.
    """
    empty = np.zeros(context.data.shape[0], dtype=bool)
    for population in step.populations + STEP_METHODS[step.method].side_populations(step):
        context.masks[population] = empty.copy()
        context.parents[population] = parent
        context.emptied.add(population)
    if parent in context.emptied:
        return  # flagged where the emptiness began; unreliability follows the tree down
    for population in step.populations:
        context.flag(population, "empty_parent", "fail", f"0 events in {parent}: {population} cannot be gated")


def run_plan(data, channels, panel, params, device=None, tops=None):
    """Run ``panel``'s gating plan on a transformed event matrix.

    Parameters
    ----------
    data : ndarray, shape (n_events, n_channels)
    channels : dict
        Marker or scatter name → column.
    panel : gating.panels.GatingPanel
    params : gating.GatingParams
    device : {"auto", "cpu", "gpu"}, optional
    tops : dict, optional
        Marker → the channel's range (``$PnR``) its logicle scale was made
        with (default 262144): for steps that work in linear units (the CAR
        reference's normalisation).

    Returns
    -------
    gating.GatingResult
    """
    from .auto import GatingResult

    xp, device_name = get_array_module(device)
    # float32 or float64 as given (float32 from the CLI: a float64 copy doubled a large tube's memory)
    data = np.asarray(data)
    if data.dtype not in (np.float32, np.float64):
        data = data.astype(np.float64)
    context = GatingContext(data, channels, params, xp, device_name, tops)
    for step in panel.plan:
        missing = [d for d in step.dimensions if d not in channels and d not in ("FSC-H",)]
        if missing:
            if step.optional or all(p not in panel.required for p in missing):
                # Its populations stand for its parent where later steps gate
                # inside them, and are absent where they are asked to exclude.
                for population in step.populations + STEP_METHODS[step.method].side_populations(step):
                    context.stand_ins[population] = step.parent
                    context.skipped.add(population)
                continue
        parent = context.resolve(step.parent) if step.parent else None
        if parent in context.masks and not context.masks[parent].any():
            _empty_step(context, step, parent)
            continue
        STEP_METHODS[step.method].function(context, step)
    context.flags.extend(verify_gating(context.data, channels, context.masks, context.gates))
    unreliable = unreliable_populations(context.flags, context.parents)
    return GatingResult(masks=context.masks, gates=context.gates, flags=context.flags, device=device_name,
                        params=params, parents=dict(context.parents), unreliable=unreliable,
                        populations=[p for p in panel.report if p in context.masks], panel=panel.name)
