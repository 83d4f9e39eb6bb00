"""Time per tube of the whole per-sample pipeline, stage by stage.

Simulates tubes of about 100,000 events (TBNK and CAR) and prints the median
time of each stage: load (flowkit), compensate, transform (logicle), gate,
count, and in the same run flowkit's own load + compensate + logicle as the
peer for the preprocessing. Target (issue 12): gating <= 0.3 s per
100,000-event tube on a 2-core machine.

    python benchmarks/bench_gating.py [--events 100000] [--repeats 5]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cytometry.analysis import (AnalysisOptions, GatedSample, analyze_gated, prepare_events,  # noqa: E402
                                car_reference_of, with_car_reference)
from cytometry.loading.fcs import read_fcs  # noqa: E402
from cytometry.loading.panel import resolve_panel  # noqa: E402
from cytometry.preprocess import compensate  # noqa: E402
from cytometry.simulation.simulate import default_concentrations, simulate_tube, write_tube  # noqa: E402
from gating import auto_gate  # noqa: E402


def stage_times(path, options):
    """Median-ready stage times of one tube, and the GatedSample and result it produced."""
    times = {}
    start = time.perf_counter()
    sample = read_fcs(path)
    times["load (flowkit)"] = time.perf_counter() - start
    panel = resolve_panel(sample.pnn, sample.pns)
    start = time.perf_counter()
    compensate(sample.events, sample.pnn, sample.spillover)
    times["compensate"] = time.perf_counter() - start
    start = time.perf_counter()
    data, channels = prepare_events(sample, panel, sample.spillover)
    times["compensate + transform"] = time.perf_counter() - start
    start = time.perf_counter()
    gating = auto_gate(data, channels, panel.name, params=options.gating)
    times["gate"] = time.perf_counter() - start

    gated = GatedSample(sample=sample, panel=panel, spillover=sample.spillover, data=data, channels=channels,
                        gating=gating, flags=list(gating.qc_flags))
    start = time.perf_counter()
    result = analyze_gated(gated, None, options)
    times["count + QC"] = time.perf_counter() - start
    return times, gated, result


def flowkit_preprocess(path):
    """``path`` loaded, compensated and logicle-transformed by flowkit alone (the peers' input).

    Returns the events, the channel names and the fluorescence channel names.
    """
    import flowkit as fk

    sample = fk.Sample(str(path), subsample=0)
    sample.apply_compensation(sample.metadata["spillover"])
    fluorescence = [label for label in sample.pnn_labels if label not in ("FSC-A", "FSC-H", "SSC-A", "Time")]
    transform = fk.transforms.LogicleTransform(param_t=262144, param_w=0.5, param_m=4.5, param_a=0)
    sample.apply_transform({label: transform for label in fluorescence})
    return sample.get_events(source="xform"), list(sample.pnn_labels), fluorescence


def flowkit_peer(path):
    start = time.perf_counter()
    flowkit_preprocess(path)
    return time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    options = AnalysisOptions(beads_per_test=50000, sample_volume_ul=50)
    with tempfile.TemporaryDirectory() as scratch:
        for panel, with_reference in (("tbnk", False), ("car", False), ("car", True)):
            concentrations = default_concentrations(panel, car_t=60.0) if panel == "car" else \
                default_concentrations("tbnk", b_cells=60.0)
            per_ul = sum(v for k, v in concentrations.items() if k in ("granulocytes", "monocytes", "lymphocytes",
                                                                        "dead_cells")) + 1000 * 1.07
            volume = args.events / per_ul
            tube = simulate_tube(panel, seed=5, concentrations=concentrations, blood_volume_ul=volume)
            path = write_tube(tube, Path(scratch) / f"{panel}.fcs")
            tube_options = options
            if with_reference:
                # the subject's pre-infusion tube, gated once (as a batch caches it per subject)
                pre = simulate_tube("car", seed=6, concentrations=default_concentrations("car", car_t=0.0),
                                    blood_volume_ul=volume)
                _, reference, _ = stage_times(write_tube(pre, Path(scratch) / "pre.fcs"), options)
                tube_options = with_car_reference(options, car_reference_of(reference, "pre-infusion tube"))
            runs = [stage_times(path, tube_options) for _ in range(args.repeats)]
            n_events = runs[0][1].sample.n_events
            stages = {name: statistics.median(run[0][name] for run in runs) for name in runs[0][0]}
            peer = statistics.median(flowkit_peer(path) for _ in range(args.repeats))
            total = stages["load (flowkit)"] + stages["compensate + transform"] + stages["gate"] + stages["count + QC"]
            label = f"{panel.upper()} tube" + (" against its pre-infusion tube" if with_reference else "")
            print(f"\n{label}, {n_events:,} events, medians of {args.repeats} runs")
            for name, seconds in stages.items():
                print(f"  {name:28s} {seconds * 1000:8.1f} ms")
            print(f"  {'total per tube':28s} {total * 1000:8.1f} ms")
            print(f"  {'peer: flowkit load+comp+logicle':28s} {peer * 1000:8.1f} ms")
            if with_reference:
                print_shape_profile_cost(runs[0][1], tube_options, args.repeats)


def print_shape_profile_cost(gated, options, repeats):
    """The CAR count with and without its shape profile (what persistence carries between visits), interleaved."""
    from gating.car import count_against_reference

    column, top = gated.channels["CAR"], gated.sample.channel_top(gated.channels["CAR"])
    values = gated.data[gated.gating.masks["t_cells"], column].astype(float)
    beads = gated.data[gated.gating.masks["beads"], column].astype(float) if "beads" in gated.gating.masks else None
    reference = options.gating.car_reference
    times = {True: [], False: []}
    for _ in range(repeats):
        for profile in (False, True):
            start = time.perf_counter()
            count_against_reference(values, reference, beads, top, shape_profile=profile)
            times[profile].append(time.perf_counter() - start)
    print(f"  {'CAR count, no shape profile':28s} {statistics.median(times[False]) * 1000:8.1f} ms")
    print(f"  {'CAR count + shape profile':28s} {statistics.median(times[True]) * 1000:8.1f} ms")

if __name__ == "__main__":
    main()
