"""The chained pipeline: collect meta-data -> meta-train KNOWN -> predict, one deployment per stage.

Each stage runs as its own flow run of its own deployment (so each can go to its own work
pool, e.g. collection on `know-gpu`), started with `run_deployment` and an idempotency key
derived from the stage's parameters. Re-running the pipeline with the same parameters, or
retrying it, reuses the stage flow runs that already completed, waits for the ones still
running and retries the ones that failed: it never starts a duplicate. Waiting is
event-driven (`flows.ops.wait` subscribes to the run's state events), not a poll loop.

Needs a Prefect server with the `know-*` deployments (`prefect deploy --all`, see
docs/operations.md):

    from prefect.deployments import run_deployment
    run_deployment("collect-and-enhance/know-pipeline",
                   parameters={"params": {"runs": 3, "stages": 6, "limit": 300}})
"""
from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.deployments import run_deployment
from pydantic import BaseModel

from params.collect import CollectParams
from params.pipeline import PipelineParams
from params.predict import MetaTrainParams, PredictParams
from storage.trajectory import config_hash

from .collect import plan_sweep
from .common import resume_hint


def stage_params(p: PipelineParams) -> tuple[CollectParams, MetaTrainParams, PredictParams]:
    """Each stage's own params model; pure, so a retry derives the same keys."""
    collect = p.collect_params()
    target = p.target_run or plan_sweep(collect)[-1].run_id
    meta = MetaTrainParams(store=p.store, out=p.known_out, exclude_runs=target, epochs=p.meta_epochs,
                           batch_size=p.meta_batch_size, pairs_per_run=p.pairs_per_run, seed=p.seed)
    predict = PredictParams(store=p.store, run_id=target, predictor=p.predictor, steps=p.steps, known=p.known_out)
    return collect, meta, predict


def idempotency_key(deployment: str, params: BaseModel, token: str = "") -> str:
    """Same deployment + same parameters (+ token) -> same key -> the server returns the existing run."""
    return f"know:{deployment}:{config_hash(params.model_dump())}" + (f":{token}" if token else "")


class StageFailed(RuntimeError):
    pass


def run_stage(deployment: str, params: BaseModel, token: str = "", timeout_s: float = 86400):
    """Start (or find) the stage's flow run, retry it if an earlier attempt failed, wait for its end."""
    from .ops import resume, wait

    log = get_run_logger()
    run = run_deployment(deployment, parameters={"params": params.model_dump()}, timeout=0,
                         idempotency_key=idempotency_key(deployment, params, token))
    state = run.state
    if state is not None and state.is_final() and not state.is_completed():
        log.info("%s: flow run %s ended %s in an earlier attempt: retrying it", deployment, run.id, state.name)
        resume(str(run.id))
    elif state is not None and state.is_completed():
        log.info("%s: reusing completed flow run %s", deployment, run.id)
    else:
        log.info("%s: flow run %s (%s)", deployment, run.id, state.name if state else "?")
    run = wait(str(run.id), timeout_s)
    if not run.state.is_completed():
        raise StageFailed(f"stage {deployment} ended {run.state.name} (flow run {run.id}); fix the cause, then "
                          f"`know resume {run.id}` or retry this pipeline run")
    return run


@flow(name="collect-and-enhance", log_prints=True)
def collect_and_enhance(params: PipelineParams = PipelineParams()) -> dict:
    """Collect meta-trajectories, meta-train KNOWN on them, predict enhanced weights of the target run."""
    with resume_hint("collect-and-enhance"):
        collect, meta, predict = stage_params(params)
        timeout = params.stage_timeout_hours * 3600
        runs = {}
        for stage, deployment, p in (("collect", params.collect_deployment, collect),
                                     ("meta-train", params.meta_train_deployment, meta),
                                     ("predict", params.predict_deployment, predict)):
            runs[stage] = str(run_stage(deployment, p, params.rerun_token, timeout).id)
            print(f"{stage} complete: flow run {runs[stage]}")
        print(f"run {predict.run_id}: prediction {predict.output_name!r} is in {params.store}")
        return {"flow_runs": runs, "target_run": predict.run_id, "prediction": predict.output_name,
                "known": params.known_out, "store": params.store}
