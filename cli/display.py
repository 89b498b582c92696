"""What the `know` commands show while they run and when they finish: rich progress bars fed
by polling the store (so Dask workers in other processes show too), and result tables."""
from __future__ import annotations

import threading
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console

console = Console(stderr=True)


def wide_console(width: int = 120) -> Console:
    return Console(width=max(Console().width, width))


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


def _progress(label, *extra):
    """label | bar | n/m | extra columns | elapsed."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    return Progress(label, BarColumn(), MofNCompleteColumn(), *extra, TimeElapsedColumn(), console=console)


@contextmanager
def watch_runs(store_url: str, run_ids: list[str], label: str = "run"):
    """A progress bar per run, fed by polling each run's record in the store."""
    from rich.progress import TextColumn

    from storage.trajectory import TrajectoryStore

    progress = _progress(TextColumn("{task.description}"), TextColumn("{task.fields[status]}"))
    bars = {rid: progress.add_task(f"{label} {rid}", total=None, status="queued") for rid in run_ids}

    def refresh():
        store = TrajectoryStore(store_url)
        for rid, bar in bars.items():
            run = store.run(rid)
            if run is not None:
                progress.update(bar, total=run.n_stages, completed=run.stages_written, status=run.status)

    with polling(progress, refresh, 0.5):
        yield


@contextmanager
def watch_experiment(out: str, plan):
    """One progress bar per experiment stage, fed by polling the output folder and its store.
    `plan` is flows.experiment.ExperimentPlan."""
    from rich.progress import TextColumn

    from storage.trajectory import TrajectoryStore

    progress = _progress(TextColumn("{task.description:<18}"))
    bars = {name: progress.add_task(name, total=total) for name, total in plan.totals().items()}
    cells = Path(out) / "cells"

    def refresh():
        if Path(plan.store).exists():
            runs = TrajectoryStore(plan.store).runs()
            progress.update(bars["meta-collect"], completed=sum(r.is_complete for r in runs if not r.start))
            targets = [r.stages_written for r in runs if r.start]
            if targets:
                progress.update(bars["target trajectory"], completed=max(targets))
        if cells.exists():
            progress.update(bars["evaluate cells"], completed=len(list(cells.glob("*.json"))))

    with polling(progress, refresh, 1.0):
        yield


def print_runs(store: str, run_ids: list[str] | None = None) -> None:
    from rich.table import Table

    from storage.trajectory import TrajectoryStore

    table = Table("run_id", "status", "model", "dataset", "mode", "r", "lr", "batch", "stages")
    style = {"complete": "green", "damaged": "bold red", "failed": "red", "running": "yellow"}
    for run in TrajectoryStore(store).runs():
        if run_ids is None or run.run_id in run_ids:
            status = f"[{style[run.status]}]{run.status}[/]" if run.status in style else run.status
            table.add_row(run.run_id, status, run.model, run.dataset, run.mode, f"{run.sampling_rate:.3g}",
                          f"{run.lr:.3g}", str(run.batch_size), str(run.n_stages))
    wide_console().print(table)


def print_l1_table(records: list[dict]) -> None:
    import pandas as pd
    from rich.markup import escape
    from rich.table import Table

    df = pd.DataFrame(records)
    wide = df.pivot_table(index=["val_runs_of", "method"], columns="kind", values="val_l1", sort=False).reset_index()
    kinds = [k for k in ("conv", "fc", "bias", "all") if k in wide.columns]
    table = Table("validation runs", "method", *[f"L1 {k}" for k in kinds], title="Validation L1 (lower is better)")
    for _, row in wide.iterrows():
        table.add_row(row.val_runs_of, escape(row.method), *[f"{row[k]:.4e}" for k in kinds])
    wide_console().print(table)
