"""Low CAR+ levels late in a subject's series: each tube alone vs with the earlier visits' CAR signal shape.

Simulates subjects like ``car_ref_gain_0.05-1pct`` of the accuracy harness
(photon-noise spreading, lymphodepleted or recovering blood, each detector
of the pre-infusion reference at its own 0.5-2x of the follow-ups' gain),
each with two peak visits (CAR+ 5-30 % of T cells) and then three late
visits at 0.05-1 % of T cells. Every tube is analysed against its subject's
reference; ``persistence`` reads the late visits with the shape the peak
visits measured (the default) and from each tube alone (the peer). Printed
per mode over the late visits: the median and mean signed error against a
perfect gate (the simulator's singlet CAR+ events over singlet beads) where
13-99 true CAR+ events lie in the tube, and the share of 95 % intervals
holding the blood's true value.

    python benchmarks/low_levels.py                # 20 subjects, seed 3
    python benchmarks/low_levels.py --subjects 40 --seed 8
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cytometry.analysis import AnalysisOptions, analyze_gated, car_reference_of, gate_file, with_car_reference  # noqa: E402
from cytometry.decisions.subjects import persistence  # noqa: E402
from cytometry.simulation.simulate import (default_concentrations, perfect_gate_count, simulate_tube,  # noqa: E402
                                           write_tube)
from cytometry.simulation.validation import _acquired_blood_ul, _lymphodepleted_blood, _normal_blood  # noqa: E402

PEAK_DAYS, LATE_DAYS = (10, 14), (56, 84, 112)


def simulate_subject(folder, subject, rng, seed):
    """One subject's tubes: ``[(day, path, truth, true CAR+/uL)]``, the pre-infusion tube first."""
    blood = (_lymphodepleted_blood(rng, b_cells=0.0) if rng.integers(2)
             else _normal_blood(rng, lymphocytes=rng.uniform(400, 1500), b_cells=0.0))
    t_cells = blood["lymphocytes"] - blood["b_cells"] - blood["nk_cells"]
    volume = _acquired_blood_ul(rng, blood["lymphocytes"])
    tubes = []
    follow_up = simulate_tube("car", seed=seed, photon_noise=True, blood_volume_ul=volume, gain_range=(0.9, 1.1),
                              concentrations=default_concentrations("car", car_t=0.0, **blood))
    gains = {dye: gain / np.exp(rng.uniform(np.log(0.5), np.log(2.0))) for dye, gain in follow_up.truth["gains"].items()}
    pre = simulate_tube("car", seed=seed + 1, photon_noise=True, blood_volume_ul=volume, gains=gains,
                        concentrations=default_concentrations("car", car_t=0.0, **dict(blood, b_cells=30.0)))
    tubes.append((0, write_tube(pre, folder / f"{subject}_day000_CAR.fcs"), pre.truth, 0.0))
    shares = [rng.uniform(0.05, 0.30) for _ in PEAK_DAYS] + \
        [float(np.exp(rng.uniform(np.log(0.0005), np.log(0.01)))) for _ in LATE_DAYS]
    for index, (day, share) in enumerate(zip(PEAK_DAYS + LATE_DAYS, shares)):
        car = share * t_cells
        tube = simulate_tube("car", seed=seed + 10 + index, photon_noise=True, blood_volume_ul=volume,
                             gain_range=(0.9, 1.1), concentrations=default_concentrations("car", car_t=car, **blood))
        tubes.append((day, write_tube(tube, folder / f"{subject}_day{day:03d}_CAR.fcs"), tube.truth, car))
    return tubes


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=20)
    parser.add_argument("--seed", type=int, default=3)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    results, late = [], {}
    with tempfile.TemporaryDirectory() as scratch:
        for number in range(args.subjects):
            subject = f"L{number:02d}"
            tubes = simulate_subject(Path(scratch), subject, rng, args.seed * 1000 + 20 * number)
            _, pre_path, pre_truth, _ = tubes[0]
            options = AnalysisOptions(beads_per_test=pre_truth["beads_per_test"],
                                      sample_volume_ul=pre_truth["sample_volume_ul"])
            options = with_car_reference(options, car_reference_of(gate_file(pre_path, options), "pre-infusion tube"))
            for day, path, truth, car in tubes[1:]:
                result = analyze_gated(gate_file(path, options), None, options)
                result.update(file=str(path), subject_id=subject, study_day=day)
                results.append(result)
                if day in LATE_DAYS:
                    perfect, events = perfect_gate_count(truth, "car_t")
                    late[(subject, day)] = (car, perfect, events)
    print(f"{args.subjects} subjects (seed {args.seed}): peak visits on days {PEAK_DAYS} at CAR+ 5-30% of T cells, "
          f"late visits on days {LATE_DAYS} at 0.05-1%; references at 0.5-2x the follow-ups' gain, photon spreading")
    header = f"{'mode':36s} {'visits':>6s} {'13-99 ev: n':>11s} {'median':>7s} {'mean':>8s} {'+/- SE':>7s} | " \
             f"{'CI cover':>8s} {'quantified':>10s}"
    print(header)
    print("-" * len(header))
    for label, carry in (("with the earlier visits' shape", True), ("each tube alone (peer)", False)):
        low, inside, quantified = [], [], 0
        for row in persistence(results, carry_shape=carry):
            for point in row["timeline"]:
                key = (row["subject_id"], point["study_day"])
                if key not in late or not point.get("car_t"):
                    continue
                car, perfect, events = late[key]
                entry = point["car_t"]
                inside.append(entry["ci95"][0] <= car <= entry["ci95"][1])
                quantified += not entry["below_lloq"]
                if perfect and 13 <= events < 100:
                    low.append((entry["cells_per_ul"] - perfect) / perfect)
        se = statistics.stdev(low) / len(low) ** 0.5 if len(low) > 1 else float("nan")
        print(f"{label:36s} {len(inside):6d} {len(low):11d} {statistics.median(low) if low else float('nan'):+7.1%} "
              f"{statistics.mean(low) if low else float('nan'):+8.1%} "
              f"{se:7.1%} | {np.mean(inside):8.1%} {quantified:10d}")
    print("median/mean (bias): signed error against a perfect gate (singlet CAR+ events over singlet beads); CI cover: 95% "
          "intervals holding the blood's true CAR+/uL; quantified: late visits at or above their LLOQ")


if __name__ == "__main__":
    main()
