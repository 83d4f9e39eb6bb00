"""The README's examples run as tests, so its figures cannot go stale (issue 14, item 6).

Every fenced block in README.md is one of:

- an **example output**: the line before the fence is
  ``<!-- output of: cytometry ARGS -->``; the command is run and every line of
  the block (trailing spaces stripped, the fence's indentation removed) must be
  a line of its stdout, in the same order. A line holding only ``...`` stands
  for output left out. The exit status must be 0.
- a **JSON contract**: the line before the fence is ``<!-- json fields: ... -->``;
  each line starting with ``cytometry`` is run, and every field of the
  schematic JSON under it (``"a" | "b"`` alternatives, ``[..]`` and ``, ...``
  elisions allowed) must be in its output, at the same nesting (a field inside
  a list must be in at least one element).
- a ``python`` example: run as a script (matplotlib without a display).
- one of the install commands under "Two commands" (CI runs those itself).

The commands run in README order in one scratch folder holding a link to the
committed ``sample_fcs/``, so relative paths work as written and a store made
by an earlier example (``--out run.store``) serves the later ones; each command
runs once per session.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

FENCE = re.compile(r"^(?P<indent> *)(?P<ticks>`{3,})(?P<info>[\w+-]*)\s*$")
OUTPUT_MARKER = re.compile(r"^\s*<!--\s*output of:\s*(?P<cmd>.+?)\s*-->\s*$")
JSON_MARKER = re.compile(r"^\s*<!--\s*json fields\b.*-->\s*$")
ELISION = "..."
# Fences that need no check: the setup commands, which CI runs as they stand.
UNCHECKED_SECTIONS = {"Two commands"}


@dataclass
class Block:
    line: int                 # 1-based line of the opening fence in README.md
    info: str                 # the fence's info string ("python", "")
    section: str              # the "## " heading it sits under
    lines: list[str]          # content, the fence's indentation removed, trailing spaces stripped
    marker: str | None = None  # "output" or "json"
    command: str | None = None  # for "output" blocks
    id: str = field(init=False, default="")

    def __post_init__(self):
        self.id = f"README.md:{self.line}"


def parse_readme(text: str) -> list[Block]:
    blocks: list[Block] = []
    section = ""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("## "):
            section = line[3:].strip()
        m = FENCE.match(line)
        if not m:
            i += 1
            continue
        indent, ticks = len(m["indent"]), m["ticks"]
        body = []
        j = i + 1
        while j < len(lines) and lines[j].strip() != ticks:
            raw = lines[j]
            strip = min(indent, len(raw) - len(raw.lstrip(" ")))
            body.append(raw[strip:].rstrip())
            j += 1
        if j == len(lines):
            raise AssertionError(f"README.md:{i + 1}: fence never closed")
        block = Block(line=i + 1, info=m["info"], section=section, lines=body)
        k = i - 1
        while k >= 0 and not lines[k].strip():
            k -= 1
        if k >= 0:
            if om := OUTPUT_MARKER.match(lines[k]):
                block.marker, block.command = "output", om["cmd"]
            elif JSON_MARKER.match(lines[k]):
                block.marker = "json"
        blocks.append(block)
        i = j + 1
    return blocks


def missing_lines(shown: list[str], output: str) -> list[str]:
    """The shown lines that are not lines of ``output`` in the same order (``...`` skips)."""
    actual = [line.rstrip() for line in output.splitlines()]
    missing, pos = [], 0
    for line in shown:
        if line.strip() == ELISION or not line.strip():
            continue
        try:
            pos = actual.index(line, pos) + 1
        except ValueError:
            missing.append(line)
    return missing


def json_segments(block: Block) -> list[tuple[str, str]]:
    """(command, schematic JSON) for each ``cytometry`` line of a JSON-fields block."""
    segments: list[tuple[str, list[str]]] = []
    for line in block.lines:
        if line.startswith("cytometry "):
            segments.append((line, []))
        elif segments:
            segments[-1][1].append(line)
        elif line.strip():
            raise AssertionError(f"{block.id}: JSON before any 'cytometry' line")
    return [(cmd, "\n".join(body)) for cmd, body in segments]


_STRING = r'"(?:[^"\\]|\\.)*"'


def parse_schematic(text: str):
    """The README's schematic JSON as a Python object."""
    text = re.sub(rf"({_STRING})(?:\s*\|\s*{_STRING})+", r"\1", text)  # "a" | "b" -> "a"
    text = re.sub(r"\[\s*\.\.\s*\]", "[]", text)                       # [..] -> []
    text = re.sub(r",\s*\.\.\.(?=\s*[}\]])", "", text)                 # , ...} -> }
    return json.loads(text)


def field_paths(obj, prefix: str = "") -> set[str]:
    """Dotted paths of every object key; ``[]`` steps into list elements (any of them)."""
    paths: set[str] = set()
    if isinstance(obj, dict):
        for key, value in obj.items():
            path = f"{prefix}.{key}" if prefix else key
            paths.add(path)
            paths |= field_paths(value, path)
    elif isinstance(obj, list):
        for value in obj:
            paths |= field_paths(value, prefix + "[]")
    return paths


BLOCKS = parse_readme(README.read_text(encoding="utf-8"))
OUTPUT_BLOCKS = [b for b in BLOCKS if b.marker == "output"]
JSON_CASES = [(b, cmd, schema) for b in BLOCKS if b.marker == "json" for cmd, schema in json_segments(b)]
PYTHON_BLOCKS = [b for b in BLOCKS if b.info == "python"]


