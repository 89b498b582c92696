"""`know`: the command line. Every command builds a flow's pydantic params and runs the flow.

    know collect --store runs.zarr --dataset digits --model simple-cnn --runs 4 --stages 5 --seed 0
    know runs --store runs.zarr

Bad input exits with code 2 and one line on stderr that says what to fix.
"""
from __future__ import annotations

import os
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

ROOT = Path(__file__).resolve().parent
# Prefect settings must exist before prefect is imported: no analytics (no internet here),
# and a project-local home so runs, results and the ephemeral database stay with the project.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_HOME", str(ROOT / ".prefect"))
os.environ.setdefault("PREFECT_RESULTS_PERSIST_BY_DEFAULT", "true")

import cyclopts  # noqa: E402
from rich.console import Console  # noqa: E402

app = cyclopts.App(name="know", help="KNOW pipeline: collect forgetting trajectories, meta-train KNOWN, "
                   "predict knowledge-overflowed weights, evaluate them.")
console = Console(stderr=True)


class UserError(Exception):
    pass


def fail(message: str, code: int = 2) -> None:
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise SystemExit(code)


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


@contextmanager
def user_errors():
    """Turn known errors into one line + exit 2; anything else keeps its traceback."""
    from storage.trajectory import StoreError

    try:
        yield
    except (ValueError, KeyError, FileNotFoundError, StoreError, RuntimeError) as e:
        fail(_one_line(e))


