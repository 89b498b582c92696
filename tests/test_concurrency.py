"""One writer per run, enforced by a lease (storage/lease.py): real processes, real stores.

A process that finds a run (or checkpoint) leased by a live writer waits for it and never
wipes it; a dead writer's lease (kill -9) is taken over and the run redone from scratch.
Two identical `know collect` processes started together both exit 0 with every run
complete and bit-identical to a single collection. Nothing is simulated: the writers are
`python know_cli.py collect` subprocesses (each with its own PREFECT_HOME and ephemeral
Prefect server) or small scripts that hold a lease through the real store API; the S3 case
runs against moto's real S3 server.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

REPO = Path(__file__).resolve().parents[1]
N_RUNS, N_STAGES = 2, 4
#: the collection under test. Ten epochs per stage stretch a run to ~1 s, so that two
#: processes overlap and a writer can be frozen or killed while a run is half written
COLLECT = ["collect", "--dataset", "digits", "--limit", "300", "--models", "simple-cnn", "--runs", str(N_RUNS),
           "--stages", str(N_STAGES), "--epochs-per-stage", "10", "--seed", "0", "--device", "cpu"]
#: attrs that legitimately differ between two collections of the same run
VOLATILE = {"created_at", "completed_at", "train_seconds", "versions"}
#: generous: on a loaded 2-core machine one `know collect` took minutes
PROCESS_TIMEOUT_S = 900
CHILD_TIMEOUT_S = 600
TRIALS = 1  # the store-creation race these trials once caught has its own test (6 processes at once)

#: holds the lease of run argv[2] in store argv[1], writes stage 0, then sleeps for ever
#: (argv[3] == "sleep") or writes the other stages after argv[3] seconds and finishes
HOLDER = """
import sys, time
import numpy as np
from know_core.layout import param_layout
from know_core.models import build_model
from storage.trajectory import TrajectoryStore

url, run_id, then = sys.argv[1], sys.argv[2], sys.argv[3]
store = TrajectoryStore(url)
layout = param_layout(build_model("simple-cnn", 1, 10, 8))
rows = np.random.default_rng(7).standard_normal((3, sum(s.size for s in layout))).astype(np.float32)
lease = store.lease_run(run_id)
store.begin_run(run_id, {"model": "simple-cnn", "stage_subset_sizes": [100, 50, 25]}, layout, 3)
store.append_stage(run_id, 0, rows[0])
print("HOLDING", lease.owner, flush=True)
if then == "sleep":
    time.sleep(600)
time.sleep(float(then))
for k in (1, 2):
    store.append_stage(run_id, k, rows[k])
store.finish_run(run_id)
lease.release()
print("DONE", flush=True)
"""

#: holds the lease of checkpoint PretrainSpec(argv[3]) in store argv[1]; sleeps for ever
#: (argv[2] == "sleep") or pre-trains it with the real task code after argv[2] seconds
PRETRAINER = """
import logging, sys, time
import torch
from storage.trajectory import TrajectoryStore
from tasks.collect import PretrainSpec, _pretrain

url, then = sys.argv[1], sys.argv[2]
spec = PretrainSpec.model_validate_json(sys.argv[3])
store = TrajectoryStore(url)
lease = store.lease_checkpoint(spec.checkpoint_id)
print("HOLDING", lease.owner, flush=True)
if then == "sleep":
    time.sleep(600)
time.sleep(float(then))
torch.set_num_threads(1)  # as the test's own pretrain (threads=1): the same weights, bit for bit
_pretrain(store, spec, "cpu", logging.getLogger("know"))
lease.release()
print("DONE", flush=True)
"""


# ---------------------------------------------------------------------------- helpers
def _layout():
    from know_core.layout import param_layout
    from know_core.models import build_model

    return param_layout(build_model("simple-cnn", 1, 10, 8))


def _holder_rows(layout) -> np.ndarray:
    return np.random.default_rng(7).standard_normal((3, sum(s.size for s in layout))).astype(np.float32)


def _script(code: str, *args: str, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """Start `python -c code args` in its own process group; wait for its HOLDING line."""
    proc = subprocess.Popen([sys.executable, "-c", code, *args], cwd=REPO, env=env or os.environ.copy(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    line = proc.stdout.readline()
    if not line.startswith("HOLDING "):
        rest = proc.stdout.read() if proc.poll() is not None else ""
        _kill(proc)
        raise AssertionError(f"holder did not start: {line}{rest}")
    return proc, line.split()[1]


def _kill(proc: subprocess.Popen) -> None:
    """SIGKILL the process group that `proc` leads (it and, for `know`, its Prefect server)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=60)


