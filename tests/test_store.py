"""The results store: atomic per-sample files, resumable runs, crash safety, Dask, read-back."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from cytometry.analysis import AnalysisOptions
from cytometry.batch.run import run_batch
from cytometry.loading.manifest import read_manifest
from cytometry.batch.store import ResultStore, params_hash

TUBES = ["S01_screening_TBNK.fcs", "S02_screening_TBNK.fcs", "S03_screening_TBNK.fcs", "S01_day000_CAR.fcs",
         "S01_day010_CAR.fcs"]


def counts_of(results):
    return {r["file"].split("/")[-1]: (r["status"], json.dumps(r["populations"], sort_keys=True)) for r in results}


@pytest.fixture(scope="module")
def run(sample_dir):
    manifest = read_manifest(sample_dir / "manifest.csv")
    files = [sample_dir / name for name in TUBES]
    return files, manifest


def test_store_round_trip_and_masks_reproduce_counts(run, tmp_path):
    files, manifest = run
    results = run_batch(files, manifest, store=tmp_path / "store", workers=1, progress=False)
    store = ResultStore(tmp_path / "store")
    stored = store.results()
    assert counts_of(stored) == counts_of(results)
    entry = next(r for r in stored if r["file"].endswith("S01_screening_TBNK.fcs"))
    masks = store.masks(entry["store_entry"])
    assert int(masks["b_cells"].sum()) == entry["populations"]["b_cells"]["events"]
    assert int(masks["beads"].sum()) == entry["beads"]["events"]
    assert "Gating-ML" in store.gatingml(entry["store_entry"])
    table = store.table()
    b = table[(table.population == "b_cells") & table.file.str.endswith("S01_screening_TBNK.fcs")]
    assert float(b.cells_per_ul.iloc[0]) == entry["populations"]["b_cells"]["cells_per_ul"]
    # No pickled objects: every attribute is text or a number.
    import h5py

    with h5py.File(store.entries()[0], "r") as h5:
        assert all(isinstance(v, (str, bytes, int, np.integer)) for v in h5.attrs.values())


def test_rerun_skips_done_and_changed_parameter_reanalyses(run, tmp_path):
    files, manifest = run
    first = run_batch(files, manifest, store=tmp_path / "s", progress=False)
    second = run_batch(files, manifest, store=tmp_path / "s", progress=False)
    assert all(r.get("skipped") for r in second)
    assert counts_of(first) == counts_of(second)
    # A store holds one parameter set: other parameters replace its results (tests/test_store_params.py).
    changed = run_batch(files, manifest, AnalysisOptions(lloq_events=20), store=tmp_path / "s", progress=False,
                        replace=True)
    assert not any(r.get("skipped") for r in changed)
    assert len(ResultStore(tmp_path / "s").entries()) == len(files)
    assert params_hash(AnalysisOptions()) != params_hash(AnalysisOptions(lloq_events=20))


def test_worker_count_does_not_change_results(run, tmp_path):
    files, manifest = run
    one = run_batch(files, manifest, workers=1, progress=False)
    two = run_batch(files, manifest, workers=2, progress=False)
    assert counts_of(one) == counts_of(two)


def test_dask_local_cluster_gives_identical_results(run, tmp_path):
    distributed = pytest.importorskip("dask.distributed")
    files, manifest = run
    local = run_batch(files, manifest, workers=1, progress=False)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        remote = run_batch(files, manifest, scheduler=cluster.scheduler_address, store=tmp_path / "dask",
                           progress=False)
    assert counts_of(local) == counts_of(remote)
    assert len(ResultStore(tmp_path / "dask").entries()) == len(files)


@pytest.mark.parametrize("kill_after", [0, 1, 6, 12])
def test_sigkill_loses_at_most_the_samples_in_flight(sample_dir, tmp_path, kill_after):
    """Kill a real `cytometry analyze --out` at several moments; the store opens and a re-run completes it."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for name in sorted(os.listdir(sample_dir)):
        if name.endswith(".fcs"):
            shutil.copy(sample_dir / name, run_dir / name)
    shutil.copy(sample_dir / "manifest.csv", run_dir / "manifest.csv")
    store_dir = tmp_path / "store"
    command = [sys.executable, "-m", "cytometry.outputs.cli", "analyze", str(run_dir), "--manifest",
               str(run_dir / "manifest.csv"), "--out", str(store_dir), "--workers", "1", "--json"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Kill once `kill_after` samples are stored (0: as soon as the store folder exists),
    # i.e. while the next one is being analysed or written.
    deadline = time.time() + 60
    while time.time() < deadline and process.poll() is None:
        samples = store_dir / "samples"
        if samples.is_dir() and len(list(samples.glob("*.h5"))) >= kill_after:
            break
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    store = ResultStore(store_dir)  # always opens; leftovers of the sample in flight are cleaned
    partial = store.results()
    assert all(r["status"] == "ok" for r in partial)
    assert kill_after <= len(partial) < 14
    assert not list((store_dir / "samples").glob(".tmp-*"))
    finished = subprocess.run(command, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr
    final = json.loads(finished.stdout)["samples"]
    assert len(final) == 14
    assert sum(bool(r.get("skipped")) for r in final) == len(partial)
    fresh = subprocess.run([sys.executable, "-m", "cytometry.outputs.cli", "analyze", str(run_dir), "--manifest",
                            str(run_dir / "manifest.csv"), "--json", "--workers", "1"], capture_output=True, text=True)
    assert counts_of(final) == counts_of(json.loads(fresh.stdout)["samples"])


def test_a_store_path_that_is_a_file_is_refused(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(ValueError, match="folder"):
        ResultStore(path)
