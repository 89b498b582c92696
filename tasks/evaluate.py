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

import numpy as np
import torch
from prefect import task
from pydantic import BaseModel, Field

from know_core.data import ImageData, balanced_split, balanced_subset
from know_core.evaluate import FinetuneConfig, finetune, linear_probe, recalibrate_bn
from know_core.layout import PREDICTED_KINDS, unflatten_state
from know_core.models import ModelSpec, build_from_spec, build_seeded
from know_core.predict import shrink_control
from know_core.train import pick_device
from storage.results import save_text
from storage.trajectory import TrajectoryStore, config_hash

from .common import retry_unless_bad_input, run_logger, set_torch_threads
from .predict import PredictSpec, predictor_config, window_rows
from .specs import DataSpec


class TargetSpec(DataSpec):
    """The downstream task: a balanced training subset and the full test split."""

    train_size: int = Field(2000, description="Balanced training images of the target task")
    val_fraction: float = Field(0.2, description="Held out of the training set to choose naive-lr's learning rate")
    subset_seed: int = Field(0, description="Seed of the balanced subset and of the validation split")

    def splits(self, split: str) -> tuple[ImageData, ImageData]:
        """('test') train subset + test split, or ('val') train-minus-val + val."""
        train = self.load("train")
        train = train.take(balanced_subset(train.y, self.train_size, self.subset_seed))
        if split == "test":
            return train, self.load("test")
        tr, va = balanced_split(train.y, self.val_fraction, self.subset_seed)
        return train.take(tr), train.take(va)


class CellSpec(BaseModel):
    out: str = Field(..., description="Experiment directory (cells are cached under <out>/cells)")
    store: str
    run_id: str = Field(..., description="Target run: Θ0 is its stage 0, predictions hang off it")
    method: str
    factor: float = 1.0
    source: str = Field("theta0", description="theta0 | scratch | ckpt:<id> | a prediction name in the store")
    step: int = 0
    shrink: bool = Field(False, description="Shrink control: Θ0 scaled per tensor towards `source` at `step`")
    seed: int = 0
    split: str = Field("test", description="test: evaluate on the test split; val: on the held-out validation split")
    target: TargetSpec = TargetSpec()
    phase1_epochs: int = 2
    phase2_epochs: int = 8
    lr1: float = 1e-3
    lr2: float = 4e-4
    batch_size: int = 128
    recalibrate: bool = Field(True, description="Re-estimate BN statistics on target images before fine-tuning (every method)")
    probe: bool = True
    device: str = "auto"


def start_state(store: TrajectoryStore, spec: CellSpec) -> tuple[ModelSpec, dict[str, torch.Tensor]]:
    """The start weights of a cell, as a complete state_dict for the run's model class."""
    attrs = store.require_run(spec.run_id)
    mspec = ModelSpec(**attrs["model_spec"])
    layout = store.layout(spec.run_id)
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
    if path.exists():
        log.info("cell %s x%g seed %d (%s): cached", spec.method, spec.factor, spec.seed, spec.split)
        return json.loads(path.read_text())
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
def target_diagnostics(store_url: str, run_id: str, predictors: dict[str, PredictSpec], window: int = 5) -> list[dict]:
    """Each predictor's L1 on the target's own held-out windows: predict stage k from k+1..k+window.

    `predictors` maps a label to a PredictSpec. Rows also carry the trajectory's step coherence.
    """
    from know_core.meta import per_kind_coherence, step_coherence
    from know_core.predict import predict_next, sizes_from_stages, window_from_stages

    configs = {label: predictor_config(p)[0] for label, p in predictors.items()}
    store = TrajectoryStore(store_url)
    attrs = store.require_run(run_id)
    traj = store.read_stages(run_id)
    layout = store.layout(run_id)
    sizes = attrs["stage_subset_sizes"]
    rows = []
    for k in range(0, traj.shape[0] - window):
        target = traj[k]
        rows_stages = traj[k + 1 : k + 1 + window]
        for label, cfg in configs.items():
            need = window_rows(cfg.name)
            w = window_from_stages(torch.from_numpy(rows_stages[:need].copy()), need)
            sz = sizes_from_stages(sizes[k + 1 : k + 1 + need], need)
            err = {kind: [] for kind in PREDICTED_KINDS}
            for s in layout:
                if s.kind not in PREDICTED_KINDS:
                    continue
                pred = predict_next(cfg, w[:, s.offset : s.stop], s.kind, sz).numpy()
                err[s.kind].append(np.abs(pred - target[s.offset : s.stop]))
            for kind, parts in err.items():
                if parts:
                    e = np.concatenate(parts)
                    rows.append({"predictor": label, "held_out_stage": k, "kind": kind, "l1": float(e.mean()), "n": int(e.size)})
            allv = np.concatenate([np.concatenate(p) for p in err.values() if p])
            rows.append({"predictor": label, "held_out_stage": k, "kind": "all", "l1": float(allv.mean()), "n": int(allv.size)})
    coh = {"coherence": step_coherence(traj), **{f"coherence_{k}": v for k, v in per_kind_coherence(traj, layout).items()}}
    for r in rows:
        r.update(coh)
    return rows
