"""The store and the batch under faults (issue 15, defects 1-5).

Damaged entries (truncated, zeroed, not HDF5, changed after writing), a full
disk (a real 1 MiB tmpfs where the machine allows, and an injected ENOSPC
everywhere), two writers of one store, and a driver killed with its workers
running. Four tubes from ``sample_fcs/`` keep it quick.
"""
import csv
import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

import h5py
import psutil
import pytest

from cytometry.batch import store as store_module
from cytometry.batch.run import run_batch
from cytometry.batch.store import ResultStore
from cytometry.loading.manifest import read_manifest
from cytometry.outputs.cli import main

TUBES = ["S01_screening_TBNK.fcs", "S01_day000_CAR.fcs", "S01_day004_CAR.fcs", "S01_day007_CAR.fcs"]
PNG_END = b"IEND\xaeB`\x82"


def make_tubes(sample_dir, folder, names):
    """Copy ``names`` from ``sample_dir`` into ``folder`` with a manifest listing exactly them."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy(sample_dir / name, folder / name)
    with open(sample_dir / "manifest.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    with open(folder / "manifest.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([rows[0], *(row for row in rows[1:] if row[0] in names)])
    return folder


@pytest.fixture(scope="module")
def tubes(sample_dir, tmp_path_factory):
    """A folder with the four tubes and a manifest listing exactly them."""
    return make_tubes(sample_dir, tmp_path_factory.mktemp("tubes"), TUBES)


@pytest.fixture(scope="module")
def built(tubes, tmp_path_factory):
    """A complete store of the four tubes (tests work on copies) and the JSON results it was written with."""
    store = tmp_path_factory.mktemp("built") / "store"
    results = run_batch([tubes / name for name in TUBES], read_manifest(tubes / "manifest.csv"), store=store,
                        workers=1, progress=False)
    assert all(r["status"] == "ok" for r in results)
    return store, {os.path.basename(r["file"]): r for r in results}


def cli(capsys, *args):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def analyze_args(tubes, store, *extra):
    return ["analyze", tubes, "--manifest", tubes / "manifest.csv", "--out", store, "--workers", 1, *extra]


def copy_store(built, tmp_path):
    target = tmp_path / "store"
    shutil.copytree(built[0], target)
    return target


def entry_of(store, file_name):
    for entry in sorted((store / "samples").glob("*.h5")):
        with h5py.File(entry, "r") as h5:
            if h5.attrs["file_name"] == file_name:
                return entry
    raise AssertionError(f"no entry for {file_name}")


def damage(entry, kind):
    size = entry.stat().st_size
    if kind == "truncated":
        os.truncate(entry, 2000)
    elif kind == "zeroed":
        entry.write_bytes(bytes(size))
    elif kind == "not_hdf5":
        entry.write_text("file,subject_id\nthis is not an HDF5 file\n")
    elif kind == "changed":  # a valid HDF5 file whose result no longer matches its checksum
        with h5py.File(entry, "r+") as h5:
            result = json.loads(h5.attrs["result"])
            result["populations"]["b_cells"]["cells_per_ul"] *= 2
            h5.attrs["result"] = json.dumps(result)
    else:
        raise ValueError(kind)


def b_cells(result):
    return result["populations"]["b_cells"]["cells_per_ul"]


# -- 1. a damaged entry is moved aside and its sample analysed again ----------------------------------------


@pytest.mark.parametrize("kind", ["truncated", "zeroed", "not_hdf5", "changed"])
def test_a_damaged_entry_is_moved_aside_and_reanalysed(capsys, tubes, built, tmp_path, kind):
    store = copy_store(built, tmp_path)
    entry = entry_of(store, "S01_day004_CAR.fcs")
    damage(entry, kind)
    damaged_bytes = entry.read_bytes()
    code, out, err = cli(capsys, *analyze_args(tubes, store, "--json"))
    assert code == 0, err
    lines = [line for line in err.splitlines() if "damaged store entry" in line]
    assert len(lines) == 1 and entry.name in lines[0] and "S01_day004_CAR.fcs" in lines[0], err
    # Moved aside, byte for byte, never deleted.
    assert (store / "samples" / "damaged" / entry.name).read_bytes() == damaged_bytes
    samples = {os.path.basename(r["file"]): r for r in json.loads(out)["samples"]}
    assert not samples["S01_day004_CAR.fcs"].get("skipped")
    assert all(samples[name].get("skipped") for name in TUBES if name != "S01_day004_CAR.fcs")
    assert b_cells(samples["S01_day004_CAR.fcs"]) == b_cells(built[1]["S01_day004_CAR.fcs"])
    # The new entry verifies, and the store reads whole again: the damaged copy is superseded.
    fresh = ResultStore(store)
    assert b_cells(fresh.read(entry.name)) == b_cells(built[1]["S01_day004_CAR.fcs"])
    assert fresh.damaged_entries() == []
    code, _, err = cli(capsys, "persistence", "--store", store)
    assert code == 0 and "damaged store entry" not in err


def test_every_entry_is_sealed_with_the_sha256_of_its_bytes(built):
    for entry in ResultStore(built[0]).entries():
        data = entry.read_bytes()
        seal = data[:store_module.USERBLOCK].rstrip(b"\0").decode().splitlines()
        assert seal == ["cytometry-counts store entry", f"sha256 {hashlib.sha256(data[512:]).hexdigest()}",
                        f"bytes {len(data) - 512}"]
        with h5py.File(entry, "r") as h5:  # still a plain HDF5 file to any reader
            assert json.loads(h5.attrs["result"])["file"].endswith(h5.attrs["file_name"])


# -- 2. subject commands and the report name what they could not read, and exit 1 ------------------------


def test_persistence_names_a_damaged_visit_and_exits_1_until_it_is_reanalysed(capsys, tubes, built, tmp_path):
    store = copy_store(built, tmp_path)
    code, whole, _ = cli(capsys, "persistence", "--store", store, "--json")
    assert code == 0
    entry = entry_of(store, "S01_day007_CAR.fcs")
    damage(entry, "truncated")
    for attempt in range(2):  # the second call still says so: the visit is missing until re-analysed
        code, out, err = cli(capsys, "persistence", "--store", store, "--json")
        assert code == 1, err
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and entry.name in errors[0] and "damaged store entry" in errors[0], err
        document = json.loads(out)
        assert [u["store_entry"] for u in document["unreadable"]] == [entry.name]
        days = [p["study_day"] for p in document["subjects"][0]["timeline"]]
        assert 7 not in days
    code, _, _ = cli(capsys, *analyze_args(tubes, store))
    assert code == 0
    code, out, err = cli(capsys, "persistence", "--store", store, "--json")
    assert code == 0, err
    assert json.loads(out)["subjects"] == json.loads(whole)["subjects"]


def test_eligibility_and_report_name_a_changed_screening_entry_and_exit_1(capsys, built, tmp_path):
    store = copy_store(built, tmp_path)
    entry = entry_of(store, "S01_screening_TBNK.fcs")
    damage(entry, "changed")  # would read as twice the B cells without the checksum
    code, out, err = cli(capsys, "eligibility", "--store", store, "--json")
    assert code == 1
    assert any("S01_screening_TBNK.fcs" in line and "changed after it was written" in line
               for line in err.splitlines()), err
    document = json.loads(out)
    assert document["unreadable"][0]["store_entry"] == entry.name
    assert all(row["value"] != 2 * b_cells(built[1]["S01_screening_TBNK.fcs"]) for row in document["subjects"])
    code, out, err = cli(capsys, "report", store, "--out", tmp_path / "qc", "--no-thumbnails")
    assert code == 1 and entry.name in err
    assert entry.name in (tmp_path / "qc" / "report.html").read_text()


# -- 3. write errors: one line per sample, the run goes on, nothing half-written ------------------------------


def _no_leftovers(folder):
    return [p for p in folder.rglob("*") if p.name.startswith(".tmp-")]


def test_injected_enospc_is_one_line_per_sample_and_leaves_nothing_half_written(capsys, monkeypatch, tubes,
                                                                                tmp_path):
    real = store_module._write_fully

    def disk_fills(fd, data):  # half the entry reaches the disk, then the disk is full
        if len(data) > 20_000:
            real(fd, memoryview(data)[:len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd, data)

    monkeypatch.setattr(store_module, "_write_fully", disk_fills)
    store = tmp_path / "store"
    code, out, err = cli(capsys, *analyze_args(tubes, store, "--json"))
    assert code == 1
    samples = json.loads(out)["samples"]
    assert [r["status"] for r in samples] == ["ok"] * len(TUBES)  # the counts stand
    assert all("No space left on device" in r["store_error"] for r in samples)
    lines = [line for line in err.splitlines() if "not stored" in line]
    assert len(lines) == len(TUBES) and all(any(name in line for line in lines) for name in TUBES), err
    assert "Traceback" not in err
    assert ResultStore(store).entries() == [] and _no_leftovers(tmp_path) == []
    # The parameter-set record itself cannot be written: one line, exit 1, nothing left.
    monkeypatch.setattr(store_module, "_write_fully", lambda fd, data: (_ for _ in ()).throw(
        OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))))
    code, out, err = cli(capsys, *analyze_args(tubes, tmp_path / "other"))
    assert code == 1 and len(err.strip().splitlines()) == 1 and "parameters.json" in err, err
    assert _no_leftovers(tmp_path) == []
    # Space again: the next run stores every sample.
    monkeypatch.setattr(store_module, "_write_fully", real)
    code, out, err = cli(capsys, *analyze_args(tubes, store, "--json"))
    assert code == 0, err
    assert not any(r.get("skipped") for r in json.loads(out)["samples"])
    assert len(ResultStore(store).entries()) == len(TUBES)


@pytest.fixture
def tiny_disk(tmp_path):
    """A real 1 MiB file system (tmpfs); needs root."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_full_disk_is_one_line_per_sample_and_a_rerun_with_space_completes(sample_dir, tmp_path, tiny_disk):
    # Two tubes: the first one's entry, figure and GatingML (~0.55 MB) fit in 1 MiB, the second's do not.
    names = ["S01_day000_CAR.fcs", "S01_screening_TBNK.fcs"]
    folder = make_tubes(sample_dir, tmp_path / "tubes", names)
    command = [sys.executable, "-m", "cytometry", "analyze", str(folder), "--manifest", str(folder / "manifest.csv"),
               "--out", str(tiny_disk / "store"), "--workers", "1", "--json"]
    outputs = ["--plots", str(tiny_disk / "plots"), "--gatingml", str(tiny_disk / "gml")]
    run = subprocess.run(command + outputs, capture_output=True, text=True, timeout=300)
    assert run.returncode == 1, run.stderr[-2000:]  # not 139 (segfault)
    assert "Traceback" not in run.stderr and "h5py" not in run.stderr
    samples = {os.path.basename(r["file"]): r for r in json.loads(run.stdout)["samples"]}
    assert sorted(samples) == sorted(names) and all(r["status"] == "ok" for r in samples.values())
    unstored = [name for name, r in samples.items() if r.get("store_error")]
    assert unstored and len(unstored) < len(names)  # the disk filled part-way; the run went on
    for name in unstored:
        assert sum(name in line and "not stored" in line for line in run.stderr.splitlines()) == 1
    # Nothing half-written: no temporary file, every entry verifies, every figure and GatingML is whole.
    assert _no_leftovers(tiny_disk) == []
    store = ResultStore(tiny_disk / "store")
    assert len(store.entries()) == len(names) - len(unstored)
    for entry in store.entries():
        store.read(entry)
    for png in (tiny_disk / "plots").glob("*.png"):
        assert png.read_bytes().endswith(PNG_END)
    for xml in (tiny_disk / "gml").glob("*.xml"):
        ET.parse(xml)
    # More space: the next run analyses exactly the samples that were not stored.
    subprocess.run(["mount", "-o", "remount,size=32m", str(tiny_disk)], check=True)
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    redone = [os.path.basename(r["file"]) for r in json.loads(again.stdout)["samples"] if not r.get("skipped")]
    assert sorted(redone) == sorted(unstored)


