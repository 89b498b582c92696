"""Resume after real failures: a `know collect` process killed with SIGKILL mid-run, and a
prediction that fails on bad data.

The store is the cache: a `complete` run is never touched again, a `running` one (its writer
died) is wiped and redone from its seed, a failed prediction leaves nothing marked complete.
The kill test runs the real CLI in its own process group with its own PREFECT_HOME (Prefect's
ephemeral server, started by that process, dies with it) and checks the restarted store
against the same command run without interruption, bit for bit.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

pytestmark = pytest.mark.usefixtures("prefect_harness")

REPO = Path(__file__).resolve().parents[1]
N_RUNS, N_STAGES = 6, 5
#: the command under test; full digits and 2 epochs per stage make a run last ~1 s, long
#: enough to stop the process while a run is half written
COLLECT = ["collect", "--dataset", "digits", "--models", "simple-cnn", "--runs", str(N_RUNS), "--stages", str(N_STAGES),
           "--runner", "thread", "--workers", "1", "--limit", "0", "--epochs-per-stage", "2", "--seed", "0",
           "--device", "cpu"]
#: attrs that legitimately differ between two collections of the same run
VOLATILE = {"created_at", "completed_at", "train_seconds", "versions"}
PROCESS_TIMEOUT_S = 300


# ---------------------------------------------------------------------------- helpers
def _env(prefect_home: Path) -> dict[str, str]:
    """A clean environment for a `know` subprocess: ephemeral Prefect in its own home."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update({
        "PREFECT_HOME": str(prefect_home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_ENABLED": "true",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
        "PYTHONUNBUFFERED": "1",
    })
    return env


def _start_know(args: list[str], prefect_home: Path, log: Path) -> subprocess.Popen:
    """`python -m know_cli ARGS` as the leader of a new process group."""
    log.parent.mkdir(parents=True, exist_ok=True)
    out = open(log, "wb")
    try:
        return subprocess.Popen([sys.executable, "-m", "know_cli", *args], cwd=REPO, env=_env(prefect_home),
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    finally:
        out.close()  # the child holds its own descriptor


def _tail(log: Path, n: int = 40) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-n:]) if log.exists() else "<no log>"


def _run_states(store: Path) -> dict[str, dict]:
    """{run_id: attrs} read straight from each run's zarr.json (atomic renames: never torn)."""
    out = {}
    runs = store / "runs"
    if not runs.is_dir():
        return out
    for d in runs.iterdir():
        meta = d / "zarr.json"
        try:
            out[d.name] = json.loads(meta.read_text()).get("attributes", {})
        except (OSError, ValueError):
            continue  # being created right now
    return out


def _files(store: Path, run_id: str) -> dict[str, tuple[int, int]]:
    """Every file of a run: relative path -> (st_mtime_ns, st_ino). A rewrite changes both."""
    base = store / "runs" / run_id
    return {str(p.relative_to(base)): (p.stat().st_mtime_ns, p.stat().st_ino) for p in sorted(base.rglob("*"))
            if p.is_file()}


def _strip(attrs: dict) -> dict:
    return {k: v for k, v in attrs.items() if k not in VOLATILE}


