"""Seeded simulator of lyse-no-wash whole-blood FCS files with counting beads.

The simulator is the oracle for every accuracy claim of the package: it writes
FCS files that look like BD Trucount-style single-platform tubes (a TBNK tube
and a CAR-T tube) and records, beside each file, the exact truth that produced
it: the population concentrations (cells/uL of blood), the per-event labels and
the number of singlet events of every population.

How a tube is made
------------------
1. **Particles.** For each population the number of particles that pass the
   laser is ``Poisson(concentration x blood_volume_ul)``. Beads are
   ``Poisson(beads_per_test / sample_volume_ul x blood_volume_ul)``; debris is
   a ``debris_fraction`` of all particles.
2. **Signals.** Each particle gets scatter (lognormal around a population
   median) and a true fluorescence signal per marker (lognormal around a
   population median; markers a population does not carry get
   autofluorescence of a few hundred). Each detector's signal is multiplied by
   a detector gain.
3. **Coincidence.** The particles are shuffled into acquisition order and each
   one is merged with the next with probability ``doublet_rate``. A doublet
   has FSC-A, SSC-A and fluorescence equal to the sum of its two particles and
   FSC-H about 1.15 x the larger of the two heights, so FSC-H / FSC-A drops
   from ~0.9 (singlets) to ~0.5.
4. **Detection.** Fluorescence is mixed by a spillover matrix S
   (``raw = signal @ S``, rows = dye, columns = detector, unit diagonal,
   off-diagonals perturbed +/-20 % per file), electronic noise
   ``Normal(0, 45-75)`` is added to every fluorescence detector (so values
   near zero go negative), and everything is clipped at the 262143 ceiling.
   Compensation with the matrix written in the file, ``raw @ inv(S)``,
   recovers ``gain x signal + noise @ inv(S)`` exactly (except for clipped
   events).

Less ideal tubes (opt-in)
-------------------------
The defaults above are deliberately clean (and the committed sample set is
made with them). Real instruments and patients are not: :func:`simulate_tube`
adds, each behind its own keyword, photon statistics in every detector
(``photon_noise``: spillover *spreading* after compensation), NK cells as a
continuum (``nk_continuum``), NKT-like CD3+ CD16/56+ T cells
(``nkt_fraction``), CD45-negative debris with lymphocyte/monocyte scatter
(``rbc_ghost_fraction``) and dim subsets bridging positive and negative modes
(``marker_continua``); basophils and eosinophils come in through the
concentrations (``basophils``, ``eosinophils``). New random draws use new
streams, so a tube made without these options is byte-identical to one made
before they existed.

Why singlet cells / singlet beads is unbiased
---------------------------------------------
Coincidence is applied *after* all particles - cells, beads and debris alike -
are shuffled together, so every particle has the same chance,
``(1 - p) / (1 + p)`` for ``p = doublet_rate``, of ending up as a singlet
event, whatever its type. The expected number of singlet cells of a population
divided by the expected number of singlet beads is therefore exactly the ratio
of their particle numbers, and ``cells/uL = singlet cells / singlet beads x
beads_per_test / sample_volume_ul`` is unbiased. Keep it that way: any change
that makes doublet formation depend on particle type breaks the oracle.

Truth files
-----------
:func:`write_tube` writes ``X.fcs`` and, in a ``truth/`` folder beside it,
``truth/X.json`` (parameters, concentrations, singlet event counts, the
spillover matrix, ...) and ``truth/X.labels.npy`` (one ``uint8`` label code
per event; ``label_names`` in the JSON maps codes to names). Label names are
singular and describe *events* (``cd4_t`` is a CAR-negative CD4 T singlet,
``car_cd4_t`` a CAR+ one); population names in ``concentrations_per_ul`` and
``singlet_events`` are the package's stable population names (``cd4_t`` there
is all CD4 T cells, CAR+ included).

Keywords and flowio
-------------------
``flowio.create_fcs`` strips leading ``$`` from metadata keys and lowercases
them; it writes FCS-standard keywords back as ``$KEY`` and every other keyword
as ``KEY`` (upper case). ``$SPILLOVER``, ``$VOL``, ``$CYT``, ``$DATE``,
``$BTIM``, ``$ETIM``, ``$FIL``, ``$SRC``, ``$COM`` and ``$TIMESTEP`` are
standard and round-trip; ``SPILL`` and ``TUBE NAME`` are non-standard and are
written without ``$`` as intended. ``$COMP`` (an FCS 2.0 keyword) is not in
flowio's list and would come out as ``COMP``; :func:`write_tube` renames it in
the TEXT segment without changing its length (see ``_encode_fcs``). Readers
(``flowio.FlowData.text``, ``flowkit.Sample.metadata``) report keys lowercased
without ``$``: ``spillover``, ``spill``, ``comp``, ``vol``, ``tube name``.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import io
import json
import sys
from array import array
from dataclasses import dataclass, field
from pathlib import Path

import flowio
import numpy as np

__all__ = [
    "SimulatedTube",
    "simulate_tube",
    "write_tube",
    "default_concentrations",
    "make_sample_set",
    "LABEL_NAMES",
    "PANELS",
    "FLUOROCHROMES",
    "detector_name",
    "marker_label",
    "label_populations",
    "POPULATION_LABELS",
    "PHOTOELECTRONS_PER_UNIT",
]

# ---------------------------------------------------------------------------
# Panels, names and instrument constants
# ---------------------------------------------------------------------------

#: Detector fluorochromes in instrument order; the ``"fl"`` style numbers
#: detectors FL1..FL7 in this order.
FLUOROCHROMES = ("FITC", "PE", "PerCP-Cy5.5", "PE-Cy7", "APC", "APC-Cy7", "V500-C")

#: Panels as (marker, dye, detector fluorochrome). The dye differs from the
#: detector only for 7-AAD, which is read in the PerCP-Cy5.5 detector.
PANELS = {
    "tbnk": (
        ("CD3", "FITC", "FITC"),
        ("CD16+56", "PE", "PE"),
        ("CD45", "PerCP-Cy5.5", "PerCP-Cy5.5"),
        ("CD4", "PE-Cy7", "PE-Cy7"),
        ("CD19", "APC", "APC"),
        ("CD8", "APC-Cy7", "APC-Cy7"),
    ),
    "car": (
        ("CD3", "FITC", "FITC"),
        ("CAR", "PE", "PE"),
        ("Viability", "7-AAD", "PerCP-Cy5.5"),
        ("CD4", "PE-Cy7", "PE-Cy7"),
        ("CD19", "APC", "APC"),
        ("CD8", "APC-Cy7", "APC-Cy7"),
        ("CD45", "V500-C", "V500-C"),
    ),
}

_DETECTOR_NAMES = {
    "bd": {
        "FITC": "FITC-A", "PE": "PE-A", "PerCP-Cy5.5": "PerCP-Cy5-5-A",
        "PE-Cy7": "PE-Cy7-A", "APC": "APC-A", "APC-Cy7": "APC-Cy7-A",
        "V500-C": "V500-C-A",
    },
    "fl": {f: f"FL{i + 1}-A" for i, f in enumerate(FLUOROCHROMES)},
    "attune": {
        "FITC": "BL1-A", "PE": "BL2-A", "PerCP-Cy5.5": "BL3-A",
        "PE-Cy7": "YL4-A", "APC": "RL1-A", "APC-Cy7": "RL3-A",
        "V500-C": "VL2-A",
    },
}

_CYTOMETERS = {"bd": "FACSCanto II", "fl": "Navios EX", "attune": "Attune NxT"}

MARKER_STYLES = ("plain", "space", "dash")
DETECTOR_STYLES = tuple(_DETECTOR_NAMES)
SPILL_KEYWORDS = ("$SPILLOVER", "SPILL", "$COMP")

SCATTER_CHANNELS = ("FSC-A", "FSC-H", "SSC-A")
TIME_CHANNEL = "Time"
_CEILING = 262143.0  # $PnR = 262144, so the largest value an ADC reports
_TIMESTEP_S = 0.01  # $TIMESTEP: the Time channel counts 10 ms ticks

#: Event label codes (index in this tuple). The same codes for both panels so
#: label arrays from different tubes can be compared directly.
#: Codes 0-12 are the original ones and never change meaning (the committed
#: sample set's label arrays use them); later cell types are appended. Which
#: populations each label counts in: :data:`POPULATION_LABELS` (also written
#: in every truth file as ``population_labels`` and ``label_populations``).
LABEL_NAMES = (
    "debris", "bead", "bead_doublet", "doublet", "granulocyte", "monocyte",
    "cd4_t", "cd8_t", "car_cd4_t", "car_cd8_t", "b_cell", "nk_cell", "dead_cell",
    # appended: NKT-like T cells (CD3+ CD16/56+; T cells, not NK), basophils
    # (leukocytes, not lymphocytes), eosinophils (granulocytes) and CD45-negative
    # lyse-no-wash debris with lymphocyte/monocyte scatter (RBC ghosts)
    "nkt_cd4_t", "nkt_cd8_t", "basophil", "eosinophil", "rbc_ghost",
)
_CODE = {name: i for i, name in enumerate(LABEL_NAMES)}
_PARTICLE_LABELS = tuple(n for n in LABEL_NAMES if n not in ("doublet", "bead_doublet"))

# Base spillover between detectors, (from dye's detector, into detector):
# fraction. Values are typical of a 3-laser BD instrument; per file each is
# perturbed +/-20 %. Unlisted pairs are 0.
_BASE_SPILL = {
    ("FITC", "PE"): 0.20, ("FITC", "PerCP-Cy5.5"): 0.035, ("FITC", "PE-Cy7"): 0.006,
    ("FITC", "V500-C"): 0.003,
    ("PE", "FITC"): 0.012, ("PE", "PerCP-Cy5.5"): 0.16, ("PE", "PE-Cy7"): 0.03,
    ("PE", "APC"): 0.002, ("PE", "APC-Cy7"): 0.001,
    ("PerCP-Cy5.5", "PE"): 0.01, ("PerCP-Cy5.5", "PE-Cy7"): 0.10,
    ("PerCP-Cy5.5", "APC"): 0.02, ("PerCP-Cy5.5", "APC-Cy7"): 0.04,
    ("PE-Cy7", "PE"): 0.015, ("PE-Cy7", "PerCP-Cy5.5"): 0.012,
    ("PE-Cy7", "APC"): 0.002, ("PE-Cy7", "APC-Cy7"): 0.03,
    ("APC", "PerCP-Cy5.5"): 0.008, ("APC", "PE-Cy7"): 0.005, ("APC", "APC-Cy7"): 0.10,
    ("APC-Cy7", "PE-Cy7"): 0.03, ("APC-Cy7", "APC"): 0.025,
    ("V500-C", "FITC"): 0.02, ("V500-C", "PE"): 0.003, ("V500-C", "PerCP-Cy5.5"): 0.001,
}

# Electronic noise SD per detector (raw units); within the 40-80 the brief
# asks for, different per detector so no code can assume one value.
_NOISE_SD = {
    "FITC": 55.0, "PE": 65.0, "PerCP-Cy5.5": 75.0, "PE-Cy7": 60.0,
    "APC": 45.0, "APC-Cy7": 70.0, "V500-C": 50.0,
}

# Autofluorescence median of a lymphocyte per detector; other cell types scale
# it by their ``af`` factor (granulocytes are the most autofluorescent).
_AUTOFLUORESCENCE = {
    "FITC": 200.0, "PE": 160.0, "PerCP-Cy5.5": 120.0, "PE-Cy7": 100.0,
    "APC": 70.0, "APC-Cy7": 60.0, "V500-C": 180.0,
}
_AF_SD = 0.35

# Bead signal per detector (before gain and spillover); with spillover the raw
# values land in 5e4-1.5e5 in every detector.
_BEAD_LEVEL = {
    "FITC": 7.0e4, "PE": 9.0e4, "PerCP-Cy5.5": 6.0e4, "PE-Cy7": 8.0e4,
    "APC": 9.0e4, "APC-Cy7": 6.0e4, "V500-C": 7.0e4,
}

# Population phenotypes. ``fsc``/``ssc``: (median FSC-A / SSC-A, log-sd).
# ``components``: list of (weight, {marker: (median, log-sd)}); a particle
# draws one component, and markers not listed get autofluorescence.
_LYMPH_FSC, _LYMPH_SSC = (45000.0, 0.10), (11000.0, 0.20)
_CD4_T = {"CD45": (20000.0, 0.25), "CD3": (10000.0, 0.30), "CD4": (12000.0, 0.25)}
_CD8_T = {"CD45": (20000.0, 0.25), "CD3": (10000.0, 0.30), "CD8": (15000.0, 0.35)}
# CAR reagent on CAR+ cells: a lognormal wide enough that ~5-10 % of CAR+ cells
# fall inside the negative (autofluorescence + noise) range - positivity is a
# continuum and gating must cope with that.
_CAR_SIGNAL = (1800.0, 0.90)

_POPULATIONS = {
    "debris": dict(fsc=(7000.0, 0.50), ssc=(3500.0, 0.60), af=0.5, components=[
        (0.7, {}),
        (0.3, {"Viability": (3000.0, 0.60)}),  # nuclear fragments take up 7-AAD
    ]),
    "bead": dict(fsc=(20000.0, 0.04), ssc=(30000.0, 0.04), af=0.0, components=[(1.0, {})]),
    "granulocyte": dict(fsc=(95000.0, 0.10), ssc=(110000.0, 0.18), af=3.0, components=[
        (1.0, {"CD45": (6000.0, 0.30), "CD16+56": (30000.0, 0.35)}),
    ]),
    "monocyte": dict(fsc=(80000.0, 0.10), ssc=(35000.0, 0.20), af=2.0, components=[
        (1.0, {"CD45": (30000.0, 0.25), "CD4": (1500.0, 0.35)}),
    ]),
    "cd4_t": dict(fsc=_LYMPH_FSC, ssc=_LYMPH_SSC, af=1.0, components=[(1.0, _CD4_T)]),
    "cd8_t": dict(fsc=_LYMPH_FSC, ssc=_LYMPH_SSC, af=1.0, components=[(1.0, _CD8_T)]),
    # activated CAR-T cells are a little larger
    "car_cd4_t": dict(fsc=(52000.0, 0.12), ssc=(13000.0, 0.22), af=1.0,
                      components=[(1.0, {**_CD4_T, "CAR": _CAR_SIGNAL})]),
    "car_cd8_t": dict(fsc=(52000.0, 0.12), ssc=(13000.0, 0.22), af=1.0,
                      components=[(1.0, {**_CD8_T, "CAR": _CAR_SIGNAL})]),
    "b_cell": dict(fsc=(43000.0, 0.10), ssc=(10000.0, 0.20), af=1.0, components=[
        (1.0, {"CD45": (18000.0, 0.25), "CD19": (8000.0, 0.30)}),
    ]),
    "nk_cell": dict(fsc=(46000.0, 0.10), ssc=(14000.0, 0.22), af=1.0, components=[
        (0.65, {"CD45": (22000.0, 0.25), "CD16+56": (6000.0, 0.45)}),
        (0.35, {"CD45": (22000.0, 0.25), "CD16+56": (6000.0, 0.45), "CD8": (1500.0, 0.40)}),
    ]),
    # Dead lymphocytes: smaller, CD45 dimmer, 7-AAD bright, about half CD3+.
    "dead_cell": dict(fsc=(28000.0, 0.18), ssc=(15000.0, 0.30), af=1.5, components=[
        (0.30, {"CD45": (7000.0, 0.35), "Viability": (25000.0, 0.40),
                "CD3": (5000.0, 0.35), "CD4": (6000.0, 0.30)}),
        (0.20, {"CD45": (7000.0, 0.35), "Viability": (25000.0, 0.40),
                "CD3": (5000.0, 0.35), "CD8": (7000.0, 0.35)}),
        (0.50, {"CD45": (7000.0, 0.35), "Viability": (25000.0, 0.40)}),
    ]),
}

# --- Cell types beyond the original ones (used only when a tube has them) ---
# NKT-like T cells: CD3+ T cells that also carry CD56 (and some CD16), a few %
# of blood T cells in adults; mostly CD8+ (Lanier's "CD3+CD56+ T cells").
# The CD16+56 signal is dimmer than on CD56-dim NK cells.
_NKT_CD16_56 = (2500.0, 0.55)
_POPULATIONS["nkt_cd4_t"] = dict(fsc=_LYMPH_FSC, ssc=(12000.0, 0.22), af=1.0, components=[
    (1.0, {**_CD4_T, "CD16+56": _NKT_CD16_56})])
_POPULATIONS["nkt_cd8_t"] = dict(fsc=_LYMPH_FSC, ssc=(12000.0, 0.22), af=1.0, components=[
    (1.0, {**_CD8_T, "CD16+56": _NKT_CD16_56})])
# Basophils: about lymphocyte-sized, low SSC (their granules are water-soluble
# and scatter little), CD45 dimmer than lymphocytes (between granulocytes and
# lymphocytes on CD45 x SSC), and CD3- CD19- CD16/56-: on CD45 x SSC they sit
# just below the lymphocytes and leak into a lymphocyte gate drawn on SSC.
_POPULATIONS["basophil"] = dict(fsc=(47000.0, 0.10), ssc=(14000.0, 0.22), af=1.5, components=[
    (1.0, {"CD45": (8000.0, 0.30)})])
# Eosinophils: SSC above neutrophils (large refractile granules), CD45 brighter
# than neutrophils, CD16-negative, and the most autofluorescent leukocytes.
_POPULATIONS["eosinophil"] = dict(fsc=(90000.0, 0.10), ssc=(150000.0, 0.14), af=5.0, components=[
    (1.0, {"CD45": (13000.0, 0.25)})])
# Lyse-no-wash debris that is NOT small: incompletely lysed RBCs, RBC ghosts
# and platelet clumps. CD45-negative (autofluorescence only) with FSC/SSC
# spread over the lymphocyte and lower monocyte region - a CD45-negative
# cluster a scatter-only or component-order gate calls "lymphocytes".
_POPULATIONS["rbc_ghost"] = dict(fsc=(33000.0, 0.35), ssc=(11000.0, 0.55), af=0.6, components=[(1.0, {})])

# --- Continua (marker_continua=True): real populations are not single tight
# lognormals; dim subsets bridge positive and negative modes. Shares are
# typical of adult blood: CD8-dim T ~10-30 % of CD8 T, CD4-dim (activated,
# CD4 internalised) T a few %, CD3-dim (activated, TCR down-regulated) T a few
# %, CD19-dim (transitional / plasmablast) B ~10 %, CD16+ (intermediate and
# non-classical) monocytes ~10-15 %, CD16-dim immature neutrophils ~5-10 %.
_CD3_DIM = (3000.0, 0.45)
_CONTINUUM_POPULATIONS = {
    "cd4_t": [(0.90, _CD4_T),
              (0.05, {**_CD4_T, "CD4": (3000.0, 0.50)}),
              (0.05, {**_CD4_T, "CD3": _CD3_DIM})],
    "cd8_t": [(0.76, _CD8_T),
              (0.19, {**_CD8_T, "CD8": (2500.0, 0.55)}),
              (0.05, {**_CD8_T, "CD3": _CD3_DIM})],
    "b_cell": [(0.90, {"CD45": (18000.0, 0.25), "CD19": (8000.0, 0.35)}),
               (0.10, {"CD45": (18000.0, 0.25), "CD19": (2500.0, 0.50)})],
    "monocyte": [(0.87, {"CD45": (30000.0, 0.25), "CD4": (1500.0, 0.35)}),
                 (0.13, {"CD45": (34000.0, 0.25), "CD4": (1000.0, 0.40), "CD16+56": (3500.0, 0.55)})],
    "granulocyte": [(0.93, {"CD45": (6000.0, 0.30), "CD16+56": (30000.0, 0.35)}),
                    (0.07, {"CD45": (6000.0, 0.30), "CD16+56": (5000.0, 0.60)})],
}
# NK cells as a continuum (nk_continuum=True): ~90 % CD56-dim CD16-bright
# (about a third of them CD8-dim, CD8alpha-alpha), ~10 % CD56-bright CD16-dim
# or negative, which in a combined CD16+56 reagent are dimmer than the CD16+
# majority (CD16 carries most of the signal) and a little CD45-brighter.
_NK_CONTINUUM = [
    (0.60, {"CD45": (22000.0, 0.25), "CD16+56": (6000.0, 0.50)}),
    (0.30, {"CD45": (22000.0, 0.25), "CD16+56": (6000.0, 0.50), "CD8": (1500.0, 0.60)}),
    (0.10, {"CD45": (26000.0, 0.25), "CD16+56": (1500.0, 0.50)}),
]

# Photoelectrons per raw unit in each detector at gain 1 (photon_noise=True).
# A detector counts photoelectrons; their Poisson spread, scaled back to raw
# units, survives compensation as spillover spreading: a compensated negative
# in detector j of cells bright in dye i has an SD of about
# SS_ij * sqrt(F_i), with SS_ij^2 = s_ij / q_j + s_ij^2 / q_i. These yields
# put SS for the main pairs of _BASE_SPILL at 2-5 sqrt(units) (FITC->PE ~2.4,
# PE->PerCP-Cy5.5 ~4.5, PerCP-Cy5.5->PE-Cy7 ~3.4, APC->APC-Cy7 ~3.7), within
# the 1-8 reported for FACSCanto-class instruments (Nguyen et al., Cytometry A
# 83:306, 2013); red and far-red PMTs yield fewer photoelectrons than
# blue/green ones, so their detectors are noisier per unit of signal.
PHOTOELECTRONS_PER_UNIT = {
    "FITC": 0.05, "PE": 0.04, "PerCP-Cy5.5": 0.008, "PE-Cy7": 0.010,
    "APC": 0.012, "APC-Cy7": 0.008, "V500-C": 0.02,
}

# Concentration keys: "leaf" keys are drawn directly; derived keys are sums
# and must agree with the leaves if a caller supplies them.
# ``nkt_cd4_t``/``nkt_cd8_t`` are subsets of ``cd4_t``/``cd8_t`` (as the CAR+
# ones are) and ``eosinophils`` a subset of ``granulocytes``; ``basophils``
# count in leukocytes only.
_LEAF_KEYS = ("granulocytes", "monocytes", "cd4_t", "cd8_t", "car_cd4_t",
              "car_cd8_t", "b_cells", "nk_cells", "dead_cells",
              "nkt_cd4_t", "nkt_cd8_t", "basophils", "eosinophils")
_DERIVED_KEYS = ("car_t", "t_cells", "lymphocytes", "leukocytes", "nkt_cells")

# Independent random streams (children of one SeedSequence) so that, for one
# seed, naming options or the spillover draw never change the events.
# Streams appended later (extra_counts, photons) leave the first ones - and so
# every tube made without the newer options - unchanged.
_STREAMS = ("counts", "order", "doublets", "spill", "gains", "noise", "channels", "time",
            "extra_counts", "photons")

DEFAULT_DILUTION_FACTOR = (50.0 + 20.0 + 450.0) / 50.0  # blood + antibody + lyse


# ---------------------------------------------------------------------------
# Result
# ---------------------------------------------------------------------------

@dataclass
class SimulatedTube:
    """One simulated tube, ready to be written with :func:`write_tube`.

    Attributes
    ----------
    events : numpy.ndarray
        ``(n_events, n_channels)`` float32, raw (uncompensated, linear)
        values in the file's channel order.
    pnn : list of str
        ``$PnN`` detector names, file order.
    pns : list of str
        ``$PnS`` marker labels, file order; ``""`` for scatter and time.
    metadata : dict
        Keywords to write, under their intended names (``"$SPILLOVER"``,
        ``"SPILL"``, ``"$VOL"``, ``"TUBE NAME"``...), string values.
    labels : numpy.ndarray
        ``(n_events,)`` uint8 label codes, see :data:`LABEL_NAMES`.
    truth : dict
        The JSON-serialisable truth record (see :func:`simulate_tube`).
    signal : numpy.ndarray
        ``(n_events, n_fluorescence)`` float64 gain-scaled true signal before
        spillover, noise and clipping, in the file's fluorescence channel
        order (the order of the spillover keyword). Not written to disk; it
        lets tests check compensation exactly.
    """

    events: np.ndarray
    pnn: list
    pns: list
    metadata: dict
    labels: np.ndarray
    truth: dict
    signal: np.ndarray | None = field(default=None, repr=False)

    @property
    def n_events(self) -> int:
        """Number of events in the tube."""
        return int(self.events.shape[0])


# ---------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------

def detector_name(fluorochrome: str, detector_style: str = "bd") -> str:
    """``$PnN`` of the detector that reads ``fluorochrome``.

    Parameters
    ----------
    fluorochrome : str
        A detector fluorochrome from :data:`FLUOROCHROMES` (``"7-AAD"`` is
        accepted and read in the PerCP-Cy5.5 detector).
    detector_style : {"bd", "fl", "attune"}
        Naming convention of the instrument.

    Returns
    -------
    str

    Examples
    --------
    >>> detector_name("PerCP-Cy5.5", "bd")
    'PerCP-Cy5-5-A'
    >>> detector_name("APC", "fl")
    'FL5-A'
    >>> detector_name("7-AAD", "attune")
    'BL3-A'
    """
    if detector_style not in _DETECTOR_NAMES:
        raise ValueError(f"detector_style must be one of {DETECTOR_STYLES}, got {detector_style!r}")
    if fluorochrome == "7-AAD":
        fluorochrome = "PerCP-Cy5.5"
    try:
        return _DETECTOR_NAMES[detector_style][fluorochrome]
    except KeyError:
        raise ValueError(f"unknown fluorochrome {fluorochrome!r}; expected one of {FLUOROCHROMES}") from None


def marker_label(marker: str, dye: str, marker_style: str = "plain") -> str:
    """``$PnS`` text for a marker in a given naming style.

    Examples
    --------
    >>> marker_label("CD16+56", "PE", "space")
    'CD16+56 PE'
    >>> marker_label("Viability", "7-AAD", "dash")
    'Viability-7-AAD'
    >>> marker_label("CD3", "FITC", "plain")
    'CD3'
    """
    if marker_style == "plain":
        return marker
    if marker_style == "space":
        return f"{marker} {dye}"
    if marker_style == "dash":
        return f"{marker}-{dye}"
    raise ValueError(f"marker_style must be one of {MARKER_STYLES}, got {marker_style!r}")


# ---------------------------------------------------------------------------
# Concentrations
# ---------------------------------------------------------------------------

def default_concentrations(panel="tbnk", *, lymphocytes=1000.0, b_cells=110.0,
                           nk_cells=110.0, cd4_fraction=0.6, monocytes=350.0,
                           granulocytes=2600.0, car_t=None, car_cd4_fraction=0.4,
                           dead_cells=None, basophils=0.0, eosinophils=0.0) -> dict:
    """A plausible blood profile (cells/uL) for a lupus screening patient.

    T cells are what is left of the lymphocytes after B and NK cells, so
    overriding ``b_cells`` keeps ``lymphocytes`` fixed.

    Parameters
    ----------
    panel : {"tbnk", "car"}
    lymphocytes : float
        Live T + B + NK cells/uL (CAR+ T cells included).
    b_cells, nk_cells, monocytes, granulocytes : float
        Cells/uL. ``granulocytes`` are all granulocytes, eosinophils included
        (the neutrophils are ``granulocytes - eosinophils``).
    cd4_fraction : float
        CD4 T cells / all T cells (CAR+ included).
    car_t : float, optional
        CAR+ T cells/uL; CAR tube only (default 50 there, 0 for TBNK).
    car_cd4_fraction : float
        Share of CAR+ T cells that are CD4+ (the rest are CD8+).
    dead_cells : float, optional
        Dead (7-AAD+) lymphocytes/uL; CAR tube only (default 3 % of
        lymphocytes there, 0 for TBNK).
    basophils : float
        Basophils/uL (leukocytes, not lymphocytes nor granulocytes in the
        counts: they fall outside the granulocyte gate); adults ~20-100.
    eosinophils : float
        Eosinophils/uL, part of ``granulocytes``; adults ~50-500, more in
        eosinophilia.

    Returns
    -------
    dict
        Leaf keys ``granulocytes, monocytes, cd4_t, cd8_t, b_cells, nk_cells``
        (plus ``car_cd4_t, car_cd8_t, dead_cells`` for the CAR panel) and the
        derived ``t_cells, lymphocytes, leukocytes`` (plus ``car_t``), and
        ``basophils, eosinophils, nkt_cd4_t, nkt_cd8_t, nkt_cells`` (NKT 0
        here; see ``simulate_tube(nkt_fraction=...)``). ``cd4_t`` and
        ``cd8_t`` include their CAR+ and NKT cells; leukocytes include the
        basophils.

    Examples
    --------
    >>> c = default_concentrations("tbnk", b_cells=12)
    >>> c["b_cells"], c["lymphocytes"]
    (12.0, 1000.0)
    >>> round(c["t_cells"], 6) == round(c["cd4_t"] + c["cd8_t"], 6)
    True
    >>> default_concentrations("car", car_t=100)["car_t"]
    100.0
    >>> c = default_concentrations("tbnk", basophils=40, eosinophils=300)
    >>> c["leukocytes"] - c["lymphocytes"] - c["monocytes"] - c["granulocytes"]
    40.0
    """
    _check_panel(panel)
    is_car = panel == "car"
    if car_t is None:
        car_t = 50.0 if is_car else 0.0
    if dead_cells is None:
        dead_cells = 0.03 * lymphocytes if is_car else 0.0
    if not is_car and (car_t or dead_cells):
        raise ValueError("the TBNK tube has no CAR+ or dead cells; use panel='car'")
    t_cells = float(lymphocytes) - float(b_cells) - float(nk_cells)
    if t_cells < 0:
        raise ValueError(f"b_cells + nk_cells ({b_cells + nk_cells}) exceed lymphocytes ({lymphocytes})")
    cd4 = t_cells * float(cd4_fraction)
    cd8 = t_cells - cd4
    out = {"granulocytes": float(granulocytes), "monocytes": float(monocytes),
           "cd4_t": cd4, "cd8_t": cd8, "b_cells": float(b_cells), "nk_cells": float(nk_cells),
           "basophils": float(basophils), "eosinophils": float(eosinophils)}
    if is_car:
        out["car_cd4_t"] = float(car_t) * float(car_cd4_fraction)
        out["car_cd8_t"] = float(car_t) - out["car_cd4_t"]
        out["dead_cells"] = float(dead_cells)
    return _complete_concentrations(out, panel)


def _check_panel(panel):
    if panel not in PANELS:
        raise ValueError(f"panel must be one of {tuple(PANELS)}, got {panel!r}")


def _complete_concentrations(conc: dict, panel: str) -> dict:
    """Validate leaf concentrations and add the derived sums (ordered dict)."""
    unknown = set(conc) - set(_LEAF_KEYS) - set(_DERIVED_KEYS)
    if unknown:
        raise ValueError(f"unknown concentration keys {sorted(unknown)}; "
                         f"leaf keys are {_LEAF_KEYS}, derived keys {_DERIVED_KEYS}")
    leaf = {k: float(conc.get(k, 0.0)) for k in _LEAF_KEYS}
    for k, v in leaf.items():
        if not np.isfinite(v) or v < 0:
            raise ValueError(f"concentration {k} must be finite and >= 0, got {v}")
    if panel == "tbnk" and (leaf["car_cd4_t"] or leaf["car_cd8_t"] or leaf["dead_cells"]):
        raise ValueError("the TBNK tube has no CAR+ or dead cells; use panel='car'")
    if leaf["car_cd4_t"] > leaf["cd4_t"] or leaf["car_cd8_t"] > leaf["cd8_t"]:
        raise ValueError("cd4_t / cd8_t include CAR+ cells, so they must be >= car_cd4_t / car_cd8_t")
    for subset in ("cd4_t", "cd8_t"):
        # allow for rounding when NKT are split off CAR-negative T cells
        if leaf["car_" + subset] + leaf["nkt_" + subset] > leaf[subset] * (1 + 1e-12):
            raise ValueError(f"{subset} includes its CAR+ and NKT cells, so it must be >= "
                             f"car_{subset} + nkt_{subset}")
    if leaf["eosinophils"] > leaf["granulocytes"]:
        raise ValueError("granulocytes include the eosinophils, so they must be >= eosinophils")
    car_t = leaf["car_cd4_t"] + leaf["car_cd8_t"]
    t_cells = leaf["cd4_t"] + leaf["cd8_t"]
    lymphocytes = t_cells + leaf["b_cells"] + leaf["nk_cells"]
    # "+ basophils" last: with none, the sum is bit-identical to the original one
    leukocytes = lymphocytes + leaf["monocytes"] + leaf["granulocytes"] + leaf["basophils"]
    nkt_cells = leaf["nkt_cd4_t"] + leaf["nkt_cd8_t"]
    derived = {"car_t": car_t, "t_cells": t_cells, "lymphocytes": lymphocytes,
               "leukocytes": leukocytes, "nkt_cells": nkt_cells}
    # A derived key that disagrees with its leaves would make the truth file
    # contradict itself: refuse rather than silently pick one.
    for k in _DERIVED_KEYS:
        if k in conc and not np.isclose(float(conc[k]), derived[k], rtol=1e-9, atol=1e-9):
            raise ValueError(
                f"concentration {k}={conc[k]} disagrees with the sum of its parts ({derived[k]}); "
                "derived keys (car_t, t_cells, lymphocytes, leukocytes, nkt_cells) follow from the leaf keys - "
                "drop them or use default_concentrations(...) to build a consistent profile")
    out = {"leukocytes": leukocytes, "lymphocytes": lymphocytes,
           "monocytes": leaf["monocytes"], "granulocytes": leaf["granulocytes"],
           "t_cells": t_cells, "cd4_t": leaf["cd4_t"], "cd8_t": leaf["cd8_t"],
           "b_cells": leaf["b_cells"], "nk_cells": leaf["nk_cells"]}
    if panel == "car":
        out.update(car_t=car_t, car_cd4_t=leaf["car_cd4_t"], car_cd8_t=leaf["car_cd8_t"],
                   dead_cells=leaf["dead_cells"])
    out.update(basophils=leaf["basophils"], eosinophils=leaf["eosinophils"], nkt_cells=nkt_cells,
               nkt_cd4_t=leaf["nkt_cd4_t"], nkt_cd8_t=leaf["nkt_cd8_t"])
    return out


def _particle_rates(conc: dict) -> dict:
    """Particles/uL of blood per original event label (cells only).

    The labels added later are in :func:`_extra_particle_rates`, drawn from
    their own stream so tubes without them keep every original draw.
    """
    g = conc.get
    return {
        "granulocyte": conc["granulocytes"] - g("eosinophils", 0.0), "monocyte": conc["monocytes"],
        "cd4_t": conc["cd4_t"] - g("car_cd4_t", 0.0) - g("nkt_cd4_t", 0.0),
        "cd8_t": conc["cd8_t"] - g("car_cd8_t", 0.0) - g("nkt_cd8_t", 0.0),
        "car_cd4_t": g("car_cd4_t", 0.0), "car_cd8_t": g("car_cd8_t", 0.0),
        "b_cell": conc["b_cells"], "nk_cell": conc["nk_cells"], "dead_cell": g("dead_cells", 0.0),
    }


def _extra_particle_rates(conc: dict) -> dict:
    """Particles/uL of blood of the cell labels added after the original ones."""
    g = conc.get
    return {"nkt_cd4_t": g("nkt_cd4_t", 0.0), "nkt_cd8_t": g("nkt_cd8_t", 0.0),
            "basophil": g("basophils", 0.0), "eosinophil": g("eosinophils", 0.0)}


# Event labels that make up each reported population (singlet counts).
# NKT-like cells are CD3+: T cells (and CD4 or CD8 T), never NK cells.
# Basophils are leukocytes but neither lymphocytes nor granulocytes (BD-style
# CD45 x SSC gating leaves them out of both); eosinophils are granulocytes.
POPULATION_LABELS = {
    "leukocytes": ("granulocyte", "monocyte", "cd4_t", "cd8_t", "car_cd4_t", "car_cd8_t", "b_cell", "nk_cell",
                   "nkt_cd4_t", "nkt_cd8_t", "basophil", "eosinophil"),
    "lymphocytes": ("cd4_t", "cd8_t", "car_cd4_t", "car_cd8_t", "b_cell", "nk_cell", "nkt_cd4_t", "nkt_cd8_t"),
    "monocytes": ("monocyte",),
    "granulocytes": ("granulocyte", "eosinophil"),
    "t_cells": ("cd4_t", "cd8_t", "car_cd4_t", "car_cd8_t", "nkt_cd4_t", "nkt_cd8_t"),
    "cd4_t": ("cd4_t", "car_cd4_t", "nkt_cd4_t"),
    "cd8_t": ("cd8_t", "car_cd8_t", "nkt_cd8_t"),
    "b_cells": ("b_cell",),
    "nk_cells": ("nk_cell",),
    "car_t": ("car_cd4_t", "car_cd8_t"),
    "car_cd4_t": ("car_cd4_t",),
    "car_cd8_t": ("car_cd8_t",),
    "dead_cells": ("dead_cell",),
    "debris": ("debris", "rbc_ghost"),
    "nkt_cells": ("nkt_cd4_t", "nkt_cd8_t"),
    "basophils": ("basophil",),
    "eosinophils": ("eosinophil",),
    "rbc_ghosts": ("rbc_ghost",),
}


def label_populations() -> dict:
    """Event label -> the populations (:data:`POPULATION_LABELS`) it counts in.

    Returns
    -------
    dict
        Every label of :data:`LABEL_NAMES` -> list of population names
        (empty for beads and doublets).

    Examples
    --------
    >>> label_populations()["nkt_cd8_t"]
    ['leukocytes', 'lymphocytes', 't_cells', 'cd8_t', 'nkt_cells']
    >>> "lymphocytes" in label_populations()["basophil"]
    False
    """
    return {label: sorted((p for p, labels in POPULATION_LABELS.items() if label in labels),
                          key=list(POPULATION_LABELS).index) for label in LABEL_NAMES}


# ---------------------------------------------------------------------------
# Simulation
# ---------------------------------------------------------------------------

def _spillover(panel_dets, rng, spillover):
    """Per-file spillover over the panel's detectors, panel order."""
    k = len(panel_dets)
    if spillover is not None:
        s = np.asarray(spillover, dtype=float)
        if s.shape != (k, k):
            raise ValueError(f"spillover must be {k}x{k} for this panel, got {s.shape}")
        if not np.allclose(np.diag(s), 1.0):
            raise ValueError("spillover must have a unit diagonal")
        return s
    base = np.eye(k)
    for i, src in enumerate(panel_dets):
        for j, dst in enumerate(panel_dets):
            if i != j:
                base[i, j] = _BASE_SPILL.get((src, dst), 0.0)
    # Always draw the full matrix of perturbations so the stream position does
    # not depend on which entries are zero.
    factor = rng.uniform(0.8, 1.2, size=(k, k))
    s = np.where(np.eye(k, dtype=bool), 1.0, base * factor)
    # Rounded so the text written to the file is exactly the matrix used.
    return np.round(s, 6)


