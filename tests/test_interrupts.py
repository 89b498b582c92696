"""Ctrl-C and `kill -9` of a real `know collect` (issue 14, items 4 and 5).

The slow tests run the CLI as a subprocess in its own session, with its own PREFECT_HOME, so
it starts its own temporary Prefect server (cli/server.py). Ctrl-C is SIGINT to the CLI's
process group, as a terminal sends it: the CLI must exit 130 within seconds with one
`error:` line and no traceback, leave the interrupted run restartable, record the flow runs
as crashed in the Prefect database of that home, and stop its server (which the group's
SIGINT must not have killed first). After `kill -9` of the CLI its server must be gone too.

The fast tests send a real SIGINT to this process: the first one stops a training loop in
another thread and raises KeyboardInterrupt in the main thread.
"""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: ~1.5 s per stage on the 2-core machine: a run is still training when its first stage is written
COLLECT = ["collect", "--dataset", "digits", "--limit", "1000", "--models", "simple-cnn", "--runs", "2",
           "--stages", "6", "--epochs-per-stage", "10", "--workers", "1", "--device", "cpu"]


def cli_env(home: Path) -> dict[str, str]:
    """This process's environment without its Prefect settings: the CLI starts its own server."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    return env


def start_cli(args: list[str], home: Path, log: Path) -> subprocess.Popen:
    home.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([sys.executable, str(ROOT / "know_cli.py"), *args], cwd=ROOT, env=cli_env(home),
                            stdout=subprocess.DEVNULL, stderr=log.open("wb"), start_new_session=True)


def processes_of(home: Path) -> dict[int, str]:
    """Live processes (any session) whose environment holds this PREFECT_HOME: pid -> cmdline."""
    marker = f"PREFECT_HOME={home}".encode()
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if marker not in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                continue
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            if state != "Z":  # a zombie is dead already
                found[int(pid)] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError):
            continue
    return found


def wait_until_gone(home: Path, timeout: float) -> dict[int, str]:
    deadline = time.monotonic() + timeout
    while (left := processes_of(home)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def run_records(store: Path) -> dict[str, dict]:
    """run id -> its attrs, read from the store's zarr.json files (written atomically)."""
    out = {}
    for meta in (store / "runs").glob("*/zarr.json"):
        try:
            out[meta.parent.name] = json.loads(meta.read_text()).get("attributes", {})
        except (OSError, ValueError):
            continue
    return out


def wait_for_first_stage(proc: subprocess.Popen, store: Path, log: Path, timeout: float = 150) -> None:
    deadline = time.monotonic() + timeout
    while not any(a.get("stages_written", 0) >= 1 for a in run_records(store).values()):
        if proc.poll() is not None:
            pytest.fail(f"know collect ended ({proc.returncode}) before a stage was written:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"no stage written after {timeout}s:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)


def server_pids(home: Path, cli_pid: int) -> list[int]:
    return [pid for pid, cmd in processes_of(home).items() if pid != cli_pid and "uvicorn" in cmd]


