"""A long fuzz campaign of FCS reading, outside CI (CI runs a short one in tests/test_hostile_input.py).

Mutates a simulated file's HEADER and TEXT bytes, truncates it, rewrites
keywords ($PAR, $TOT, $DATATYPE, $BYTEORD, $PnB, $PnR, $BEGINDATA/$ENDDATA,
$SPILLOVER) and changes the DATA length; every outcome must be a sample or
an FcsError with a one-line message. Prints the counts and every other
exception found (with the input saved for reproduction).

    python benchmarks/fuzz_campaign.py --examples 100000 [--seed 1] [--out fuzz_findings/]
"""
from __future__ import annotations

import argparse
import collections
import random
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cytometry.loading.fcs import FcsError, read_fcs  # noqa: E402
from cytometry.simulation.simulate import simulate_tube, write_tube  # noqa: E402

KEYWORDS = ["$PAR", "$TOT", "$DATATYPE", "$BYTEORD", "$P1B", "$P3B", "$P4R", "$BEGINDATA", "$ENDDATA", "$SPILLOVER"]
VALUES = ["", "0", "-1", "1", "2", "7", "999999999999", "1e9", "I", "F", "D", "A", "4,3,2,1", "1,2", "x", "16", "8"]


def mutate(raw, rng):
    raw = bytearray(raw)
    text_end = int(raw[18:26].strip())
    kind = rng.choice(["flip", "truncate", "keyword", "length"])
    if kind == "flip":
        for _ in range(rng.randint(1, 8)):
            raw[rng.randint(0, text_end)] = rng.randint(0, 255)
    elif kind == "truncate":
        raw = raw[:rng.randint(0, len(raw) - 1)]
    elif kind == "keyword":
        keyword = rng.choice(KEYWORDS)
        value = rng.choice(VALUES + [str(rng.randint(-10, 10 ** 13))])
        text = raw[:text_end + 1].decode("latin-1")
        text = re.sub(re.escape(keyword) + r"/([^/]*)/", lambda m: f"{keyword}/{value}/", text, count=1)
        raw = bytearray(text.encode("latin-1")) + raw[text_end + 1:]
    else:
        extra = rng.randint(-400, 400)
        raw = raw[:len(raw) + extra] if extra < 0 else raw + bytes(extra)
    return kind, bytes(raw)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default="fuzz_findings")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    outcomes = collections.Counter()
    findings = []
    with tempfile.TemporaryDirectory() as scratch:
        base = write_tube(simulate_tube("tbnk", seed=4, blood_volume_ul=0.1), Path(scratch) / "base.fcs").read_bytes()
        path = Path(scratch) / "fuzzed.fcs"
        start = time.perf_counter()
        slowest = 0.0
        for i in range(args.examples):
            kind, data = mutate(base, rng)
            path.write_bytes(data)
            t0 = time.perf_counter()
            try:
                read_fcs(path)
                outcomes[(kind, "sample")] += 1
            except FcsError as exc:
                outcomes[(kind, "FcsError")] += 1
                if "\n" in str(exc):
                    findings.append((i, kind, "multi-line FcsError", data))
            except Exception as exc:  # a finding
                outcomes[(kind, type(exc).__name__)] += 1
                findings.append((i, kind, f"{type(exc).__name__}: {exc}", data))
            slowest = max(slowest, time.perf_counter() - t0)
        elapsed = time.perf_counter() - start
    print(f"{args.examples} inputs in {elapsed:.0f} s (slowest {slowest * 1000:.0f} ms)")
    for (kind, result), count in sorted(outcomes.items()):
        print(f"  {kind:9s} {result:20s} {count:7d}")
    print(f"{len(findings)} findings")
    if findings:
        out = Path(args.out)
        out.mkdir(exist_ok=True)
        for i, kind, message, data in findings[:50]:
            (out / f"finding_{i}.fcs").write_bytes(data)
            print(f"  #{i} ({kind}): {message[:200]}")


if __name__ == "__main__":
    main()