def _resolve_gains(panel_entries, gains, gain_range, rng):
    dyes = [dye for _, dye, _ in panel_entries]
    dets = [det for _, _, det in panel_entries]
    drawn = rng.uniform(*gain_range, size=len(dyes)) if gain_range is not None else None
    if gains is not None and gain_range is not None:
        raise ValueError("give gains or gain_range, not both")
    out = {}
    for i, (dye, det) in enumerate(zip(dyes, dets)):
        out[dye] = float(np.round(drawn[i], 4)) if drawn is not None else 1.0
    if gains is not None:
        for key, value in gains.items():
            if key in out:
                out[key] = float(value)
            elif key in dets:  # e.g. "PerCP-Cy5.5" for the 7-AAD detector
                out[dyes[dets.index(key)]] = float(value)
            else:
                raise ValueError(f"gain for {key!r}, which is not in the {dyes} panel")
    for dye, value in out.items():
        if not value > 0:
            raise ValueError(f"gain for {dye} must be > 0, got {value}")
    return out


def _lognormal(rng, median, sd, n):
    return median * np.exp(sd * rng.standard_normal(n))


def _draw_particles(label, n, panel_entries, rng, components=None):
    """Scatter (A, H) and true fluorescence (panel detector order) of n particles.

    ``components`` replaces the population's marker components (continua).
    """
    spec = _POPULATIONS[label]
    if components is not None:
        spec = dict(spec, components=components)
    fsc = _lognormal(rng, *spec["fsc"], n)
    ssc = _lognormal(rng, *spec["ssc"], n)
    fsc_h = 0.9 * fsc * (1.0 + 0.03 * rng.standard_normal(n))
    k = len(panel_entries)
    sig = np.empty((n, k))
    if label == "bead":
        # One brightness per bead shared by all detectors (bead size), plus a
        # small per-detector jitter: tight CV (~3-4 %).
        bright = np.exp(0.03 * rng.standard_normal(n))
        for j, (_, _, det) in enumerate(panel_entries):
            sig[:, j] = _BEAD_LEVEL[det] * bright * np.exp(0.02 * rng.standard_normal(n))
        return fsc, fsc_h, ssc, sig
    weights = np.array([w for w, _ in spec["components"]])
    comp = rng.choice(len(weights), size=n, p=weights / weights.sum())
    for j, (marker, _, det) in enumerate(panel_entries):
        sig[:, j] = _lognormal(rng, _AUTOFLUORESCENCE[det] * spec["af"], _AF_SD, n)
        for c, (_, markers) in enumerate(spec["components"]):
            if marker in markers:
                idx = np.flatnonzero(comp == c)
                sig[idx, j] = _lognormal(rng, *markers[marker], idx.size)
    return fsc, fsc_h, ssc, sig


