"""Downstream evaluation tasks: one (method, factor, seed) cell = one fine-tune + one linear probe.

A cell's result is a small JSON file `<out>/cells/<key>.json`, key = hash of everything that
determines it (start weights' digest, protocol, seed, target data). The folder is the cache:
a re-run, a retry or a resumed flow reuses every finished cell.
"""
from __future__ import annotations

import copy
import hashlib
import json
import time
from pathlib import Path

import torch
from prefect import task
from pydantic import BaseModel

from know_core.data import ImageData, balanced_split, balanced_subset
from know_core.diagnostics import held_out_window_l1
from know_core.known import WINDOW
from know_core.evaluate import FinetuneConfig, finetune
from know_core.probe import linear_probe, recalibrate_bn
from know_core.layout import PREDICTED_KINDS, unflatten_state
from know_core.models import ModelSpec, build_from_spec, build_seeded
from know_core.predict import shrink_control
from know_core.train import pick_device
from params.predict import KnownSource
from storage.locks import exclusive
from storage.results import save_text
from storage.trajectory import TrajectoryStore, config_hash

from .common import retry_unless_bad_input, run_logger, set_torch_threads
from .predict import predictor_config
from .specs import DataSpec


class TargetSpec(DataSpec):
    """The downstream task: a balanced training subset and the full test split."""

    train_size: int
    val_fraction: float = 0.2  # held out of the training set to choose learning rates; never the test split
    subset_seed: int = 0  # seed of the balanced subset and of the validation split

    def splits(self, split: str) -> tuple[ImageData, ImageData]:
        """('test') train subset + test split, or ('val') train-minus-val + val."""
        train = self.load("train")
        train = train.take(balanced_subset(train.y, self.train_size, self.subset_seed))
        if split == "test":
            return train, self.load("test")
        tr, va = balanced_split(train.y, self.val_fraction, self.subset_seed)
        return train.take(tr), train.take(va)


class CellSpec(BaseModel):
    """One (method, factor, seed) cell; the protocol values come from the experiment's stage model."""

    out: str  # experiment directory (cells are cached under <out>/cells)
    store: str
    run_id: str  # target run: Θ0 is its stage 0, predictions hang off it
    method: str
    factor: float = 1.0
    source: str = "theta0"  # theta0 | scratch | ckpt:<id> | a prediction name in the store
    step: int = 0
    shrink: bool = False  # shrink control: Θ0 scaled per tensor towards `source` at `step`
    seed: int
    split: str = "test"  # test: evaluate on the test split; val: on the held-out validation split
    target: TargetSpec
    phase1_epochs: int
    phase2_epochs: int
    lr1: float
    lr2: float
    batch_size: int
    recalibrate: bool = True  # re-estimate BN statistics on target images before fine-tuning (every method)
    probe: bool = True
    device: str


def start_state(store: TrajectoryStore, spec: CellSpec) -> tuple[ModelSpec, dict[str, torch.Tensor]]:
    """The start weights of a cell, as a complete state_dict for the run's model class."""
    run = store.require_run(spec.run_id)
    mspec = run.model_spec_obj()
    layout = run.layout
    if spec.source == "scratch":
        return mspec, build_seeded(mspec, spec.seed).state_dict()
    if spec.source.startswith("ckpt:"):
        vec, layout_c, _ = store.load_checkpoint(spec.source[5:])
        return mspec, unflatten_state(vec, layout_c)
    theta0 = store.read_stages(spec.run_id, 0)
    if spec.source == "theta0":
        return mspec, unflatten_state(theta0, layout)
    pred, _ = store.read_prediction(spec.run_id, spec.source, spec.step)
    if not spec.shrink:
        return mspec, unflatten_state(pred, layout)
    state = unflatten_state(theta0, layout)
    pred_state = unflatten_state(pred, layout)
    for s in layout:
        if s.kind in PREDICTED_KINDS:
            state[s.name] = shrink_control(state[s.name], pred_state[s.name])
    return mspec, state