from test_resume import _env  # noqa: E402 - a `know` subprocess's environment: its own PREFECT_HOME


def _start_know(store: Path, home: Path, log: Path) -> subprocess.Popen:
    """`python know_cli.py collect ... --store STORE` as the leader of a new process group."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "know_cli.py", *COLLECT, "--store", str(store)], cwd=REPO,
                                env=_env(home), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _finish(procs: list[subprocess.Popen], timeout: float = PROCESS_TIMEOUT_S) -> list[int]:
    deadline = time.monotonic() + timeout
    try:
        return [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                _kill(p)


def _tail(log: Path, n: int = 60) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-n:]) if log.exists() else "<no log>"


def _run_states(store: Path) -> dict[str, dict]:
    """{run_id: attrs} straight from each run's zarr.json (written by atomic renames)."""
    out = {}
    runs = store / "runs"
    for d in runs.iterdir() if runs.is_dir() else ():
        try:
            out[d.name] = json.loads((d / "zarr.json").read_text()).get("attributes", {})
        except (OSError, ValueError):
            continue
    return out


def _strip(attrs: dict) -> dict:
    return {k: v for k, v in attrs.items() if k not in VOLATILE}


def _assert_matches_reference(store: Path, reference: dict) -> None:
    """Every run complete, no lease or error left, and bit-identical to the reference."""
    from storage.trajectory import TrajectoryStore

    ts = TrajectoryStore(store)
    assert ts.run_ids() == sorted(reference)
    for rid, (want_attrs, want) in reference.items():
        attrs = ts.run_attrs(rid)
        assert attrs["status"] == "complete" and attrs["stages_written"] == attrs["n_stages"] == N_STAGES, (rid, attrs)
        assert not {"error", "failed_at", "lease_owner", "lease_heartbeat"} & attrs.keys(), attrs
        got = ts.read_stages(rid)
        assert got.dtype == want.dtype and got.tobytes() == want.tobytes(), f"{rid}: differs from one collection"
        assert _strip(attrs) == _strip(want_attrs), rid
        assert ts.lease_holder("runs", rid) is None  # every lease was given back


@pytest.fixture(scope="module")
def reference(tmp_path_factory, prefect_harness):
    """{run_id: (attrs, read_stages)} of the same command run once, alone, in this process."""
    import know_cli
    from storage.trajectory import TrajectoryStore

    store = tmp_path_factory.mktemp("reference") / "ref.zarr"
    try:
        know_cli.main([*COLLECT, "--store", str(store)])
    except SystemExit as e:
        assert e.code in (0, None), f"reference collection exited {e.code}"
    ts = TrajectoryStore(store)
    out = {rid: (ts.run_attrs(rid), ts.read_stages(rid)) for rid in ts.run_ids()}
    assert len(out) == N_RUNS
    return out


# ---------------------------------------------------------------------------- the store's lease
#: opens a store and creates its parent groups once argv[2] (a file) appears, so that all start together
PREPARE_CHILD = """
import os, sys, time
from storage.trajectory import TrajectoryStore
print("ready", flush=True)
while not os.path.exists(sys.argv[2]):
    time.sleep(0.0005)
TrajectoryStore(sys.argv[1]).prepare()
"""


