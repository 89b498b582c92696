"""The chained pipeline: collect meta-data -> record the target run -> meta-train KNOWN ->
predict, one deployment per stage.

Each stage runs as its own flow run of its own deployment (so each can go to its own work
pool, e.g. collection on `know-gpu`), started with `run_deployment` and an idempotency key.
The key is derived from the stage's parameters *and the content of what it reads*, known
once the stage before it has completed:

    collect, target   the parameters (the data set is fixed by them)
    meta-train        + every eligible run's id and completion stamp
    predict           + the prediction's input hash (the target run's id and completion
                        stamp, the predictor options, the sha256 of the KNOWN file)

A stage run found under its key is reused only when its products are still current for
those inputs (the planned runs are complete; `<known_out>/known.pt` was trained on these
runs with these settings; the stored prediction carries this input hash). When another
run has overwritten them since (a pipeline with other settings and the same `known_out`),
the next attempt key (`<key>:again<n>`) starts a fresh stage run, which recomputes them.
So re-running the pipeline, or retrying it, reuses the stage flow runs whose products are
current, waits for the ones still running and retries the ones that failed; it never starts
a duplicate. Waiting is event-driven (`flows.ops.wait` subscribes to the run's state
events), not a poll loop. When it ends (also when a stage failed) the pipeline run publishes a
markdown artifact `pipeline-stages`: each stage run's name, state, id and link in the UI.

The target run (unless `target_run` names one) is recorded at the fixed sampling rate
`target_r` (0.5 unless set), so its prediction's step k acts as (1/target_r)^k times its data.

Needs a Prefect server with the `know-*` deployments (`prefect deploy --all`, see
docs/operations.md):

    from prefect.deployments import run_deployment
    run_deployment("collect-and-enhance/know-pipeline",
                   parameters={"params": {"runs": 3, "stages": 6, "limit": 300}})
"""
from __future__ import annotations

from typing import Callable

from prefect import flow, get_run_logger
from prefect.deployments import run_deployment
from pydantic import BaseModel

from know_core.data import subset_sizes
from know_core.errors import KnowError
from params.collect import CollectParams
from params.pipeline import PipelineParams
from params.predict import MetaTrainParams, PredictParams
from storage.trajectory import TrajectoryStore, config_hash

from .collect import plan_sweep
from .common import resume_hint


def target_params(p: PipelineParams) -> CollectParams | None:
    """The collection of the target run at the fixed rate `target_r`, or None when `target_run`
    names an existing run. One grid cell: the sweep's data and last model, the lr of the sweep's
    last run, its batch capped at the smallest subset at target_r. Pure, like stage_params."""
    if p.target_run:
        return None
    collect = p.collect_params()
    last = plan_sweep(collect)[-1]
    n = len(last.load("train"))
    smallest = subset_sizes(n, p.target_r, collect.stages)[-1]
    return CollectParams(**{**collect.model_dump(), "sweep": "grid", "models": last.model, "runs": 1,
                            "r": p.target_r, "lr": last.lr, "batch_size": max(1, min(last.batch_size, smallest))})


def stage_params(p: PipelineParams) -> tuple[CollectParams, MetaTrainParams, PredictParams]:
    """Each stage's own params model; pure, so a retry derives the same keys."""
    collect = p.collect_params()
    target = p.target_run or plan_sweep(target_params(p))[0].run_id
    meta = MetaTrainParams(store=p.store, out=p.known_out, exclude_runs=target, epochs=p.meta_epochs,
                           batch_size=p.meta_batch_size, pairs_per_run=p.pairs_per_run, seed=p.seed)
    predict = PredictParams(store=p.store, run_id=target, predictor=p.predictor, steps=p.steps, known=p.known_out)
    return collect, meta, predict


def idempotency_key(deployment: str, params: BaseModel, token: str = "", inputs: str = "") -> str:
    """Same deployment + same parameters + same input digest (+ token) -> same key -> the server
    returns the existing run. `inputs` is a content digest of what the stage reads."""
    content = params.model_dump() if not inputs else {"params": params.model_dump(), "inputs": inputs}
    return f"know:{deployment}:{config_hash(content)}" + (f":{token}" if token else "")