def _pair_doublets(n, p, rng):
    """Start indices of coincidences: particle i merges with i + 1.

    Every particle (except the last) is a candidate with probability p; a
    particle already swallowed by its predecessor cannot start another.
    """
    cand = np.flatnonzero(rng.random(n) < p)
    starts = []
    last = -2
    for i in cand:
        if i == n - 1:
            break
        if i == last + 1:  # consumed by the previous doublet
            continue
        starts.append(i)
        last = i
    return np.asarray(starts, dtype=np.int64)


def simulate_tube(panel="tbnk", *, seed=0, concentrations=None, blood_volume_ul=5.0,
                  beads_per_test=50000.0, sample_volume_ul=50.0, doublet_rate=0.03,
                  debris_fraction=0.05, marker_style="plain", detector_style="bd",
                  shuffle_channels=False, gains=None, gain_range=None,
                  spill_keyword="$SPILLOVER", spillover=None, write_vol=True,
                  dilution_factor=DEFAULT_DILUTION_FACTOR, tube_name=None,
                  source="SIM", cytometer=None, date=_dt.date(2026, 1, 15),
                  start_time="09:30:00", event_rate=1500.0, photon_noise=False,
                  photoelectrons_per_unit=None, nk_continuum=False, nkt_fraction=0.0,
                  rbc_ghost_fraction=0.0, marker_continua=False) -> SimulatedTube:
    """Simulate one lyse-no-wash bead-counting tube.

    Parameters
    ----------
    panel : {"tbnk", "car"}
        TBNK tube (CD3 FITC, CD16+56 PE, CD45 PerCP-Cy5.5, CD4 PE-Cy7,
        CD19 APC, CD8 APC-Cy7) or CAR tube (CD3 FITC, CAR PE, Viability 7-AAD,
        CD4 PE-Cy7, CD19 APC, CD8 APC-Cy7, CD45 V500-C).
    seed : int
        Seeds independent ``numpy.random.default_rng`` streams (children of
        ``SeedSequence(seed)``); the same arguments and seed give
        byte-identical files. Naming options (styles, channel shuffle, spill
        keyword, $VOL) do not change the events.
    concentrations : dict, optional
        Cells/uL of blood; default :func:`default_concentrations(panel)
        <default_concentrations>`. Leaf keys ``granulocytes, monocytes, cd4_t,
        cd8_t, b_cells, nk_cells`` and, CAR tube only, ``car_cd4_t, car_cd8_t,
        dead_cells`` (``cd4_t``/``cd8_t`` include CAR+). Derived keys
        (``car_t, t_cells, lymphocytes, leukocytes``) may be present but must
        equal the sums of the leaves.
    blood_volume_ul : float
        uL of blood whose particles are acquired.
    beads_per_test, sample_volume_ul : float
        Beads in the tube and uL of blood pipetted into it; bead events are
        ``Poisson(beads_per_test / sample_volume_ul x blood_volume_ul)``.
    doublet_rate : float
        Probability that a particle coincides with the next one.
    debris_fraction : float
        Debris as a fraction of all particles.
    marker_style : {"plain", "space", "dash"}
        ``$PnS`` style: ``CD3`` / ``CD3 FITC`` / ``CD3-FITC``.
    detector_style : {"bd", "fl", "attune"}
        ``$PnN`` style: ``FITC-A`` / ``FL1-A`` / ``BL1-A``.
    shuffle_channels : bool
        Write the channels in a random order.
    gains : dict, optional
        Fluorochrome -> multiplier of the true signal (missing ones are 1).
    gain_range : (float, float), optional
        Draw every detector gain uniformly from this range instead.
    spill_keyword : {"$SPILLOVER", "SPILL", "$COMP"}
        Keyword under which the spillover matrix is written.
    spillover : array_like, optional
        ``k x k`` spillover over the panel's fluorochromes in panel order,
        used as is (default: a realistic matrix perturbed +/-20 % by seed).
    write_vol : bool
        Write ``$VOL`` (nL of stained sample analysed,
        ``blood_volume_ul x dilution_factor x 1000``).
    dilution_factor : float
        Stained-sample volume / blood volume (50 uL blood + 20 uL antibody +
        450 uL lyse by default).
    tube_name, source, cytometer : str, optional
        ``TUBE NAME`` (default ``TBNK`` / ``CAR``), ``$SRC``, ``$CYT``
        (default by detector style).
    date : datetime.date
        ``$DATE``.
    start_time : str
        ``$BTIM`` as ``HH:MM:SS``; ``$ETIM`` follows from the Time channel.
    event_rate : float
        Mean events per second (sets the Time channel).
    photon_noise : bool
        Photon (photoelectron) statistics in every fluorescence detector:
        after spillover mixing, each detector's signal ``x`` is converted to
        photoelectrons with ``q / gain`` photoelectrons per raw unit (``q``
        from ``photoelectrons_per_unit``; a higher gain amplifies each
        photoelectron into more units), drawn ``Poisson(x q / gain)`` and
        converted back, before electronic noise and clipping. After
        compensation this is *spillover spreading*: cells bright in one dye
        (CD3 FITC T cells) get broad "negatives" in the detectors that dye
        spills into (CD16+56 PE), SD ~ ``sqrt(s / q x signal)``. Off by
        default (the committed sample set has no photon noise).
    photoelectrons_per_unit : dict, optional
        Fluorochrome (detector) -> photoelectrons per raw unit at gain 1;
        missing ones come from :data:`PHOTOELECTRONS_PER_UNIT`. Only with
        ``photon_noise``.
    nk_continuum : bool
        NK cells as a continuum: ~10 % CD56-bright CD16-dim (dimmer in the
        CD16+56 reagent), a CD8-dim subset (~30 %) with a broad CD8 level and
        broader CD16+56, instead of two tight lognormals.
    nkt_fraction : float
        Share (0-0.3) of the CAR-negative T cells that are NKT-like (CD3+
        CD16+56+; ~65 % CD8+, 35 % CD4+). They are T cells in the truth
        (labels ``nkt_cd4_t``/``nkt_cd8_t`` count in ``t_cells``,
        ``cd4_t``/``cd8_t``, ``lymphocytes``, never in ``nk_cells``); they
        are taken out of the T cells, so ``t_cells`` is unchanged. Typical
        adult blood: 0.02-0.10.
    rbc_ghost_fraction : float
        CD45-negative lyse-no-wash debris with lymphocyte-to-monocyte
        scatter (incompletely lysed RBCs, RBC ghosts, platelet clumps;
        label ``rbc_ghost``, counted in ``debris``) as a fraction of all
        particles, up to ~0.4 in real lyse-no-wash tubes. Independent of
        ``debris_fraction`` (the small debris); the two must sum below 1.
    marker_continua : bool
        Dim subsets that bridge positive and negative modes: CD4-dim and
        CD3-dim T, CD8-dim T (~20 % of CD8 T), CD19-dim B (~10 %), CD16+
        monocytes (~13 %), CD16-dim immature neutrophils (~7 %).

    Returns
    -------
    SimulatedTube
        ``truth`` holds ``seed, panel, concentrations_per_ul, singlet_events``
        (population -> singlet events, CAR+ included in ``cd4_t``/``t_cells``),
        ``bead_events_singlet, bead_events_doublet`` (bead+bead doublets),
        ``label_counts, particles, doublet_composition, beads_per_test,
        sample_volume_ul, blood_volume_ul, dilution_factor, doublet_rate,
        gains, marker_style, detector_style, spill_keyword, spillover,
        label_names, population_labels`` (population -> labels),
        ``label_populations`` (label -> populations), ``realism`` (the
        options above: photon noise and its photoelectron yields, continua,
        NKT share, RBC ghosts) and more; ``file`` is filled in by
        :func:`write_tube`.

    Examples
    --------
    >>> tube = simulate_tube("tbnk", seed=1, blood_volume_ul=1.0,
    ...                      concentrations=default_concentrations("tbnk", b_cells=50))
    >>> tube.pnn[:3], tube.pns[3]
    (['FSC-A', 'FSC-H', 'SSC-A'], 'CD3')
    >>> tube.events.dtype, tube.labels.dtype
    (dtype('float32'), dtype('uint8'))
    >>> tube.truth["singlet_events"]["b_cells"] == int((tube.labels == LABEL_NAMES.index("b_cell")).sum())
    True

    A less ideal tube: photon noise, NKT cells, RBC ghosts, continua.

    >>> real = simulate_tube("tbnk", seed=1, blood_volume_ul=1.0, photon_noise=True, nkt_fraction=0.05,
    ...                      rbc_ghost_fraction=0.3, nk_continuum=True, marker_continua=True)
    >>> real.truth["label_populations"]["nkt_cd4_t"]
    ['leukocytes', 'lymphocytes', 't_cells', 'cd4_t', 'nkt_cells']
    >>> 0.25 < real.truth["label_counts"]["rbc_ghost"] / real.n_events < 0.35
    True
    """
    _check_panel(panel)
    if marker_style not in MARKER_STYLES:
        raise ValueError(f"marker_style must be one of {MARKER_STYLES}, got {marker_style!r}")
    if detector_style not in DETECTOR_STYLES:
        raise ValueError(f"detector_style must be one of {DETECTOR_STYLES}, got {detector_style!r}")
    if spill_keyword not in SPILL_KEYWORDS:
        raise ValueError(f"spill_keyword must be one of {SPILL_KEYWORDS}, got {spill_keyword!r}")
    if not 0.0 <= doublet_rate < 0.5:
        raise ValueError("doublet_rate must be in [0, 0.5)")
    if not 0.0 <= debris_fraction < 1.0:
        raise ValueError("debris_fraction must be in [0, 1)")
    if not 0.0 <= rbc_ghost_fraction < 1.0 or debris_fraction + rbc_ghost_fraction >= 1.0:
        raise ValueError("rbc_ghost_fraction must be in [0, 1) and debris_fraction + rbc_ghost_fraction < 1")
    if not 0.0 <= nkt_fraction <= 0.3:
        raise ValueError(f"nkt_fraction must be in [0, 0.3] (NKT-like cells are a few % of T cells), "
                         f"got {nkt_fraction}")
    if photoelectrons_per_unit is not None and not photon_noise:
        raise ValueError("photoelectrons_per_unit is used only with photon_noise=True")
    for name, v in (("blood_volume_ul", blood_volume_ul), ("beads_per_test", beads_per_test),
                    ("sample_volume_ul", sample_volume_ul), ("dilution_factor", dilution_factor),
                    ("event_rate", event_rate)):
        if not v > 0:
            raise ValueError(f"{name} must be > 0, got {v}")

    entries = PANELS[panel]
    dets = [det for _, _, det in entries]
    conc = _complete_concentrations(
        default_concentrations(panel) if concentrations is None else dict(concentrations), panel)
    if nkt_fraction:
        conc = _split_off_nkt(conc, nkt_fraction, panel)
    streams = dict(zip(_STREAMS, (np.random.default_rng(s)
                                  for s in np.random.SeedSequence(seed).spawn(len(_STREAMS)))))
    # One stream per population: changing one population's concentration
    # leaves the scatter and signals drawn for every other population
    # unchanged (acquisition order and doublet pairing still change).
    pop_rngs = dict(zip(_PARTICLE_LABELS, (np.random.default_rng(s) for s in
                                           np.random.SeedSequence([seed, 1]).spawn(len(_PARTICLE_LABELS)))))

    # --- particle counts --------------------------------------------------
    rates = _particle_rates(conc)
    rc = streams["counts"]
    counts = {lab: int(rc.poisson(rates[lab] * blood_volume_ul)) for lab in rates}
    counts["bead"] = int(rc.poisson(beads_per_test / sample_volume_ul * blood_volume_ul))
    expected_other = (sum(rates.values()) * blood_volume_ul
                      + beads_per_test / sample_volume_ul * blood_volume_ul)
    extra_rates = _extra_particle_rates(conc)
    if any(extra_rates.values()) or rbc_ghost_fraction:
        rx = streams["extra_counts"]
        counts.update({lab: int(rx.poisson(rate * blood_volume_ul)) for lab, rate in extra_rates.items()})
        expected_other += sum(extra_rates.values()) * blood_volume_ul
        counts["rbc_ghost"] = int(rx.poisson(
            rbc_ghost_fraction / (1.0 - debris_fraction - rbc_ghost_fraction) * expected_other))
    # Debris and RBC ghosts are fractions of *all* particles: with the
    # ghosts, the small debris' share of the rest grows to stay debris_fraction.
    counts["debris"] = int(rc.poisson(debris_fraction / (1.0 - debris_fraction - rbc_ghost_fraction)
                                      * expected_other))
    counts = {lab: counts.get(lab, 0) for lab in _PARTICLE_LABELS}

    # --- particles ---------------------------------------------------------
    components = {}
    if marker_continua:
        components.update(_CONTINUUM_POPULATIONS)
    if nk_continuum:
        components["nk_cell"] = _NK_CONTINUUM
    parts = [_draw_particles(lab, counts[lab], entries, pop_rngs[lab], components.get(lab))
             for lab in _PARTICLE_LABELS]
    p_lab = np.concatenate([np.full(counts[lab], _CODE[lab], np.uint8) for lab in _PARTICLE_LABELS])
    p_fsc = np.concatenate([p[0] for p in parts])
    p_fsch = np.concatenate([p[1] for p in parts])
    p_ssc = np.concatenate([p[2] for p in parts])
    p_sig = np.concatenate([p[3] for p in parts]).reshape(-1, len(entries))
    gain = _resolve_gains(entries, gains, gain_range, streams["gains"])
    p_sig = p_sig * np.array([gain[dye] for _, dye, _ in entries])

    order = streams["order"].permutation(p_lab.size)
    p_lab, p_fsc, p_fsch, p_ssc, p_sig = (a[order] for a in (p_lab, p_fsc, p_fsch, p_ssc, p_sig))
    n_part = p_lab.size

    # --- coincidence -------------------------------------------------------
    starts = _pair_doublets(n_part, doublet_rate, streams["doublets"])
    keep = np.ones(n_part, dtype=bool)
    keep[starts + 1] = False
    lab = p_lab.copy()
    fsc, ssc, sig = p_fsc.copy(), p_ssc.copy(), p_sig.copy()
    fsch = p_fsch.copy()
    a, b = starts, starts + 1
    fsc[a] = p_fsc[a] + p_fsc[b]
    ssc[a] = p_ssc[a] + p_ssc[b]
    sig[a] = p_sig[a] + p_sig[b]
    fsch[a] = (np.maximum(p_fsch[a], p_fsch[b]) * 1.15
               * (1.0 + 0.03 * streams["doublets"].standard_normal(a.size)))
    both_beads = (p_lab[a] == _CODE["bead"]) & (p_lab[b] == _CODE["bead"])
    lab[a] = np.where(both_beads, _CODE["bead_doublet"], _CODE["doublet"])
    composition = {}
    for x, y in zip(p_lab[a], p_lab[b]):
        key = "+".join(sorted((LABEL_NAMES[x], LABEL_NAMES[y])))
        composition[key] = composition.get(key, 0) + 1
    composition = dict(sorted(composition.items()))
    lab, fsc, fsch, ssc, sig = lab[keep], fsc[keep], fsch[keep], ssc[keep], sig[keep]
    n = lab.size

    # --- detection -----------------------------------------------------------
    s_panel = _spillover(dets, streams["spill"], spillover)
    noise = streams["noise"].standard_normal((n, len(entries))) * np.array([_NOISE_SD[d] for d in dets])
    mixed = sig @ s_panel
    photoelectron_yield = None
    if photon_noise:
        photoelectron_yield = _photoelectron_yield(entries, photoelectrons_per_unit, gain)
        mixed = _photon_counting(mixed, photoelectron_yield, streams["photons"])
    fluor = np.minimum(mixed + noise, _CEILING)
    fsc, fsch, ssc = (np.clip(v, 0.0, _CEILING) for v in (fsc, fsch, ssc))
    # Particles arrive as a Poisson process; an event is timed by its first particle.
    t_sec = np.cumsum(streams["time"].exponential(1.0 / event_rate, n_part))
    time_ticks = np.floor(t_sec[keep] / _TIMESTEP_S)

    # --- channels ----------------------------------------------------------
    pnn = list(SCATTER_CHANNELS) + [detector_name(d, detector_style) for d in dets] + [TIME_CHANNEL]
    pns = ["", "", ""] + [marker_label(m, dye, marker_style) for m, dye, _ in entries] + [""]
    cols = np.column_stack([fsc, fsch, ssc, fluor, time_ticks])
    perm = (streams["channels"].permutation(len(pnn)) if shuffle_channels
            else np.arange(len(pnn)))
    pnn = [pnn[i] for i in perm]
    pns = [pns[i] for i in perm]
    events = cols[:, perm].astype(np.float32)
    # fluorescence channels in file order (order of the spillover keyword)
    fl_order = [int(i) - 3 for i in perm if 3 <= i < 3 + len(entries)]
    s_file = s_panel[np.ix_(fl_order, fl_order)]
    fl_names = [detector_name(dets[j], detector_style) for j in fl_order]
    signal = sig[:, fl_order]

    # --- metadata ----------------------------------------------------------
    duration = float(t_sec[-1]) if n_part else 0.0
    btim = _dt.datetime.combine(date, _dt.time.fromisoformat(start_time))
    etim = btim + _dt.timedelta(seconds=int(np.ceil(duration)))
    if tube_name is None:
        tube_name = "TBNK" if panel == "tbnk" else "CAR"
    metadata = {
        "$CYT": cytometer or _CYTOMETERS[detector_style],
        "$DATE": date.strftime("%d-%b-%Y").upper(),
        "$BTIM": btim.strftime("%H:%M:%S"),
        "$ETIM": etim.strftime("%H:%M:%S"),
        "$FIL": "simulated.fcs",
        "$SRC": str(source),
        "$TIMESTEP": repr(_TIMESTEP_S),
        "$COM": "Simulated lyse-no-wash bead-counting tube (cytometry.simulation.simulate) - truth in the truth folder",
        "TUBE NAME": str(tube_name),
        spill_keyword: _format_spill(fl_names, s_file),
    }
    vol_nl = float(blood_volume_ul) * float(dilution_factor) * 1000.0
    if write_vol:
        metadata["$VOL"] = f"{vol_nl:.10g}"

    # --- truth -------------------------------------------------------------
    label_counts = {name: int(np.count_nonzero(lab == i)) for i, name in enumerate(LABEL_NAMES)}
    pops = [p for p in POPULATION_LABELS
            if panel == "car" or p not in ("car_t", "car_cd4_t", "car_cd8_t", "dead_cells")]
    singlet_events = {p: sum(label_counts[x] for x in POPULATION_LABELS[p]) for p in pops}
    truth = {
        "file": None,
        "seed": int(seed),
        "panel": panel,
        "tube_name": str(tube_name),
        "concentrations_per_ul": conc,
        "singlet_events": singlet_events,
        "bead_events_singlet": label_counts["bead"],
        "bead_events_doublet": label_counts["bead_doublet"],
        "beads_per_test": float(beads_per_test),
        "sample_volume_ul": float(sample_volume_ul),
        "blood_volume_ul": float(blood_volume_ul),
        "dilution_factor": float(dilution_factor),
        "vol_nl": vol_nl if write_vol else None,
        "doublet_rate": float(doublet_rate),
        "singlet_probability": (1.0 - doublet_rate) / (1.0 + doublet_rate),
        "debris_fraction": float(debris_fraction),
        "n_events": int(n),
        "label_counts": label_counts,
        "particles": counts,
        "doublet_composition": composition,
        "gains": gain,
        "marker_style": marker_style,
        "detector_style": detector_style,
        "shuffle_channels": bool(shuffle_channels),
        "spill_keyword": spill_keyword,
        "spillover": {"channels": fl_names, "matrix": s_file.tolist()},
        "noise_sd": {detector_name(d, detector_style): _NOISE_SD[d] for d in dets},
        "channels": [{"pnn": a_, "pns": b_} for a_, b_ in zip(pnn, pns)],
        "label_names": list(LABEL_NAMES),
        "population_labels": {p: list(v) for p, v in POPULATION_LABELS.items()},
        "label_populations": label_populations(),
        "realism": {
            "photon_noise": bool(photon_noise),
            # photoelectrons per raw unit actually used (after the gain), per detector
            "photoelectrons_per_unit": (None if photoelectron_yield is None else
                                        {detector_name(d, detector_style): float(q)
                                         for d, q in zip(dets, photoelectron_yield)}),
            "nk_continuum": bool(nk_continuum),
            "marker_continua": bool(marker_continua),
            "nkt_fraction": float(nkt_fraction),
            "rbc_ghost_fraction": float(rbc_ghost_fraction),
        },
    }
    return SimulatedTube(events=events, pnn=pnn, pns=pns, metadata=metadata,
                         labels=lab.astype(np.uint8), truth=truth, signal=signal)


