"""Collection flows: a sweep of meta-trajectories, and the target model's trajectory.

    from flows.collect import CollectParams, collect_trajectories
    run_ids = collect_trajectories(CollectParams(store="runs.zarr", runs=4, stages=5))
"""
from __future__ import annotations

import numpy as np
from prefect import flow
from prefect.futures import wait
from prefect.utilities.annotations import unmapped
from pydantic import BaseModel, Field

from know_core.data import subset_sizes
from know_core.models import MODELS
from know_core.train import SweepRanges, sample_hyperparameters
from storage.trajectory import TrajectoryStore
from tasks.collect import PretrainSpec, collect_run, pretrain
from tasks.common import BadInput
from tasks.specs import RunSpec

from .common import gpu_annotation, make_runner, resume_hint


class RunnerParams(BaseModel):
    runner: str = Field("thread", description="Task runner for the fan-out: thread | dask")
    workers: int = Field(1, description="Parallel training runs (thread pool size or Dask worker processes)")
    dask_address: str = Field("", description="Existing Dask scheduler, e.g. tcp://127.0.0.1:8786 (runner=dask)")
    device: str = Field("auto", description="auto (CUDA when present) | cpu | cuda | cuda:N")


class CollectParams(RunnerParams):
    store: str = Field("runs.zarr", description="Trajectory store: a local path or an fsspec URL (s3://bucket/prefix)")
    dataset: str = Field("digits", description="digits | fashion-mnist | mnist5k | cifar10 | cifar100 | image-folder")
    data_dir: str = Field("", description="Directory of the data set files; empty = the default location")
    classes: str = Field("", description="Class subset, e.g. '0-4'; empty = all classes")
    limit: int = Field(0, description="Use only N training images (0 = all)")
    models: str = Field("simple-cnn", description="Comma-separated model names: simple-cnn, mlp, resnet, resnet18")
    runs: int = Field(4, description="Runs per model (random sweep) or seeds per grid cell (grid sweep)")
    stages: int = Field(7, description="Snapshots per run (the release uses 7; meta-training needs >= 6)")
    sweep: str = Field("random", description="random: r, lr, batch drawn per run (method §3); grid: products of the *_values lists")
    r_min: float = Field(0.3, description="random sweep: lower bound of r (raised where the smallest subset needs it)")
    r_max: float = Field(0.9, description="random sweep: upper bound of r")
    lr_min: float = Field(1e-5, description="random sweep: lower bound of the Adam lr")
    lr_max: float = Field(4e-3, description="random sweep: upper bound of the Adam lr")
    batch_max: int = Field(256, description="random sweep: upper bound of the batch size")
    batch_min: int = Field(32, description="random sweep: lower bound of the batch size (r is raised so the smallest subset holds it)")
    r_values: str = Field("0.5", description="grid sweep: comma-separated r values")
    lr_values: str = Field("0.001", description="grid sweep: comma-separated learning rates")
    batch_size: int = Field(32, description="grid sweep: batch size")
    epochs_per_stage: int = Field(1, description="Epochs per subset")
    mode: str = Field("independent", description="independent (each stage from the common init, as the release's meta-data) | sequential")
    seed: int = Field(0, description="Seed of the sweep's RNG; run seeds derive from it")
    width: int = Field(0, description="Model width; 0 = default")


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def plan_sweep(p: CollectParams) -> list[RunSpec]:
    """The run specs of a sweep; pure and seeded, so a re-run plans the same run ids."""
    models = [m.strip() for m in p.models.split(",") if m.strip()]
    for m in models:
        if m not in MODELS:
            raise BadInput(f"unknown model {m!r}; choose one of: {', '.join(MODELS)}")
    if p.runs < 1:
        raise BadInput(f"runs={p.runs}: need at least 1 run")
    if p.stages < 2:
        raise BadInput(f"stages={p.stages} is too few; a trajectory needs at least 2 stages")
    base = dict(dataset=p.dataset, data_dir=p.data_dir, classes=p.classes, limit=p.limit, stages=p.stages,
                epochs_per_stage=p.epochs_per_stage, mode=p.mode, width=p.width)
    specs: list[RunSpec] = []
    if p.sweep == "grid":
        rs, lrs = _floats(p.r_values), _floats(p.lr_values)
        for r in rs:
            if not 0 < r < 1:
                raise BadInput(f"sampling rate r={r} is out of range; it must satisfy 0 < r < 1")
        for m in models:
            for r in rs:
                for lr in lrs:
                    for i in range(p.runs):
                        specs.append(RunSpec(model=m, r=r, lr=lr, batch_size=p.batch_size, seed=p.seed * 10007 + i, **base))
        n = len(RunSpec(**base).load("train"))
        for s in specs:  # the grid's fixed batch must fit every run's smallest subset
            try:
                s.trajectory_config().validate(n)
            except ValueError as e:
                raise BadInput(str(e)) from None
        return specs
    if p.sweep != "random":
        raise BadInput(f"unknown sweep {p.sweep!r}; use 'random' or 'grid'")
    for bound, name in ((p.r_min, "r_min"), (p.r_max, "r_max")):
        if not 0 < bound < 1:
            raise BadInput(f"sampling rate {name}={bound} is out of range; it must satisfy 0 < r < 1")
    n = len(RunSpec(**base).load("train"))
    rng = np.random.default_rng(p.seed)
    ranges = SweepRanges(p.r_min, p.r_max, p.lr_min, p.lr_max, min(p.batch_min, p.batch_max), p.batch_max)
    for m in models:
        for i in range(p.runs):
            try:
                r, lr, batch = sample_hyperparameters(n, p.stages, ranges, rng)
            except ValueError as e:
                raise BadInput(str(e)) from None
            specs.append(RunSpec(model=m, r=round(r, 6), lr=float(f"{lr:.6g}"), batch_size=batch,
                                 seed=p.seed * 10007 + i, **base))
    return specs


