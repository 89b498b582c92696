"""Operations against a running Prefect server: submit a stage to its deployment, resume a failed run.

    export PREFECT_API_URL=http://127.0.0.1:4200/api
    from flows.ops import submit, resume
    run_id, url = submit("collect", {"runs": "3", "stages": "6", "limit": "300"})
    resume(run_id)          # after it failed or crashed: schedules it again for its worker
    resume(run_id)          # RUNNING/CANCELLING but its worker died (kill -9, machine down):
                            # marked Crashed once silent for STALE_HEARTBEATS heartbeats, then retried
    set_schedule("know-collect", "nightly-meta-data", active=True)  # keeps its parameters

`know submit`, `know resume` and `know schedule` are thin wrappers. Parameters are validated
here, with the flow's own pydantic model, before anything reaches the server.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

from pydantic import BaseModel

from know_core.errors import BadInput

#: stage name -> (deployment name, entrypoint). Deployment names are the ones in prefect.yaml.
STAGES: dict[str, tuple[str, str]] = {
    "collect": ("know-collect", "flows.collect:collect_trajectories"),
    "collect-gpu": ("know-collect-gpu", "flows.collect:collect_trajectories"),
    "trajectory": ("know-trajectory", "flows.trajectory:forgetting_trajectory"),
    "trajectory-gpu": ("know-trajectory-gpu", "flows.trajectory:forgetting_trajectory"),
    "meta-train": ("know-meta-train", "flows.meta_train:meta_train_known"),
    "predict": ("know-predict", "flows.predict:predict_weights"),
    "pipeline": ("know-pipeline", "flows.pipeline:collect_and_enhance"),
    "experiment": ("know-experiment", "flows.experiment:know_run"),
}

#: flow name -> entrypoint, to re-run a flow run that has no deployment (a local `know ...` run)
FLOWS: dict[str, str] = {
    "collect-trajectories": "flows.collect:collect_trajectories",
    "forgetting-trajectory": "flows.trajectory:forgetting_trajectory",
    "meta-train-known": "flows.meta_train:meta_train_known",
    "predict-weights": "flows.predict:predict_weights",
    "collect-and-enhance": "flows.pipeline:collect_and_enhance",
    "know-experiment": "flows.experiment:know_run",
}

RETRYABLE = {"FAILED", "CRASHED", "CANCELLED", "COMPLETED"}
#: not final, but maybe orphaned: a run whose process (worker, machine) died stays in one of these
RECOVERABLE = {"RUNNING", "CANCELLING", "PENDING"}
#: a RECOVERABLE run is orphaned once it has sent no sign of life (flow-run heartbeat, task-run
#: state change) for this many heartbeat intervals (PREFECT_FLOWS_HEARTBEAT_FREQUENCY, 180 s by default)
STALE_HEARTBEATS = 2


class OpsError(BadInput):
    """A user-fixable problem (unknown stage, bad parameter, no server): one line, exit 2."""


def load_entrypoint(entrypoint: str):
    """'flows.collect:collect_trajectories' (or 'flows/collect.py:...') -> the flow object,
    imported as a module of the `flows` package."""
    path, name = entrypoint.split(":")
    return getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), name)


def params_model(entrypoint: str) -> type[BaseModel]:
    """The pydantic model of the flow's single `params` argument."""
    import inspect
    import typing

    fn = load_entrypoint(entrypoint).fn
    hints = typing.get_type_hints(fn)
    if list(inspect.signature(fn).parameters) != ["params"] or not issubclass(hints["params"], BaseModel):
        raise TypeError(f"{entrypoint} must take exactly one pydantic `params` argument")
    return hints["params"]


