"""Operations against a real `prefect server start` and `prefect worker start` (as in
tests/test_server.py, whose process helpers this module uses):

* `know schedule on|off`: the nightly schedule of know-collect (deployed from prefect.yaml)
  keeps its parameters, and the runs the server's scheduler creates from it carry them;
  Prefect's own update of `active` alone (what `prefect deployment schedule resume` sends)
  empties them on this server, which is why the command exists.
* `know resume` of a run whose worker was killed with -9 mid-sweep: refused while the run's
  heartbeat is fresh, then (silent for two heartbeat intervals) it and its orphaned task runs
  are marked Crashed, a new worker runs it again, complete runs are not retrained (their chunk
  files keep their mtimes) and no task run is left RUNNING.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from test_server import BIN, ROOT, Procs, launch_server


def start_server(procs: Procs, timeout: float = 900, **env) -> str:
    """test_server's start, patient with a loaded machine (a slow /health answer is not a failure)."""
    import httpx

    url, proc = launch_server(procs, **env)
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, f"prefect server exited with {proc.returncode}:\n{procs.log(proc)[-3000:]}"
        try:
            if httpx.get(f"{url}/health", timeout=20).status_code == 200:
                return url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    pytest.fail(f"prefect server not healthy after {timeout}s:\n{procs.log(proc)[-3000:]}")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]  # minutes normally; generous for a loaded machine

HEARTBEAT_S = 30  # the engine's minimum; know resume then waits 2 x 30 s of silence
NIGHTLY = next(s for s in next(d for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
                               if d["name"] == "know-collect")["schedules"] if s["slug"] == "nightly-meta-data")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A server whose scheduler loops every 2 s, the know-cpu pool and the know-collect deployment."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.settings import PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
    from prefect.utilities.asyncutils import run_coro_as_sync
    from prefect.workers.process import ProcessWorker

    procs = Procs(tmp_path_factory.mktemp("prefect-home"))
    t0 = time.time()
    timings = {}

    async def make_pool():
        async with get_client() as client:
            await client.create_work_pool(WorkPoolCreate(
                name="know-cpu", type="process", base_job_template=ProcessWorker.get_default_base_job_template()))

    try:
        url = start_server(procs, PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="2")
        timings["server"] = time.time() - t0
        with temporary_settings({PREFECT_API_URL: url, PREFECT_FLOWS_HEARTBEAT_FREQUENCY: HEARTBEAT_S}):
            run_coro_as_sync(make_pool())
            t1 = time.time()
            deploy = subprocess.run([str(BIN / "prefect"), "--no-prompt", "deploy", "--name", "know-collect"], cwd=ROOT,
                                    env=procs.env(url), capture_output=True, text=True, timeout=300)
            timings["deploy"] = time.time() - t1
            assert deploy.returncode == 0, deploy.stdout[-3000:] + deploy.stderr[-3000:]
            yield {"url": url, "procs": procs, "timings": timings}
            from prefect.events.worker import EventsWorker
            from prefect.logging.handlers import APILogWorker

            APILogWorker.drain_all(timeout=10)
            EventsWorker.drain_all(timeout=10)
    finally:
        print(f"fixture timings: {timings}")
        procs.stop_all()
        strays = procs.strays()
        assert not strays, f"processes left running: {strays}"


def read(coro_fn):
    from prefect.client.orchestration import get_client
    from prefect.utilities.asyncutils import run_coro_as_sync

    async def go():
        async with get_client() as client:
            return await coro_fn(client)

    return run_coro_as_sync(go())


def nightly(client_deployment):
    return next(s for s in client_deployment.schedules if s.slug == "nightly-meta-data")


def scheduled_runs(client, deployment_id):
    from prefect.client.schemas.filters import (DeploymentFilter, DeploymentFilterId, FlowRunFilter,
                                                FlowRunFilterState, FlowRunFilterStateType)

    return client.read_flow_runs(
        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
        flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=["SCHEDULED"]))))