def test_processes_creating_one_fresh_store_at_once_all_succeed(tmp_path):
    """zarr checks that no node exists and then writes it: the slower of two processes opening or
    preparing one new store got ContainsGroupError (seen in CI as a failed `know collect`)."""
    procs = [subprocess.Popen([sys.executable, "-c", PREPARE_CHILD, str(tmp_path / "s.zarr"), str(tmp_path / "go")],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(6)]
    for p in procs:  # every child has imported and waits for the file
        assert p.stdout.readline().strip() == "ready", p.communicate(timeout=CHILD_TIMEOUT_S)[1][-2000:]
    (tmp_path / "go").touch()
    for p in procs:
        _, err = p.communicate(timeout=CHILD_TIMEOUT_S)
        assert p.returncode == 0, err[-2000:]
    assert {d.name for d in (tmp_path / "s.zarr").iterdir()} >= {"runs", "checkpoints", "predictions"}


def test_a_live_lease_is_waited_for_never_wiped_and_a_dead_one_is_taken_over(tmp_path):
    from storage.lease import LEASE_TIMEOUT_S, LeaseBusy
    from storage.trajectory import StoreError, TrajectoryStore

    url = tmp_path / "s.zarr"
    env = {**os.environ, "KNOW_LEASE_HEARTBEAT_S": "0.5"}
    proc, owner = _script(HOLDER, str(url), "r", "sleep", env=env)
    try:
        assert f":{proc.pid}:" in owner
        store = TrajectoryStore(url)
        assert store.lease_holder("runs", "r") == owner
        lock = url / "locks" / "runs" / "r.lock"
        assert json.loads(lock.read_text())["pid"] == proc.pid
        record = store.run("r")
        assert record.status == "running" and record.lease_owner == owner and record.stages_written == 1
        beat = record.lease_heartbeat

        t0 = time.monotonic()
        with pytest.raises(LeaseBusy, match=f"being written by {owner}"):
            store.lease_run("r", timeout=1.5)
        assert time.monotonic() - t0 >= 1.5
        with pytest.raises(StoreError, match="being written by .*refusing to wipe it"):
            store.begin_run("r", {"model": "simple-cnn"}, _layout(), 3)
        store.fail_run("r", "RuntimeError: not mine to fail")
        time.sleep(3.0)  # the holder's heartbeat thread refreshes the record meanwhile (every 0.5 s here)
        record = store.run("r")
        assert record.status == "running" and record.stages_written == 1 and record.error == ""
        assert record.lease_heartbeat > beat, "the heartbeat was not refreshed"
        assert np.array_equal(store.read_stages("r", 0), _holder_rows(_layout())[0])
    finally:
        _kill(proc)

    # the writer is dead: its lease is free at once (the kernel dropped its flock)
    assert store.lease_holder("runs", "r") is None
    lease = store.lease_run("r", timeout=LEASE_TIMEOUT_S / 2)
    assert lease is not None  # at once, not after LEASE_TIMEOUT_S
    with lease:
        assert lease.previous == owner  # the record still named the dead writer
        rows = _holder_rows(_layout()) + 1
        store.begin_run("r", {"model": "simple-cnn"}, _layout(), 3)
        assert store.run("r").stages_written == 0 and store.run("r").lease_owner == str(lease.owner)
        for k in range(3):
            store.append_stage("r", k, rows[k])
        store.finish_run("r")
    assert lease.released and store.lease_holder("runs", "r") is None
    attrs = store.run_attrs("r")
    assert attrs["status"] == "complete" and not {"lease_owner", "lease_heartbeat", "error"} & attrs.keys()
    np.testing.assert_array_equal(store.read_stages("r"), rows)


def test_a_waiting_writer_skips_the_run_its_writer_completes(tmp_path, caplog):
    from storage.trajectory import TrajectoryStore

    url = tmp_path / "s.zarr"
    proc, owner = _script(HOLDER, str(url), "r", "2")
    try:
        store = TrajectoryStore(url)
        caplog.set_level(logging.INFO, logger="know.test")
        t0 = time.monotonic()
        lease = store.lease_run("r", log=logging.getLogger("know.test"))
        waited = time.monotonic() - t0
        assert proc.wait(timeout=CHILD_TIMEOUT_S) == 0 and "DONE" in proc.stdout.read()
    finally:
        _kill(proc)
    assert lease is None, "the run was complete: no lease to take"
    assert waited >= 1.0
    assert f"run r is being written by {owner}: waiting for it" in caplog.text
    assert store.run_status("r") == "complete"
    np.testing.assert_array_equal(store.read_stages("r"), _holder_rows(_layout()))


def test_a_complete_run_carries_no_stale_error(tmp_path):
    from storage.trajectory import TrajectoryStore

    store = TrajectoryStore(tmp_path / "s.zarr")
    layout, rows = _layout(), _holder_rows(_layout())
    store.begin_run("r", {"model": "simple-cnn"}, layout, 3)
    store.fail_run("r", "RuntimeError: first attempt")
    assert store.run("r").error == "RuntimeError: first attempt"
    with store.lease_run("r") as lease:
        assert lease.previous == ""  # a failed run holds no lease: it was free, not taken over
        store.begin_run("r", {"model": "simple-cnn"}, layout, 3)  # a restart clears the error
        assert not {"error", "failed_at"} & store.run_attrs("r").keys()
        # an error set on the running run by anyone else (plain zarr) is dropped on finish too
        zarr.open_group(str(tmp_path / "s.zarr"), mode="a")["runs/r"].update_attributes(
            {"error": "stale", "failed_at": "2001-09-09T00:00:00+00:00"})
        for k in range(3):
            store.append_stage("r", k, rows[k])
        store.finish_run("r", train_seconds=1.0)
    attrs = store.run_attrs("r")
    assert attrs["status"] == "complete" and attrs["train_seconds"] == 1.0
    assert not {"error", "failed_at", "lease_owner", "lease_heartbeat"} & attrs.keys(), attrs


def test_pretrain_waits_for_a_live_pretrainer_and_takes_over_a_dead_one(tmp_path, caplog):
    from storage.lease import LeaseBusy
    from storage.trajectory import TrajectoryStore
    from tasks.collect import PretrainSpec, pretrain

    spec = PretrainSpec(model="simple-cnn", width=0, epochs=1, lr=1e-3, batch_size=32, seed=0, augment=False,
                        dataset="digits", limit=300)
    ckpt = spec.checkpoint_id
    caplog.set_level(logging.INFO, logger="know")

    # a live pre-trainer: pretrain waits, then skips the checkpoint the other process wrote
    live = tmp_path / "live.zarr"
    proc, owner = _script(PRETRAINER, str(live), "1.5", spec.model_dump_json())
    try:
        assert TrajectoryStore(live).lease_holder("checkpoints", ckpt) == owner
        assert pretrain.fn(str(live), spec, "cpu", threads=1) == ckpt
        written = TrajectoryStore(live).checkpoint(ckpt)
        assert proc.wait(timeout=CHILD_TIMEOUT_S) == 0 and "DONE" in proc.stdout.read()
    finally:
        _kill(proc)
    assert f"checkpoint {ckpt} is being written by {owner}: waiting for it" in caplog.text
    assert f"checkpoint {ckpt} already complete (pre-trained by another process): skipped" in caplog.text
    after = TrajectoryStore(live).checkpoint(ckpt)
    assert after.is_complete and after.adam_step is not None and after.created_at == written.created_at

    # a pre-trainer killed while holding the lease: pretrain takes it over and trains
    dead = tmp_path / "dead.zarr"
    proc, owner = _script(PRETRAINER, str(dead), "sleep", spec.model_dump_json())
    try:
        with pytest.raises(LeaseBusy):
            TrajectoryStore(dead).lease_checkpoint(ckpt, timeout=1.0)
    finally:
        _kill(proc)
    assert pretrain.fn(str(dead), spec, "cpu", threads=1) == ckpt
    record = TrajectoryStore(dead).checkpoint(ckpt)
    assert record.is_complete and record.adam_step is not None
    vec, _, _ = TrajectoryStore(dead).load_checkpoint(ckpt)
    assert np.array_equal(vec, TrajectoryStore(live).load_checkpoint(ckpt)[0])  # seeded: the same weights


@pytest.mark.slow
def test_record_lease_on_s3(tmp_path):
    """Remote stores have no lock file: the record is the lease (heartbeat timeout, pid check
    on this host), and a writer whose record lease was overwritten stops (LeaseLost)."""
    from helpers_s3 import moto_s3
    from storage import lease as lease_mod
    from storage.lease import LeaseBusy, LeaseLost
    from storage.trajectory import StoreError, TrajectoryStore

    layout, rows = _layout(), _holder_rows(_layout())
    with moto_s3("know-leases") as s3:
        url = s3.url("leases.zarr")
        store = TrajectoryStore(url)
        root = zarr.open_group(url, mode="a", storage_options=store.storage_options)

        # another host's lease: live while its heartbeat is fresh, dead once it is stale
        root.create_group("runs/f").update_attributes({
            "status": "running", "n_stages": 3, "stages_written": 0, "lease_owner": "elsewhere:1:abc",
            "lease_heartbeat": lease_mod.now_iso()})
        assert store.lease_holder("runs", "f") == "elsewhere:1:abc"
        with pytest.raises(LeaseBusy):
            store.lease_run("f", timeout=1.0)
        with pytest.raises(StoreError, match="being written by elsewhere:1:abc"):
            store.begin_run("f", {"model": "simple-cnn"}, layout, 3)
        old = time.time() - 2 * lease_mod.LEASE_TIMEOUT_S
        root["runs/f"].update_attributes({"lease_heartbeat": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(old))})
        assert store.lease_holder("runs", "f") is None
        with store.lease_run("f", timeout=60) as lease:
            assert lease.previous == "elsewhere:1:abc"
            store.begin_run("f", {"model": "simple-cnn"}, layout, 3)
            for k in range(3):
                store.append_stage("f", k, rows[k])
            store.finish_run("f")
        attrs = store.run_attrs("f")
        assert attrs["status"] == "complete" and not {"lease_owner", "lease_heartbeat"} & attrs.keys()

        # a live process on this host holds a run; killed, its lease is dead at once (pid gone)
        proc, owner = _script(HOLDER, url, "r", "sleep")
        try:
            assert store.lease_holder("runs", "r") == owner
            with pytest.raises(LeaseBusy):
                store.lease_run("r", timeout=1.0)
        finally:
            _kill(proc)
        lease = store.lease_run("r", timeout=60)
        assert lease is not None and lease.previous == owner
        with lease:
            store.begin_run("r", {"model": "simple-cnn"}, layout, 3)
            store.append_stage("r", 0, rows[0])
            # another writer overwrites the record lease: this one stops at its next stage
            root["runs/r"].update_attributes({"lease_owner": "elsewhere:2:def", "lease_heartbeat": lease_mod.now_iso()})
            with pytest.raises(LeaseLost):
                store.append_stage("r", 1, rows[1])
            store.fail_run("r", "LeaseLost")  # not ours any more: left to the new writer
        attrs = store.run_attrs("r")
        assert attrs["status"] == "running" and attrs["lease_owner"] == "elsewhere:2:def" and "error" not in attrs
        assert attrs["stages_written"] == 1