def _split_off_nkt(conc, nkt_fraction, panel):
    """Turn ``nkt_fraction`` of the CAR-negative T cells into NKT-like cells.

    CD3+ CD56+ T cells are mostly CD8+ (about two thirds) in adult blood; the
    split is capped by the CAR-negative T cells available in each subset.
    """
    if conc.get("nkt_cells"):
        raise ValueError("give NKT cells either as nkt_cd4_t/nkt_cd8_t concentrations or as nkt_fraction")
    free_cd4 = conc["cd4_t"] - conc.get("car_cd4_t", 0.0)
    free_cd8 = conc["cd8_t"] - conc.get("car_cd8_t", 0.0)
    nkt = nkt_fraction * (free_cd4 + free_cd8)
    nkt_cd8 = min(0.65 * nkt, free_cd8)
    nkt_cd4 = min(nkt - nkt_cd8, free_cd4)
    leaves = {k: v for k, v in conc.items() if k in _LEAF_KEYS}
    leaves.update(nkt_cd4_t=nkt_cd4, nkt_cd8_t=nkt_cd8)
    return _complete_concentrations(leaves, panel)


def perfect_gate_count(truth, population):
    """What a perfect gate reports for a simulated tube: cells/µL and the events it rests on.

    The tube's singlet events of ``population`` over its singlet beads, times
    beads per test over the sample volume. Its distance to the blood's
    concentration is the draw's counting noise, which no analysis removes.

    Examples
    --------
    >>> truth = {"singlet_events": {"b_cells": 120}, "bead_events_singlet": 3000, "beads_per_test": 50000.0,
    ...          "sample_volume_ul": 50.0}
    >>> perfect_gate_count(truth, "b_cells")
    (40.0, 120)
    """
    events = truth["singlet_events"][population]
    beads = truth["bead_events_singlet"]
    return events / beads * truth["beads_per_test"] / truth["sample_volume_ul"], events