def parse_overrides(pairs: list[str] | tuple[str, ...]) -> dict[str, str]:
    """['runs=3', 'store=s3://b/x'] -> {'runs': '3', 'store': 's3://b/x'}; pydantic coerces the types."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise OpsError(f"--param {pair!r} is not key=value, e.g. --param runs=3")
        out[key.strip().replace("-", "_")] = value
    return out


def validate_params(model: type[BaseModel], params: dict[str, Any]) -> dict[str, Any]:
    """Check names (pydantic would silently drop a typo) and types with the stage model; return
    the JSON-ready dict."""
    from pydantic import ValidationError

    from params.common import describe

    unknown = sorted(set(params) - set(model.model_fields))
    if unknown:
        raise OpsError(f"unknown parameter(s) {', '.join(unknown)} for {model.__name__}; "
                       f"valid: {', '.join(model.model_fields)}")
    try:
        return model.model_validate(params).model_dump(mode="json")
    except ValidationError as e:
        raise OpsError(f"parameter {describe(e, cli=False)}") from None


def require_server() -> str:
    """The configured API URL; submitting to an ephemeral in-process server would reach no worker."""
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    if not url:
        raise OpsError("no Prefect server configured: export PREFECT_API_URL=http://127.0.0.1:4200/api "
                       "(start one with `prefect server start --host 127.0.0.1`, see docs/operations.md)")
    return url


def flow_run_url(flow_run) -> str:
    from prefect.utilities.urls import url_for

    url = url_for(flow_run)
    if not url:
        url = require_server().rstrip("/").removesuffix("/api") + f"/runs/flow-run/{flow_run.id}"
    return url


def _deployment_name(stage: str) -> tuple[str, str | None]:
    if stage in STAGES:
        return STAGES[stage]
    return stage, None  # any other deployment name (or flow/deployment) the server knows


async def _read_deployment(client, name: str):
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
    from prefect.exceptions import ObjectNotFound

    if "/" in name:
        try:
            return await client.read_deployment_by_name(name)
        except ObjectNotFound:
            return None
    found = await client.read_deployments(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[name])))
    if len(found) > 1:
        raise OpsError(f"{len(found)} deployments are named {name!r}; pass flow-name/{name}")
    return found[0] if found else None


def precheck_params(model: type[BaseModel], params: dict[str, Any]) -> None:
    """The user's overrides alone against the stage model: unknown names and bad values are
    refused; a required field missing here may still come from the deployment's defaults."""
    from pydantic import ValidationError

    from params.common import describe

    unknown = sorted(set(params) - set(model.model_fields))
    if unknown:
        raise OpsError(f"unknown parameter(s) {', '.join(unknown)} for {model.__name__}; "
                       f"valid: {', '.join(model.model_fields)}")
    try:
        model.model_validate(params)
    except ValidationError as e:
        # a model-level error (no loc, e.g. known=official without official_dir) may involve a
        # field the deployment's defaults set: the merged params are validated after reading it
        if any(err["type"] != "missing" and err.get("loc") for err in e.errors()):
            raise OpsError(f"parameter {describe(e, cli=False, skip_missing=True)}") from None


def check_named_runs(params: dict[str, Any]) -> None:
    """A run the overrides name (`run_id`, `target_run`) must be in the store they name, when
    that store is a local path: one line (OpsError) here, not a failed flow run later."""
    from pathlib import Path

    store = str(params.get("store") or "")
    named = [(f, str(params[f]).strip()) for f in ("run_id", "target_run") if str(params.get(f) or "").strip()]
    if not store or "://" in store or not named:
        return
    if not Path(store).is_dir():
        raise OpsError(f"{named[0][0]} {named[0][1]}: store {store} does not exist here, so it holds no such run; "
                       f"check the path with `know runs --store {store}`")
    from storage.trajectory import TrajectoryStore

    st = TrajectoryStore(store)
    for field, run_id in named:
        if st.run(run_id) is None:
            raise OpsError(f"{field} {run_id} is not a run of store {store}; list its runs with "
                           f"`know runs --store {store}`")


def submit(stage: str, params: dict[str, Any] | None = None, *, tags: list[str] | tuple[str, ...] = (),
           idempotency_key: str | None = None) -> tuple[str, str]:
    """Start a flow run of the stage's deployment and return at once: (flow_run_id, UI url).

    `params` override fields of the deployment's default `params` (strings are coerced);
    the merged values are validated with the flow's pydantic model first.
    """
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.utilities.asyncutils import run_coro_as_sync

    name, entrypoint = _deployment_name(stage)
    if entrypoint:  # a typo fails here, before the server is asked
        precheck_params(params_model(entrypoint), params or {})
    check_named_runs(params or {})  # a missing run fails here too, before the server is asked
    require_server()

    async def read():
        async with get_client() as client:
            return await _read_deployment(client, name)

    deployment = run_coro_as_sync(read())
    if deployment is None:
        known = ", ".join(STAGES)
        raise OpsError(f"no deployment {name!r} on the server; deploy with `prefect deploy --all` from the repo root "
                       f"(stages: {known})")
    entrypoint = deployment.entrypoint or entrypoint
    model = params_model(entrypoint)
    merged = {**(deployment.parameters or {}).get("params", {}), **(params or {})}
    checked = validate_params(model, merged)
    run = run_deployment(deployment.id, parameters={"params": checked}, timeout=0, tags=list(tags),
                         idempotency_key=idempotency_key, as_subflow=False)
    return str(run.id), flow_run_url(run)