def wait_for_healthy_server(proc: subprocess.Popen, home: Path, log: Path, timeout: float = 150) -> int:
    """The pid of the CLI's one server, once it answers /api/health (its port is in its cmdline)."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"know collect ended ({proc.returncode}) early:\n{log.read_text()[-3000:]}")
        servers = {pid: cmd for pid, cmd in processes_of(home).items() if pid != proc.pid and "uvicorn" in cmd}
        assert len(servers) <= 1, servers
        for pid, cmd in servers.items():
            args = cmd.split()
            port = args[args.index("--port") + 1]
            assert args[args.index("--host") + 1] == "127.0.0.1", cmd
            try:
                if httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2).status_code == 200:
                    return pid
            except httpx.HTTPError:
                pass
        time.sleep(0.2)
    pytest.fail(f"no healthy server after {timeout}s: {processes_of(home)}\n{log.read_text()[-3000:]}")


def db_states(home: Path) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(flow runs, task runs) as (name, state type), from the Prefect database of `home`."""
    with sqlite3.connect(f"file:{home / 'prefect.db'}?mode=ro", uri=True) as db:
        return (db.execute("SELECT name, state_type FROM flow_run").fetchall(),
                db.execute("SELECT name, state_type FROM task_run").fetchall())


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ctrl_c_stops_collect_with_130_and_a_restartable_store(tmp_path):
    home, store, log = tmp_path / "home", tmp_path / "runs.zarr", tmp_path / "collect.log"
    proc = start_cli([*COLLECT, "--store", str(store)], home, log)
    try:
        wait_for_first_stage(proc, store, log)
        servers = server_pids(home, proc.pid)
        assert len(servers) == 1, processes_of(home)
        assert os.getpgid(servers[0]) != os.getpgid(proc.pid)  # the group's SIGINT cannot reach it
        t0 = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in a terminal
        code = proc.wait(60)
        took = time.monotonic() - t0
    finally:
        kill_group(proc)
    err = log.read_text(errors="replace")
    assert code == 130, err[-3000:]
    assert took < 10, f"exit took {took:.1f}s"
    assert "Traceback" not in err, err[-3000:]
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "interrupted" in errors[0], err[-3000:]
    assert err.strip().splitlines()[-1] == errors[0]  # the last word, and nothing after it
    assert wait_until_gone(home, 5) == {}  # the server was stopped, not left behind

    runs = run_records(store)
    assert runs, "nothing written"
    for rid, attrs in runs.items():  # finished work complete, nothing partial marked complete
        if attrs.get("status") == "complete":
            assert attrs["stages_written"] == attrs["n_stages"], (rid, attrs)
    interrupted = [rid for rid, a in runs.items() if a.get("status") != "complete"]
    assert interrupted, runs
    # the flows recorded how they ended, on the server that the Ctrl-C did not kill
    flows, tasks = db_states(home)
    assert flows and all(state in ("CRASHED", "CANCELLED") for _, state in flows), flows
    assert not [t for t in tasks if t[1] in ("RUNNING", "PENDING", "SCHEDULED")], tasks

    # the same command again finishes the sweep: the interrupted run is redone from scratch
    again = subprocess.run([sys.executable, str(ROOT / "know_cli.py"), *COLLECT, "--store", str(store)], cwd=ROOT,
                           env=cli_env(home), capture_output=True, text=True, timeout=240, start_new_session=True)
    assert again.returncode == 0, again.stderr[-3000:]
    runs = run_records(store)
    assert len(runs) == 2 and all(a["status"] == "complete" and a["stages_written"] == 6 for a in runs.values()), runs
    assert any(f"run {rid} was" in again.stderr and "restarting it from scratch" in again.stderr for rid in interrupted)
    assert wait_until_gone(home, 5) == {}


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_kill_9_of_the_cli_takes_its_temporary_server_down(tmp_path):
    home, store, log = tmp_path / "home", tmp_path / "runs.zarr", tmp_path / "collect.log"
    proc = start_cli([*COLLECT, "--store", str(store)], home, log)
    try:
        wait_for_healthy_server(proc, home, log)
        os.kill(proc.pid, signal.SIGKILL)  # the CLI alone: no exit handler runs
        proc.wait(10)
        left = wait_until_gone(home, 5)
    finally:
        kill_group(proc)
        for pid in processes_of(home):  # do not leave one behind for the next tests
            os.kill(pid, signal.SIGKILL)
    assert left == {}, f"still running 5 s after kill -9 of the CLI: {left}"


# -- fast: real signals to this process --------------------------------------------------------

def test_first_sigint_stops_training_in_other_threads_and_raises_in_main():
    import torch

    import know_core.train as train
    from cli.errors import interrupts

    outcome, started = {}, threading.Event()

    def train_forever():  # a training loop in a worker thread, as Prefect's thread pool runs one
        model = torch.nn.Linear(8, 3)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        x, y = torch.randn(256, 8), torch.randint(0, 3, (256,))
        gen = torch.Generator().manual_seed(0)
        started.set()
        try:
            while True:
                train.run_epoch(model, opt, x, y, 16, gen, torch.device("cpu"))
        except KeyboardInterrupt as e:
            outcome["stopped"] = e

    before = signal.getsignal(signal.SIGINT)
    worker = threading.Thread(target=train_forever, daemon=True)
    try:
        with interrupts():
            worker.start()
            assert started.wait(120)
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(10)  # the handler raises in this (the main) thread
            worker.join(60)
        assert not worker.is_alive() and "stopped" in outcome
        assert signal.getsignal(signal.SIGINT) is before  # restored
    finally:
        train.STOP.clear()
        worker.join(10)


def test_a_user_set_api_url_starts_no_server(monkeypatch):
    from cli import server

    assert server.needs_server(["collect", "--runs", "2"]) and server.needs_server(["run", "--preset", "quick"])
    assert not server.needs_server(["collect", "--help"]) and not server.needs_server(["runs", "--store", "s"])
    assert not server.needs_server(["submit", "collect"]) and not server.needs_server([])
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    assert server.start_if_needed(["collect"]) is None