def _photoelectron_yield(entries, photoelectrons_per_unit, gain):
    """Photoelectrons per raw unit of each panel detector, after its gain."""
    yields = dict(PHOTOELECTRONS_PER_UNIT)
    for key, value in (photoelectrons_per_unit or {}).items():
        if key not in yields:
            raise ValueError(f"photoelectrons_per_unit for unknown fluorochrome {key!r}; "
                             f"expected one of {FLUOROCHROMES}")
        if not value > 0:
            raise ValueError(f"photoelectrons_per_unit for {key} must be > 0, got {value}")
        yields[key] = float(value)
    # The gain multiplies the signal of a dye; its detector turns the same
    # photoelectrons into proportionally more raw units.
    return np.array([yields[det] / gain[dye] for _, dye, det in entries])


def _photon_counting(mixed, photoelectron_yield, rng):
    """Poisson photoelectron counts of each detector's light, back in raw units."""
    expected = np.maximum(mixed, 0.0) * photoelectron_yield
    return rng.poisson(expected) / photoelectron_yield


def _format_spill(names, matrix) -> str:
    """FCS 3.1 spillover text: ``n,name1..namen,v11,v12,...`` (row-major)."""
    values = ",".join(repr(float(v)) for v in np.asarray(matrix).ravel())
    return f"{len(names)}," + ",".join(names) + "," + values


