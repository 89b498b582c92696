"""Operations against a running Prefect server: submit a stage to its deployment, resume a failed run.

    export PREFECT_API_URL=http://127.0.0.1:4200/api
    from flows.ops import submit, resume
    run_id, url = submit("collect", {"runs": "3", "stages": "6", "limit": "300"})
    resume(run_id)          # after it failed or crashed: schedules it again for its worker

`know submit` and `know resume` are thin wrappers. Parameters are validated here, with the
flow's own pydantic model, before anything reaches the server.
"""
from __future__ import annotations

import importlib
from typing import Any

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
        if any(err["type"] != "missing" for err in e.errors()):
            raise OpsError(f"parameter {describe(e, cli=False, skip_missing=True)}") from None


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


async def _aresume(flow_run_id: str):
    """What `prefect flow-run retry` does (Prefect 3.8 cli/flow_run.py), as a function.

    A run of a deployment is forced back to Scheduled and its worker picks it up again;
    finished work is reused (complete runs in the store, cached task results). A run
    without a deployment (a local `know ...` command) is re-run here, in this process.
    Returns ("scheduled", "SCHEDULED") or ("local", (flow run, flow name)).
    """
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.responses import SetStateStatus
    from prefect.exceptions import ObjectNotFound
    from prefect.states import Scheduled

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
        if state not in RETRYABLE:
            raise OpsError(f"flow run {flow_run_id} is {state}; only finished runs (failed, crashed, cancelled, "
                           "completed) can be resumed")
        if run.deployment_id:
            result = await client.set_flow_run_state(run.id, Scheduled(message="Resumed via know resume"), force=True)
            if result.status == SetStateStatus.ABORT:
                raise OpsError(f"flow run {flow_run_id} could not be resumed: {result.details.reason}")
            return "scheduled", "SCHEDULED"
        flow = await client.read_flow(run.flow_id)
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


def resume(flow_run_id: str) -> tuple[str, str]:
    """Retry a failed or crashed flow run. Returns (how, state): ('scheduled', 'SCHEDULED') for
    a deployment run (its worker runs it again), ('local', final state) for a local run."""
    from prefect.utilities.asyncutils import run_coro_as_sync

    how, detail = run_coro_as_sync(_aresume(flow_run_id))
    if how == "local":
        return how, _run_locally(*detail)
    return how, detail


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