# -- 4. one writer per store; temporary files of live processes are left alone --------------------------------


def test_temporary_files_of_live_processes_survive_opening_the_store(tmp_path):
    store = ResultStore(tmp_path / "store")
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        in_flight = store.samples / f".tmp-{'a' * 64}-0123456789abcdef.h5-00ff00ff-{live.pid}"
        leftover = store.samples / f".tmp-{'b' * 64}-0123456789abcdef.h5-00ff00ff-{dead.pid}"
        in_flight.write_bytes(b"in flight")
        leftover.write_bytes(b"killed")
        ResultStore(store.path)  # another process opening the store
        assert in_flight.exists() and not leftover.exists()
    finally:
        live.kill()
        live.wait()


HOLDER = """
import sys, time
from cytometry.batch.store import ResultStore
store = ResultStore(sys.argv[1])
store.lock()
print("locked", flush=True)
sys.stdin.read()
"""


def test_a_second_writer_is_refused_while_another_process_holds_the_store(capsys, tubes, tmp_path):
    store = tmp_path / "store"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(store)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, out, err = cli(capsys, *analyze_args(tubes, store, "--lock-timeout", 0.3))
        assert code == 2
        assert len(err.strip().splitlines()) == 1 and f"pid {holder.pid}" in err and "holds this store" in err
        assert ResultStore(store).entries() == []
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    ResultStore(store).lock(timeout=0)  # released when the holder ends