def stale_after_seconds() -> float:
    """Silence after which a RUNNING/CANCELLING/PENDING run counts as orphaned: STALE_HEARTBEATS
    flow-run heartbeat intervals (PREFECT_FLOWS_HEARTBEAT_FREQUENCY; workers and `know` should
    share it). A live run sends a heartbeat every interval, from a thread, even mid-training."""
    from prefect.settings import get_current_settings

    frequency = get_current_settings().flows.heartbeat_frequency or 180  # None (off) on the workers' side: 180
    return float(STALE_HEARTBEATS * max(frequency, 30))  # the engine never beats less often than 30 s


@dataclass
class Liveness:
    """When the flow runs of one run tree last showed a sign of life, and what it was."""

    last_seen: Any  # datetime (UTC) or None
    what: str
    age_s: float


async def _run_tree(client, run) -> list:
    """The run and its in-process subflow runs that are not final, parents first. Subflow runs of
    a deployment (e.g. a pipeline's stage runs) run elsewhere and are left to their own workers."""
    from prefect.client.schemas.filters import (FlowRunFilter, FlowRunFilterDeploymentId,
                                                FlowRunFilterParentFlowRunId, FlowRunFilterState,
                                                FlowRunFilterStateType)

    tree, frontier = [run], [run.id]
    while frontier:
        children = await client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=frontier),
            deployment_id=FlowRunFilterDeploymentId(is_null_=True),
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=sorted(RECOVERABLE)))))
        children = [c for c in children if all(c.id != t.id for t in tree)]
        tree += children
        frontier = [c.id for c in children]
    return tree


async def _unfinished_parent(client, run):
    """The top-most in-process parent flow run of `run` that is not final, or None."""
    found, current = None, run
    while current.parent_task_run_id is not None and current.deployment_id is None:
        parent_task = await client.read_task_run(current.parent_task_run_id)
        if parent_task.flow_run_id is None:
            break
        current = await client.read_flow_run(parent_task.flow_run_id)
        if current.state is not None and current.state.type.value in RECOVERABLE:
            found = current
    return found


async def _orphan_task_runs(client, flow_run_ids: list) -> list:
    from prefect.client.schemas.filters import (TaskRunFilter, TaskRunFilterFlowRunId, TaskRunFilterState,
                                                TaskRunFilterStateType)
    from prefect.client.schemas.objects import StateType

    found, offset = [], 0
    while True:
        page = await client.read_task_runs(task_run_filter=TaskRunFilter(
            flow_run_id=TaskRunFilterFlowRunId(any_=flow_run_ids),
            state=TaskRunFilterState(type=TaskRunFilterStateType(any_=[StateType.RUNNING, StateType.PENDING]))),
            limit=200, offset=offset)
        found += page
        if len(page) < 200:
            return found
        offset += 200


async def liveness(client, tree: list, task_runs: list) -> Liveness:
    """The newest sign of life of a run tree: its last flow-run heartbeat event, a flow run
    entering Running, or a task run changing state (the newest finished one and every one that
    is still RUNNING/PENDING). States forced from outside (Cancelling) do not count."""
    from datetime import datetime, timedelta, timezone

    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterEndTime, TaskRunFilterFlowRunId
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import TaskRunSort
    from prefect.events.filters import (EventFilter, EventNameFilter, EventOccurredFilter, EventOrder,
                                        EventResourceFilter)

    now = datetime.now(timezone.utc)
    seen: list[tuple[datetime, str]] = []
    for fr in tree:
        if fr.start_time:
            seen.append((fr.start_time, f"flow run {fr.name} started"))
        if fr.state and fr.state.type in (StateType.RUNNING, StateType.PENDING):
            seen.append((fr.state.timestamp, f"flow run {fr.name} became {fr.state.name}"))
    ids = [fr.id for fr in tree]
    try:
        page = await client.read_events(filter=EventFilter(
            occurred=EventOccurredFilter(since=now - timedelta(days=7), until=now + timedelta(hours=1)),
            event=EventNameFilter(name=["prefect.flow-run.heartbeat"]),
            resource=EventResourceFilter(id=[f"prefect.flow-run.{i}" for i in ids]),
            order=EventOrder.DESC), limit=1)
        for event in page.events:
            seen.append((event.occurred, "heartbeat"))
    except Exception:  # noqa: BLE001 - a server without the events API: the states still tell
        pass
    newest_done = await client.read_task_runs(task_run_filter=TaskRunFilter(  # not-null: Postgres sorts NULLs first
        flow_run_id=TaskRunFilterFlowRunId(any_=ids), end_time=TaskRunFilterEndTime(is_null_=False)),
        sort=TaskRunSort.END_TIME_DESC, limit=1)
    for tr in [*task_runs, *newest_done]:
        for t in (tr.state.timestamp if tr.state else None, tr.end_time, tr.start_time):
            if t:
                seen.append((t, f"task run {tr.name} {tr.state.name if tr.state else ''}".rstrip()))
    if not seen:
        return Liveness(None, "nothing", float("inf"))
    last, what = max(seen, key=lambda x: x[0])
    return Liveness(last, what, (now - last).total_seconds())