def _kill_when_half_done(proc: subprocess.Popen, store: Path, found: dict, deadline: float) -> None:
    """Poll the store; once >= 2 runs are complete and another has written some but not all of
    its stages, SIGSTOP the process group, re-check the frozen store, and SIGKILL it (or let it
    continue if the run finished in between, and wait for the next run)."""
    pgid = proc.pid
    while time.monotonic() < deadline and proc.poll() is None:
        states = _run_states(store)
        complete = [r for r, a in states.items() if a.get("status") == "complete"]
        running = [r for r, a in states.items() if a.get("status") == "running"
                   and 1 <= a.get("stages_written", 0) < a.get("n_stages", N_STAGES)]
        if len(complete) >= 2 and running:
            os.killpg(pgid, signal.SIGSTOP)
            time.sleep(0.05)  # let in-flight renames land
            states = _run_states(store)
            complete = [r for r, a in states.items() if a.get("status") == "complete"]
            running = [r for r, a in states.items() if a.get("status") == "running"]
            if len(complete) >= 2 and len(running) == 1 and 1 <= states[running[0]].get("stages_written", 0) < N_STAGES:
                os.killpg(pgid, signal.SIGKILL)
                found.update(states=states, killed_at=time.time())
                return
            os.killpg(pgid, signal.SIGCONT)
        time.sleep(0.005)


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def killed_and_reference(tmp_path_factory, prefect_harness):
    """Start `know collect` in a subprocess and kill it mid-run; meanwhile run the same command
    uninterrupted, in this process, into another store (the reference)."""
    import know_cli

    root = tmp_path_factory.mktemp("resume")
    store, ref = root / "killed.zarr", root / "reference.zarr"
    home, log = root / "prefect-home", root / "first.log"
    proc = _start_know(COLLECT + ["--store", str(store)], home, log)
    found: dict = {}
    watcher = threading.Thread(target=_kill_when_half_done,
                               args=(proc, store, found, time.monotonic() + PROCESS_TIMEOUT_S), daemon=True)
    watcher.start()
    try:
        try:
            know_cli.main(COLLECT + ["--store", str(ref)])
        except SystemExit as e:
            assert e.code in (0, None), f"reference run exited {e.code}"
        watcher.join(PROCESS_TIMEOUT_S)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert found, f"never saw 2 complete runs and 1 half-written run (exit {proc.returncode}):\n{_tail(log)}"
    assert proc.returncode == -signal.SIGKILL
    return store, ref, home, found["states"]