def test_two_concurrent_analyze_runs_into_one_store(tubes, tmp_path):
    store = tmp_path / "store"
    command = [sys.executable, "-m", "cytometry", "analyze", str(tubes), "--manifest", str(tubes / "manifest.csv"),
               "--out", str(store), "--workers", "1", "--json", "--lock-timeout", "240"]
    # The first also draws gating figures (slower per tube; the parameter set is the same), so that it is
    # still analysing when the second, started once the first has opened the store, looks at it.
    first = subprocess.Popen(command + ["--plots", str(tmp_path / "plots")], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and first.poll() is None and not (store / "samples").is_dir():
        time.sleep(0.01)
    # The second starts while the first is analysing (its start-up alone outlasts the first's first tube).
    second = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out1, err1 = first.communicate(timeout=300)
    out2, err2 = second.communicate(timeout=300)
    assert first.returncode == 0, err1
    assert second.returncode == 0, err2
    # One run analysed every sample, the other waited and found them done: none analysed twice, none lost,
    # nothing deleted under the other's feet.
    analysed = [{os.path.basename(r["file"]) for r in json.loads(out)["samples"] if not r.get("skipped")}
                for out in (out1, out2)]
    assert analysed[0] & analysed[1] == set()
    assert sorted(analysed[0] | analysed[1]) == sorted(TUBES)
    assert len(ResultStore(store).entries()) == len(TUBES)
    assert _no_leftovers(store) == []


# -- 5. workers exit when their driver dies ---------------------------------------------------------------------


def _running(pid):
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_sigkill_of_the_driver_leaves_no_worker_processes(tubes, tmp_path):
    command = [sys.executable, "-m", "cytometry", "analyze", str(tubes), "--manifest", str(tubes / "manifest.csv"),
               "--out", str(tmp_path / "store"), "--workers", "2"]
    driver = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers = []
    try:
        deadline = time.time() + 120
        while time.time() < deadline and driver.poll() is None:
            workers = [p.pid for p in psutil.Process(driver.pid).children(recursive=True)]
            if len(workers) >= 2:
                break
            time.sleep(0.02)
        assert len(workers) >= 2, "the pool's workers never started"
        driver.send_signal(signal.SIGKILL)
        driver.wait()
        deadline = time.time() + 10
        while time.time() < deadline and any(_running(pid) for pid in workers):
            time.sleep(0.1)
        assert [pid for pid in workers if _running(pid)] == []
    finally:
        for pid in workers:  # only the processes this test started
            if _running(pid):
                psutil.Process(pid).kill()
