"""Flow plumbing shared by every stage: task runners and the resume hint on failure."""
from __future__ import annotations

from contextlib import contextmanager

from prefect.task_runners import ThreadPoolTaskRunner


def refuse_other_record(out: str, record_name: str, identity: dict, force: bool, what: str) -> None:
    """BadInput when the output folder `out` is a file, or its `record_name` JSON names a
    different `what` (experiment, study) than `identity` and `force` is off."""
    import json
    from pathlib import Path

    from know_core.errors import BadInput

    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise BadInput(f"output path {folder} is a file; pass a folder with --out")
    record = folder / record_name
    if record.exists() and not force:
        old = json.loads(record.read_text())
        if old != identity:
            diff = sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
            raise BadInput(f"{folder} holds a different {what} (differs in: {', '.join(diff[:5])}); "
                           "use another --out or pass --force")


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


def _code_block(text: str, lang: str = "text") -> str:
    """A fenced block that holds any text: the fence is longer than any backtick run inside."""
    import re

    fence = "`" * max(3, 1 + max((len(m) for m in re.findall(r"`+", text)), default=0))
    return f"{fence}{lang}\n{text}\n{fence}\n"


def _needs_new_parameters(error: BaseException) -> bool:
    """True when retrying the same flow run (same parameters) can only fail the same way: a bad
    setting (BadInput), a diverged run (NonFinite), or an id that the store does not have."""
    from know_core.errors import BadInput, NonFinite, StoreState

    if isinstance(error, (BadInput, NonFinite)):
        return True
    return isinstance(error, StoreState) and "does not exist" in str(error)


def _submit_stage() -> str:
    """The `know submit` stage of this flow run's deployment (its deployment name when not a stage)."""
    from prefect.runtime import deployment

    name = deployment.name or ""
    from .ops import STAGES

    return next((stage for stage, (dep, _) in STAGES.items() if dep == name), name)


def hint_key(flow_run_id: str) -> str:
    """The artifact key of a flow run's resume hint: one key per run, so a later version (the
    retry's "resolved") supersedes the failure's hint, in the run's Artifacts tab and on the
    Artifacts page."""
    return f"resume-hint-{flow_run_id}".lower()


def resume_markdown(stage: str, error: BaseException) -> str:
    """The hint for a failed stage: the error, and only the fixes that can work for it."""
    from prefect.runtime import deployment, flow_run

    from know_core.errors import one_line

    run_id = flow_run.id or "<flow-run-id>"
    text = f"## {stage} failed\n\n" + _code_block(f"{type(error).__name__}: {one_line(error)}")
    if _needs_new_parameters(error):
        text += ("\nA setting of this run causes it: resuming the flow run would repeat its parameters and fail "
                 "the same way. Start a new run with the setting the error names fixed (or after the step it asks "
                 "for)")
        if deployment.id:
            text += ":\n\n" + _code_block(f"know submit {_submit_stage() or '<stage>'} --param <name>=<fixed value>",
                                           "bash")
        else:
            text += ": the same `know` command with that option changed.\n"
        return text
    text += ("\nFix the cause, then resume: finished work is kept (complete runs in the store, a meta-training's "
             "epoch checkpoints, a completed prediction with the same inputs).\n\n")
    if deployment.id:
        text += _code_block(f"know resume {run_id}\nprefect flow-run retry {run_id}", "bash")
    else:  # a local run: Prefect's retry needs the entrypoint, `know resume` knows it
        text += _code_block(f"know resume {run_id}", "bash")
    return text


def _publish_resolved(stage: str) -> None:
    """After a retry completed: supersede this run's failure hint (same key), if it has one."""
    from prefect.runtime import flow_run

    if not flow_run.id or (flow_run.run_count or 1) <= 1:
        return
    from prefect.artifacts import create_markdown_artifact
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    key = hint_key(flow_run.id)
    with get_client(sync_client=True) as client:
        if not client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])), limit=1):
            return
    create_markdown_artifact(f"## {stage}: resolved by retry\n\nAttempt {flow_run.run_count} of flow run "
                             f"`{flow_run.id}` completed; the earlier failure hint no longer applies.\n",
                             key=key, description=f"{stage}: resolved by retry")


@contextmanager
def no_subflow_heartbeats():
    """Sub-flows started inside send no heartbeats of their own.

    Prefect 3.8.8's sync engine joins a flow run's heartbeat thread when the run ends, and that
    thread sleeps in 1 s steps, so every flow run waits up to 1 s at its end: most of the
    orchestration overhead of `know run` (7 flow runs). A sub-flow runs in its parent's
    process, and the parent's heartbeats go on (its thread started before this block), so
    `know resume` still sees the run tree alive (flows/ops.liveness reads the whole tree)."""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield


@contextmanager
def resume_hint(stage: str):
    """On failure, publish a markdown artifact (key `resume-hint-<flow run id>`) with the fixes
    that can work; when a retry of the same run completes, a new version says it is resolved.
    Sub-flows started inside send no heartbeats of their own (no_subflow_heartbeats)."""
    from prefect.runtime import flow_run

    try:
        with no_subflow_heartbeats():
            yield
    except BaseException as e:
        try:
            from prefect.artifacts import create_markdown_artifact

            create_markdown_artifact(resume_markdown(stage, e), key=hint_key(flow_run.id or "local"),
                                     description=f"How to fix the failed {stage} stage")
        except Exception:  # noqa: BLE001 - never hide the real error behind the hint
            pass
        raise
    try:
        _publish_resolved(stage)
    except Exception:  # noqa: BLE001 - the stage completed; a missing note must not fail it
        pass
