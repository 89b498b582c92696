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

    stop = threading.Event()
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[status]}"), TimeElapsedColumn(), console=console)
    bars = {rid: progress.add_task(f"{label} {rid}", total=None, status="queued") for rid in run_ids}

    def poll():
        store = None
        while not stop.wait(0.5):
            try:
                store = store or TrajectoryStore(store_url)
                for rid, bar in bars.items():
                    attrs = store.run_attrs(rid) or {}
                    if attrs:
                        progress.update(bar, total=attrs.get("n_stages"), completed=attrs.get("stages_written", 0),
                                        status=attrs.get("status", ""))
            except Exception:  # noqa: BLE001 - progress must never break the run
                pass

    thread = threading.Thread(target=poll, daemon=True)
    with progress:
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            # one last refresh so the final state is visible
            try:
                store = TrajectoryStore(store_url)
                for rid, bar in bars.items():
                    attrs = store.run_attrs(rid) or {}
                    progress.update(bar, total=attrs.get("n_stages"), completed=attrs.get("stages_written", 0),
                                    status=attrs.get("status", ""))
            except Exception:  # noqa: BLE001
                pass


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
    store: Trajectory store: a local directory or an fsspec URL (s3://bucket/prefix).
    dataset: digits | fashion-mnist | mnist5k | cifar10 | cifar100 | image-folder.
    data_dir: Directory holding the data set files (default: its standard location).
    classes: Class subset such as '0-4'; empty for all classes.
    limit: Use only this many training images (0 = all).
    model: Comma-separated models: simple-cnn, mlp, resnet, resnet18.
    runs: Runs per model (random sweep) or seeds per grid cell (grid sweep).
    stages: Snapshots per run; meta-training needs at least 6.
    sweep: random draws r, lr and batch per run (method §3); grid uses the fixed values.
    r: Fix the sampling rate (0 < r < 1) instead of drawing it.
    lr: Fix the Adam learning rate instead of drawing it.
    batch_size: Fix the batch size instead of drawing it.
    epochs_per_stage: Epochs of training per subset.
    mode: independent (every stage from one common init) or sequential.
    seed: Seed of the sweep; the same seed plans the same run ids.
    width: Model width (0 = the architecture default).
    runner: thread (in-process) or dask (prefect-dask cluster).
    workers: Parallel training runs.
    dask_address: Existing Dask scheduler address for runner=dask.
    device: auto | cpu | cuda | cuda:N.
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
            p.batch_max = batch_size
            p.batch_size = batch_size
        _check_store_path(store)
        specs = plan_sweep(p)  # validates before any flow starts
        if batch_size is not None and sweep == "random":
            specs = [s.model_copy(update={"batch_size": batch_size}) for s in specs]
            for s in specs:
                s.trajectory_config().validate(len(s.load("train")))
            p.sweep, p.batch_size = "grid", batch_size
            p.r_values = ",".join(sorted({str(s.r) for s in specs}))
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
    store: Trajectory store: a local directory or an fsspec URL.
    dataset: Source data set.
    data_dir: Directory holding the data set files (default: its standard location).
    classes: Source class subset such as '0-4'.
    limit: Use only this many training images (0 = all).
    model: simple-cnn | mlp | resnet | resnet18.
    width: Model width (0 = default).
    pretrain_epochs: Epochs of pre-training on the full source data (gives Θ0).
    stages: Snapshots Θ0..Θ(S-1).
    r: Sampling rate of the nested subsets (0 < r < 1).
    lr: Adam learning rate of the forgetting fine-tunes.
    batch_size: Batch size (must fit the smallest subset).
    seed: Seed of pre-training and of the subsets.
    augment: Use the release's light augmentation.
    device: auto | cpu | cuda | cuda:N.
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
    store: Trajectory store: a local directory or an fsspec URL.
    """
    with user_errors():
        _check_store_path(store)
        if "://" not in store and not Path(store).exists():
            raise ValueError(f"store {store} does not exist; create it with `know collect --store {store}`")
        _print_runs(store)


def main(argv: list[str] | None = None) -> None:
    app(argv if argv is not None else sys.argv[1:])


if __name__ == "__main__":
    main()
