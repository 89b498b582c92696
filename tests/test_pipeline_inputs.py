"""The pipeline reuses a stage run only when its products are current for its inputs; its
target run is recorded at a fixed r; `know submit` refuses a run that is not in its store.

Real Prefect (the session's test harness), real stores, digits. The stage deployments are
registered on the harness and run by an in-process worker thread (`StageWorker`): it claims a
Scheduled run of those deployments (Scheduled -> Pending, as a worker does) and runs its flow
with Prefect's engine, so `run_deployment`, idempotency keys, `know resume` and the
event-driven wait of flows/pipeline.py run as on a server, without a subprocess per run.
"""
from __future__ import annotations

import threading
import time

import pytest

# imported at collection, not inside a test: importing prefect configures its log handlers on the
# stderr of that moment, which must not be a capture fixture's file (closed after its test)
import flows.pipeline  # noqa: F401
import know_cli

SMALL = dict(dataset="digits", models="simple-cnn", runs=3, stages=6, limit=300, device="cpu", pairs_per_run=2000)
STAGE_FLOWS = {"collect": "flows.collect:collect_trajectories", "meta-train": "flows.meta_train:meta_train_known",
               "predict": "flows.predict:predict_weights"}


class StageWorker:
    """Runs the Scheduled flow runs of some deployments, one at a time, in a thread of this process."""

    def __init__(self, flows_by_deployment: dict):
        self.flows = flows_by_deployment  # deployment id -> flow
        self.stopping = threading.Event()
        self.ran: list[str] = []
        self.thread = threading.Thread(target=self._loop, name="stage-worker", daemon=True)

    def _claim(self):
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import (FlowRunFilter, FlowRunFilterDeploymentId, FlowRunFilterState,
                                                    FlowRunFilterStateType)
        from prefect.client.schemas.objects import StateType
        from prefect.client.schemas.responses import SetStateStatus
        from prefect.states import Pending

        with get_client(sync_client=True) as client:
            for run in client.read_flow_runs(flow_run_filter=FlowRunFilter(
                    deployment_id=FlowRunFilterDeploymentId(any_=list(self.flows)),
                    state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))), limit=5):
                if client.set_flow_run_state(run.id, Pending()).status == SetStateStatus.ACCEPT:
                    return client.read_flow_run(run.id)
        return None

    def _loop(self):
        from prefect.flow_engine import run_flow

        while not self.stopping.is_set():
            try:
                run = self._claim()
                if run is None:
                    self.stopping.wait(0.2)
                    continue
                self.ran.append(str(run.id))
                run_flow(self.flows[run.deployment_id], flow_run=run, return_type="state")
            except Exception as e:  # noqa: BLE001 - a failed stage is the pipeline's to report
                print(f"stage worker: {type(e).__name__}: {e}")

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stopping.set()
        self.thread.join(60)


@pytest.fixture(scope="module")
def stage_deployments(prefect_harness):
    """Deployments of the three stage flows on the harness, served by a StageWorker."""
    from prefect.client.orchestration import get_client

    from flows.ops import load_entrypoint

    names, flows = {}, {}
    with get_client(sync_client=True) as client:
        for stage, entrypoint in STAGE_FLOWS.items():
            flow = load_entrypoint(entrypoint)
            flow_id = client.create_flow_from_name(flow.name)
            deployment_id = client.create_deployment(flow_id=flow_id, name=f"inputs-{stage}", entrypoint=entrypoint)
            names[stage], flows[deployment_id] = f"{flow.name}/inputs-{stage}", flow
    with StageWorker(flows) as worker:
        yield names, worker


def _pipeline_params(tmp_path, names, **kw):
    from params.pipeline import PipelineParams

    return PipelineParams(store=str(tmp_path / "runs.zarr"), known_out=str(tmp_path / "known"), **SMALL,
                          collect_deployment=names["collect"], meta_train_deployment=names["meta-train"],
                          predict_deployment=names["predict"], **kw)


def _products(p):
    """(KNOWN sha256 prefix, its epochs setting, the stored prediction's record, the input hash
    a prediction made from the current files would carry)."""
    from flows.pipeline import stage_params
    from storage.known_files import file_digest, known_path, load_known_payload
    from storage.trajectory import TrajectoryStore
    from tasks.predict import prediction_input_hash

    _, _, predict = stage_params(p)
    store = TrajectoryStore(p.store)
    sha = file_digest(known_path(p.known_out))
    epochs = load_known_payload(p.known_out)["provenance"]["config"]["epochs"]
    record = store.prediction(predict.run_id, predict.output_name)
    return sha, epochs, record, prediction_input_hash(predict, store.require_run(predict.run_id), sha)


