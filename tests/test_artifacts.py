"""What the stages publish as Prefect artifacts, read back through the API (`read_artifacts`).

One small world on the session's test server: a collect run (table of its runs), a prediction
that fails because KNOWN is not trained yet (its resume hint says `know resume`), one with a
bad run id (its hint says to start a new run, never to resume), meta-training (validation-L1
table), then `know resume` of the failed prediction: it completes, publishes the prediction
(factors, weights, export command), and its hint is superseded by "resolved by retry".
"""
from __future__ import annotations

import json
import re

import pytest

pytestmark = pytest.mark.usefixtures("prefect_harness")

SMALL = dict(dataset="digits", models="simple-cnn", runs=3, stages=6, limit=300, device="cpu")


def artifacts_of(flow_run_id) -> list:
    """Every artifact (all versions) linked to a flow run, oldest first."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    from prefect.client.schemas.sorting import ArtifactSort

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])), sort=ArtifactSort.CREATED_DESC)
    return list(reversed(found))


def latest(key: str):
    """The newest version of a keyed artifact (what the Artifacts page shows)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
                                      sort=ArtifactSort.CREATED_DESC, limit=1)
    assert found, f"no artifact {key!r}"
    return found[0]


def assert_renders(md: str) -> None:
    """Well-formed markdown code: fenced blocks close with their own fence, and outside them every
    backtick belongs to a one-backtick inline span holding no backtick (no nested code spans)."""
    fence = None
    for line in md.splitlines():
        m = re.match(r"^(`{3,})", line)
        if fence is None and m:
            fence = m.group(1)
            continue
        if fence is not None:
            if line.strip() == fence:
                fence = None
            continue
        spans = re.findall(r"`[^`]+`", line)
        assert line.count("`") == 2 * len(spans), f"broken inline code in {line!r}"
    assert fence is None, f"unclosed code fence {fence!r} in:\n{md}"


def test_stage_artifacts_and_resume_hints(tmp_path):
    from flows.collect import CollectParams, collect_trajectories
    from flows.common import hint_key
    from flows.meta_train import MetaTrainParams, meta_train_known
    from flows.ops import resume
    from flows.predict import PredictParams, predict_weights

    store, known = tmp_path / "runs.zarr", tmp_path / "known"

    # collect: a table of its runs
    state = collect_trajectories(CollectParams(store=str(store), **SMALL), return_state=True)
    assert state.is_completed(), state
    run_ids = state.result()
    [table] = [a for a in artifacts_of(state.state_details.flow_run_id) if a.key == "collect-runs"]
    assert table.type == "table"
    rows = json.loads(table.data)
    assert [r["run_id"] for r in rows] == run_ids
    for row in rows:
        assert set(row) == {"run_id", "model", "r", "lr", "batch", "status"}
        assert row["status"] == "complete" and row["model"] == "simple-cnn" and 0 < row["r"] < 1
        assert row["lr"] > 0 and row["batch"] >= 1
    target = run_ids[-1]

    # a prediction before KNOWN exists: fixable outside the run, so the hint says resume
    predict = PredictParams(store=str(store), run_id=target, predictor="know", known=str(known), steps=2)
    failed = predict_weights(predict, return_state=True)
    assert failed.is_failed(), failed
    failed_id = str(failed.state_details.flow_run_id)
    [hint] = [a for a in artifacts_of(failed_id) if a.key == hint_key(failed_id)]
    assert hint.type == "markdown"
    assert_renders(hint.data)
    assert f"know resume {failed_id}" in hint.data
    assert "prefect flow-run retry" not in hint.data  # a local run: Prefect's retry would need --entrypoint

    # a bad run id: resuming repeats it, so no resume command, a new run instead
    bad = predict_weights(predict.model_copy(update={"run_id": "0123456789abcdef"}), return_state=True)
    assert bad.is_failed(), bad
    bad_id = str(bad.state_details.flow_run_id)
    bad_hint = latest(hint_key(bad_id)).data
    assert_renders(bad_hint)
    assert "0123456789abcdef" in bad_hint and "know resume" not in bad_hint and "flow-run retry" not in bad_hint
    assert "new run" in bad_hint

    # meta-training: the validation-L1 table
    meta = meta_train_known(MetaTrainParams(store=str(store), out=str(known), epochs=2, pairs_per_run=2000,
                                            exclude_runs=target), return_state=True)
    assert meta.is_completed(), meta
    [l1] = [a for a in artifacts_of(meta.state_details.flow_run_id) if a.key == "meta-train-val-l1"]
    assert l1.type == "table"
    l1_rows = json.loads(l1.data)
    assert {"val_runs_of", "method", "kind", "val_l1"} <= set(l1_rows[0])
    assert {r["kind"] for r in l1_rows} >= {"conv", "fc", "bias"}
    assert any(r["method"].startswith("known-") for r in l1_rows) and all(r["val_l1"] >= 0 for r in l1_rows)
    assert str(known.resolve() / "known.pt") in l1.description

    # resume the failed prediction: it completes, publishes the prediction, supersedes its hint
    assert resume(failed_id) == ("local", "COMPLETED")
    now = latest(hint_key(failed_id))
    assert "resolved by retry" in now.data and now.id != hint.id
    assert_renders(now.data)
    [pred] = [a for a in artifacts_of(failed_id) if a.key == f"prediction-{target}"]
    assert_renders(pred.data)
    from storage.trajectory import TrajectoryStore

    rec = TrajectoryStore(str(store)).prediction(target, predict.output_name)
    assert rec.is_complete and len(rec.factors) == 2
    for k, f in enumerate(rec.factors, start=1):
        assert f"| {k} | x{f:.4g} |" in pred.data
    assert str(store.resolve()) in pred.data and f"predictions/{target}/{predict.output_name}" in pred.data
    export = re.search(r"^know export .*$", pred.data, re.M).group(0)
    assert f"--run-id {target}" in export and f"--prediction '{predict.output_name}'" in export
    assert "--step 2" in export
