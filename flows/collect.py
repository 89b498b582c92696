"""Collection flows: a sweep of meta-trajectories, and the target model's trajectory.

    from flows.collect import CollectParams, collect_trajectories
    run_ids = collect_trajectories(CollectParams(store="runs.zarr", runs=4, stages=5))

The settings are params.collect.CollectParams; the target trajectory is flows.trajectory.
"""
from __future__ import annotations

import numpy as np
from prefect import flow
from prefect.futures import wait
from prefect.utilities.annotations import unmapped

from know_core.errors import BadInput, KnowError
from know_core.train import SweepRanges, sample_hyperparameters
from params.collect import CollectParams
from params.common import RunnerFields
from storage.trajectory import TrajectoryStore
from tasks.collect import collect_run
from tasks.specs import DataSpec, RunSpec

from .common import gpu_annotation, make_runner, resume_hint


def plan_sweep(p: CollectParams) -> list[RunSpec]:
    """The run specs of a sweep; pure and seeded, so a re-run plans the same run ids.

    Raises BadInput before anything is written when the data cannot give the sweep (e.g. a
    batch that does not fit the smallest subset)."""
    base = dict(dataset=p.dataset, data_dir=p.data_dir, classes=p.classes, limit=p.limit, stages=p.stages,
                epochs_per_stage=p.epochs_per_stage, mode=p.mode, optimizer=p.optimizer, width=p.width,
                model_kwargs=p.model_kwargs, head=p.head)
    n = len(DataSpec(dataset=p.dataset, data_dir=p.data_dir, classes=p.classes, limit=p.limit).load("train"))
    specs: list[RunSpec] = []
    if p.sweep == "grid":
        for m in p.model_list():
            for r in p.r_grid():
                for lr in p.lr_grid():
                    for i in range(p.runs):
                        specs.append(RunSpec(model=m, r=r, lr=lr, batch_size=p.grid_batch(), seed=p.seed * 10007 + i,
                                             **base))
        for s in specs:  # the grid's fixed batch must fit every run's smallest subset
            s.trajectory_config().validate(n)
        return specs
    rng = np.random.default_rng(p.seed)
    ranges = SweepRanges(*p.r_bounds(), *p.lr_bounds(), *p.batch_bounds())
    for m in p.model_list():
        for i in range(p.runs):
            r, lr, batch = sample_hyperparameters(n, p.stages, ranges, rng)
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
        try:
            failed[0][1].result()
        except KnowError as e:  # a domain error stays one: the CLI shows it as one line
            raise type(e)(f"{len(failed)} of {len(specs)} runs failed; first, run {failed[0][0]}: {e}") from e
        except BaseException as e:  # a bug keeps its traceback (chained)
            raise RuntimeError(f"{len(failed)} of {len(specs)} runs failed; first, run {failed[0][0]}: "
                               f"{type(e).__name__}: {e}") from e
        raise RuntimeError(f"{len(failed)} of {len(specs)} runs failed; first, run {failed[0][0]}: "
                           f"{failed[0][1].name}")  # pragma: no cover
    return [f.result() for f in futures]


def fan_out(store: str, specs: list[RunSpec], rp: RunnerFields) -> list[str]:
    TrajectoryStore(store).prepare()  # parent groups exist before any writer starts
    runner = make_runner(rp.runner, rp.workers, rp.dask_address, gpu=rp.device.startswith("cuda"))
    return train_runs.with_options(task_runner=runner)(store, specs, rp.device, rp.runner == "dask" and rp.device.startswith("cuda"))


def preflight(params: CollectParams) -> list[RunSpec]:
    """Everything that can be checked before a flow starts: the planned runs (BadInput if not)."""
    return plan_sweep(params)


def publish_runs_table(store: str, specs: list[RunSpec]) -> None:
    """A table artifact (key `collect-runs`) of the sweep's runs and their status in the store.
    Never raises: the store holds the results, the artifact only shows them."""
    try:
        from prefect.artifacts import create_table_artifact

        st = TrajectoryStore(store)
        rows = [{"run_id": s.run_id, "model": s.model, "r": s.r, "lr": s.lr, "batch": s.batch_size,
                 "status": st.run_status(s.run_id) or "not started"} for s in specs]
        done = sum(row["status"] == "complete" for row in rows)
        create_table_artifact(rows, key="collect-runs", description=f"{done} of {len(rows)} runs complete in {store}")
    except Exception:  # noqa: BLE001 - e.g. no run context: nothing to attach the table to
        pass


@flow(name="collect-trajectories", log_prints=True)
def collect_trajectories(params: CollectParams = CollectParams()) -> list[str]:
    """Meta-data collection: a sweep of forgetting trajectories of small models (method §3)."""
    with resume_hint("collect-trajectories"):
        specs = plan_sweep(params)
        print(f"collecting {len(specs)} runs into {params.store}")
        try:
            return fan_out(params.store, specs, params)
        finally:  # failed runs too: the table shows which
            publish_runs_table(params.store, specs)