def _cli(command: str) -> list[str]:
    argv = shlex.split(command)
    assert argv[0] == "cytometry", f"not a cytometry command: {command!r}"
    return [sys.executable, "-m", "cytometry.outputs.cli", *argv[1:]]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    work = tmp_path_factory.mktemp("readme")
    (work / "sample_fcs").symlink_to(ROOT / "sample_fcs", target_is_directory=True)
    return work


@pytest.fixture(scope="module")
def env():
    return {**os.environ, "MPLBACKEND": "Agg", "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def outputs(workdir, env):
    """Every README command, run once each in README order: command -> CompletedProcess."""
    commands = []
    for block in BLOCKS:
        if block.marker == "output":
            commands.append(block.command)
        elif block.marker == "json":
            commands.extend(cmd for cmd, _ in json_segments(block))
    done: dict[str, subprocess.CompletedProcess] = {}
    for command in commands:
        if command not in done:
            done[command] = subprocess.run(_cli(command), cwd=workdir, env=env, capture_output=True,
                                           text=True, timeout=600)
    return done


def test_readme_has_checked_examples():
    assert len(OUTPUT_BLOCKS) >= 3 and JSON_CASES and PYTHON_BLOCKS


def test_every_block_is_checked():
    unchecked = [b.id for b in BLOCKS
                 if b.marker is None and b.info != "python" and b.section not in UNCHECKED_SECTIONS]
    assert not unchecked, (f"code blocks in README.md that no test checks: {unchecked}; put "
                           "'<!-- output of: cytometry ... -->' or '<!-- json fields: ... -->' before them")


@pytest.mark.parametrize("block", OUTPUT_BLOCKS, ids=lambda b: b.id)
def test_example_output(block, outputs):
    run = outputs[block.command]
    assert run.returncode == 0, f"{block.command} exited {run.returncode}:\n{run.stderr[-2000:]}"
    shown = [line for line in block.lines if line.strip() and line.strip() != ELISION]
    assert shown, f"{block.id}: empty example"
    missing = missing_lines(block.lines, run.stdout)
    assert not missing, (f"{block.id}: lines the README shows that `{block.command}` does not print "
                         f"(in this order):\n" + "\n".join(missing) + "\n--- it prints:\n" + run.stdout)


@pytest.mark.parametrize("block, command, schema", JSON_CASES,
                         ids=[f"{b.id}:{cmd.split()[1]}" for b, cmd, _ in JSON_CASES])
def test_json_contract(block, command, schema, outputs):
    run = outputs[command]
    assert run.returncode == 0, f"{command} exited {run.returncode}:\n{run.stderr[-2000:]}"
    wanted = field_paths(parse_schematic(schema))
    assert wanted, f"{block.id}: no fields shown for {command}"
    have = field_paths(json.loads(run.stdout))
    assert not wanted - have, f"{block.id}: fields the README shows that `{command}` lacks: {sorted(wanted - have)}"


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=lambda b: b.id)
def test_python_example(block, outputs, workdir, env):
    # after the CLI examples, so `run_batch(..., store="run.store")` finds their store
    code = "\n".join(block.lines)
    run = subprocess.run([sys.executable, "-c", code], cwd=workdir, env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, f"{block.id} failed:\n{run.stderr[-3000:]}"


# --- the checks themselves can fail ---------------------------------------------------

def test_missing_lines_reports_changed_and_reordered_lines():
    out = "head  \nrow a 114\nrow b 5.49\ntotal\n"
    assert missing_lines(["head", "...", "row b 5.49"], out) == []
    assert missing_lines(["row a 115"], out) == ["row a 115"]
    assert missing_lines(["row b 5.49", "row a 114"], out) == ["row a 114"]
    assert missing_lines(["  row a 114"], out) == ["  row a 114"]


def test_schematic_fields():
    schema = parse_schematic('{"s": [{"v": "a" | "b", "ci": [..], "p": {"x": {"e": 1}, ...}}]}')
    assert field_paths(schema) == {"s", "s[].v", "s[].ci", "s[].p", "s[].p.x", "s[].p.x.e"}
    assert field_paths({"s": [{"v": 1}, {"ci": None}]}) == {"s", "s[].v", "s[].ci"}


def test_parse_readme_strips_fence_indent_and_reads_markers():
    text = ("## Sec\n\n  <!-- output of: cytometry x -->\n  ```\n    two spaces\n  ```\n"
            "```python\nprint(1)\n```\n")
    a, b = parse_readme(text)
    assert (a.marker, a.command, a.lines, a.section) == ("output", "cytometry x", ["  two spaces"], "Sec")
    assert (b.marker, b.info, b.lines) == (None, "python", ["print(1)"])


# --- docstring examples: skipped only where they cannot run --------------------------

# (file, count of `doctest: +SKIP` lines, why). Any other skip fails this test: an example
# that can run on sample_fcs/ must run, so its printed output cannot go stale.
ALLOWED_SKIPS = {
    ("cytometry/analysis.py", 2, "GatedSample.to_anndata needs the optional anndata extra"),
}


def test_docstring_examples_are_not_skipped():
    found = {}
    for package in ("cytometry", "gating", "gpu"):
        for path in sorted((ROOT / package).rglob("*.py")):
            n = path.read_text(encoding="utf-8").count("doctest: +SKIP")
            if n:
                found[path.relative_to(ROOT).as_posix()] = n
    allowed = {name: n for name, n, _ in ALLOWED_SKIPS}
    assert found == allowed, ("docstring examples marked +SKIP beyond those that cannot run "
                              f"(found {found}, allowed {allowed}); make them run on sample_fcs/")