# ---------------------------------------------------------------------------- `know collect` processes
@pytest.mark.slow
@pytest.mark.parametrize("trial", range(TRIALS))
def test_two_concurrent_collects_both_succeed_and_match_one(trial, reference, tmp_path):
    store = tmp_path / "shared.zarr"
    logs = [tmp_path / f"proc{i}.log" for i in range(2)]
    procs = [_start_know(store, tmp_path / f"home{i}", logs[i]) for i in range(2)]
    rcs = _finish(procs)
    texts = [log.read_text(errors="replace") for log in logs]
    for rc, log in zip(rcs, logs):
        assert rc == 0, _tail(log)
    for text, log in zip(texts, logs):
        assert "restarting it from scratch" not in text, f"a live writer's run was wiped:\n{_tail(log)}"
        assert "got stage" not in text and "KeyError" not in text, _tail(log)
    _assert_matches_reference(store, reference)
    waits = sum(text.count(": waiting for it") for text in texts)
    print(f"trial {trial}: {waits} waits for a live writer")


@pytest.mark.slow
def test_a_second_collect_waits_for_a_frozen_writer(reference, tmp_path):
    """Freeze the first writer (SIGSTOP) while it holds a run: the second process waits for
    that run, and neither wipes it; once the first one continues, both finish."""
    store = tmp_path / "shared.zarr"
    first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"
    first = _start_know(store, tmp_path / "home1", first_log)
    procs = [first]
    try:
        frozen = None
        deadline = time.monotonic() + PROCESS_TIMEOUT_S
        while frozen is None and first.poll() is None and time.monotonic() < deadline:
            running = [r for r, a in _run_states(store).items() if a.get("status") == "running"]
            if running:
                os.killpg(first.pid, signal.SIGSTOP)
                time.sleep(0.05)
                running = [r for r, a in _run_states(store).items() if a.get("status") == "running"]
                if running:
                    frozen = running[0]
                else:
                    os.killpg(first.pid, signal.SIGCONT)
            time.sleep(0.02)
        assert frozen is not None, f"never saw a running run:\n{_tail(first_log)}"
        at_freeze = _run_states(store)[frozen]
        assert f":{first.pid}:" in at_freeze["lease_owner"]

        second = _start_know(store, tmp_path / "home2", second_log)
        procs.append(second)
        wanted = f"run {frozen} is being written by {at_freeze['lease_owner']}: waiting for it"
        while wanted not in second_log.read_text(errors="replace"):
            assert second.poll() is None, _tail(second_log)
            assert time.monotonic() < deadline, _tail(second_log)
            time.sleep(0.2)
        time.sleep(2)  # it keeps waiting: the frozen run is untouched
        assert _run_states(store)[frozen] == at_freeze
        os.killpg(first.pid, signal.SIGCONT)
        rcs = _finish(procs)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGCONT)
                _kill(p)
    assert rcs == [0, 0], (_tail(first_log), _tail(second_log))
    text = second_log.read_text(errors="replace")
    assert f"run {frozen} already complete (written by another process): skipped" in text, _tail(second_log)
    for log in (first_log, second_log):
        assert "restarting it from scratch" not in log.read_text(errors="replace"), _tail(log)
    _assert_matches_reference(store, reference)


