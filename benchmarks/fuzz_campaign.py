"""A long fuzz campaign of the whole `cytometry analyze` command, outside CI.

CI runs a short one of the reader alone (tests/test_hostile_input.py). This
one mutates small simulated TBNK and CAR tubes (float data, and the same
tubes stored as 16-bit and 24-bit integers), structure-aware
(:mod:`cytometry.simulation.fcs_bytes`: one keyword or segment changed, the
offsets kept consistent unless the HEADER itself is the target), and runs
each mutant through ``cytometry.outputs.cli.main(["analyze", ...])``
in-process with stdout and stderr captured. Mutators:

    header     HEADER offsets: blank, spaces inside, off by one or more, zero, swapped, beyond the file
    par tot pnb pnr png pne datatype byteord
               the keyword's value: neighbours, zero, negative, huge, non-numbers, empty
    spill_shape  $SPILLOVER's count, names and number of values
    spill_value  $SPILLOVER's entries: 1e308, NaN, zero diagonal, singular, ill-conditioned
    duplicate  a keyword written twice (same value or another)
    non_utf8   bytes 0x80-0xFF (invalid UTF-8) in keyword names and values
    data       the events: all zero, constant, subnormal, huge, NaN, zero scatter
    flip truncate length
               random bytes in HEADER/TEXT, the file cut short, DATA grown or shrunk

Each outcome is classified:

    ok           a result (exit 0)
    clean error  status "error" with a one-line message (exit 1)
    unexpected   an "unexpected ..." message, the CLI's last-resort "cytometry: error:", a
                 multi-line message, output that is not the JSON contract
    traceback    a traceback on stderr or an exception out of main()
    warning      a Python warning (RuntimeWarning...) on stderr
    hang         no answer within --timeout seconds (SIGALRM)

Prints examples/s, the outcome table per mutator and every finding (inputs
saved under --out for reproduction). The target: 0 unexpected, 0 traceback,
0 warning, 0 hang.

    python benchmarks/fuzz_campaign.py --examples 20000 [--seed 1] [--minutes 15] [--by-datatype] [--out fuzz_findings/]
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import io
import json
import random
import re
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from cytometry.outputs.cli import main as cli_main  # noqa: E402
from cytometry.simulation.fcs_bytes import FcsParts, as_integer_data, split_fcs  # noqa: E402
from cytometry.simulation.simulate import simulate_tube, write_tube  # noqa: E402

ANALYZE_ARGS = ["--json", "--workers", "1", "--beads-per-test", "50000", "--sample-volume-ul", "50"]
OUTCOMES = ("ok", "clean error", "unexpected", "traceback", "warning", "hang")

NUMBERS = ["", " ", "0", "-1", "1", "2", "7", "x", "1e300", "-1e300", "nan", "inf", "999999999999", "1.5",
           "\u00b9", "0x10", " 8 ", "1e-320"]


class Hang(BaseException):
    """Raised by SIGALRM: not an Exception, so no handler in the code under test swallows it."""


def _on_alarm(signum, frame):
    raise Hang()


def _par(parts):
    return int(parts.get("$PAR"))


def _channel(parts, rng):
    return rng.randint(1, _par(parts))


def _neighbours(value):
    n = int(value)
    return [str(n - 1), str(n + 1), str(n * 2), str(n // 2), f" {n}", f"{n} ", f"{n}.0"]


def _events(parts):
    return np.frombuffer(parts.data, dtype="<f4").reshape(-1, _par(parts)).copy()


def _with_events(parts, events):
    return FcsParts(parts.version, parts.keywords, parts.delimiter, np.ascontiguousarray(events, "<f4").tobytes())


def _spill(parts):
    fields = parts.get("$SPILLOVER").split(",")
    n = int(fields[0])
    return n, fields[1:1 + n], np.array([float(v) for v in fields[1 + n:]]).reshape(n, n)


def _spill_text(n, names, values):
    return ",".join([str(n)] + list(names) + [v if isinstance(v, str) else repr(float(v)) for v in values])


def mutate(parts, rng, integer=None):
    """One mutant of ``parts`` (float data): (mutator name, file bytes).

    ``integer`` = (bits, big_endian) mutates the tube stored as integer data
    instead (the events are changed as floats first, then stored).
    """
    store = (lambda p: as_integer_data(p, *integer)) if integer else (lambda p: p)
    float_parts, parts = parts, store(parts)
    kind = rng.choice(["header", "par", "tot", "pnb", "pnr", "png", "pne", "datatype", "byteord", "spill_shape",
                       "spill_value", "duplicate", "non_utf8", "data", "flip", "truncate", "length"])
    if kind == "header":
        raw = bytearray(parts.to_bytes())
        field = rng.randrange(6)
        current = raw[10 + 8 * field:18 + 8 * field].strip() or b"0"
        number = int(current)
        choice = rng.choice(["blank", "spaced", "off", "zero", "huge", "negative", "beyond", "swap", "junk"])
        value = {"blank": b"", "spaced": str(number)[:1].encode() + b" " + str(number)[1:].encode(),
                 "off": str(number + rng.choice([-2, -1, 1, 2, 58])).encode(), "zero": b"0",
                 "huge": b"99999999", "negative": b"-1", "beyond": str(len(raw) + rng.randint(0, 999)).encode(),
                 "swap": raw[10 + 8 * ((field + 2) % 4):18 + 8 * ((field + 2) % 4)].strip(),
                 "junk": bytes(rng.randint(0, 255) for _ in range(rng.randint(1, 8)))}[choice]
        raw[10 + 8 * field:18 + 8 * field] = value[:8].rjust(8)
        return kind, bytes(raw)
    if kind in ("par", "tot"):
        name = "$" + kind.upper()
        value = rng.choice(NUMBERS + _neighbours(parts.get(name)))
        return kind, parts.with_keywords({name: value}).to_bytes()
    if kind in ("pnb", "pnr", "png", "pne"):
        letter = kind[-1].upper()
        values = {"B": ["0", "7", "8", "12", "16", "24", "31", "33", "64", "x", ""],
                  "R": ["0", "1", "-1", "1e300", "nan", "inf", "x", "", "4294967297", "1024", "262144"],
                  "G": ["-1", "0", "2", "0.5", "1e-300", "1e300", "nan", "inf", "x", "", "-0"],
                  "E": ["4,1", "0,0", "4,0", "x", "4", "-1,0", "1e300,1", "0,1", ",", "4,1,2"]}[letter]
        channels = [_channel(parts, rng)] if rng.random() < 0.7 else range(1, _par(parts) + 1)
        value = rng.choice(values + NUMBERS[:6])
        return kind, parts.with_keywords({f"$P{c}{letter}": value for c in channels}).to_bytes()
    if kind == "datatype":
        return kind, parts.with_keywords({"$DATATYPE": rng.choice(["I", "F", "D", "A", "f", "", "X", " F"])}).to_bytes()
    if kind == "byteord":
        value = rng.choice(["1,2,3,4", "4,3,2,1", "1,2", "2,1", "3,4,1,2", "1,2,3,4,5,6,7,8", "", "big", "4, 3,2,1"])
        return kind, parts.with_keywords({"$BYTEORD": value}).to_bytes()
    if kind == "spill_shape":
        n, names, matrix = _spill(parts)
        values = list(matrix.ravel())
        choice = rng.choice(["count", "drop_value", "add_value", "unnamed", "unknown_name", "drop_name", "empty"])
        if choice == "count":
            text = _spill_text(rng.choice([n - 1, n + 1, 0, -1, 10 ** 9]), names, values)
        elif choice == "drop_value":
            text = _spill_text(n, names, values[:-rng.randint(1, n)])
        elif choice == "add_value":
            text = _spill_text(n, names, values + [0.0] * rng.randint(1, n))
        elif choice == "unnamed":
            text = _spill_text(n, [], values)
        elif choice == "unknown_name":
            text = _spill_text(n, names[:-1] + ["NOPE-A"], values)
        elif choice == "drop_name":
            text = _spill_text(n, names[:-1], values)
        else:
            text = rng.choice(["", "0", "x", ",,,"])
        return kind, parts.with_keywords({"$SPILLOVER": text}).to_bytes()
    if kind == "spill_value":
        n, names, matrix = _spill(parts)
        i, j = rng.randrange(n), rng.randrange(n)
        choice = rng.choice(["huge", "nan", "inf", "zero_diagonal", "zeros", "duplicate_row", "ill", "tiny", "text",
                             "percent", "negative", "dup_detector"])
        values = list(matrix.ravel())
        if choice == "huge":
            matrix[i, j] = rng.choice([1e308, -1e308, 1e200])
        elif choice in ("nan", "inf", "text"):
            values[i * n + j] = {"nan": "nan", "inf": "-inf", "text": "x"}[choice]
        elif choice == "zero_diagonal":
            matrix[i, i] = 0.0
        elif choice == "zeros":
            matrix[:] = 0.0
        elif choice == "duplicate_row":
            matrix[(i + 1) % n] = matrix[i]
        elif choice == "ill":
            matrix[(i + 1) % n] = matrix[i] + rng.choice([1e-6, 1e-9, 1e-12])
        elif choice == "tiny":
            matrix *= rng.choice([1e-3, 1e-6, 1e-100])
        elif choice == "percent":
            matrix *= 100.0
        elif choice == "negative":
            matrix[i, j] = -rng.random() * 2
        elif choice == "dup_detector":
            names = list(names)
            names[i] = names[j if j != i else (i + 1) % n]
        if choice not in ("nan", "inf", "text"):
            values = list(matrix.ravel())
        return kind, parts.with_keywords({"$SPILLOVER": _spill_text(n, names, values)}).to_bytes()
    if kind == "duplicate":
        key, value = rng.choice(parts.keywords)
        other = rng.choice([value, "x", "-1", "0", str(rng.randint(1, 99))])
        pairs = list(parts.keywords)
        pairs.insert(rng.randint(0, len(pairs)), (rng.choice([key, key.lower(), key.lstrip("$")]), other))
        return kind, FcsParts(parts.version, tuple(pairs), parts.delimiter, parts.data).to_bytes()
    if kind == "non_utf8":
        pairs = list(parts.keywords)
        at = rng.randrange(len(pairs))
        key, value = pairs[at]
        junk = "".join(chr(rng.randint(0x80, 0xFF)) for _ in range(rng.randint(1, 4)))
        if rng.random() < 0.5:
            value = value[:rng.randint(0, len(value))] + junk + value[rng.randint(0, len(value)):]
        else:
            key = key[:rng.randint(1, len(key))] + junk + key[rng.randint(1, len(key)):]
        pairs[at] = (key, value)
        return kind, FcsParts(parts.version, tuple(pairs), parts.delimiter, parts.data).to_bytes()
    if kind == "data":
        events = _events(float_parts)
        choice = rng.choice(["zero", "constant", "subnormal", "huge", "nan", "nan_some", "zero_scatter",
                             "negative", "inf_column", "few_events"])
        column = rng.randrange(events.shape[1])
        if choice == "zero":
            events[:] = 0
        elif choice == "constant":
            events[:] = rng.choice([1.0, 1e-40, 262143.0])
        elif choice == "subnormal":
            events = (np.random.default_rng(rng.randrange(2 ** 32)).random(events.shape) * 1e-39).astype("<f4")
        elif choice == "huge":
            events[:, column] = rng.choice([3e38, 1e30, -3e38])
        elif choice == "nan":
            events[:, column] = np.nan
        elif choice == "nan_some":
            events[rng.randrange(len(events)), column] = np.nan
        elif choice == "zero_scatter":
            events[:, :3] = 0
        elif choice == "negative":
            events = -events
        elif choice == "inf_column":
            events[:, column] = np.inf
        else:
            events = events[:rng.choice([1, 2, 3, 5, 10, 50])]
            return kind, store(_with_events(float_parts, events).with_keywords({"$TOT": str(len(events))})).to_bytes()
        return kind, store(_with_events(float_parts, events)).to_bytes()
    raw = bytearray(parts.to_bytes())
    text_end = int(raw[18:26].strip())
    if kind == "flip":
        for _ in range(rng.randint(1, 8)):
            raw[rng.randint(0, text_end)] = rng.randint(0, 255)
    elif kind == "truncate":
        raw = raw[:rng.randint(0, len(raw) - 1)]
    else:
        extra = rng.randint(-400, 400)
        raw = raw[:len(raw) + extra] if extra < 0 else raw + bytes(extra)
    return kind, bytes(raw)


def run_analyze(path, timeout):
    """(outcome, detail) of ``cytometry analyze path`` run in this process."""
    out, err = io.StringIO(), io.StringIO()
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli_main(["analyze", str(path), *ANALYZE_ARGS])
    except Hang:
        return "hang", f"no answer in {timeout:g} s"
    except BaseException:  # noqa: BLE001 - anything out of main() is a finding
        return "traceback", traceback.format_exc(limit=-3).strip().splitlines()[-1]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    stderr = err.getvalue()
    if "Traceback" in stderr:
        return "traceback", stderr.strip().splitlines()[-1]
    if "Warning:" in stderr:
        return "warning", next(line for line in stderr.splitlines() if "Warning:" in line)
    if "cytometry: error:" in stderr:
        return "unexpected", next(line for line in stderr.splitlines() if "cytometry: error:" in line)
    try:
        sample = json.loads(out.getvalue())["samples"][0]
    except (ValueError, KeyError, IndexError):
        return "unexpected", f"exit {code}, not the JSON contract: {out.getvalue()[:120]!r}"
    if sample["status"] == "ok" and code == 0:
        return "ok", ""
    message = sample.get("error") or ""
    if sample["status"] != "error" or code != 1 or not message:
        return "unexpected", f"exit {code}, status {sample['status']}, error {message!r}"
    if "\n" in message:
        return "unexpected", "multi-line error: " + message.splitlines()[0]
    if message.startswith("unexpected"):
        return "unexpected", message
    return "clean error", message


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--minutes", type=float, default=None, help="stop after this long, whatever --examples")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds before an example is a hang")
    parser.add_argument("--out", default="fuzz_findings")
    parser.add_argument("--by-datatype", action="store_true", help="one table row per mutator and data type")
    parser.add_argument("--messages", type=int, default=0, metavar="N",
                        help="also print each mutator's N commonest clean errors")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    signal.signal(signal.SIGALRM, _on_alarm)
    outcomes = collections.defaultdict(collections.Counter)
    findings, durations = [], []
    messages = collections.defaultdict(collections.Counter)
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        tubes = [split_fcs(write_tube(simulate_tube(panel, seed=4, blood_volume_ul=volume),
                                      scratch / f"base_{panel}.fcs").read_bytes())
                 for panel, volume in (("tbnk", 0.1), ("car", 0.2))]
        # Float data (as the simulator writes), 16-bit little-endian and 24-bit big-endian integers.
        bases = [(tube, integer) for tube in tubes for integer in (None, (16, False), (24, True))]
        path = scratch / "fuzzed.fcs"
        start = time.perf_counter()
        done = 0
        for i in range(args.examples):
            if args.minutes is not None and time.perf_counter() - start > 60 * args.minutes:
                break
            tube, integer = rng.choice(bases)
            kind, data = mutate(tube, rng, integer)
            kind = f"{kind}/{'F' if integer is None else f'I{integer[0]}'}" if args.by_datatype else kind
            path.write_bytes(data)
            t0 = time.perf_counter()
            outcome, detail = run_analyze(path, args.timeout)
            durations.append(time.perf_counter() - t0)
            outcomes[kind][outcome] += 1
            done += 1
            if outcome == "clean error":
                # The file's own numbers vary; the reason's wording is what matters.
                messages[kind][re.sub(r"[0-9]+", "N", detail)[:100]] += 1
            if outcome not in ("ok", "clean error"):
                findings.append((i, kind, outcome, detail, data))
        elapsed = time.perf_counter() - start
    rate = done / elapsed if elapsed else float("nan")
    print(f"{done} examples in {elapsed:.0f} s: {rate:.2f} examples/s (median {1000 * np.median(durations):.0f} ms, "
          f"slowest {1000 * max(durations):.0f} ms); {args.examples} would take ~{args.examples / rate / 60:.0f} min")
    print(f"{'mutator':16s}" + "".join(f"{o:>13s}" for o in OUTCOMES))
    totals = collections.Counter()
    for kind in sorted(outcomes):
        totals.update(outcomes[kind])
        print(f"{kind:16s}" + "".join(f"{outcomes[kind][o]:13d}" for o in OUTCOMES))
    print(f"{'total':16s}" + "".join(f"{totals[o]:13d}" for o in OUTCOMES))
    for kind in sorted(messages) if args.messages else ():
        for message, count in messages[kind].most_common(args.messages):
            print(f"  {kind:12s} {count:6d}  {message}")
    print(f"{len(findings)} findings")
    if findings:
        out = Path(args.out)
        out.mkdir(exist_ok=True)
        for i, kind, outcome, detail, data in findings[:100]:
            (out / f"finding_{i}_{kind}.fcs").write_bytes(data)
            print(f"  #{i} {kind} {outcome}: {detail[:200]}")
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