@pytest.mark.slow
def test_a_stage_run_is_reused_only_while_its_products_are_current(tmp_path, stage_deployments):
    from flows.ops import check_named_runs
    from flows.pipeline import collect_and_enhance
    from storage.trajectory import TrajectoryStore

    names, worker = stage_deployments
    a, b = _pipeline_params(tmp_path, names, meta_epochs=2), _pipeline_params(tmp_path, names, meta_epochs=3)
    t0 = time.perf_counter()

    first = collect_and_enhance(a)
    sha_a, epochs, record, expected = _products(a)
    assert epochs == 2 and record.is_complete and record.input_hash == expected
    # the target run was recorded at the fixed r = 0.5, not drawn from the sweep's range
    store = TrajectoryStore(a.store)
    target = store.require_run(first["target_run"])
    assert first["target_r"] == target.sampling_rate == 0.5
    assert record.factors == pytest.approx([2.0, 4.0, 8.0])
    sweep = [r for r in store.runs() if r.run_id != target.run_id]
    assert len(sweep) == 3 and all(r.sampling_rate != 0.5 for r in sweep)
    check_named_runs({"store": a.store, "run_id": target.run_id})  # a run that is there passes

    # B: other meta-training settings, the same known_out. Collections are reused, KNOWN is
    # retrained, and the prediction is made again from B's KNOWN (its sha is in the input hash)
    second = collect_and_enhance(b)
    sha_b, epochs, record_b, expected = _products(b)
    assert epochs == 3 and sha_b != sha_a
    assert record_b.input_hash == expected != record.input_hash
    for stage in ("collect", "target"):
        assert second["flow_runs"][stage] == first["flow_runs"][stage], stage
    for stage in ("meta-train", "predict"):
        assert second["flow_runs"][stage] != first["flow_runs"][stage], stage

    # A again: its meta-train run completed, but known/ now holds B's model, so a fresh run
    # retrains A's; the prediction follows A's KNOWN again
    third = collect_and_enhance(a)
    sha, epochs, record_a, expected = _products(a)
    assert epochs == 2 and sha != sha_b
    assert record_a.input_hash == expected != record_b.input_hash
    for stage in ("meta-train", "predict"):
        assert third["flow_runs"][stage] not in (first["flow_runs"][stage], second["flow_runs"][stage]), stage

    # A once more: every product is current, every stage run is reused, nothing new runs
    ran = len(worker.ran)
    fourth = collect_and_enhance(a)
    assert fourth["flow_runs"] == third["flow_runs"] and len(worker.ran) == ran
    assert _products(a)[2].input_hash == record_a.input_hash
    print(f"4 pipeline runs, {len(worker.ran)} stage runs: {time.perf_counter() - t0:.1f}s")


