"""The meta-training stage: KNOWN (conv, fc, bias) trained on the complete runs of a store.

    from flows.meta_train import meta_train_known
    from params.predict import MetaTrainParams
    meta_train_known(MetaTrainParams(store="runs.zarr", out="known"))
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
from prefect import flow

from know_core.errors import BadInput
from params.predict import MetaTrainParams
from storage.locks import exclusive
from storage.results import save_table
from storage.trajectory import TrajectoryStore
from tasks.common import run_logger
from tasks.meta import eligible_runs, meta_provenance, meta_report, pick_default, train_known_set

from .common import resume_hint


def meta_data_sets(spec: MetaTrainParams) -> list[str]:
    """The main meta-data set, plus one per mode when comparing and both modes have runs."""
    sets = [spec.meta_data]
    if spec.compare_modes and spec.meta_data == "all":
        store = TrajectoryStore(spec.store)
        # modes of the runs that train the main set: excluded or too-short runs don't count, else
        # one mode left would be trained twice (as 'all' and as itself)
        modes = sorted({r.mode for r in eligible_runs(store, spec, spec.meta_data)})
        for mode in modes if len(modes) > 1 else []:
            try:
                eligible_runs(store, spec, mode)
                sets.append(mode)
            except BadInput:  # too few runs of that mode to split
                pass
    return sets


def publish_l1_table(table: pd.DataFrame, description: str) -> None:
    """The validation-L1 table as a table artifact (key `meta-train-val-l1`). Never raises."""
    try:
        from prefect.artifacts import create_table_artifact

        rows = [{k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()}
                for row in table.to_dict("records")]
        create_table_artifact(rows, key="meta-train-val-l1", description=description)
    except Exception:  # noqa: BLE001 - the files (val_l1.csv) are the product
        pass


def preflight(params: MetaTrainParams) -> None:
    """BadInput before any flow starts when the store cannot train KNOWN."""
    eligible_runs(TrajectoryStore(params.store), params, params.meta_data)


@flow(name="meta-train-known", log_prints=True)
def meta_train_known(params: MetaTrainParams = MetaTrainParams()) -> dict:
    """Meta-train KNOWN (raw and min-max scaling) on complete runs; write models and the L1 table."""
    with resume_hint("meta-train-known"):
        preflight(params)
        # one meta-training of a folder at a time: two study variants (or two processes) that
        # share a KNOWN folder train it once, the second finds every model up to date
        with exclusive(Path(params.out) / ".meta-train.lock", f"KNOWN {params.out}", run_logger()):
            return _meta_train(params)


def _meta_train(params: MetaTrainParams) -> dict:
    """Train (or find up to date) every KNOWN of the folder, then its tables and default."""
    tables, run_tables, dirs = [], [], []
    for meta_data in meta_data_sets(params):
        model_dirs = [train_known_set(params, meta_data, scaling) for scaling in ("raw", "minmax")]
        dirs += model_dirs
        table, runs = meta_report(params, meta_data, model_dirs)
        tables.append(table)
        run_tables.append(runs.assign(meta_data=meta_data))
    table = pd.concat(tables, ignore_index=True)
    runs = pd.concat(run_tables, ignore_index=True)
    scaling = pick_default(params, table, dirs)
    out = Path(params.out)
    save_table(table, out / "val_l1.csv")
    save_table(runs, out / "runs.csv")
    print(f"default KNOWN: {params.meta_data} meta-data, {scaling} scaling -> {out / 'known.pt'}")
    publish_l1_table(table, f"Validation L1 (lower is better); default KNOWN: {params.meta_data} meta-data, "
                            f"{scaling} scaling -> {out.resolve() / 'known.pt'}")
    provenance = meta_provenance(TrajectoryStore(params.store), params, params.meta_data)
    return {"out": str(out), "scaling": scaling, "table": table.to_dict("records"), "provenance": provenance}