def attempt_key(key: str, attempt: int) -> str:
    """The key of the stage's `attempt`-th fresh run for the same inputs (0 = the key itself)."""
    return key if attempt == 0 else f"{key}:again{attempt}"


# ---------------------------------------------------------------- what each stage reads / makes

def runs_collected(p: CollectParams) -> bool:
    """The collection's products are current: every planned run is complete in the store."""
    store = TrajectoryStore(p.store)
    return all(store.run_status(s.run_id) == "complete" for s in plan_sweep(p))


def meta_inputs(meta: MetaTrainParams) -> str:
    """Digest of what meta-training reads: each eligible run's id and completion stamp."""
    from tasks.meta import eligible_runs

    runs = eligible_runs(TrajectoryStore(meta.store), meta, meta.meta_data)
    return config_hash({r.run_id: r.completed_at for r in runs})


def known_current(meta: MetaTrainParams) -> bool:
    from tasks.meta import known_is_current

    return known_is_current(meta)


def predict_inputs(predict: PredictParams) -> str:
    """The input hash the prediction carries when made now (run stamp, options, KNOWN sha256)."""
    from tasks.predict import prediction_status

    return prediction_status(predict)[0]


def prediction_current(predict: PredictParams) -> bool:
    from tasks.predict import prediction_status

    return prediction_status(predict)[1]


# ---------------------------------------------------------------- running one stage

class StageFailed(RuntimeError):
    pass


def _current(check: Callable[[], bool] | None) -> bool:
    """A product check; a store that cannot answer (a missing run or file) is not current."""
    if check is None:
        return True
    try:
        return bool(check())
    except (KnowError, OSError):
        return False


