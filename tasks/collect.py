"""Collection tasks: train one forgetting trajectory, or one pre-trained start point.

The store is the cache here: a run whose status is `complete` is skipped (its chunks are
not touched), a `running` or `failed` one is wiped and restarted. That makes a retried or
resumed flow run continue where it stopped, even after the worker process was killed.

One writer per run: a task takes the run's lease (storage/lease.py) before writing it. A run
that a live process is writing is waited for, then skipped once complete (or taken over if
that process dies); it is never wiped under its writer. Checkpoints are leased the same way,
so two experiments that need the same pre-trained start train it once.
"""
from __future__ import annotations

import time

import numpy as np
import torch
from prefect import task

from know_core.data import subset_sizes
from know_core.layout import flatten_state, param_layout, unflatten_state
from know_core.models import ModelSpec, build_seeded
from know_core.errors import NonFinite, StoreState
from know_core.train import (AdamState, TrainConfig, accuracy, iter_trajectory, pick_device, train_epochs,
                             train_until_plateau)
from storage.lease import Lease, LeaseLost
from storage.records import CheckpointInfo
from storage.trajectory import TrajectoryStore, config_hash

from .common import run_logger, retry_unless_bad_input, set_torch_threads
from .specs import DataSpec, ModelChoice, RunSpec


@task(name="train-trajectory", retries=1, retry_delay_seconds=1, retry_condition_fn=retry_unless_bad_input,
      task_run_name="trajectory-{spec.model}-{spec.dataset}-seed{spec.seed}")
def collect_run(store_url: str, spec: RunSpec, device: str = "auto", threads: int = 1) -> str:
    """Train one trajectory and stream each stage's weights into the store. Returns the run id.

    threads: torch threads (1 in a fan-out; 0 = every core for a run that trains alone)."""
    log = run_logger()
    set_torch_threads(threads)
    store = TrajectoryStore(store_url)
    run_id = spec.run_id
    if store.run_status(run_id) == "complete":
        log.info("run %s already complete: skipped", run_id)
        return run_id

    data = spec.load("train")
    cfg = spec.trajectory_config(device)
    cfg.validate(len(data))  # bad input fails here, before anything is written
    while True:
        lease = store.lease_run(run_id, log=log)  # waits while another live process writes the run
        if lease is None:
            log.info("run %s already complete (written by another process): skipped", run_id)
            return run_id
        with lease:
            try:
                return _write_run(store, spec, data, cfg, lease, log)
            except LeaseLost as e:  # another writer took it over: wait for it, as for any live writer
                log.warning("%s; waiting for that writer", e)


def _write_run(store: TrajectoryStore, spec: RunSpec, data, cfg, lease: Lease, log) -> str:
    """Train the run from scratch into the store, holding its lease."""
    run_id = spec.run_id
    status = store.run_status(run_id)
    if status is not None:
        gone = f" (took over the lease of {lease.previous}: that writer is gone)" if lease.previous else ""
        log.info("run %s was %r: restarting it from scratch%s", run_id, status, gone)
    model = spec.build_model(data)
    adam = None
    if spec.start:
        vec, layout0, _ = store.load_checkpoint(spec.start)
        model.load_state_dict(unflatten_state(vec, layout0))
        if spec.optimizer == "carry" and spec.mode == "sequential":
            adam = store.load_optimizer_state(spec.start)
            if adam is None and spec.start.startswith("pre-"):  # a user's file (file-…) has none: empty moments
                raise StoreState(f"checkpoint {spec.start} has no Adam state to carry (it predates the carry regime); "
                                 "re-run its pre-training (`know trajectory` does) or use --optimizer fresh")
    layout = param_layout(model)
    sizes = subset_sizes(len(data), cfg.r, cfg.stages)
    store.begin_run(run_id, spec.run_info(data, sizes), layout, cfg.stages)
    t0 = time.perf_counter()
    try:
        stages = iter_trajectory(model, data, cfg, start_trained=bool(spec.start), optimizer_state=adam)
        for k, vec in stages:
            if not np.isfinite(vec).all():
                raise NonFinite(f"run {run_id}: stage {k} produced non-finite weights (lr={spec.lr} too high?)")
            store.append_stage(run_id, k, vec)
            log.info("run %s: stage %d/%d written (|D%d|=%d, %.1fs)", run_id, k + 1, cfg.stages, k, sizes[k],
                     time.perf_counter() - t0)
        store.finish_run(run_id, train_seconds=round(time.perf_counter() - t0, 3))
    except LeaseLost:
        raise  # the run is the new writer's now: not ours to mark failed
    except BaseException as e:
        store.fail_run(run_id, f"{type(e).__name__}: {e}")
        raise
    return run_id