@pytest.mark.slow
def test_the_pipeline_publishes_links_to_its_stage_runs(tmp_path, stage_deployments):
    """The pipeline run's `pipeline-stages` artifact, read back through the API, names every stage
    run that ran (the worker's own list), with its name, state and link in the UI."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey
    from prefect.settings import PREFECT_UI_URL, temporary_settings

    from flows.pipeline import collect_and_enhance, stages_markdown

    names, worker = stage_deployments
    p = _pipeline_params(tmp_path, names, meta_epochs=2)
    before = len(worker.ran)
    state = collect_and_enhance(p, return_state=True)
    assert state.is_completed(), state
    stage_runs = state.result()["flow_runs"]
    assert list(stage_runs) == ["collect", "target", "meta-train", "predict"]
    assert sorted(worker.ran[before:]) == sorted(stage_runs.values())  # each ran, once, in this pipeline run

    ui = PREFECT_UI_URL.value()  # the harness sets no UI URL: derived from its API URL
    assert ui and ui.startswith("http://127.0.0.1:") and not ui.endswith("/api")
    deployment = {"collect": p.collect_deployment, "target": p.collect_deployment,
                  "meta-train": p.meta_train_deployment, "predict": p.predict_deployment}
    with get_client(sync_client=True) as client:
        [artifact] = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id]),
            key=ArtifactFilterKey(any_=["pipeline-stages"])))
        runs = {stage: client.read_flow_run(run_id) for stage, run_id in stage_runs.items()}
    assert artifact.type == "markdown" and artifact.description == "4 of 4 stage runs completed"
    md = artifact.data
    for stage, run in runs.items():
        assert (f"| {stage} | {deployment[stage]} | [{run.name}]({ui.rstrip('/')}/runs/flow-run/{run.id}) "
                f"| Completed | `{run.id}` |") in md, md
    assert md.count("/runs/flow-run/") == 4

    # a pipeline run that fails (its predict deployment does not exist) still publishes the stage
    # runs it had: the three reused ones, and no predict row
    broken = p.model_copy(update={"predict_deployment": "predict-weights/no-such-deployment"})
    failed = collect_and_enhance(broken, return_state=True)
    assert failed.is_failed(), failed
    with get_client(sync_client=True) as client:
        [partial] = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[failed.state_details.flow_run_id]),
            key=ArtifactFilterKey(any_=["pipeline-stages"])))
    assert partial.description == "3 of 3 stage runs completed"
    for stage in ("collect", "target", "meta-train"):
        assert f"| {stage} | {deployment[stage]} | [{runs[stage].name}](" in partial.data
    assert str(runs["predict"].id) not in partial.data and "| predict |" not in partial.data

    # no UI to link to (PREFECT_UI_URL="", as the CLI's temporary server sets): the id alone
    with temporary_settings({PREFECT_UI_URL: ""}):
        bare = stages_markdown([(stage, deployment[stage], run) for stage, run in runs.items()])
    assert "/runs/flow-run/" not in bare and "](" not in bare
    assert all(f"| {run.name} | Completed | `{run.id}` |" in bare for run in runs.values())


def test_the_target_run_is_planned_at_a_fixed_r():
    from flows.collect import plan_sweep
    from flows.pipeline import stage_params, target_params
    from params.pipeline import PipelineParams
    from params.predict import PredictParams

    p = PipelineParams(**{k: v for k, v in SMALL.items() if k != "pairs_per_run"})
    assert p.target_r == 0.5
    target = plan_sweep(target_params(p))
    sweep = plan_sweep(p.collect_params())
    assert len(target) == 1 and target[0].r == 0.5 and all(s.r != 0.5 for s in sweep)
    assert target[0].model == sweep[-1].model and target[0].lr == sweep[-1].lr
    assert target[0].batch_size <= 300 * 0.5 ** 5  # capped at the smallest subset
    _, meta, predict = stage_params(p)
    assert predict.run_id == target[0].run_id == meta.exclude_runs
    # a fixed sweep r leaves the target at target_r; target_r sets it
    assert plan_sweep(target_params(p.model_copy(update={"r": 0.7})))[0].r == 0.5
    assert plan_sweep(target_params(PipelineParams(**{**p.model_dump(), "target_r": 0.6})))[0].r == 0.6
    # a named target run is used as it is: nothing is recorded for it
    named = PipelineParams(**{**p.model_dump(), "target_run": "abc"})
    assert target_params(named) is None and stage_params(named)[2].run_id == "abc"
    # the forms say the factors depend on r
    for model in (PipelineParams, PredictParams):
        text = model.model_fields["steps"].description
        assert "(1/r)^k" in text and "x2/x4/x8" in text and "r = 0.5" in text, model.__name__


@pytest.mark.parametrize("store_kind", ["empty store", "no store"])
def test_submit_refuses_a_run_that_is_not_in_the_local_store(tmp_path, capfd, store_kind):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from storage.trajectory import TrajectoryStore

    store = tmp_path / "runs.zarr"
    if store_kind == "empty store":
        TrajectoryStore(str(store)).prepare()
    capfd.readouterr()
    # a server that does not answer: the check must come before any server is asked
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api"}), pytest.raises(SystemExit) as exit_:
        know_cli.main(["submit", "predict", "--param", f"store={store}", "--param", "run_id=nope"])
    err = capfd.readouterr().err.strip()
    assert exit_.value.code == 2, err
    assert len(err.splitlines()) == 1 and "nope" in err and f"know runs --store {store}" in err, err
    assert store.exists() == (store_kind == "empty store")
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api"}), pytest.raises(SystemExit) as exit_:
        know_cli.main(["submit", "pipeline", "--param", f"store={store}", "--param", "target_run=nope"])
    err = capfd.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1 and "target_run nope" in err, err