def latest_attempt(key: str, batch: int = 50) -> int:
    """The highest attempt n whose key `attempt_key(key, n)` has a flow run (0 when none has)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterIdempotencyKey
    from prefect.utilities.asyncutils import run_coro_as_sync

    async def read() -> int:
        latest, start = 0, 0
        async with get_client() as client:
            while True:
                keys = [attempt_key(key, n) for n in range(start, start + batch)]
                found = {r.idempotency_key for r in await client.read_flow_runs(
                    flow_run_filter=FlowRunFilter(idempotency_key=FlowRunFilterIdempotencyKey(any_=keys)),
                    limit=batch)}
                hits = [n for n, k in zip(range(start, start + batch), keys) if k in found]
                if hits:
                    latest = max(hits)
                if keys[-1] not in found:
                    return latest
                start += batch

    return run_coro_as_sync(read())


def run_stage(deployment: str, params: BaseModel, token: str = "", timeout_s: float = 86400, inputs: str = "",
              current: Callable[[], bool] | None = None, ran: list | None = None):
    """Start (or find) the stage's flow run for these parameters and inputs, retry it if an
    earlier attempt failed, start a fresh one if it completed but its products are no longer
    current (`current()` false), and wait for its end. The ended flow run is appended to `ran`
    (also when it failed)."""
    from .ops import resume, wait

    log = get_run_logger()
    key = idempotency_key(deployment, params, token, inputs)
    attempt = latest_attempt(key)
    while True:
        run = run_deployment(deployment, parameters={"params": params.model_dump()}, timeout=0,
                             idempotency_key=attempt_key(key, attempt))
        state = run.state
        if state is not None and state.is_completed() and not _current(current):
            log.info("%s: flow run %s completed, but its products have changed since (another run wrote them): "
                     "starting a fresh run", deployment, run.id)
            attempt += 1
            continue
        break
    if state is not None and state.is_final() and not state.is_completed():
        log.info("%s: flow run %s ended %s in an earlier attempt: retrying it", deployment, run.id, state.name)
        resume(str(run.id))
    elif state is not None and state.is_completed():
        log.info("%s: reusing completed flow run %s (its products are current for its inputs)", deployment, run.id)
    else:
        log.info("%s: flow run %s (%s)", deployment, run.id, state.name if state else "?")
    run = wait(str(run.id), timeout_s)
    if ran is not None:
        ran.append(run)
    if not run.state.is_completed():
        raise StageFailed(f"stage {deployment} ended {run.state.name} (flow run {run.id}); fix the cause, then "
                          f"`know resume {run.id}` or retry this pipeline run")
    if not _current(current):
        raise StageFailed(f"stage {deployment} completed (flow run {run.id}) but its products are not current for "
                          "its inputs: another run overwrote them meanwhile (the same store or known_out?); "
                          "retry this pipeline run")
    return run


def stages_markdown(stages: list[tuple[str, str, object]]) -> str:
    """A table of the stage runs, (stage, deployment, FlowRun) each: name, state, UI link, id.
    The link's base is Prefect's PREFECT_UI_URL (by default PREFECT_API_URL without `/api`);
    with none (or PREFECT_UI_URL="") the table gives the id only."""
    from prefect.utilities.urls import url_for

    rows = ["| stage | deployment | flow run | state | id |", "|---|---|---|---|---|"]
    for stage, deployment, run in stages:
        url = url_for("flow-run", obj_id=str(run.id))
        name = f"[{run.name}]({url})" if url else run.name
        rows.append(f"| {stage} | {deployment} | {name} | {run.state.name if run.state else '?'} | `{run.id}` |")
    return "## Stage runs of this pipeline run\n\n" + "\n".join(rows) + "\n"


def publish_stages(stages: list[tuple[str, str, object]]) -> None:
    """A markdown artifact (key `pipeline-stages`) of the stage runs so far. Never raises."""
    try:
        from prefect.artifacts import create_markdown_artifact

        done = sum(bool(run.state and run.state.is_completed()) for _, _, run in stages)
        create_markdown_artifact(stages_markdown(stages), key="pipeline-stages",
                                 description=f"{done} of {len(stages)} stage runs completed")
    except Exception:  # noqa: BLE001 - the stages ran; the artifact only points at them
        pass


@flow(name="collect-and-enhance", log_prints=True)
def collect_and_enhance(params: PipelineParams = PipelineParams()) -> dict:
    """Collect meta-trajectories and a target run at a fixed r, meta-train KNOWN on the former,
    predict enhanced weights of the latter."""
    with resume_hint("collect-and-enhance"):
        collect, meta, predict = stage_params(params)
        target = target_params(params)
        timeout, token = params.stage_timeout_hours * 3600, params.rerun_token
        runs, ran = {}, []  # stage -> flow run id; (stage, deployment, FlowRun) of each ended stage run

        def stage(name: str, deployment: str, p: BaseModel, inputs: Callable[[], str] | None,
                  current: Callable[[], bool]) -> None:
            digest = inputs() if inputs else ""  # after the stages before it: their products are final
            ended: list = []
            try:
                runs[name] = str(run_stage(deployment, p, token, timeout, digest, current, ended).id)
            finally:
                ran.extend((name, deployment, r) for r in ended)
            print(f"{name} complete: flow run {runs[name]}")

        try:
            stage("collect", params.collect_deployment, collect, None, lambda: runs_collected(collect))
            if target is not None:
                stage("target", params.collect_deployment, target, None, lambda: runs_collected(target))
            stage("meta-train", params.meta_train_deployment, meta, lambda: meta_inputs(meta),
                  lambda: known_current(meta))
            stage("predict", params.predict_deployment, predict, lambda: predict_inputs(predict),
                  lambda: prediction_current(predict))
        finally:
            if ran:
                publish_stages(ran)
        run = TrajectoryStore(params.store).require_run(predict.run_id)
        print(f"run {predict.run_id} (r={run.sampling_rate:g}): prediction {predict.output_name!r} is in {params.store}")
        return {"flow_runs": runs, "target_run": predict.run_id, "target_r": run.sampling_rate,
                "prediction": predict.output_name, "known": params.known_out, "store": params.store}