# ---------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------

def _encode_fcs(events, pnn, pns, metadata) -> bytes:
    """FCS 3.1 bytes via flowio, with keywords under their intended names."""
    meta = dict(metadata)
    for key, value in meta.items():
        # FCS forbids empty values, and a value that starts or ends with the
        # "/" delimiter cannot be told apart from an escaped delimiter
        # (flowio then misreads every keyword after it).
        if not isinstance(value, str) or not value or value[0] == "/" or value[-1] == "/":
            raise ValueError(f"keyword {key}: value must be a non-empty string not starting "
                             f"or ending with '/', got {value!r}")
    rename = {}
    # flowio writes only its list of standard keywords with a "$"; "$COMP"
    # (FCS 2.0/3.0) is not in it and would be written as "COMP". Pad its value
    # by one character and then swap "/COMP/<value>X/" for "/$COMP/<value>/":
    # the TEXT segment keeps its length, so flowio's data offsets stay right.
    if "$COMP" in meta:
        value = meta.pop("$COMP")
        meta["COMP"] = value + "X"
        rename[f"/COMP/{value}X/".encode()] = f"/$COMP/{value}/".encode()
    flat = array("f", np.ascontiguousarray(events, dtype="<f4").tobytes())
    buf = io.BytesIO()
    flowio.create_fcs(buf, flat, list(pnn), opt_channel_names=list(pns), metadata_dict=meta)
    data = buf.getvalue()
    for old, new in rename.items():
        if data.count(old) != 1 or len(old) != len(new):
            raise RuntimeError("could not rename the $COMP keyword in the FCS TEXT segment")
        data = data.replace(old, new)
    return data


