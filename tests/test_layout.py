"""The package layout rules a newcomer relies on (issue 14, item 7).

``cytometry/`` is laid out by stage; the simulator and accuracy harness stay
out of the runtime import path; imports sit at the top of each module, so a
module's dependencies are read from its first lines. The few deferred
imports are listed here with their reason.
"""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "cytometry"

#: Imports that may be deferred into a function, and why.
DEFERRED = {
    "flowkit": "2.3 s to import; only GatingML export and reviewed gates need it, not reading files, --help or the store",
    "anndata": "optional extra (GatedSample.to_anndata)",
    "dask": "optional extra (--scheduler)",
    "importlib": "the package's lazy top-level exports",
}

STAGES = {"loading": {"fcs.py", "manifest.py", "panel.py", "reviewed_gates.py"},
          "decisions": {"qc.py", "eligibility.py", "subjects.py", "car_shape.py"},
          "batch": {"run.py", "store.py"},
          "outputs": {"cli.py", "report.py", "plots.py", "formatting.py"},
          "simulation": {"simulate.py", "cohort.py", "validation.py", "metamorphic.py", "fcs_bytes.py"}}


def _modules():
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def _imported_modules(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield node, [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node, [node.module]


def test_stages_hold_their_modules():
    for stage, modules in STAGES.items():
        found = {p.name for p in (PACKAGE / stage).glob("*.py")} - {"__init__.py"}
        assert found == modules, f"cytometry/{stage}/ holds {sorted(found)}"
        assert (PACKAGE / stage / "__init__.py").read_text().strip().startswith('"""'), f"{stage} has no docstring"


def test_no_function_local_imports_beyond_the_deferred_ones():
    hidden = []
    for path in _modules():
        tree = ast.parse(path.read_text())
        for function in ast.walk(tree):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(function):
                if isinstance(node, ast.ImportFrom) and node.level:
                    hidden.append(f"{path.relative_to(ROOT)}:{node.lineno} relative import in a function")
                    continue
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
                    if any(name.split(".")[0] not in DEFERRED for name in names):
                        hidden.append(f"{path.relative_to(ROOT)}:{node.lineno} {', '.join(names)}")
    assert not hidden, "function-local imports hide dependencies:\n" + "\n".join(hidden)


def test_runtime_never_imports_the_simulator():
    offenders = []
    for path in _modules():
        if "simulation" in path.relative_to(PACKAGE).parts:
            continue
        for node, names in _imported_modules(ast.parse(path.read_text())):
            if any(name.startswith("cytometry.simulation") for name in names):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, f"runtime modules import the simulator: {offenders}"


def test_the_cli_runs_without_loading_the_simulator():
    code = ("import sys; from cytometry.outputs.cli import main; import cytometry.batch.run, cytometry.outputs.report; "
            "print(sorted(m for m in sys.modules if m.startswith('cytometry.simulation')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_python_dash_m_cytometry_is_the_command():
    out = subprocess.run([sys.executable, "-m", "cytometry", "--version"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.startswith("cytometry"), out.stderr


@pytest.mark.parametrize("pattern", [":.3g}", ":.4g}"])
def test_outputs_round_through_the_one_formatter(pattern):
    """Counts and intervals in outputs go through ``format_sig``/``count_text``, not ad-hoc format specs."""
    places = []
    for stage in ("outputs", "decisions"):
        for path in (PACKAGE / stage).glob("*.py"):
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if pattern in line and ("cells_per_ul" in line or "ci95" in line):
                    places.append(f"{path.relative_to(ROOT)}:{number}")
    assert not places, f"a count formatted outside cytometry.outputs.formatting: {places}"