async def _recover_orphan(client, run, force: bool, notify: Callable[[str], None] | None) -> None:
    """A RUNNING/CANCELLING/PENDING run whose process is gone: force it, its in-process subflow
    runs and their RUNNING/PENDING task runs to Crashed, so it can be retried. Refused (OpsError)
    while the run still shows signs of life, unless `force`."""
    from prefect.states import Crashed

    ancestor = await _unfinished_parent(client, run)
    if ancestor is not None:  # sub-flows send no heartbeats of their own: only the root can tell
        raise OpsError(f"flow run {run.id} is a sub-flow of flow run {ancestor.id} ({ancestor.name}), which is still "
                       f"{ancestor.state.type.value}; run `know resume {ancestor.id}` instead")
    tree = await _run_tree(client, run)
    task_runs = await _orphan_task_runs(client, [fr.id for fr in tree])
    alive = await liveness(client, tree, task_runs)
    threshold = stale_after_seconds()
    state = run.state.type.value
    if not force and alive.age_s < threshold:
        raise OpsError(
            f"flow run {run.id} is {state} and showed a sign of life {alive.age_s:.0f}s ago ({alive.what}); "
            f"it may still be running. If its worker is gone (killed, machine down), `know resume {run.id}` "
            f"recovers it once it has been silent for {threshold:.0f}s ({STALE_HEARTBEATS} heartbeat intervals), "
            f"or now with --force")
    age = "never" if alive.last_seen is None else f"{alive.age_s:.0f}s ago ({alive.what})"
    message = f"Marked Crashed by know resume: {state} with no sign of life since {age}; its worker is gone"
    if force and alive.age_s < threshold:
        message = f"Marked Crashed by know resume --force ({state}, last sign of life {age})"
    for tr in task_runs:
        await client.set_task_run_state(tr.id, Crashed(message=message), force=True)
    for fr in reversed(tree):  # subflows before their parent
        await client.set_flow_run_state(fr.id, Crashed(message=message), force=True)
    if notify:
        notify(f"flow run {run.id} was {state}, last sign of life {age}: marked it Crashed, with "
               f"{len(tree) - 1} subflow run(s) and {len(task_runs)} task run(s)")