# ---------------------------------------------------------------------------- tests
@pytest.mark.slow
def test_restart_after_kill9_resumes_and_matches_uninterrupted(killed_and_reference, tmp_path):
    store, ref, home, at_kill = killed_and_reference
    complete = sorted(r for r, a in at_kill.items() if a["status"] == "complete")
    (interrupted,) = [r for r, a in at_kill.items() if a["status"] == "running"]
    assert len(complete) >= 2 and len(at_kill) == len(complete) + 1
    assert 1 <= at_kill[interrupted]["stages_written"] < N_STAGES

    # the killed run's rows: a prefix written, the rest still empty (fill value NaN)
    partial = zarr.open_group(str(store), mode="r")[f"runs/{interrupted}/weights"][:]
    k = at_kill[interrupted]["stages_written"]
    assert np.isfinite(partial[:k]).all() and np.isnan(partial[k + 1 :]).all()
    files_before = {rid: _files(store, rid) for rid in complete}
    assert all(any("/c/" in f or f.startswith("weights/c") for f in fs) for fs in files_before.values())

    # restart: the same command, the same PREFECT_HOME
    log = tmp_path / "restart.log"
    proc = _start_know(COLLECT + ["--store", str(store)], home, log)
    try:
        rc = proc.wait(timeout=PROCESS_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert rc == 0, _tail(log)
    text = log.read_text(errors="replace")
    assert text.count("already complete: skipped") == len(complete), _tail(log, 80)
    assert text.count(f"run {interrupted} was 'running': restarting it from scratch") == 1, _tail(log, 80)

    after = _run_states(store)
    assert len(after) == N_RUNS and {a["status"] for a in after.values()} == {"complete"}
    # complete runs were skipped: not one file rewritten, attrs (incl. timestamps) unchanged
    for rid in complete:
        assert _files(store, rid) == files_before[rid], f"complete run {rid} was rewritten"
        assert after[rid] == at_kill[rid]
    # the interrupted run was redone from scratch (new created_at), the rest trained fresh
    retrained = [r for r in at_kill if after[r]["created_at"] != at_kill[r]["created_at"]]
    skipped = [r for r in at_kill if after[r].get("completed_at") == at_kill[r].get("completed_at") is not None]
    assert retrained == [interrupted] and sorted(skipped) == complete
    assert "error" not in after[interrupted]

    # no snapshot lost or duplicated, and the whole store equals the uninterrupted one
    root, want = zarr.open_group(str(store), mode="r"), zarr.open_group(str(ref), mode="r")
    assert sorted(root["runs"].group_keys()) == sorted(want["runs"].group_keys())
    for rid in after:
        attrs = after[rid]
        assert attrs["stages_written"] == attrs["n_stages"] == N_STAGES
        w = root[f"runs/{rid}/weights"][:]
        assert w.shape == (N_STAGES, attrs["n_params"]) and np.isfinite(w).all()
        assert len({row.tobytes() for row in w}) == N_STAGES, f"{rid}: duplicated stage rows"
        assert np.array_equal(w, want[f"runs/{rid}/weights"][:]), f"{rid}: differs from the uninterrupted run"
        assert _strip(attrs) == _strip(dict(want[f"runs/{rid}"].attrs)), rid
    assert not list(store.rglob("*.partial")), "a torn write was left in the store"


@pytest.fixture
def small_store(tmp_path, prefect_harness):
    """Two complete 5-stage runs, collected in this process."""
    from flows.collect import CollectParams, collect_trajectories

    params = CollectParams(store=str(tmp_path / "runs.zarr"), dataset="digits", models="simple-cnn", runs=2,
                           stages=N_STAGES, limit=300, seed=0, device="cpu")
    run_ids = collect_trajectories(params)
    return params, run_ids


@pytest.mark.slow
def test_failed_prediction_leaves_nothing_complete_and_retry_reruns_only_prediction(small_store):
    """A NaN in one stored stage makes the prediction fail with a NonFiniteError naming the
    tensor; nothing is left marked complete. After the data is repaired the retry (the same
    collection, then the same prediction flow) recomputes only the prediction."""
    from flows.collect import collect_trajectories
    from flows.predict import PredictParams, predict_weights
    from storage.trajectory import TrajectoryStore
    from params.predict import PredictParams
    from tasks.predict import predict_run

    collect_params, run_ids = small_store
    store = Path(collect_params.store)
    ts = TrajectoryStore(store)
    rid = run_ids[0]
    layout = ts.layout(rid)
    bad = next(s for s in layout if s.kind == "conv" and s.offset > 0)

    # a bad value in stage 1 of one tensor (written with plain zarr: the run stays `complete`)
    w = zarr.open_group(str(store), mode="r+")[f"runs/{rid}/weights"]
    good_row = w[1, :]
    broken = good_row.copy()
    broken[bad.offset + bad.size // 2] = np.nan
    w[1, :] = broken

    params = PredictParams(store=str(store), run_id=rid, predictor="taskvector", steps=3)
    with pytest.raises(Exception) as err:
        predict_weights(params)
    assert type(err.value).__name__ == "NonFiniteError", repr(err.value)
    assert repr(bad.name) in str(err.value), str(err.value)
    assert ts.prediction_attrs(rid, "taskvector") is None, "a failed prediction must not be left behind"
    assert not (store / "predictions" / rid / "taskvector").exists()
    with pytest.raises(Exception, match="no complete prediction"):
        ts.read_prediction(rid, "taskvector", 1)

    # fix the cause, then retry the chain: collection (all runs complete: skipped), prediction
    w[1, :] = good_row
    files_before = {r: _files(store, r) for r in run_ids}
    attrs_before = {r: ts.run_attrs(r) for r in run_ids}
    assert collect_trajectories(collect_params) == run_ids
    name = predict_weights(params)
    assert name == "taskvector"
    for r in run_ids:
        assert _files(store, r) == files_before[r], f"run {r} was rewritten by the retry"
        assert ts.run_attrs(r) == attrs_before[r]
    assert ts.prediction_attrs(rid, name)["status"] == "complete"
    theta = ts.read_stages(rid)
    for step in (1, 2, 3):
        got, _ = ts.read_prediction(rid, name, step)
        assert np.isfinite(got).all()
        np.testing.assert_allclose(got, theta[0] + step * (theta[0] - theta[1]), rtol=1e-5, atol=1e-6)

    # a second retry is a no-op: the prediction is served from the store
    def pred_files():
        return {str(p): p.stat().st_mtime_ns for p in (store / "predictions").rglob("*") if p.is_file()}

    before = pred_files()
    assert predict_run.fn(PredictParams(**params.model_dump())) == name
    assert pred_files() == before
