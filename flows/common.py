"""Flow plumbing shared by every stage: task runners and the resume hint on failure."""
from __future__ import annotations

from contextlib import contextmanager

from prefect.task_runners import ThreadPoolTaskRunner


def make_runner(runner: str = "thread", workers: int = 1, dask_address: str = "", gpu: bool = False):
    """A task runner for the fan-out.

    thread  in-process thread pool (torch releases the GIL in its kernels)
    dask    prefect-dask: a local cluster of `workers` single-thread processes, or the
            existing scheduler at `dask_address`. With gpu=True each local worker offers one
            "GPU" resource, so one GPU runs one training at a time.
    """
    if runner == "thread":
        return ThreadPoolTaskRunner(max_workers=max(1, workers))
    if runner == "dask":
        from prefect_dask import DaskTaskRunner

        if dask_address:
            return DaskTaskRunner(address=dask_address)
        kwargs = {"n_workers": max(1, workers), "threads_per_worker": 1, "processes": True,
                  "dashboard_address": None}
        if gpu:
            kwargs["resources"] = {"GPU": 1}
        return DaskTaskRunner(cluster_kwargs=kwargs)
    raise ValueError(f"unknown runner {runner!r}; use 'thread' or 'dask'")


@contextmanager
def gpu_annotation(enabled: bool):
    """Dask resource annotation: a task submitted inside needs one GPU slot."""
    if not enabled:
        yield
        return
    import dask

    with dask.annotate(resources={"GPU": 1}):
        yield


def resume_markdown(stage: str, error: BaseException) -> str:
    from prefect.runtime import flow_run

    run_id = flow_run.id or "<flow-run-id>"
    return (
        f"## {stage} failed\n\n`{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}`\n\n"
        "Finished work is kept (complete runs in the store, cached task results). Resume with either:\n\n"
        f"```\nknow resume {run_id}\nprefect flow-run retry {run_id}\n```\n"
    )


@contextmanager
def resume_hint(stage: str):
    """On failure, publish a markdown artifact that shows the exact resume command."""
    try:
        yield
    except BaseException as e:
        try:
            from prefect.artifacts import create_markdown_artifact

            create_markdown_artifact(resume_markdown(stage, e), key="resume-hint",
                                     description=f"How to resume the failed {stage} stage")
        except Exception:  # noqa: BLE001 - never hide the real error behind the hint
            pass
        raise