def state_digest(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k, v in state.items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def cell_path(spec: CellSpec, digest: str) -> Path:
    key = config_hash({**spec.model_dump(exclude={"out", "store", "method", "factor", "device"}), "start": digest})
    return Path(spec.out) / "cells" / f"{key}.json"


@task(name="finetune-cell", retries=1, retry_delay_seconds=1, retry_condition_fn=retry_unless_bad_input,
      task_run_name="finetune-{spec.method}-x{spec.factor:g}-seed{spec.seed}-{spec.split}")
def finetune_cell(spec: CellSpec) -> dict:
    """Fine-tune (method §6) and linear-probe one start point; cached in <out>/cells."""
    log = run_logger()
    set_torch_threads()
    store = TrajectoryStore(spec.store)
    mspec, state = start_state(store, spec)
    path = cell_path(spec, state_digest(state))
    # one writer per cell: two rows or variants with the same start and protocol fine-tune it once
    with exclusive(path.parent / ".locks" / f"{path.stem}.lock", f"cell {path.stem}", log):
        return _cell(spec, mspec, state, path, log)


def _cell(spec: CellSpec, mspec: dict, state: dict, path: Path, log) -> dict:
    """The cached result of one cell, or its fine-tune and probe, saved to `path`."""
    if path.exists():
        log.info("cell %s x%g seed %d (%s): cached", spec.method, spec.factor, spec.seed, spec.split)
        # the same start and protocol may have been computed for another row (know-lr at the
        # fixed lr2 is the know cell): the result is shared, the row's name is this spec's
        return {**json.loads(path.read_text()), "method": spec.method, "factor": spec.factor}
    train, test = spec.target.splits(spec.split)
    model = build_from_spec(mspec)
    model.load_state_dict(state, strict=True)
    t0 = time.perf_counter()
    if spec.recalibrate:
        recalibrate_bn(model, train.x, seed=spec.seed)
    probe = linear_probe(model, (train.x, train.y), (test.x, test.y), recalibrate=False) if spec.probe else {}
    cfg = FinetuneConfig(spec.phase1_epochs, spec.phase2_epochs, spec.lr1, spec.lr2, spec.batch_size, spec.seed,
                         str(pick_device(spec.device)))
    rows = finetune(copy.deepcopy(model), train.num_classes, (train.x, train.y), (test.x, test.y), cfg)
    result = {
        "method": spec.method, "factor": spec.factor, "seed": spec.seed, "split": spec.split, "lr2": spec.lr2,
        "rows": rows, "probe": {k: v for k, v in probe.items() if isinstance(v, (int, float, bool))},
        "seconds": round(time.perf_counter() - t0, 3),
    }
    save_text(json.dumps(result), path)
    log.info("cell %s x%g seed %d (%s): final acc %.4f, probe %.4f (%.1fs)", spec.method, spec.factor, spec.seed,
             spec.split, rows[-1]["test_acc"], result["probe"].get("acc", float("nan")), result["seconds"])
    return result


@task(name="target-diagnostics")
def target_diagnostics(store_url: str, run_id: str, predictors: dict[str, KnownSource], window: int = WINDOW) -> list[dict]:
    """Each predictor's L1 on the target's own held-out windows (know_core.diagnostics), with
    the trajectory's step coherence on every row. `predictors` maps a label to its settings."""
    from know_core.pairs import per_kind_coherence, step_coherence

    configs = {label: predictor_config(p)[0] for label, p in predictors.items()}
    store = TrajectoryStore(store_url)
    run = store.require_run(run_id)
    traj = store.read_stages(run_id)
    rows = held_out_window_l1(traj, run.layout, run.stage_subset_sizes, run.sampling_rate, configs, window)
    coh = {"coherence": step_coherence(traj, run.layout), **{f"coherence_{k}": v for k, v in per_kind_coherence(traj, run.layout).items()}}
    for r in rows:
        r.update(coh)
    return rows
