"""Accuracy of the automatic gating and counts against the simulator's truth.

Generates a seeded, varied set of tubes (see ``cytometry.simulation.validation.CONDITIONS``:
the ideal conditions on the simulator's clean defaults and the realistic ones with
photon-noise spreading, NK continuum and NKT cells, CD45-negative high-scatter
debris, basophils/eosinophils, continua and extreme blood compositions),
analyses each, and prints per population the median and 95th-percentile
relative count error, interval coverage and F1 of event assignment, the
eligibility confusion matrix, and per condition the B-cell and lymphocyte
accuracy, lymphosum, false qc_fail and wrong verdicts.

    python benchmarks/accuracy.py                  # 120 tubes over all conditions
    python benchmarks/accuracy.py --samples 240 --seed 7 --keep DIR
    python benchmarks/accuracy.py --conditions realistic        # or ideal, or names: typical,neutropenia
    python benchmarks/accuracy.py --list-conditions
    python benchmarks/accuracy.py --without-reference   # CAR cut from the sample alone
    python benchmarks/accuracy.py --conditions car_reference --samples 200   # references at 0.5-2x gain
    python benchmarks/accuracy.py --conditions car_ref_gain_spread --samples 400 --seed 2026,5,11   # pooled
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cytometry.simulation.validation import (CONDITIONS, IDEAL_CONDITIONS, LYMPHOSUM_TOLERANCE_PCT,  # noqa: E402
                                  evaluate_tube, select_conditions, simulate_condition_set, summarize,
                                  summarize_by_condition, summarize_car)


def _fmt(value, pattern):
    """``pattern.format(value)``, or a right-aligned ``-`` of the same width for ``None``."""
    return pattern.format(value) if value is not None else "-".rjust(len(pattern.format(0.0)))


def _fmt_error(value):
    """A relative error in 6 characters; errors of 10x and more print as ``>999%``."""
    if value is not None and value >= 9.995:
        return " >999%"
    return _fmt(value, "{:6.1%}")


def _interval(bounds):
    """A percentage interval as ``lo-hi%``; ``?`` for a bound too few tubes cannot give."""
    low, high = bounds if bounds else (None, None)
    if low is None and high is None:
        return "-"
    text = lambda v: "?" if v is None else f"{100 * v:.0f}"
    return f"{text(low)}-{text(high)}%"


def print_condition_table(records, out=None):
    """The per-condition accuracy table (see ``summarize_by_condition``), to ``out`` (default: stdout now)."""
    out = out or sys.stdout   # read at the call: a stream bound at import may be closed since
    table = summarize_by_condition(records)
    ideal = {c.name for c in IDEAL_CONDITIONS}
    header = (f"{'condition':26s} {'n':>3s} | {'B err':>6s} {'B CI':>5s} {'B F1':>5s} | "
              f"{'L err':>6s} {'L CI':>5s} {'L F1':>5s} | {'lsum ok':>7s} | {'qcfail':>6s} {'n good':>6s} | "
              f"{'wrong':>5s} {'n verd':>6s} | {'failed':>6s}")
    print(header, file=out)
    print("-" * len(header), file=out)
    for name, row in table.items():
        b, lymph = row["b_cells"], row["lymphocytes"]
        marker = " " if name in ideal else "*"
        print(f"{name + marker:26s} {row['n']:3d} | {_fmt_error(b['median_rel_error'])} "
              f"{_fmt(b['coverage'], '{:5.0%}')} {_fmt(b['median_f1'], '{:5.3f}')} | "
              f"{_fmt_error(lymph['median_rel_error'])} {_fmt(lymph['coverage'], '{:5.0%}')} "
              f"{_fmt(lymph['median_f1'], '{:5.3f}')} | {_fmt(row['lymphosum_ok'], '{:7.0%}')} | "
              f"{_fmt(row['qc_fail_among_good'], '{:6.0%}')} {row['n_good']:6d} | "
              f"{row['wrong_verdicts']:5d} {row['n_verdicts']:6d} | {row['n_failed']:6d}", file=out)
    print(f"* realistic condition. err: median relative count error; CI: share of 95% intervals holding the "
          f"truth; F1: median event F1 over tubes with >= 50 true events; lsum ok: share of TBNK tubes with "
          f"lymphosum within 100 +/- {LYMPHOSUM_TOLERANCE_PCT:g}%; qcfail: share of good tubes (>= 1,000 singlet "
          f"beads, all markers, sound acquisition) called qc_fail; wrong: eligible/not_eligible verdicts "
          f"contradicting the truth, of n verd; failed: tubes whose analysis raised.", file=out)
    for name, row in table.items():
        for error in row["errors"][:1]:
            print(f"  {name}: {error}", file=out)
    return table


def print_car_table(records, out=None):
    """CAR+ T cells per condition (see ``summarize_car``): the issue-13 targets, to ``out`` (default: stdout now)."""
    out = out or sys.stdout
    table = summarize_car(records)
    if not table:
        return table
    print("\nCAR+ T cells against the pre-infusion reference (per condition; car_ref_gain_*: reference at 0.5-2x "
          "the follow-up's gain)", file=out)
    header = (f"{'condition':26s} {'n':>4s} {'CI cover':>8s} | {'n>=100':>6s} {'med err':>7s} {'p95 err':>7s} "
              f"{'p95 95% CI':>10s} {'p95 pg':>6s} | {'med own':>7s} {'p95 own':>7s} | {'n <1/uL':>7s} {'>=LLOQ':>6s}")
    print(header, file=out)
    print("-" * len(header), file=out)
    for name, row in table.items():
        print(f"{name:26s} {row['n']:4d} {row['coverage']:8.1%} | {row['n_error']:6d} "
              f"{_fmt(row['median_rel_error'], '{:7.1%}')} {_fmt(row['p95_rel_error'], '{:7.1%}')} "
              f"{_interval(row['p95_rel_error_interval']):>10s} {_fmt(row['p95_perfect_rel_error'], '{:6.1%}')} | "
              f"{_fmt(row['median_rel_error_to_perfect'], '{:7.1%}')} "
              f"{_fmt(row['p95_rel_error_to_perfect'], '{:7.1%}')} | "
              f"{row['n_absent']:7d} {row['false_persistence']:6d}", file=out)
    for name, row in table.items():
        if row["n_low"]:
            se = f" +/- {row['low_level_bias_se']:.1%}" if row["low_level_bias_se"] is not None else ""
            print(f"  {name}: low levels (13-99 true CAR+ events, {row['n_low']} tubes): mean signed error against "
                  f"the perfect gate {row['low_level_bias']:+.1%}{se}", file=out)
    for name, row in table.items():
        if row["shape_error_correlation"] is not None:
            print(f"  {name}: positives' shape ({row['n_shape']} tubes >= 100 events, shape fitted): log-SD median "
                  f"{row['shape_log_sd']:.2f}, scatter {row['shape_log_sd_scatter']:.2f}, fit's SE median "
                  f"{_fmt(row['shape_log_sd_se'], '{:.2f}')}; r(error against the perfect gate, fitted log-SD) "
                  f"= {row['shape_error_correlation']:+.2f}", file=out)
    print("CI cover: share of 95% intervals holding the true CAR+ cells/uL; med/p95 err over tubes with >= 100 true "
          "CAR+ events; p95 95% CI: a distribution-free interval for that p95 (order statistics; '?': too few tubes "
          "to bound it); p95 pg: the p95 err of a perfect gate (singlet CAR+ events over singlet beads: the blood draw's "
          "counting noise, a floor); med/p95 own: the count against that perfect gate (the analysis' own error); "
          "n <1/uL: tubes whose true CAR+ is below 1 cell/uL, >=LLOQ: of those, reported at or above the tube's "
          "LLOQ (a false persistence; target 0).", file=out)
    return table


def _seeds(text):
    """``"2026,5,11"`` -> ``[2026, 5, 11]`` (distinct, in order); an argparse type."""
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds must be integers separated by commas, got {text!r}") from None
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"a seed is repeated in {text!r}: its tubes would be counted twice")
    return seeds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=120,
                        help="tubes, spread evenly over the selected conditions")
    parser.add_argument("--conditions", default=None,
                        help="comma-separated condition names or groups (ideal, realistic, all; default all)")
    parser.add_argument("--list-conditions", action="store_true", help="print the condition names and exit")
    parser.add_argument("--seed", type=_seeds, default=[2026],
                        help="seed of the draws, or several comma-separated: each seed draws --samples tubes "
                             "and the tables pool them (a p95 over ~100 tubes is too loose to settle a target)")
    parser.add_argument("--keep", help="write the simulated tubes here instead of a temporary folder")
    parser.add_argument("--without-reference", action="store_true",
                        help="CAR tubes without their pre-infusion tube: the CAR cut from the sample's own "
                             "negative mode (the fallback when the manifest links no reference)")
    args = parser.parse_args(argv)
    if args.list_conditions:
        ideal = {c.name for c in IDEAL_CONDITIONS}
        for c in CONDITIONS:
            print(f"{c.name:26s} {c.panel:5s} {'ideal' if c.name in ideal else 'realistic'}")
        return
    try:
        conditions = select_conditions(args.conditions)
    except ValueError as exc:
        parser.error(str(exc))
    with tempfile.TemporaryDirectory() as scratch:
        out_dir = Path(args.keep) if args.keep else Path(scratch)
        records = []
        for seed in args.seed:
            # one folder per seed: the draws of different seeds share file names
            seed_dir = out_dir / f"seed{seed}" if len(args.seed) > 1 else out_dir
            tubes = simulate_condition_set(seed_dir, args.samples, seed,
                                           with_pre_infusion=not args.without_reference, conditions=conditions)
            records += [evaluate_tube(path, condition, truth) for path, condition, truth in tubes]
    populations, confusion = summarize(records)

    seeds = ", ".join(str(seed) for seed in args.seed)
    print(f"{len(records)} simulated tubes over {len(conditions)} conditions "
          f"(seed{'s' if len(args.seed) > 1 else ''} {seeds}"
          f"{', CAR tubes without a pre-infusion reference' if args.without_reference else ''}); "
          f"{sum(r.status != 'ok' for r in records)} failed to analyse")
    header = f"{'population':13s} {'n':>4s} {'med err':>8s} {'p95 err':>8s} {'CI cover':>9s} {'med F1':>7s} " \
             f"{'min F1':>7s} {'n F1':>5s}"
    print(header)
    print("-" * len(header))

    fmt = _fmt
    for name, s in populations.items():
        print(f"{name:13s} {s['n']:4d} {fmt(s['median_rel_error'], '{:8.1%}')} {fmt(s['p95_rel_error'], '{:8.1%}')} "
              f"{fmt(s['coverage'], '{:9.1%}')} {fmt(s['median_f1'], '{:7.3f}')} {fmt(s['min_f1'], '{:7.3f}')} "
              f"{s['n_f1']:5d}")
    print("\nF1 over tubes with >= 50 true events of the population; errors relative to the true cells/uL.")
    car = populations.get("car_t", {})
    if "n_f1_1pct" in car:
        print(f"CAR+ T where CAR+ >= 1% of T cells and >= 50 events ({car['n_f1_1pct']} tubes): median F1 {car['median_f1_1pct']:.3f}, "
              f"min {car['min_f1_1pct']:.3f}, F1 >= 0.90 in {car['share_f1_1pct_ge_0.90']:.0%} of tubes")
        print(f"  the ideal count-preserving cut (truth's brightest k T cells, k the true CAR+): median F1 "
              f"{car['median_ideal_f1_1pct']:.3f}, F1 >= 0.90 in {car['share_ideal_f1_1pct_ge_0.90']:.0%} of tubes; "
              f"gap to it: median {car['median_f1_gap_to_ideal_1pct']:.3f}, max {car['max_f1_gap_to_ideal_1pct']:.3f}")

    print("\nEligibility (TBNK tubes; truth: B cells > 5 cells/uL)")
    verdicts = ["eligible", "not_eligible", "indeterminate", "qc_fail"]
    print(f"{'truth':14s}" + "".join(f"{v:>15s}" for v in verdicts))
    for truth in ("eligible", "not_eligible"):
        print(f"{truth:14s}" + "".join(f"{confusion.get((truth, v), 0):15d}" for v in verdicts))

    print(f"indeterminate verdicts with the truth within one interval width of 5 cells/uL: "
          f"{confusion.get(('indeterminate', 'near threshold'), 0)}, farther: "
          f"{confusion.get(('indeterminate', 'far from threshold'), 0)}")

    print("\nBy condition: tubes, B-cell intervals holding the truth, CAR+ intervals holding the truth, errors")
    conditions = {}
    for r in records:
        conditions.setdefault(r.condition, []).append(r)
    for name, rs in conditions.items():
        b = [r.populations["b_cells"]["inside"] for r in rs if "inside" in r.populations.get("b_cells", {})]
        car = [r.populations["car_t"]["inside"] for r in rs if "inside" in r.populations.get("car_t", {})]
        errors = [r.error for r in rs if r.status != "ok"]
        print(f"  {name:24s} {len(rs):3d}   B {sum(b):3d}/{len(b):<3d}  CAR {sum(car):3d}/{len(car):<3d}  "
              f"{'; '.join(errors[:2])}")
    print("\nAccuracy per condition")
    print_condition_table(records)
    print_car_table(records)
    times = [r.gating_seconds for r in records if r.status == "ok"]
    if times:
        print(f"\nload+compensate+transform+gate per tube: median {statistics.median(times) * 1000:.0f} ms "
              f"(tubes of {min(int(r.populations.get('beads', {}).get('events', 0)) for r in records if r.status == 'ok')}+ beads)")


if __name__ == "__main__":
    main()