async def _aresume(flow_run_id: str, force: bool = False, notify: Callable[[str], None] | None = None):
    """What `prefect flow-run retry` does (Prefect 3.8 cli/flow_run.py), as a function, plus the
    recovery of a run orphaned by a dead worker.

    A run of a deployment is forced back to Scheduled and its worker picks it up again;
    finished work is reused (complete runs in the store, cached task results). A run
    without a deployment (a local `know ...` command) is re-run here, in this process.
    A RUNNING/CANCELLING/PENDING run is first marked Crashed (`_recover_orphan`) when it has
    been silent for `stale_after_seconds()` (or with `force`). Task runs that a finished run
    left RUNNING or PENDING (its process died) are marked Crashed too.
    Returns ("scheduled", "SCHEDULED") or ("local", (flow run, flow name)).
    """
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.responses import SetStateStatus
    from prefect.exceptions import ObjectNotFound
    from prefect.states import Crashed, Scheduled

    try:
        run_uuid = UUID(str(flow_run_id))
    except ValueError:
        raise OpsError(f"{flow_run_id!r} is not a flow-run id (a UUID, as shown by `know submit` or the UI)") from None
    async with get_client() as client:
        try:
            run = await client.read_flow_run(run_uuid)
        except ObjectNotFound:
            raise OpsError(f"flow run {flow_run_id} not found on {require_server_or_ephemeral()}") from None
        state = run.state.type.value if run.state else "UNKNOWN"
        if state in RECOVERABLE:
            await _recover_orphan(client, run, force, notify)
        elif state not in RETRYABLE:
            raise OpsError(f"flow run {flow_run_id} is {state}; only finished runs (failed, crashed, cancelled, "
                           "completed) and runs whose worker is gone (running, cancelling) can be resumed")
        else:  # a finished run whose process died mid-task leaves its task and subflow runs open: close them
            tree = await _run_tree(client, run)
            crashed = Crashed(message=f"Marked Crashed by know resume: its flow run was {state}")
            for tr in await _orphan_task_runs(client, [fr.id for fr in tree]):
                await client.set_task_run_state(tr.id, crashed, force=True)
            for fr in reversed(tree[1:]):
                await client.set_flow_run_state(fr.id, crashed, force=True)
        if run.deployment_id:
            result = await client.set_flow_run_state(run.id, Scheduled(message="Resumed via know resume"), force=True)
            if result.status == SetStateStatus.ABORT:
                raise OpsError(f"flow run {flow_run_id} could not be resumed: {result.details.reason}")
            return "scheduled", "SCHEDULED"
        flow = await client.read_flow(run.flow_id)
        run = await client.read_flow_run(run_uuid)
    return "local", (run, flow.name)


def require_server_or_ephemeral() -> str:
    from prefect.settings import get_current_settings

    return get_current_settings().api.url or "the local (ephemeral) Prefect database"


def _run_locally(run, flow_name: str) -> str:
    """Re-run a deployment-less flow run in this process, like `prefect flow-run retry --entrypoint`."""
    from prefect.client.orchestration import get_client
    from prefect.flow_engine import run_flow
    from prefect.states import Scheduled
    from prefect.utilities.asyncutils import run_coro_as_sync
    from prefect.utilities.callables import get_call_parameters, parameters_to_args_kwargs

    if flow_name not in FLOWS:
        raise OpsError(f"flow run {run.id} is a {flow_name!r} run without a deployment; retry it with "
                       f"`prefect flow-run retry {run.id} --entrypoint <module:flow>`")
    flow = load_entrypoint(FLOWS[flow_name])

    async def reschedule():
        async with get_client() as client:
            await client.set_flow_run_state(run.id, Scheduled(message="Resumed via know resume (local)"), force=True)
            return await client.read_flow_run(run.id)

    run = run_coro_as_sync(reschedule())
    args, kwargs = parameters_to_args_kwargs(flow.fn, run.parameters or {})
    state = run_flow(flow=flow, flow_run=run, return_type="state",
                     parameters=get_call_parameters(flow.fn, args, kwargs))
    return state.type.value


def resume(flow_run_id: str, force: bool = False, notify: Callable[[str], None] | None = None) -> tuple[str, str]:
    """Retry a failed or crashed flow run, or one left RUNNING/CANCELLING by a dead worker (see
    `_aresume`; `force` skips the staleness check, `notify` hears what was marked Crashed).
    Returns (how, state): ('scheduled', 'SCHEDULED') for a deployment run (its worker runs it
    again), ('local', final state) for a local run."""
    from prefect.utilities.asyncutils import run_coro_as_sync

    how, detail = run_coro_as_sync(_aresume(flow_run_id, force, notify))
    if how == "local":
        return how, _run_locally(*detail)
    return how, detail


@dataclass
class ScheduleInfo:
    """One deployment schedule as the server holds it after `set_schedule`."""

    deployment: str  # flow-name/deployment-name
    slug: str
    schedule_id: str
    active: bool
    changed: bool  # False: it was already so
    parameters: dict[str, Any]
    schedule: str  # e.g. "cron 0 2 * * * (UTC)"


def _describe_schedule(schedule) -> str:
    sch = schedule.schedule
    for attr, label in (("cron", "cron"), ("interval", "every"), ("rrule", "rrule")):
        value = getattr(sch, attr, None)
        if value:
            tz = getattr(sch, "timezone", None)
            return f"{label} {value}" + (f" ({tz})" if tz else "")
    return str(sch)


