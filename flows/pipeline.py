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
from pydantic import BaseModel, Field

from storage.trajectory import config_hash

from .collect import CollectParams, plan_sweep
from .common import resume_hint
from .predict import MetaTrainParams, PredictParams


class PipelineParams(BaseModel):
    """Flat parameters of the whole chain; each stage's params model is built from them."""

    # collection (flows.collect.CollectParams)
    store: str = Field("runs.zarr", description="Trajectory store shared by all stages: a path (relative to the repo) or an fsspec URL")
    dataset: str = Field("digits", description="Meta-data set: digits | fashion-mnist | mnist5k | cifar10 | cifar100 | image-folder")
    classes: str = Field("", description="Class subset, e.g. '0-4'; empty = all classes")
    limit: int = Field(0, description="Use only N training images (0 = all)")
    models: str = Field("simple-cnn", description="Comma-separated meta models: simple-cnn, mlp, resnet, resnet18")
    runs: int = Field(4, description="Meta runs per model (random sweep of r, lr, batch; method §3)")
    stages: int = Field(7, description="Snapshots per run; meta-training needs >= 6")
    epochs_per_stage: int = Field(1, description="Epochs per subset")
    mode: str = Field("independent", description="independent (each stage from the common init) | sequential")
    seed: int = Field(0, description="Seed of the sweep (same seed = same run ids, so finished runs are reused)")
    device: str = Field("auto", description="auto (CUDA when present) | cpu | cuda | cuda:N")
    runner: str = Field("thread", description="Collection fan-out: thread | dask")
    workers: int = Field(1, description="Parallel training runs of the collection")
    dask_address: str = Field("", description="Existing Dask scheduler for runner=dask, e.g. tcp://127.0.0.1:8786")
    # meta-training (flows.predict.MetaTrainParams)
    known_out: str = Field("known", description="Output directory of the meta-trained KNOWN models")
    meta_epochs: int = Field(15, description="Max epochs per KNOWN model (early stopping usually ends sooner)")
    meta_batch_size: int = Field(4096, description="Pairs per Adam step of meta-training")
    pairs_per_run: int = Field(20000, description="Max meta-training pairs per run and kind")
    # prediction (flows.predict.PredictParams)
    target_run: str = Field("", description="Run to enhance; empty = the last run of this sweep. It is always left out of meta-training")
    predictor: str = Field("know", description="know (uses the KNOWN just trained) | know-s2 | know-s3 | know-s4 | taskvector | logfit | naive")
    steps: int = Field(3, description="Recurrent prediction steps: 3 gives x2/x4/x8 at r=0.5")
    # orchestration
    collect_deployment: str = Field("collect-trajectories/know-collect", description="Deployment of the collection stage (collect-trajectories/know-collect-gpu on a GPU box)")
    meta_train_deployment: str = Field("meta-train-known/know-meta-train", description="Deployment of the meta-training stage")
    predict_deployment: str = Field("predict-weights/know-predict", description="Deployment of the prediction stage")
    stage_timeout_hours: float = Field(24.0, description="Give up waiting for one stage after this long")
    rerun_token: str = Field("", description="Any new value starts fresh stage runs instead of reusing completed ones with the same parameters")


def stage_params(p: PipelineParams) -> tuple[CollectParams, MetaTrainParams, PredictParams]:
    """Each stage's own params model; pure, so a retry derives the same keys."""
    collect = CollectParams(store=p.store, dataset=p.dataset, classes=p.classes, limit=p.limit, models=p.models,
                            runs=p.runs, stages=p.stages, epochs_per_stage=p.epochs_per_stage, mode=p.mode,
                            seed=p.seed, device=p.device, runner=p.runner, workers=p.workers,
                            dask_address=p.dask_address)
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