@flow(name="train-runs")
def train_runs(store: str, specs: list[RunSpec], device: str = "auto", gpu: bool = False) -> list[str]:
    """Fan out one task per run; fail with a list of the failed runs after all have ended."""
    with gpu_annotation(gpu):
        futures = collect_run.map(unmapped(store), specs, unmapped(device))
    wait(futures)
    failed = [(s.run_id, f.state) for s, f in zip(specs, futures) if not f.state.is_completed()]
    if failed:
        first = failed[0][1]
        try:
            first.result()
        except BaseException as e:  # noqa: BLE001
            msg = f"{type(e).__name__}: {e}"
        else:  # pragma: no cover
            msg = first.name
        raise RuntimeError(f"{len(failed)} of {len(specs)} runs failed (first: run {failed[0][0]}: {msg})")
    return [f.result() for f in futures]


def fan_out(store: str, specs: list[RunSpec], rp: RunnerParams) -> list[str]:
    TrajectoryStore(store).prepare()  # parent groups exist before any writer starts
    runner = make_runner(rp.runner, rp.workers, rp.dask_address, gpu=rp.device.startswith("cuda"))
    return train_runs.with_options(task_runner=runner)(store, specs, rp.device, rp.runner == "dask" and rp.device.startswith("cuda"))


@flow(name="collect-trajectories", log_prints=True)
def collect_trajectories(params: CollectParams = CollectParams()) -> list[str]:
    """Meta-data collection: a sweep of forgetting trajectories of small models (method §3)."""
    with resume_hint("collect-trajectories"):
        specs = plan_sweep(params)
        print(f"collecting {len(specs)} runs into {params.store}")
        return fan_out(params.store, specs, params)


class TrajectoryParams(RunnerParams):
    store: str = Field("runs.zarr", description="Trajectory store: a local path or an fsspec URL")
    dataset: str = Field("digits", description="Source data set")
    data_dir: str = Field("", description="Directory of the data set files; empty = default")
    classes: str = Field("", description="Source classes, e.g. '0-4'; empty = all")
    limit: int = Field(0, description="Use only N training images (0 = all)")
    model: str = Field("simple-cnn", description="simple-cnn | mlp | resnet | resnet18")
    width: int = Field(0, description="Model width; 0 = default")
    pretrain_epochs: int = Field(5, description="Epochs of source pre-training (Θ0)")
    pretrain_lr: float = Field(1e-3, description="Adam lr of pre-training")
    pretrain_batch_size: int = Field(128, description="Batch size of pre-training")
    r: float = Field(0.5, description="Sampling rate of the nested subsets")
    stages: int = Field(5, description="Snapshots Θ0..Θ(S-1); use window+2 = 7 to also score predictors on held-out windows")
    lr: float = Field(1e-3, description="Adam lr of the forgetting fine-tunes (release: 1e-3)")
    batch_size: int = Field(128, description="Batch size (release: 128)")
    epochs_per_stage: int = Field(1, description="Epochs per subset (release: 1)")
    augment: bool = Field(False, description="Release augmentation (rotate/shift/zoom); off by default on CPU")
    seed: int = Field(0, description="Seed of pre-training and of the subset shuffle")


def target_specs(p: TrajectoryParams) -> tuple[PretrainSpec, RunSpec]:
    data = dict(dataset=p.dataset, data_dir=p.data_dir, classes=p.classes, limit=p.limit)
    pre = PretrainSpec(model=p.model, width=p.width, epochs=p.pretrain_epochs, lr=p.pretrain_lr,
                       batch_size=p.pretrain_batch_size, seed=p.seed, augment=p.augment, **data)
    run = RunSpec(model=p.model, width=p.width, r=p.r, stages=p.stages, lr=p.lr, batch_size=p.batch_size,
                  epochs_per_stage=p.epochs_per_stage, seed=p.seed, mode="sequential", augment=p.augment,
                  start=pre.checkpoint_id, **data)
    return pre, run


@flow(name="forgetting-trajectory", log_prints=True)
def forgetting_trajectory(params: TrajectoryParams = TrajectoryParams()) -> str:
    """The target model: pre-train Θ0 (kept as a checkpoint), then its sequential trajectory (method §2)."""
    with resume_hint("forgetting-trajectory"):
        pre, run = target_specs(params)
        if not 0 < params.r < 1:
            raise BadInput(f"sampling rate r={params.r} is out of range; it must satisfy 0 < r < 1")
        if params.stages < 2:
            raise BadInput(f"stages={params.stages} is too few; a trajectory needs at least 2 stages")
        if params.model not in MODELS:
            raise BadInput(f"unknown model {params.model!r}; choose one of: {', '.join(MODELS)}")
        n = len(run.load("train"))
        if params.batch_size > subset_sizes(n, params.r, params.stages)[-1]:
            raise BadInput(f"batch size {params.batch_size} is larger than the smallest subset "
                           f"({subset_sizes(n, params.r, params.stages)[-1]} images); lower --batch-size or use fewer stages")
        store = TrajectoryStore(params.store)
        store.prepare()
        ckpt = pretrain(params.store, pre, params.device)
        run_id = collect_run(params.store, run, params.device, threads=0)  # runs alone: every core
        print(f"target trajectory {run_id} (from checkpoint {ckpt}) is complete")
        return run_id