async def _aset_schedule(deployment_name: str, slug: str, active: bool) -> ScheduleInfo:
    from uuid import UUID

    from prefect.client.orchestration import get_client

    name, _ = _deployment_name(deployment_name)
    async with get_client() as client:
        deployment = await _read_deployment(client, name)
        if deployment is None:
            raise OpsError(f"no deployment {name!r} on the server; deploy with `prefect deploy --all` from the repo root "
                           f"(stages: {', '.join(STAGES)})")
        schedules = list(deployment.schedules or [])
        listing = ", ".join(f"{s.slug or s.id} ({_describe_schedule(s)})" for s in schedules) or "none"
        if slug:
            picked = [s for s in schedules if s.slug == slug or str(s.id) == slug]
        else:
            picked = schedules if len(schedules) == 1 else []
        if len(picked) != 1:
            what = f"no schedule {slug!r}" if slug else f"{len(schedules)} schedules"
            raise OpsError(f"deployment {deployment.name!r} has {what}; name one of: {listing}")
        schedule = picked[0]
        flow = await client.read_flow(deployment.flow_id)
        full = f"{flow.name}/{deployment.name}"
        parameters = dict(schedule.parameters or {})
        changed = schedule.active != active
        if changed:
            # The server's DeploymentScheduleUpdate defaults `parameters` to {} and writes it, so an
            # update of `active` alone (what `prefect deployment schedule resume|pause` sends) wipes
            # the schedule's parameters. Send them back with it.
            await client.update_deployment_schedule(deployment.id, schedule.id, active=active, parameters=parameters)
        after = next((s for s in (await client.read_deployment(deployment.id)).schedules or []
                      if s.id == UUID(str(schedule.id))), None)
        if after is None or after.active != active or dict(after.parameters or {}) != parameters:
            raise OpsError(f"schedule {schedule.slug or schedule.id} of {full} did not take the change: the server holds "
                           f"active={getattr(after, 'active', None)}, parameters={getattr(after, 'parameters', None)}")
        return ScheduleInfo(full, schedule.slug or "", str(schedule.id), active, changed, parameters,
                            _describe_schedule(after))


def set_schedule(deployment: str, slug: str = "", active: bool = True) -> ScheduleInfo:
    """Switch a deployment schedule on or off, keeping its parameters; verified by reading it back.

    `deployment`: a stage (collect), a deployment name (know-collect) or flow/deployment;
    `slug`: the schedule's slug (nightly-meta-data) or id, optional when it has one schedule."""
    from prefect.utilities.asyncutils import run_coro_as_sync

    require_server()
    return run_coro_as_sync(_aset_schedule(deployment, slug, active))


async def await_final(flow_run_id: str, timeout: float | None = None):
    """Wait until the flow run is final (completed, failed, crashed, cancelled) and return it.

    Event-driven like `prefect.flow_runs.wait_for_flow_run` (it subscribes to the run's
    state events), but robust to a run that was just retried: the subscription replays the
    last minute of events, including the *previous* attempt's Failed, so every final-looking
    event is checked against the run's current state before returning.
    """
    from uuid import UUID

    import anyio
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.events.clients import get_events_subscriber
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

    final = {StateType.COMPLETED, StateType.FAILED, StateType.CRASHED, StateType.CANCELLED}
    run_uuid = UUID(str(flow_run_id))
    event_filter = EventFilter(event=EventNameFilter(prefix=["prefect.flow-run"]),
                               resource=EventResourceFilter(id=[f"prefect.flow-run.{run_uuid}"]))
    async with get_client() as client:
        with anyio.fail_after(timeout):
            async with get_events_subscriber(filter=event_filter) as events:
                run = await client.read_flow_run(run_uuid)  # after subscribing: no event is missed
                if run.state and run.state.type in final:
                    return run
                async for event in events:
                    state_type = event.resource.get("prefect.state-type")
                    if state_type and StateType(state_type) in final:
                        run = await client.read_flow_run(run_uuid)
                        if run.state and run.state.type in final:
                            return run
    raise TimeoutError(f"flow run {flow_run_id} did not finish")  # pragma: no cover - fail_after raises first


def wait(flow_run_id: str, timeout: float | None = None):
    """Block until the flow run is final; returns the FlowRun (see `await_final`)."""
    from prefect.utilities.asyncutils import run_coro_as_sync

    return run_coro_as_sync(await_final(flow_run_id, timeout))