def write_tube(tube: SimulatedTube, path) -> Path:
    """Write a simulated tube as FCS 3.1 plus its truth files.

    Writes ``path`` and, in ``truth/`` beside it, ``<stem>.json`` and
    ``<stem>.labels.npy``. ``$FIL`` and the truth's ``file`` are set to the
    file name. The tube object is not modified.

    Parameters
    ----------
    tube : SimulatedTube
    path : str or Path
        Output ``.fcs`` path; parent folders are created.

    Returns
    -------
    Path
        The FCS path.

    Examples
    --------
    >>> import tempfile, flowkit
    >>> tube = simulate_tube("car", seed=2, blood_volume_ul=0.5)
    >>> with tempfile.TemporaryDirectory() as d:
    ...     p = write_tube(tube, Path(d) / "car.fcs")
    ...     s = flowkit.Sample(p)
    ...     (s.event_count == tube.n_events, (p.parent / "truth" / "car.json").exists())
    (True, True)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = dict(tube.metadata)
    metadata["$FIL"] = path.name
    path.write_bytes(_encode_fcs(tube.events, tube.pnn, tube.pns, metadata))
    truth = dict(tube.truth)
    truth["file"] = path.name
    tdir = path.parent / "truth"
    tdir.mkdir(exist_ok=True)
    (tdir / f"{path.stem}.json").write_text(json.dumps(truth, indent=2) + "\n")
    np.save(tdir / f"{path.stem}.labels.npy", np.asarray(tube.labels, dtype=np.uint8))
    return path


# ---------------------------------------------------------------------------
# Committed sample set
# ---------------------------------------------------------------------------

_MANIFEST_COLUMNS = ("file", "subject_id", "visit", "study_day", "tube",
                     "beads_per_test", "sample_volume_ul", "comment")

# Screening TBNK tubes: (subject, cells/uL, tube options, comment). Lupus
# patients are often leukopenic (WBC 3,000-5,000/uL), which also keeps the
# committed files small.
_SCREENING = (
    ("S01", dict(lymphocytes=1050, b_cells=120, nk_cells=130, cd4_fraction=0.60,
                     monocytes=320, granulocytes=2300),
     dict(marker_style="plain", detector_style="bd"),
     "clearly eligible (B ~120/uL); CAR-T series follows"),
    ("S02", dict(lymphocytes=820, b_cells=0.8, nk_cells=95, cd4_fraction=0.55,
                     monocytes=260, granulocytes=2100),
     dict(marker_style="space", detector_style="fl", shuffle_channels=True, spill_keyword="SPILL"),
     "clearly not eligible (B ~0.8/uL, prior rituximab)"),
    ("S03", dict(lymphocytes=700, b_cells=5.5, nk_cells=80, cd4_fraction=0.58,
                     monocytes=280, granulocytes=2400),
     dict(marker_style="dash", detector_style="attune", shuffle_channels=True, spill_keyword="$COMP"),
     "near threshold (B ~5.5/uL, ~25 events): must be called borderline"),
    ("S04", dict(lymphocytes=1150, b_cells=15, nk_cells=140, cd4_fraction=0.62,
                     monocytes=350, granulocytes=2700),
     dict(marker_style="space", detector_style="bd", shuffle_channels=True,
          gain_range=(0.75, 1.35), write_vol=False),
     "moderate (B ~15/uL); detector gains drawn, no $VOL"),
    ("S05", dict(lymphocytes=480, b_cells=40, nk_cells=60, cd4_fraction=0.50,
                     monocytes=240, granulocytes=2000),
     dict(marker_style="plain", detector_style="attune"),
     "lymphopenic, B ~40/uL"),
)
_SCREENING_DAY = -14

# S01 after lymphodepletion and CAR-T infusion (day 0 = pre-infusion):
# day, CAR+ T, B, CAR- CD4 T, CAR- CD8 T, NK, monocytes, granulocytes, dead
# CAR+ T expand to a peak near day 10 and contract to a few /uL by day 84;
# B cells vanish from day 4 (aplasia) and start to come back by day 84.
_CAR_SERIES = (
    (0, 0.0, 35.0, 110.0, 90.0, 40.0, 120.0, 1300.0, 15.0),
    (4, 9.0, 0.3, 45.0, 50.0, 25.0, 60.0, 450.0, 12.0),
    (7, 70.0, 0.0, 60.0, 80.0, 45.0, 150.0, 600.0, 15.0),
    (10, 160.0, 0.0, 90.0, 130.0, 80.0, 260.0, 1100.0, 20.0),
    (14, 95.0, 0.0, 120.0, 170.0, 110.0, 300.0, 1700.0, 18.0),
    (21, 40.0, 0.0, 150.0, 210.0, 140.0, 320.0, 2200.0, 15.0),
    (28, 20.0, 0.0, 180.0, 240.0, 150.0, 330.0, 2500.0, 14.0),
    (56, 7.0, 0.3, 230.0, 280.0, 160.0, 340.0, 2700.0, 14.0),
    (84, 2.5, 2.0, 270.0, 300.0, 170.0, 340.0, 2800.0, 14.0),
)
_CAR_CD4_FRACTION = 0.4
_SCREENING_LOT = 50120.0  # beads per test, lot-specific
_CAR_LOT = 48950.0
_DAY0 = _dt.date(2026, 3, 2)


def _car_concentrations(car, b, cd4, cd8, nk, mono, gran, dead):
    car4 = car * _CAR_CD4_FRACTION
    return {"granulocytes": gran, "monocytes": mono, "cd4_t": cd4 + car4,
            "cd8_t": cd8 + (car - car4), "car_cd4_t": car4, "car_cd8_t": car - car4,
            "b_cells": b, "nk_cells": nk, "dead_cells": dead}


def make_sample_set(out_dir, seed=2026, *, screening_volume_ul=5.0, car_volume_ul=2.5) -> list:
    """Write the committed sample set and its ``manifest.csv``.

    Five screening TBNK tubes (study day -14) spanning the eligibility
    threshold (B cells > 5/uL) with mixed naming styles, shuffled channels and
    all three spillover keywords, and one subject's CAR-tube series on days
    0 (pre-infusion), 4, 7, 10, 14, 21, 28, 56 and 84.

    Parameters
    ----------
    out_dir : str or Path
        Folder for the FCS files, ``truth/`` and ``manifest.csv``.
    seed : int
        Base seed; file ``i`` uses ``seed + i``.
    screening_volume_ul, car_volume_ul : float
        uL of blood acquired per screening / CAR tube (sized so the committed
        set stays under 9 MB).

    Returns
    -------
    list of Path
        The FCS files written, in manifest order.

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     paths = make_sample_set(d)
    ...     len(paths)
    14
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, paths = [], []
    i = 0
    for k, (subject, conc_kw, opts, comment) in enumerate(_SCREENING):
        name = f"{subject}_screening_TBNK.fcs"
        date = _DAY0 + _dt.timedelta(days=_SCREENING_DAY - 7 * k)
        tube = simulate_tube("tbnk", seed=seed + i, concentrations=default_concentrations("tbnk", **conc_kw),
                             blood_volume_ul=screening_volume_ul, beads_per_test=_SCREENING_LOT,
                             source=subject, date=date, start_time=f"{9 + k:02d}:15:00", **opts)
        paths.append(write_tube(tube, out_dir / name))
        rows.append((name, subject, "screening", _SCREENING_DAY, "TBNK", _SCREENING_LOT, 50, comment))
        i += 1
    subject = _SCREENING[0][0]
    for day, *values in _CAR_SERIES:
        name = f"{subject}_day{day:03d}_CAR.fcs"
        visit = f"D{day}"
        tube = simulate_tube("car", seed=seed + i, concentrations=_car_concentrations(*values),
                             blood_volume_ul=car_volume_ul, beads_per_test=_CAR_LOT,
                             marker_style="space", detector_style="bd",
                             gain_range=(0.92, 1.08),  # day-to-day instrument settings
                             source=subject, date=_DAY0 + _dt.timedelta(days=day),
                             start_time="10:40:00")
        paths.append(write_tube(tube, out_dir / name))
        comment = ("pre-infusion (after lymphodepletion): negative reference for the CAR gate"
                   if day == 0 else f"post-infusion day {day}")
        rows.append((name, subject, visit, day, "CAR", _CAR_LOT, 50, comment))
        i += 1
    with open(out_dir / "manifest.csv", "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(_MANIFEST_COLUMNS)
        for r in rows:
            w.writerow([_fmt_number(x) for x in r])
    return paths


def _fmt_number(x):
    if isinstance(x, float) and x.is_integer():
        return str(int(x))
    return str(x)


def _folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

def main(argv=None) -> int:
    """``python -m cytometry.simulation.simulate {sample-set,tube} ...``."""
    ap = argparse.ArgumentParser(prog="python -m cytometry.simulation.simulate",
                                 description="Write simulated bead-counting FCS files with truth.")
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("sample-set", help="write the committed sample set and manifest.csv")
    s.add_argument("out_dir")
    s.add_argument("--seed", type=int, default=2026)
    t = sub.add_parser("tube", help="write one tube (FCS + truth/)")
    t.add_argument("out", help="output .fcs path")
    t.add_argument("--panel", choices=tuple(PANELS), default="tbnk")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--b-cells", type=float, default=110.0, help="B cells/uL")
    t.add_argument("--lymphocytes", type=float, default=1000.0, help="lymphocytes/uL")
    t.add_argument("--car-t", type=float, default=None, help="CAR+ T cells/uL (CAR panel)")
    t.add_argument("--blood-volume", type=float, default=5.0, help="uL of blood acquired")
    t.add_argument("--beads-per-test", type=float, default=50000.0)
    t.add_argument("--sample-volume", type=float, default=50.0, help="uL of blood in the tube")
    t.add_argument("--doublet-rate", type=float, default=0.03)
    t.add_argument("--marker-style", choices=MARKER_STYLES, default="plain")
    t.add_argument("--detector-style", choices=DETECTOR_STYLES, default="bd")
    t.add_argument("--spill-keyword", choices=SPILL_KEYWORDS, default="$SPILLOVER")
    t.add_argument("--shuffle-channels", action="store_true")
    t.add_argument("--no-vol", action="store_true", help="do not write $VOL")
    t.add_argument("--basophils", type=float, default=0.0, help="basophils/uL")
    t.add_argument("--eosinophils", type=float, default=0.0, help="eosinophils/uL (part of the granulocytes)")
    t.add_argument("--photon-noise", action="store_true", help="photoelectron statistics (spillover spreading)")
    t.add_argument("--nk-continuum", action="store_true", help="CD56-bright and CD8-dim NK subsets")
    t.add_argument("--nkt-fraction", type=float, default=0.0, help="share of T cells that are NKT-like")
    t.add_argument("--rbc-ghost-fraction", type=float, default=0.0,
                   help="CD45-negative debris with lymphocyte scatter, share of events")
    t.add_argument("--marker-continua", action="store_true", help="dim subsets between the modes")
    args = ap.parse_args(argv)

    if args.command == "sample-set":
        paths = make_sample_set(args.out_dir, seed=args.seed)
        size = _folder_size(Path(args.out_dir))
        for p in paths:
            print(p)
        print(f"{len(paths)} FCS files; total size of {args.out_dir}: {size} bytes ({size / 1e6:.2f} MB)")
        return 0
    conc = default_concentrations(args.panel, lymphocytes=args.lymphocytes, b_cells=args.b_cells,
                                  car_t=args.car_t, basophils=args.basophils, eosinophils=args.eosinophils)
    tube = simulate_tube(args.panel, seed=args.seed, concentrations=conc,
                         blood_volume_ul=args.blood_volume, beads_per_test=args.beads_per_test,
                         sample_volume_ul=args.sample_volume, doublet_rate=args.doublet_rate,
                         marker_style=args.marker_style, detector_style=args.detector_style,
                         spill_keyword=args.spill_keyword, shuffle_channels=args.shuffle_channels,
                         write_vol=not args.no_vol, photon_noise=args.photon_noise,
                         nk_continuum=args.nk_continuum, nkt_fraction=args.nkt_fraction,
                         rbc_ghost_fraction=args.rbc_ghost_fraction, marker_continua=args.marker_continua)
    path = write_tube(tube, args.out)
    tr = tube.truth
    print(f"{path}: {tube.n_events} events, {tr['bead_events_singlet']} singlet beads, "
          f"{tr['singlet_events']['b_cells']} singlet B cells "
          f"(B = {tr['concentrations_per_ul']['b_cells']:g}/uL)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
