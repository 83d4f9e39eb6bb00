"""Shared fixtures: paths to the committed samples and the shared reference data."""
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DIR = ROOT / "sample_fcs"
SHARED_DATA = ROOT.parent / "shared" / "data"


def pytest_collection_modifyitems(config, items):
    """Skip tests marked ``gpu`` when no CUDA device answers."""
    from gpu.device import _cupy_if_usable

    if _cupy_if_usable() is not None:
        return
    skip = pytest.mark.skip(reason="needs CuPy and a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def sample_dir():
    return SAMPLE_DIR


@pytest.fixture(scope="session")
def real_fcs():
    path = SHARED_DATA / "flowkit" / "100715.fcs"
    if not path.exists():
        pytest.skip("shared reference data not present beside the project")
    return path
