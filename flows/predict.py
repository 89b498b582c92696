"""Meta-training and prediction flows.

    from flows.predict import MetaTrainParams, meta_train_known, PredictParams, predict_weights
    meta_train_known(MetaTrainParams(store="runs.zarr", out="known"))
    predict_weights(PredictParams(store="runs.zarr", run_id="…", known="known"))
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
from prefect import flow
from pydantic import Field

from storage.trajectory import TrajectoryStore
from tasks.meta import MetaSpec, eligible_runs, meta_report, pick_default, train_known_set
from tasks.predict import PredictSpec, predict_run

from .common import resume_hint


class MetaTrainParams(MetaSpec):
    """Flat parameters of the meta-training flow (see MetaSpec for each field)."""


def meta_data_sets(spec: MetaSpec) -> list[str]:
    """The main meta-data set, plus one per mode when comparing and both modes have runs."""
    sets = [spec.meta_data]
    if spec.compare_modes and spec.meta_data == "all":
        store = TrajectoryStore(spec.store)
        # modes of the runs that train the main set: excluded or too-short runs don't count, else
        # one mode left would be trained twice (as 'all' and as itself)
        modes = sorted(set(eligible_runs(store, spec, spec.meta_data)["mode"]))
        for mode in modes if len(modes) > 1 else []:
            try:
                eligible_runs(store, spec, mode)
                sets.append(mode)
            except ValueError:  # too few runs of that mode to split
                pass
    return sets


@flow(name="meta-train-known", log_prints=True)
def meta_train_known(params: MetaTrainParams = MetaTrainParams()) -> dict:
    """Meta-train KNOWN (raw and min-max scaling) on complete runs; write models and the L1 table."""
    with resume_hint("meta-train-known"):
        spec = MetaSpec(**params.model_dump())
        eligible_runs(TrajectoryStore(spec.store), spec, spec.meta_data)  # fail fast on bad input
        tables, run_tables, dirs = [], [], []
        for meta_data in meta_data_sets(spec):
            model_dirs = [train_known_set(spec, meta_data, scaling) for scaling in ("raw", "minmax")]
            dirs += model_dirs
            table, runs = meta_report(spec, meta_data, model_dirs)
            tables.append(table)
            run_tables.append(runs.assign(meta_data=meta_data))
        table = pd.concat(tables, ignore_index=True)
        runs = pd.concat(run_tables, ignore_index=True)
        scaling = pick_default(spec, table, dirs)
        out = Path(spec.out)
        table.to_csv(out / "val_l1.csv", index=False)
        runs.to_csv(out / "runs.csv", index=False)
        print(f"default KNOWN: {spec.meta_data} meta-data, {scaling} scaling -> {out / 'known.pt'}")
        return {"out": str(out), "scaling": scaling, "table": table.to_dict("records")}


class PredictParams(PredictSpec):
    """Flat parameters of the prediction flow (see PredictSpec)."""


@flow(name="predict-weights", log_prints=True)
def predict_weights(params: PredictParams) -> str:
    """Predict x(1/r)^k weights of one run with one predictor into the store."""
    with resume_hint("predict-weights"):
        return predict_run(PredictSpec(**params.model_dump()))