class PretrainSpec(ModelChoice):
    """A source model pre-trained on D0 (the Θ0 of the target trajectory, method §2)."""

    model: str
    width: int
    epochs: int
    lr: float
    batch_size: int
    seed: int
    augment: bool
    patience: int = 0  # > 0: until the validation accuracy plateaus, `epochs` the cap (know_core.train.train_until_plateau)
    val_fraction: float = 0.0  # with patience: the share of the training split held out for validation

    @property
    def checkpoint_id(self) -> str:
        return "pre-" + config_hash(self.hashed())  # model_kwargs/head only when set: old ids stay


@task(name="pretrain", retries=1, retry_delay_seconds=1, retry_condition_fn=retry_unless_bad_input,
      task_run_name="pretrain-{spec.model}-{spec.dataset}-seed{spec.seed}")
def pretrain(store_url: str, spec: PretrainSpec, device: str = "auto", threads: int = 0) -> str:
    """Pre-train a model on the source data (all of it, or all but its validation split when
    spec.patience is set) and keep its checkpoint in the store."""
    log = run_logger()
    set_torch_threads(threads)
    store = TrajectoryStore(store_url)
    ckpt = spec.checkpoint_id

    def usable() -> bool:  # complete with its Adam state, from the record alone (the moments are read when used)
        rec = store.checkpoint(ckpt)
        return rec is not None and rec.is_complete and rec.adam_step is not None

    if usable():
        log.info("checkpoint %s already complete: skipped", ckpt)
        return ckpt
    record = store.checkpoint(ckpt)
    if record is not None and record.is_complete:
        log.info("checkpoint %s has no Adam state (written before the carry regime): pre-training it again", ckpt)

    lease = store.lease_checkpoint(ckpt, done=usable, log=log)  # waits while another process pre-trains it
    if lease is None:
        log.info("checkpoint %s already complete (pre-trained by another process): skipped", ckpt)
        return ckpt
    with lease:
        return _pretrain(store, spec, device, log)


def _pretrain(store: TrajectoryStore, spec: PretrainSpec, device: str, log) -> str:
    """Pre-train and save the checkpoint, holding its lease."""
    ckpt = spec.checkpoint_id
    data = spec.load("train")
    mspec = spec.model_spec(data)
    model = build_seeded(mspec, spec.seed)
    tcfg = TrainConfig(spec.lr, spec.batch_size, spec.epochs, spec.seed, spec.augment, device)
    t0 = time.perf_counter()
    model.to(pick_device(device))
    opt = torch.optim.Adam(model.parameters(), lr=spec.lr)  # kept: a `carry` trajectory continues with it
    plateau = {}
    if spec.patience:
        train, val = data.holdout(spec.val_fraction, seed=spec.seed)  # Θ0 never trains on its validation images
        def progress(e: int, loss: float, acc: float) -> None:
            log.info("pretrain epoch %d (cap %d) loss %.4f, source validation accuracy %.4f", e + 1, spec.epochs, loss, acc)

        result = train_until_plateau(model, train, val, tcfg, spec.patience, optimizer=opt, on_epoch=progress)
        plateau = dict(epochs_run=result.epochs_run, best_epoch=result.best_epoch, val_acc=result.val_acc)
        log.info("pretrain: %d epochs run, epoch %d kept (validation accuracy %.4f on %d held-out images)",
                 result.epochs_run, result.best_epoch + 1, result.val_acc[result.best_epoch], len(val))
    else:
        train_epochs(model, data, tcfg, optimizer=opt,
                     on_epoch=lambda e, loss: log.info("pretrain epoch %d/%d loss %.4f", e + 1, spec.epochs, loss))
    test_acc = accuracy(model, spec.load("test"), device=device)
    layout = param_layout(model)
    store.save_checkpoint(ckpt, flatten_state(model.state_dict(), layout), layout, CheckpointInfo(
        spec=spec.model_dump(), model_spec=mspec.__dict__, test_acc=test_acc,
        train_seconds=round(time.perf_counter() - t0, 3), device=str(pick_device(device)), **plateau,
    ), optimizer=AdamState.of(opt, model))
    log.info("checkpoint %s saved: source test accuracy %.4f", ckpt, test_acc)
    return ckpt