@pytest.mark.slow
def test_a_killed_writers_lease_is_taken_over(reference, tmp_path):
    """kill -9 a collection once a run has written stage 1: the next collection takes the
    dead writer's lease over, redoes that run from scratch, and matches one collection."""
    from storage.trajectory import TrajectoryStore

    store = tmp_path / "shared.zarr"
    first_log = tmp_path / "first.log"
    first = _start_know(store, tmp_path / "home1", first_log)
    killed = None
    try:
        deadline = time.monotonic() + PROCESS_TIMEOUT_S
        while killed is None and first.poll() is None and time.monotonic() < deadline:
            half = [r for r, a in _run_states(store).items()
                    if a.get("status") == "running" and 2 <= a.get("stages_written", 0) < N_STAGES]
            if half:
                os.killpg(first.pid, signal.SIGSTOP)
                time.sleep(0.05)  # let in-flight renames land
                states = _run_states(store)
                half = [r for r in half if states[r].get("status") == "running"]
                if half:
                    os.killpg(first.pid, signal.SIGKILL)
                    killed = (half[0], states[half[0]])
                else:
                    os.killpg(first.pid, signal.SIGCONT)
            time.sleep(0.02)
    finally:
        _kill(first)
    assert killed is not None, f"never saw a run with stage 1 written (exit {first.returncode}):\n{_tail(first_log)}"
    assert first.returncode == -signal.SIGKILL
    run_id, at_kill = killed
    owner = at_kill["lease_owner"]
    assert f":{first.pid}:" in owner
    assert TrajectoryStore(store).lease_holder("runs", run_id) is None  # dead: its flock is gone

    second_log = tmp_path / "second.log"
    (rc,) = _finish([_start_know(store, tmp_path / "home2", second_log)])
    assert rc == 0, _tail(second_log)
    text = second_log.read_text(errors="replace")
    assert (f"run {run_id} was 'running': restarting it from scratch (took over the lease of {owner}: "
            "that writer is gone)") in text, _tail(second_log)
    _assert_matches_reference(store, reference)