def test_schedule_on_keeps_parameters(server, capsys):
    import know_cli
    from flows.ops import OpsError, set_schedule

    deployment = read(lambda c: c.read_deployment_by_name("collect-trajectories/know-collect"))
    before = nightly(deployment)
    assert before.active is False and before.parameters == NIGHTLY["parameters"]

    with pytest.raises(OpsError, match=r"no schedule 'nightly'.*name one of: nightly-meta-data \(cron 0 2 \* \* \*"):
        set_schedule("collect", "nightly", active=True)  # a stage name finds its deployment too
    info = set_schedule("know-collect", "nightly-meta-data", active=True)
    assert info.active and info.changed and info.parameters == NIGHTLY["parameters"]
    assert info.deployment == "collect-trajectories/know-collect" and "0 2 * * *" in info.schedule
    # the server's scheduler (every 2 s here) plans the next nights from it: with its parameters
    deadline, runs = time.time() + 300, []
    while time.time() < deadline and not runs:
        runs = read(lambda c: scheduled_runs(c, deployment.id))
        time.sleep(1)
    assert runs, "the scheduler created no run from the switched-on schedule"
    for run in runs:
        assert run.auto_scheduled and run.parameters == NIGHTLY["parameters"], run.parameters
        assert run.parameters["params"]["dataset"] == "fashion-mnist" and run.parameters["params"]["runs"] == 8

    # the command line: off (its only schedule, so no slug needed); parameters still there
    with pytest.raises(SystemExit) as exit_:
        know_cli.main(["schedule", "off", "know-collect"])
    captured = capsys.readouterr()
    out = captured.out + captured.err  # the console writes to stderr
    assert exit_.value.code == 0, out
    assert "switched off" in out and "fashion-mnist" in out
    after = nightly(read(lambda c: c.read_deployment_by_name("collect-trajectories/know-collect")))
    assert after.active is False and after.parameters == NIGHTLY["parameters"]
    assert not read(lambda c: scheduled_runs(c, deployment.id))  # switching off drops the planned runs

    # why: an update of `active` alone (prefect deployment schedule resume) empties the parameters here
    read(lambda c: c.update_deployment_schedule(deployment.id, after.id, active=True))
    wiped = nightly(read(lambda c: c.read_deployment_by_name("collect-trajectories/know-collect")))
    assert wiped.active is True and wiped.parameters == {}
    read(lambda c: c.update_deployment_schedule(deployment.id, after.id, active=False,
                                                parameters=NIGHTLY["parameters"]))


def _kill_tree(pid: int) -> list[int]:
    """SIGKILL a process and all its descendants (the flow-run subprocess has its own session)."""
    import psutil

    root = psutil.Process(pid)
    victims = [*root.children(recursive=True), root]
    for p in victims:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(victims, timeout=20)
    return [p.pid for p in victims]


def _chunk_mtimes(store: Path, run_ids: list[str]) -> dict[str, int]:
    return {str(f.relative_to(store)): f.stat().st_mtime_ns for rid in run_ids
            for f in sorted((store / "runs" / rid).rglob("*")) if f.is_file()}


def _open_task_runs(client, flow_run_ids):
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterFlowRunId, TaskRunFilterState, \
        TaskRunFilterStateType

    return client.read_task_runs(task_run_filter=TaskRunFilter(
        flow_run_id=TaskRunFilterFlowRunId(any_=flow_run_ids),
        state=TaskRunFilterState(type=TaskRunFilterStateType(any_=["RUNNING", "PENDING"]))))


def _tree_ids(client, root_id):
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    async def walk():
        ids, frontier = [root_id], [root_id]
        while frontier:
            kids = await client.read_flow_runs(flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=frontier)))
            frontier = [k.id for k in kids if k.id not in ids]
            ids += frontier
        return ids

    return walk()


