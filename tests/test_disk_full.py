"""A full or read-only disk under the store (issue 14, item 5), on a real small tmpfs.

`know collect` and `know predict` run as subprocesses with the store on a tmpfs that is too
small: each must exit 2 with one `error:` line that names the file it could not write and
what to free, mark nothing partial complete, and, once the tmpfs is remounted bigger, the
same command must finish with weights bit-identical to the same work on a normal disk. On
a tmpfs remounted read-only, `know predict` exits 2 with one line naming the store.

Mounting needs root; without it (or where mount is refused) the tests skip, saying why.
The CLI subprocesses share one Prefect server started here (PREFECT_API_URL set, so they
start none of their own): the tests are about the disk, test_interrupts.py about servers.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SWEEP = dict(dataset="digits", limit=300, models="simple-cnn", runs=4, stages=5)
COLLECT = ["collect", "--dataset", "digits", "--limit", "300", "--models", "simple-cnn", "--runs", "4",
           "--stages", "5", "--workers", "1", "--device", "cpu"]


class Tmpfs:
    """A tmpfs mounted on `path`, unmounted at teardown."""

    def __init__(self, path: Path):
        self.path = path

    def remount(self, options: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{options}", str(self.path)], check=True, capture_output=True)

    def used_bytes(self) -> int:
        st = os.statvfs(self.path)
        return (st.f_blocks - st.f_bfree) * st.f_frsize


@pytest.fixture
def tmpfs(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0:
        pytest.skip(f"mounting a tmpfs needs root; this test runs as uid {os.geteuid()}")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip() or mounted.returncode}")
    try:
        yield Tmpfs(disk)
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory):
    """(PREFECT_HOME, PREFECT_API_URL) of one server for this module's CLI runs."""
    from cli.server import TemporaryServer

    home = tmp_path_factory.mktemp("disk-prefect-home")
    server = TemporaryServer(home).start()
    try:
        server.wait_ready(timeout=600)
        yield home, server.api_url
    finally:
        server.stop(drain=False)