@contextmanager
def watch_runs(store_url: str, run_ids: list[str], label: str = "run"):
    """A rich progress bar per run, fed by polling each run's `stages_written` in the store.

    Polling the store (not the flow) means progress also shows for Dask workers in other
    processes.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from storage.trajectory import TrajectoryStore

    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[status]}"), TimeElapsedColumn(), console=console)
    bars = {rid: progress.add_task(f"{label} {rid}", total=None, status="queued") for rid in run_ids}

    def refresh():
        store = TrajectoryStore(store_url)
        for rid, bar in bars.items():
            attrs = store.run_attrs(rid) or {}
            if attrs:
                progress.update(bar, total=attrs.get("n_stages"), completed=attrs.get("stages_written", 0),
                                status=attrs.get("status", ""))

    with polling(progress, refresh, 0.5):
        yield


@contextmanager
def polling(progress, refresh, interval: float):
    """Show `progress` and call `refresh` every `interval` s in a thread, and once at the end.

    Errors in `refresh` are swallowed: progress display must never break the run."""
    def safe_refresh():
        try:
            refresh()
        except Exception:  # noqa: BLE001
            pass

    stop = threading.Event()

    def loop():
        while not stop.wait(interval):
            safe_refresh()

    thread = threading.Thread(target=loop, daemon=True)
    with progress:
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            safe_refresh()  # one last refresh so the final state is visible


Runner = Literal["thread", "dask"]


@app.command
def collect(
    *,
    store: str = "runs.zarr",
    dataset: str = "digits",
    data_dir: str = "",
    classes: str = "",
    limit: int = 0,
    model: str = "simple-cnn",
    runs: int = 4,
    stages: int = 7,
    sweep: Literal["random", "grid"] = "random",
    r: float | None = None,
    lr: float | None = None,
    batch_size: int | None = None,
    epochs_per_stage: int = 1,
    mode: Literal["independent", "sequential"] = "independent",
    seed: int = 0,
    width: int = 0,
    runner: Runner = "thread",
    workers: int = 1,
    dask_address: str = "",
    device: str = "auto",
):
    """Collect a sweep of forgetting trajectories into a Zarr store (method §3).

    Parameters
    ----------
    store
        Trajectory store: a local directory or an fsspec URL (s3://bucket/prefix).
    dataset
        digits | fashion-mnist | mnist5k | cifar10 | cifar100 | image-folder.
    data_dir
        Directory holding the data set files (default: its standard location).
    classes
        Class subset such as '0-4'; empty for all classes.
    limit
        Use only this many training images (0 = all).
    model
        Comma-separated models: simple-cnn, mlp, resnet, resnet18.
    runs
        Runs per model (random sweep) or seeds per grid cell (grid sweep).
    stages
        Snapshots per run; meta-training needs at least 6.
    sweep
        random draws r, lr and batch per run (method §3); grid uses the fixed values.
    r
        Fix the sampling rate (0 < r < 1) instead of drawing it.
    lr
        Fix the Adam learning rate instead of drawing it.
    batch_size
        Fix the batch size instead of drawing it.
    epochs_per_stage
        Epochs of training per subset.
    mode
        independent (every stage from one common init) or sequential.
    seed
        Seed of the sweep; the same seed plans the same run ids.
    width
        Model width (0 = the architecture default).
    runner
        thread (in-process) or dask (prefect-dask cluster).
    workers
        Parallel training runs.
    dask_address
        Existing Dask scheduler address for runner=dask.
    device
        auto | cpu | cuda | cuda:N.
    """
    from flows.collect import CollectParams, collect_trajectories, plan_sweep

    with user_errors():
        p = CollectParams(store=store, dataset=dataset, data_dir=data_dir, classes=classes, limit=limit,
                          models=model, runs=runs, stages=stages, sweep=sweep, epochs_per_stage=epochs_per_stage,
                          mode=mode, seed=seed, width=width, runner=runner, workers=workers,
                          dask_address=dask_address, device=device)
        if r is not None:
            p.r_min = p.r_max = r
            p.r_values = str(r)
        if lr is not None:
            p.lr_min = p.lr_max = lr
            p.lr_values = str(lr)
        if batch_size is not None:
            p.batch_min = p.batch_max = batch_size  # random sweep: r and lr still drawn, batch fixed
            p.batch_size = batch_size
        _check_store_path(store)
        specs = plan_sweep(p)  # validates before any flow starts; the flow re-plans the same specs
        with watch_runs(store, [s.run_id for s in specs]):
            run_ids = collect_trajectories(p)
    console.print(f"[green]{len(run_ids)} runs complete[/] in {store}")
    _print_runs(store, run_ids)


def _check_store_path(store: str) -> None:
    if "://" not in store and Path(store).exists() and not Path(store).is_dir():
        raise ValueError(f"store path {store} is a file, not a Zarr store; pass a directory path or URL")


def _print_runs(store: str, run_ids: list[str] | None = None) -> None:
    from rich.table import Table

    from storage.trajectory import TrajectoryStore

    df = TrajectoryStore(store).list_runs()
    if run_ids is not None and len(df):
        df = df[df.run_id.isin(run_ids)]
    table = Table("run_id", "status", "model", "dataset", "mode", "r", "lr", "batch", "stages")
    for _, row in df.iterrows():
        table.add_row(row.run_id, str(row.get("status")), str(row.get("model")), str(row.get("dataset")),
                      str(row.get("mode")), f"{row.get('sampling_rate', float('nan')):.3g}",
                      f"{row.get('lr', float('nan')):.3g}", str(row.get("batch_size")), str(row.get("n_stages")))
    Console(width=max(Console().width, 120)).print(table)


@app.command
def trajectory(
    *,
    store: str = "runs.zarr",
    dataset: str = "digits",
    data_dir: str = "",
    classes: str = "",
    limit: int = 0,
    model: str = "simple-cnn",
    width: int = 0,
    pretrain_epochs: int = 5,
    stages: int = 5,
    r: float = 0.5,
    lr: float = 1e-3,
    batch_size: int = 128,
    seed: int = 0,
    augment: bool = False,
    device: str = "auto",
):
    """Pre-train a source model and record its sequential forgetting trajectory (method §2).

    Parameters
    ----------
    store
        Trajectory store: a local directory or an fsspec URL.
    dataset
        Source data set.
    data_dir
        Directory holding the data set files (default: its standard location).
    classes
        Source class subset such as '0-4'.
    limit
        Use only this many training images (0 = all).
    model
        simple-cnn | mlp | resnet | resnet18.
    width
        Model width (0 = default).
    pretrain_epochs
        Epochs of pre-training on the full source data (gives Θ0).
    stages
        Snapshots Θ0..Θ(S-1).
    r
        Sampling rate of the nested subsets (0 < r < 1).
    lr
        Adam learning rate of the forgetting fine-tunes.
    batch_size
        Batch size (must fit the smallest subset).
    seed
        Seed of pre-training and of the subsets.
    augment
        Use the release's light augmentation.
    device
        auto | cpu | cuda | cuda:N.
    """
    from flows.collect import TrajectoryParams, forgetting_trajectory, target_specs

    with user_errors():
        _check_store_path(store)
        p = TrajectoryParams(store=store, dataset=dataset, data_dir=data_dir, classes=classes, limit=limit,
                             model=model, width=width, pretrain_epochs=pretrain_epochs, stages=stages, r=r, lr=lr,
                             batch_size=batch_size, seed=seed, augment=augment, device=device)
        _, run = target_specs(p)
        with watch_runs(store, [run.run_id], label="target"):
            run_id = forgetting_trajectory(p)
    console.print(f"[green]target trajectory complete:[/] {run_id}")
    _print_runs(store, [run_id])


@app.command
def runs(*, store: str = "runs.zarr"):
    """List the runs in a store with their status and hyper-parameters.

    Parameters
    ----------
    store
        Trajectory store: a local directory or an fsspec URL.
    """
    with user_errors():
        _check_store_path(store)
        if "://" not in store and not Path(store).exists():
            raise ValueError(f"store {store} does not exist; create it with `know collect --store {store}`")
        _print_runs(store)


@app.command(name="meta-train")
def meta_train(
    *,
    store: str = "runs.zarr",
    out: str = "known",
    meta_data: Literal["all", "independent", "sequential"] = "all",
    exclude_runs: str = "",
    epochs: int = 15,
    batch_size: int = 4096,
    lr: float = 1e-3,
    patience: int = 3,
    pairs_per_run: int = 20000,
    val_fraction: float = 0.25,
    seed: int = 0,
    official_dir: str = "",
    compare_modes: bool = True,
):
    """Meta-train the three KNOWN models (conv, fc, bias) on complete runs of a store.

    Trains with raw and with min-max input scaling, keeps the better as OUT/known.pt, and
    prints the validation-L1 table against taskvector, logfit, identity and constant scale.

    Parameters
    ----------
    store
        Trajectory store holding complete runs with at least 6 stages.
    out
        Output directory for models, checkpoints and tables.
    meta_data
        Runs that train the default model: all, independent or sequential.
    exclude_runs
        Comma-separated run ids to leave out (e.g. the target run).
    epochs
        Maximum epochs per model (early stopping usually ends sooner).
    batch_size
        Pairs per Adam step.
    lr
        Adam learning rate.
    patience
        Epochs without a better validation L1 before stopping.
    pairs_per_run
        Maximum pairs per run and kind.
    val_fraction
        Fraction of runs held out for validation (split by run).
    seed
        Seed of the split, subsampling and training.
    official_dir
        Directory of the authors' KNOWN_*.h5 files, added to the table.
    compare_modes
        Also train on independent-only and sequential-only runs when both exist.
    """
    from flows.predict import MetaTrainParams, meta_train_known

    with user_errors():
        _require_store(store)
        params = MetaTrainParams(
            store=store, out=out, meta_data=meta_data, exclude_runs=exclude_runs, epochs=epochs,
            batch_size=batch_size, lr=lr, patience=patience, pairs_per_run=pairs_per_run,
            val_fraction=val_fraction, seed=seed, official_dir=official_dir, compare_modes=compare_modes)
        from storage.trajectory import TrajectoryStore
        from tasks.meta import eligible_runs

        eligible_runs(TrajectoryStore(store), params, meta_data)  # bad input fails here, before any flow starts
        result = meta_train_known(params)
    _print_l1_table(result["table"])
    console.print(f"[green]default KNOWN ({result['scaling']} scaling) saved to[/] {out}/known.pt")


def _print_l1_table(records: list[dict]) -> None:
    import pandas as pd
    from rich.markup import escape
    from rich.table import Table

    df = pd.DataFrame(records)
    wide = df.pivot_table(index=["val_runs_of", "method"], columns="kind", values="val_l1", sort=False).reset_index()
    kinds = [k for k in ("conv", "fc", "bias", "all") if k in wide.columns]
    table = Table("validation runs", "method", *[f"L1 {k}" for k in kinds], title="Validation L1 (lower is better)")
    for _, row in wide.iterrows():
        table.add_row(row.val_runs_of, escape(row.method), *[f"{row[k]:.4e}" for k in kinds])
    Console(width=max(Console().width, 120)).print(table)


def _require_store(store: str) -> None:
    _check_store_path(store)
    if "://" not in store and not Path(store).exists():
        raise ValueError(f"store {store} does not exist; create it with `know collect --store {store}`")


@app.command
def predict(
    *,
    store: str = "runs.zarr",
    run: str,
    predictor: str = "know",
    known: str = "official",
    official_dir: str = "",
    steps: int = 3,
    alpha: float = 1.0,
    predict_norm: bool = False,
    block_values: int = 1 << 22,
):
    """Predict knowledge-overflowed weights of one run, streamed into the store.

    Parameters
    ----------
    store
        Trajectory store.
    run
        Run id (see `know runs`).
    predictor
        naive | taskvector | logfit | know | know-s2 | know-s3 | know-s4.
    known
        'official' (needs --official-dir) or a directory written by `know meta-train`.
    official_dir
        Directory holding KNOWN_Conv.h5, KNOWN_FC.h5 and KNOWN_Bias.h5.
    steps
        Recurrent steps; 3 gives x2, x4, x8 at r = 0.5.
    alpha
        Step size of the taskvector predictor.
    predict_norm
        Also predict norm affine parameters with the Bias model.
    block_values
        Columns per streamed block; bounds memory whatever the model size.
    """
    from flows.predict import PredictParams, predict_weights
    from storage.trajectory import TrajectoryStore
    from tasks.predict import PredictSpec, prediction_inputs

    with user_errors():
        _require_store(store)
        params = PredictParams(store=store, run_id=run, predictor=predictor, known=known, official_dir=official_dir,
                               steps=steps, alpha=alpha, predict_norm=predict_norm, block_values=block_values)
        # bad input (run, stages, KNOWN source) fails here, before any flow starts and logs tracebacks
        prediction_inputs(PredictSpec(**params.model_dump()), TrajectoryStore(store))
        name = predict_weights(params)

    attrs = TrajectoryStore(store).prediction_attrs(run, name)
    console.print(f"[green]prediction {name!r}[/] of run {run}: virtual data factors {attrs['factors']} "
                  f"({attrs.get('seconds', 0):.2f}s); export with `know export --store {store} --run {run} "
                  f"--prediction '{name}' --step {steps} --out model.pt`")


@app.command
def export(
    *,
    store: str = "runs.zarr",
    run: str,
    prediction: str = "",
    predictor: str = "",
    step: int = 3,
    out: str = "model.pt",
    recalibrate_bn: str = "",
    recalibrate_classes: str = "",
):
    """Export Θ0 or a predicted step as a state_dict for the run's model class.

    Load it with `model.load_state_dict(torch.load(path, weights_only=True), strict=True)`.
    KNOW shrinks kernels, so BatchNorm statistics from Θ0 no longer fit: re-estimate them
    with --recalibrate-bn DATASET (recommended for models with BatchNorm).

    Parameters
    ----------
    store
        Trajectory store.
    run
        Run id.
    prediction
        Name of the prediction in the store (as printed by `know predict`); empty = Θ0.
    predictor
        Shorthand for --prediction when its name equals the predictor (e.g. taskvector).
    step
        Prediction step (1 = first factor).
    out
        Output file for the state_dict.
    recalibrate_bn
        Data set whose training images re-estimate BatchNorm statistics.
    recalibrate_classes
        Class subset for the re-estimation, e.g. '0-4'.
    """
    from tasks.predict import export_state

    with user_errors():
        _require_store(store)
        info = export_state(store, run, prediction or predictor, step, out, recalibrate_bn, recalibrate_classes)
    console.print(f"[green]wrote[/] {info['out']} ({info['prediction'] or 'theta0'} step {info['step']}, "
                  f"BN statistics: {info['bn_recalibrated_on']})")


@contextmanager
def watch_experiment(p):
    """One progress bar per experiment stage, fed by polling the output folder and its store."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from flows.experiment import parse_methods, plan
    from storage.trajectory import TrajectoryStore

    pl = plan(p)
    methods = parse_methods(p)
    n_models = len([m for m in p.meta_models.split(",") if m.strip()])
    totals = {
        "meta-collect": sum(c.runs for c in pl["collects"]) * n_models,
        "target trajectory": p.window + 2,
        "evaluate cells": len(methods) * p.seeds + (len(p.naive_lr_grid.split(",")) if any(m == "naive-lr" for m, _ in methods) else 0),
    }
    progress = Progress(TextColumn("{task.description:<18}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=console)
    bars = {name: progress.add_task(name, total=total) for name, total in totals.items()}
    cells = Path(p.out) / "cells"

    def refresh():
        df = TrajectoryStore(pl["store"]).list_runs() if Path(pl["store"]).exists() else None
        if df is not None and len(df):
            meta = df[df.start == ""]
            progress.update(bars["meta-collect"], completed=int((meta.status == "complete").sum()))
            tgt = df[df.start != ""]
            if len(tgt):
                progress.update(bars["target trajectory"], completed=int(tgt.stages_written.max()))
        if cells.exists():
            progress.update(bars["evaluate cells"], completed=len(list(cells.glob("*.json"))))

    with polling(progress, refresh, 1.0):
        yield


@app.command
def run(
    *,
    preset: str = "standard",
    out: str = "",
    force: bool = False,
    workers: int = 2,
    device: str = "auto",
    official_dir: str = "",
    seeds: int | None = None,
):
    """Run the whole KNOW experiment and print its summary table.

    Collects meta-trajectories, meta-trains KNOWN, pre-trains a source model, records its
    forgetting trajectory, predicts x2/x4/x8 weights and fine-tunes every start point on a
    target task over several seeds. A finished stage is reused when run again.

    Parameters
    ----------
    preset
        quick | standard | full | mnist | half-data.
    out
        Output folder (default: results/PRESET).
    force
        Reuse a folder that holds a different experiment.
    workers
        Parallel fine-tunes (one torch thread each).
    device
        auto | cpu | cuda.
    official_dir
        Directory of the authors' KNOWN_*.h5 files, for the official rows.
    seeds
        Override the preset's number of seeds.
    """
    from flows.experiment import know_run, parse_methods, preset_params, refuse_other_experiment

    with user_errors():
        overrides = {"force": force, "workers": workers, "device": device, "official_dir": official_dir}
        if out:
            overrides["out"] = out
        if seeds is not None:
            overrides["seeds"] = seeds
        p = preset_params(preset, **overrides)
        parse_methods(p)  # bad input fails here, before any flow starts
        refuse_other_experiment(p)
        with watch_experiment(p):
            know_run(p)
    Console(width=max(Console().width, 160)).print((Path(p.out) / "summary.md").read_text())
    console.print(f"[green]done:[/] {p.out}/results.csv, summary.md, accuracy_vs_factor.png, learning_curves.png")


@app.command
def submit(stage: str, /, *, param: list[str] | None = None, tag: list[str] | None = None, watch: bool = False):
    """Submit a stage to its deployment on the Prefect server and print the flow-run URL.

    Needs PREFECT_API_URL (e.g. http://127.0.0.1:4200/api), deployments from
    `prefect deploy --all` and a worker on the stage's pool (docs/operations.md).

        know submit pipeline --param runs=3 --param stages=6 --param limit=300

    Parameters
    ----------
    stage
        collect | collect-gpu | trajectory | trajectory-gpu | meta-train | predict | pipeline |
        experiment, or any deployment name.
    param
        key=value overriding one field of the deployment's default params (repeatable).
    tag
        Extra flow-run tag (repeatable); know-chain on a collect run starts meta-training when it completes.
    watch
        Wait until the run ends (event-driven) and exit 1 if it did not complete.
    """
    from flows.ops import parse_overrides, submit as submit_run

    with user_errors():
        run_id, url = submit_run(stage, parse_overrides(param or []), tags=tag or [])
    print(url)
    console.print(f"submitted {stage}: flow run {run_id}", highlight=False)
    if watch:
        _watch_flow_run(run_id)


def _watch_flow_run(run_id: str) -> None:
    from flows.ops import wait

    with console.status(f"waiting for flow run {run_id}"):
        run = wait(run_id)
    if run.state.is_completed():
        console.print(f"[green]flow run {run_id} {run.state.name}[/]", highlight=False)
        return
    console.print(f"[bold red]flow run {run_id} {run.state.name}[/]: {run.state.message or ''}\n"
                  f"resume it with `know resume {run_id}`", highlight=False, soft_wrap=True)
    raise SystemExit(1)


@app.command
def resume(flow_run_id: str, /, *, watch: bool = False):
    """Retry a failed or crashed flow run; finished work (complete runs, cached results) is reused.

    A run of a deployment goes back to Scheduled and its pool's worker runs it again (like
    `prefect flow-run retry`); a local run (from `know collect` etc.) re-runs here.

    Parameters
    ----------
    flow_run_id
        The flow run's id (shown by `know submit`, the UI, or the failed run's resume-hint artifact).
    watch
        For a deployment run, wait until it ends and exit 1 if it did not complete.
    """
    from flows.ops import resume as resume_run

    with user_errors():
        how, state = resume_run(flow_run_id)
    if how == "scheduled":
        console.print(f"flow run {flow_run_id} scheduled again; a worker of its pool will pick it up", highlight=False)
        if watch:
            _watch_flow_run(flow_run_id)
        return
    console.print(f"flow run {flow_run_id} re-ran locally: {state}", highlight=False)
    if state != "COMPLETED":
        raise SystemExit(1)


def main(argv: list[str] | None = None) -> None:
    app(argv if argv is not None else sys.argv[1:])


if __name__ == "__main__":
    main()
