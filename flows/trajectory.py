"""The target model's stage: pre-train Θ0 on the source data (kept as a checkpoint), or take
it from a state_dict file (`checkpoint`, tasks/checkpoint.py), then record its sequential
forgetting trajectory (method §2).

    from flows.trajectory import forgetting_trajectory
    from params.collect import TrajectoryParams
    run_id = forgetting_trajectory(TrajectoryParams(store="runs.zarr", model="resnet", stages=7))
"""
from __future__ import annotations

from prefect import flow

from params.collect import TrajectoryParams
from storage.trajectory import TrajectoryStore
from tasks.checkpoint import checkpoint_start, import_checkpoint, preflight_checkpoint
from tasks.collect import PretrainSpec, collect_run, pretrain
from tasks.specs import RunSpec

from .common import resume_hint


def target_specs(p: TrajectoryParams) -> tuple[PretrainSpec, RunSpec]:
    """The pre-training and the trajectory run the settings describe."""
    data = dict(dataset=p.dataset, data_dir=p.data_dir, classes=p.classes, limit=p.limit)
    model = dict(model=p.model, width=p.width, model_kwargs=p.model_kwargs, head=p.head)
    pre = PretrainSpec(**model, epochs=p.pretrain_epochs, lr=p.pretrain_lr, batch_size=p.pretrain_batch_size,
                       seed=p.seed, augment=p.augment, patience=p.pretrain_patience,
                       val_fraction=p.pretrain_val_fraction if p.pretrain_patience else 0.0, **data)
    start, sha = checkpoint_start(p.checkpoint) if p.checkpoint else (pre.checkpoint_id, "")
    run = RunSpec(**model, r=p.r, stages=p.stages, lr=p.lr, batch_size=p.batch_size,
                  epochs_per_stage=p.epochs_per_stage, seed=p.seed, mode="sequential", optimizer=p.optimizer, augment=p.augment,
                  start=start, checkpoint_sha256=sha, **data)
    return pre, run


def preflight(p: TrajectoryParams) -> RunSpec:
    """Checks that need the data (the batch must fit the smallest subset); the trajectory run."""
    _, run = target_specs(p)
    data = run.load("train")
    run.trajectory_config().validate(len(data))  # BadInput, as collect_run would raise later
    run.model_spec(data)  # the model builds and fits the data (BadInput names the problem)
    if p.checkpoint:
        preflight_checkpoint(p.checkpoint, run, data)  # a state_dict of that model, or one line naming the key
    return run


@flow(name="forgetting-trajectory", log_prints=True)
def forgetting_trajectory(params: TrajectoryParams = TrajectoryParams()) -> str:
    """The target model: pre-train Θ0 (kept as a checkpoint), then its sequential trajectory (method §2)."""
    with resume_hint("forgetting-trajectory"):
        pre, _ = target_specs(params)
        run = preflight(params)
        TrajectoryStore(params.store).prepare()
        if params.checkpoint:
            ckpt = import_checkpoint(params.store, params.checkpoint, run)
        else:
            ckpt = pretrain(params.store, pre, params.device)
        run_id = collect_run(params.store, run, params.device, threads=0)  # runs alone: every core
        print(f"target trajectory {run_id} (from checkpoint {ckpt}) is complete")
        return run_id
