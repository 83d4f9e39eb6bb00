"""CAR-T kinetics a sponsor can report, against a simulated cohort's truth.

Generates the seeded cohort of :mod:`cytometry.simulation.cohort` (fast and slow
expansion, late persistence at ~1 cell/uL, incomplete B-cell aplasia, B-cell
recovery; each subject's pre-infusion reference at 0.5-2x the follow-ups'
detector gain; TBNK tubes from the same blood, one with a mistyped bead lot),
runs the real pipeline through the command line

    cytometry analyze DIR --manifest DIR/manifest.csv --out STORE
    cytometry persistence --store STORE --json

and prints per subject true vs measured Cmax, Tmax, AUC(0-28 d), Clast,
Tlast, aplasia onset and recovery day (relative errors, pass/fail against
the tolerance), the CAR+ and B-cell values of every visit, and the TBNK/CAR
T-cell cross-check against the pairs that should and should not be flagged.

"true" is the blood concentration; "perfect" is what a perfect gate would
count in the tube (the simulator's singlet events over singlet beads): the
gap between the two is the blood draw's counting noise, the gap between
"perfect" and "measured" the analysis' own error.

    python benchmarks/kinetics.py                      # the whole cohort, seed 2113
    python benchmarks/kinetics.py --seed 7 --keep DIR --subjects fast,recovery
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cytometry.simulation.cohort import SUBJECTS, compare_to_truth, make_cohort, singlet_probability  # noqa: E402


def _num(value, width=9):
    """A number in ``width`` characters (4 significant digits), ``-`` for ``None``."""
    if value is None:
        return "-".rjust(width)
    return (str(value) if isinstance(value, int) else f"{value:.4g}").rjust(width)


def _err(value):
    if value is None:
        return "-".rjust(7)
    if abs(value) >= 9.995:
        return "  >999%" if value > 0 else " <-999%"
    return f"{value:+7.1%}"


def _count(entry):
    if not entry:
        return "-"
    text = f"{entry['cells_per_ul']:.3g} [{entry['ci95'][0]:.3g}-{entry['ci95'][1]:.3g}]"
    return f"<LLOQ {text}" if entry["below_lloq"] else text


def run_pipeline(cohort_dir, store, workers):
    """``cytometry analyze`` into a store, then ``cytometry persistence --json`` twice.

    Returns ``(subjects, seconds, own_subjects)``: the persistence output
    (each visit with its subject's earlier CAR signal shape), the analysis'
    seconds, and the output with ``--own-shape-only`` (each tube alone),
    the peer the shape's carrying is measured against.
    """
    cli = [sys.executable, "-m", "cytometry.outputs.cli"]
    started = time.perf_counter()
    analyze = subprocess.run(cli + ["analyze", str(cohort_dir), "--manifest", str(cohort_dir / "manifest.csv"),
                                    "--out", str(store), "--workers", str(workers)],
                             capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if analyze.returncode not in (0, 1):
        raise SystemExit(f"cytometry analyze failed ({analyze.returncode}): {analyze.stderr.strip()[-500:]}")
    for line in analyze.stderr.splitlines():
        if line.startswith("error:"):
            print(line)
    outputs = []
    for extra in ([], ["--own-shape-only"]):
        persistence = subprocess.run(cli + ["persistence", "--store", str(store), "--json"] + extra,
                                     capture_output=True, text=True)
        if persistence.returncode not in (0, 1):
            raise SystemExit(f"cytometry persistence failed ({persistence.returncode}): {persistence.stderr.strip()}")
        outputs.append(json.loads(persistence.stdout)["subjects"])
    return outputs[0], seconds, outputs[1]


def print_subject(subject_id, row, out=sys.stdout):
    """The per-subject tables: kinetic parameters, visits, cross-checks."""
    print(f"\n{subject_id} {row['profile']}: {row['description']}; pre-infusion reference at "
          f"x{row['reference_gain_ratio']:g} the follow-ups' gain", file=out)
    if not row["found"]:
        print("  not in the persistence output", file=out)
    header = f"  {'parameter':24s} {'true':>9s} {'perfect':>9s} {'measured':>9s} {'rel err':>7s}  pass"
    print(header, file=out)
    print("  " + "-" * (len(header) - 2), file=out)
    for p in row["parameters"]:
        verdict = ("ok" if p["passed"] else "FAIL") + (" (diagnostic)" if p["diagnostic"] else "")
        print(f"  {p['label']:24s} {_num(p['true'])} {_num(p['tube'])} {_num(p['measured'])} "
              f"{_err(p['relative_error'])}  {verdict}", file=out)
    print(f"  {'day':>4s} {'uL':>4s} {'true CAR+':>9s} {'perfect':>9s} {'events':>6s}  {'measured CAR+ [95% CI]':28s} "
          f"{'in CI':5s} {'true B':>7s}  measured B", file=out)
    for v in row["visits"]:
        print(f"  {v['study_day']:4d} {v['blood_volume_ul']:4g} {_num(v['car_t_true'])} {_num(v['car_t_tube'])} "
              f"{v['car_t_tube_events']:6d}  {_count(v['car_t']):28s} {'yes' if v['car_t_inside'] else 'NO':5s} "
              f"{_num(v['b_cells_true'], 7)}  {_count(v['b_cells'])}", file=out)
    for c in row["crosschecks"]:
        expected = "should flag" if c["expected_flag"] else "should agree"
        got = "not compared" if not c["compared"] else ("FLAGGED" if c["flagged"] else "agree")
        diff = "" if c["difference_pct"] is None else f"TBNK vs CAR tube {c['difference_pct']:+.1f}%, z = {c['z']:+.2f}"
        print(f"  T-cell cross-check day {c['study_day']:>2d}: {diff:36s} {got:12s} ({expected}) "
              f"{'ok' if c['passed'] else 'FAIL'}", file=out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=2113)
    parser.add_argument("--subjects", default="", help="comma-separated profiles or IDs: "
                        + ", ".join(s.profile for s in SUBJECTS) + " (default: all)")
    parser.add_argument("--tolerance", type=float, default=0.2, help="relative tolerance of Cmax, AUC, Clast")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--keep", help="write the cohort and the store here instead of a temporary folder")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        base = Path(args.keep) if args.keep else Path(scratch)
        cohort_dir, store = base / "cohort", base / "store"
        try:
            truth = make_cohort(cohort_dir, seed=args.seed, subjects=args.subjects.split(","))
        except ValueError as exc:
            parser.error(str(exc))
        subjects, seconds, own_subjects = run_pipeline(cohort_dir, store, args.workers)
    rows = compare_to_truth(truth, subjects, args.tolerance)
    n_tubes = sum(len(s["visits"]) + len(s["tbnk"]) for s in truth["subjects"].values())
    print(f"{len(rows)} simulated subjects, {n_tubes} tubes (seed {args.seed}); analyze with {args.workers} "
          f"worker(s): {seconds:.0f} s; tolerance {args.tolerance:.0%} on Cmax, AUC0-28 and Clast, days exact")
    for subject_id, row in rows.items():
        print_subject(subject_id, row)

    print("\nSummary (each visit with the CAR signal's log-SD of its subject's earlier visits)")
    print_summary(rows)
    own_rows = compare_to_truth(truth, own_subjects, args.tolerance)
    print("\nThe same store, each tube alone (cytometry persistence --own-shape-only)")
    print_summary(own_rows)
    print("(relative errors; '!' beyond the tolerance or a wrong day; x-check: TBNK/CAR pairs judged as the truth "
          "says; Clast/Tlast against the truth at each tube's LLOQ by the analysis' rule on the known CAR-negative "
          "T cells of the tube and its reference - the 25-event floor and the measured LLOQ are diagnostic rows)")
    acceptance = all(x["passed"] for row in rows.values() for x in row["parameters"]
                     if x["key"] in ("cmax", "tmax_day", "auc_0_28"))
    every = all(x["passed"] for row in rows.values() for x in row["parameters"] if not x["diagnostic"])
    every_own = all(x["passed"] for row in own_rows.values() for x in row["parameters"] if not x["diagnostic"])
    lloqs = [v["car_t"]["lloq"]["cells_per_ul"] for row in rows.values() for v in row["visits"]
             if v["car_t"] and (v["car_t"].get("lloq") or {}).get("cells_per_ul") is not None]
    checks = [c for row in rows.values() for c in row["crosschecks"]]
    flagged_right = sum(c["passed"] for c in checks if c["expected_flag"])
    agreed_right = sum(c["passed"] for c in checks if not c["expected_flag"])
    print(f"\nCmax, Tmax, AUC0-28 within {args.tolerance:.0%} for every subject: {'yes' if acceptance else 'NO'}; "
          f"every parameter (Clast/Tlast and aplasia days too): {'yes' if every else 'NO'} "
          f"(each tube alone: {'yes' if every_own else 'NO'})")
    print(f"T-cell cross-check: {flagged_right}/{sum(c['expected_flag'] for c in checks)} disagreeing pairs flagged, "
          f"{agreed_right}/{sum(not c['expected_flag'] for c in checks)} agreeing pairs not flagged")
    if lloqs:
        true_lloqs = [v["car_t_lloq_events"] / (v["blood_volume_ul"] * singlet_probability())
                      for s in truth["subjects"].values() for v in s["visits"]
                      if v["study_day"] > 0 and "car_t_lloq_events" in v]
        print(f"CAR+ LLOQ reported per tube: {min(lloqs):.3g}-{max(lloqs):.3g} cells/uL; the truth's, from the "
              f"known cells: {min(true_lloqs):.3g}-{max(true_lloqs):.3g} cells/uL")
    for label, table in (("", rows), (" (each tube alone)", own_rows)):
        low = [(v["car_t"]["cells_per_ul"] - v["car_t_tube"]) / v["car_t_tube"] for row in table.values()
               for v in row["visits"] if v["study_day"] > 0 and v["car_t"] and v["car_t_tube"]
               and 13 <= v["car_t_tube_events"] < 100]
        if low:
            se = statistics.stdev(low) / len(low) ** 0.5 if len(low) > 1 else float("nan")
            print(f"CAR+ low levels{label} (13-99 true events, {len(low)} visits): mean signed error against the "
                  f"perfect gate {statistics.mean(low):+.1%} +/- {se:.1%}")
    for label, table in (("", rows), (" (each tube alone)", own_rows)):
        inside = [v["car_t_inside"] for row in table.values() for v in row["visits"] if v["study_day"] > 0]
        print(f"CAR+ 95% intervals holding the true blood value{label}: {sum(inside)}/{len(inside)} post-infusion "
              f"visits")
    return 0 if acceptance else 1


def print_summary(rows, out=sys.stdout):
    """One line per subject: each parameter's relative error or ok/FAIL."""
    header = f"{'subject':8s} {'profile':19s} {'gain':>5s} {'Cmax':>7s} {'Tmax':>4s} {'AUC':>7s} {'Clast':>7s} " \
             f"{'Tlast':>5s} {'onset':>5s} {'recov':>5s} {'x-check':>7s}"
    print(header, file=out)
    print("-" * len(header), file=out)
    for subject_id, row in rows.items():
        p = {x["key"]: x for x in row["parameters"]}

        def mark(key, value=True):
            text = _err(p[key]["relative_error"]).strip() if value and p[key]["relative_error"] is not None else \
                ("ok" if p[key]["passed"] else "FAIL")
            return text if p[key]["passed"] else f"{text}!"
        checks = row["crosschecks"]
        xcheck = f"{sum(c['passed'] for c in checks)}/{len(checks)}"
        print(f"{subject_id:8s} {row['profile']:19s} {row['reference_gain_ratio']:5.2f} {mark('cmax'):>7s} "
              f"{mark('tmax_day', False):>4s} {mark('auc_0_28'):>7s} {mark('clast'):>7s} "
              f"{mark('tlast_day', False):>5s} {mark('aplasia_onset_day', False):>5s} "
              f"{mark('aplasia_recovery_day', False):>5s} {xcheck:>7s}", file=out)


if __name__ == "__main__":
    sys.exit(main())