def test_resume_after_worker_killed(server, tmp_path):
    from prefect.client.schemas.objects import State, StateType
    from prefect.settings import PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    from flows.ops import OpsError, resume, stale_after_seconds, submit, wait
    from storage.trajectory import TrajectoryStore

    procs, url = server["procs"], server["url"]
    worker_env = procs.env(url, PREFECT_FLOWS_HEARTBEAT_FREQUENCY=str(HEARTBEAT_S))
    store = tmp_path / "runs.zarr"
    n_runs = 8
    t0 = time.time()
    w1 = procs.start("worker-1", [str(BIN / "prefect"), "worker", "start", "--pool", "know-cpu", "--name", "cpu-1"],
                     worker_env)
    run_id, _ = submit("collect", {"store": str(store), "dataset": "digits", "models": "simple-cnn",
                                   "runs": str(n_runs), "stages": "6", "limit": "600", "epochs_per_stage": "2",
                                   "device": "cpu", "workers": "1"})
    # mid-sweep: two runs complete, a third being written
    deadline = time.time() + 600
    while True:
        assert time.time() < deadline, f"sweep did not get going:\n{procs.log(w1)[-4000:]}"
        try:
            runs = TrajectoryStore(str(store)).list_runs() if (store / "runs").is_dir() else None
        except Exception:  # noqa: BLE001 - a record being written right now: look again
            runs = None
        if runs is not None and len(runs):
            complete = list(runs.run_id[runs.status == "complete"])
            if len(complete) >= 2 and (runs.status == "running").any():
                break
            assert len(complete) < n_runs, "the sweep finished before the worker was killed"
        time.sleep(0.2)
    mtimes = _chunk_mtimes(store, complete)
    killed = _kill_tree(w1.pid)
    t_kill = time.time() - t0
    assert w1.poll() is not None and len(killed) >= 2, killed  # the worker and its flow-run process

    with temporary_settings({PREFECT_API_URL: url, PREFECT_FLOWS_HEARTBEAT_FREQUENCY: HEARTBEAT_S}):
        threshold = stale_after_seconds()
        assert threshold == 2 * HEARTBEAT_S
        run = read(lambda c: c.read_flow_run(run_id))
        assert run.state.type == StateType.RUNNING, run.state
        # `prefect flow-run cancel` with no worker left: the run stays CANCELLING
        read(lambda c: c.set_flow_run_state(run_id, State(type=StateType.CANCELLING)))
        assert read(lambda c: c.read_flow_run(run_id)).state.type == StateType.CANCELLING
        tree = read(lambda c: _tree_ids(c, run.id))
        assert read(lambda c: _open_task_runs(c, tree)), "expected task runs left RUNNING by the killed worker"
        # a sub-flow sends no heartbeats of its own: resuming it alone is refused, naming the root
        assert len(tree) >= 2, tree
        with pytest.raises(OpsError, match=rf"sub-flow of flow run {run.id}.*know resume {run.id}"):
            resume(tree[1])
        # silent for less than the threshold: it might still be running somewhere, so it is refused.
        # (Asked with 10-minute heartbeats, i.e. a 20-minute threshold, so that a slow machine
        # between the kill and this call cannot make the answer depend on timing.)
        with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: 600}):
            with pytest.raises(OpsError, match=r"sign of life \d+s ago .*1200s .*--force"):
                resume(run_id)
        assert read(lambda c: c.read_flow_run(run_id)).state.type == StateType.CANCELLING  # untouched

        procs.start("worker-2", [str(BIN / "prefect"), "worker", "start", "--pool", "know-cpu", "--name", "cpu-2"],
                    worker_env)
        notes, deadline = [], time.time() + threshold + 60
        while True:
            try:
                assert resume(run_id, notify=notes.append) == ("scheduled", "SCHEDULED")
                break
            except OpsError as e:
                assert "sign of life" in str(e) and time.time() < deadline, e
                time.sleep(3)
        t_resumed = time.time() - t0
        assert notes and "marked it Crashed" in notes[0], notes
        final = wait(run_id, 900)
        assert final.state.is_completed(), f"{final.state}\n{procs.log(procs.procs[-1][0])[-4000:]}"
        assert final.run_count >= 2

        st = TrajectoryStore(str(store))
        runs = st.list_runs()
        assert len(runs) == n_runs and (runs.status == "complete").all(), runs
        assert _chunk_mtimes(store, complete) == mtimes, "a complete run was rewritten"
        tree = read(lambda c: _tree_ids(c, run.id))
        assert len(tree) >= 3  # the crashed attempt's subflow run and the retry's
        assert not read(lambda c: _open_task_runs(c, tree)), "task runs left RUNNING/PENDING"
    print(f"timings: {server['timings']}, killed at {t_kill:.0f}s, resumed at {t_resumed:.0f}s, "
          f"done at {time.time() - t0:.0f}s")