def know(args: list[str], prefect_api) -> subprocess.CompletedProcess:
    home, url = prefect_api
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_API_URL=url, PREFECT_SERVER_ANALYTICS_ENABLED="false")
    return subprocess.run([sys.executable, str(ROOT / "know_cli.py"), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The single `error:` line, checked to be the last line, with no traceback anywhere."""
    assert proc.returncode == 2, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-4000:]
    assert proc.stderr.strip().splitlines()[-1] == errors[0]
    return errors[0]


def reference_collect(store: Path, **overrides) -> list[str]:
    """The sweep's runs trained in this process on a normal disk (the fan-out's settings)."""
    from flows.collect import plan_sweep
    from params.collect import CollectParams
    from storage.trajectory import TrajectoryStore
    from tasks.collect import collect_run

    TrajectoryStore(store).prepare()
    specs = plan_sweep(CollectParams(store=str(store), **{**SWEEP, **overrides}))
    return [collect_run.fn(str(store), spec, "cpu", threads=1) for spec in specs]


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a.view(np.uint32), b.view(np.uint32))


@pytest.fixture(scope="module")
def one_run_store(tmp_path_factory) -> tuple[Path, str]:
    """A normal-disk store with one complete run (to copy onto the small disk), and its id."""
    store = tmp_path_factory.mktemp("one-run") / "runs.zarr"
    (run_id,) = reference_collect(store, runs=1)
    return store, run_id


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_collect_on_a_full_disk_exits_2_then_finishes_bit_identical(tmpfs, prefect_api, tmp_path):
    from storage.trajectory import TrajectoryStore

    store = tmpfs.path / "runs.zarr"
    first = know([*COLLECT, "--store", str(store)], prefect_api)
    line = one_error_line(first)
    assert line.startswith(f"error: no space left on device writing {store}/"), line
    assert line.endswith("free space there or pass another --store"), line

    runs = TrajectoryStore(store).runs()
    done = [r for r in runs if r.is_complete]
    assert done and len(done) < 4, [(r.run_id, r.status, r.stages_written) for r in runs]  # partly done
    assert all(r.stages_written == r.n_stages for r in done)  # nothing partial marked complete

    tmpfs.remount("size=64m")  # space freed
    again = know([*COLLECT, "--store", str(store)], prefect_api)
    assert again.returncode == 0, again.stderr[-4000:]

    ref_store = tmp_path / "reference.zarr"
    ids = reference_collect(ref_store)
    got, ref = TrajectoryStore(store), TrajectoryStore(ref_store)
    assert sorted(r.run_id for r in got.runs() if r.is_complete) == sorted(ids)
    for rid in ids:
        assert same_bits(got.read_stages(rid), ref.read_stages(rid)), f"run {rid} differs from the normal-disk run"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_predict_on_a_full_disk_exits_2_then_finishes_bit_identical(tmpfs, prefect_api, one_run_store, tmp_path):
    from params.predict import PredictParams
    from storage.trajectory import TrajectoryStore
    from tasks.predict import predict_run

    base, run_id = one_run_store
    tmpfs.remount("size=64m")
    store = tmpfs.path / "runs.zarr"
    shutil.copytree(base, store)
    tmpfs.remount(f"size={tmpfs.used_bytes() // 1024 + 16}k")  # 16 KiB free: no room for 2 x 17898 floats
    predict = ["predict", "--store", str(store), "--run-id", run_id, "--predictor", "taskvector", "--steps", "2"]

    first = know(predict, prefect_api)
    line = one_error_line(first)
    # the first write that does not fit is the predictions group's zarr.json or one under
    # predictions/<run>/, depending on how the kernel rounds the 16 KiB to pages
    assert line.startswith(f"error: no space left on device writing {store}/predictions/"), line
    assert line.endswith("free space there or pass another --store"), line
    rec = TrajectoryStore(store).prediction(run_id, "taskvector")
    assert rec is None or not rec.is_complete, rec

    tmpfs.remount("size=64m")
    again = know(predict, prefect_api)
    assert again.returncode == 0, again.stderr[-4000:]

    ref_store = tmp_path / "reference.zarr"
    shutil.copytree(base, ref_store)
    predict_run.fn(PredictParams(store=str(ref_store), run_id=run_id, predictor="taskvector", steps=2))
    got, ref = TrajectoryStore(store), TrajectoryStore(ref_store)
    assert got.prediction(run_id, "taskvector").is_complete
    for step in (1, 2):
        assert same_bits(got.read_prediction(run_id, "taskvector", step)[0],
                         ref.read_prediction(run_id, "taskvector", step)[0]), f"step {step} differs"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_predict_into_a_read_only_store_exits_2_naming_it(tmpfs, prefect_api, one_run_store):
    from storage.trajectory import TrajectoryStore

    base, run_id = one_run_store
    tmpfs.remount("size=64m")
    store = tmpfs.path / "runs.zarr"
    shutil.copytree(base, store)
    tmpfs.remount("ro")
    proc = know(["predict", "--store", str(store), "--run-id", run_id, "--predictor", "taskvector", "--steps", "2"],
                prefect_api)
    line = one_error_line(proc)
    assert line.startswith("error: read-only file system writing ") and str(store) in line, line
    assert "remount it read-write or pass another --store" in line, line
    assert TrajectoryStore(store).prediction(run_id, "taskvector") is None  # nothing written, nothing claimed


# -- fast: the one-line message for each refused write ------------------------------------------

@pytest.mark.parametrize("code, words", [(28, "no space left on device writing"), (122, "disk quota exceeded writing"),
                                         (30, "read-only file system writing"), (13, "permission denied on")])
def test_disk_problem_names_the_path_and_the_option(code, words, monkeypatch, tmp_path):
    from cli.errors import disk_problem

    store = tmp_path / "runs.zarr"
    monkeypatch.setattr(sys, "argv", ["know", "collect", "--store", str(store)])
    chunk = store / "runs" / "abc" / "weights" / "c" / "0" / "0"
    try:
        try:
            raise OSError(code, os.strerror(code), str(chunk))
        except OSError as e:  # as train_runs reports a failed run: a RuntimeError chained to it
            raise RuntimeError("1 of 4 runs failed") from e
    except RuntimeError as wrapped:
        line = disk_problem(wrapped)
    assert line is not None and line.startswith(f"{words} {chunk}; "), line
    assert line.endswith("pass another --store"), line
    assert disk_problem(RuntimeError("not a disk")) is None
    assert disk_problem(OSError(2, "No such file or directory", str(chunk))) is None  # not a disk refusal

