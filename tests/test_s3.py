"""The trajectory store on S3: collection, listing, reads, prediction and export against a
real S3 API (moto in server mode on 127.0.0.1), compared with the same work on a local store.

The endpoint reaches the code only through AWS_ENDPOINT_URL (storage.trajectory.
s3_options_from_env), exactly as a user points `know` at MinIO or another local S3.
Object listings and versions are read with boto3, not with the code under test.
"""
from __future__ import annotations


import numpy as np
import pytest
import torch
import zarr

from helpers_s3 import moto_s3

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]

PREFIX = "team/know/runs.zarr"
N_RUNS, N_STAGES, LIMIT = 2, 5, 300
#: attrs that differ between two stores holding the same work: timestamps, durations, versions,
#: and the prediction cache key (it includes the run's completed_at)
VOLATILE = {"created_at", "completed_at", "train_seconds", "versions", "seconds", "input_hash"}


def _params(store: str, **kw):
    from flows.collect import CollectParams

    base = dict(store=store, dataset="digits", limit=LIMIT, models="simple-cnn", runs=N_RUNS, stages=N_STAGES,
                seed=0, device="cpu", runner="thread", workers=2)
    return CollectParams(**{**base, **kw})


def _strip(attrs: dict) -> dict:
    return {k: v for k, v in attrs.items() if k not in VOLATILE}


@pytest.fixture(scope="module")
def s3():
    with moto_s3("know-bucket", versioning=True) as server:
        yield server


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """The same sweep, collected into a local store one run at a time (the S3 collection runs
    both at once in threads: equal results also guard seeded init against thread races)."""
    from flows.collect import collect_trajectories

    store = tmp_path_factory.mktemp("local") / "runs.zarr"
    run_ids = collect_trajectories(_params(str(store), workers=1))
    return store, run_ids


@pytest.fixture(scope="module")
def on_s3(s3, local, tmp_path_factory, monkeypatch_module):
    """Collect into s3://know-bucket/team/know/runs.zarr (cwd moved to an empty directory, so a
    store that silently went to a local path would show up there)."""
    from flows.collect import collect_trajectories

    cwd = tmp_path_factory.mktemp("cwd")
    monkeypatch_module.chdir(cwd)
    url = s3.url(PREFIX)
    run_ids = collect_trajectories(_params(url))
    assert not any(cwd.iterdir()), f"S3 collection wrote local files: {list(cwd.iterdir())}"
    return url, run_ids


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_collect_on_s3_writes_objects_and_equals_local(s3, local, on_s3):
    from storage.trajectory import TrajectoryStore

    url, run_ids = on_s3
    assert run_ids == local[1] and len(run_ids) == N_RUNS

    keys = s3.keys(PREFIX)
    for rid in run_ids:
        chunks = [k for k in keys if k.startswith(f"{PREFIX}/runs/{rid}/weights/c/")]
        assert len(chunks) == N_STAGES, (rid, chunks)  # one chunk object per stage row
        assert f"{PREFIX}/runs/{rid}/zarr.json" in keys

    store, ref = TrajectoryStore(url), TrajectoryStore(local[0])
    assert store.storage_options == {"client_kwargs": {"endpoint_url": s3.endpoint}}
    df, ref_df = store.list_runs(), ref.list_runs()
    assert list(df.run_id) == sorted(run_ids) == list(ref_df.run_id)
    assert set(df.status) == {"complete"} and set(df.stages_written) == {N_STAGES}
    for rid in run_ids:
        assert _strip(store.run_attrs(rid)) == _strip(ref.run_attrs(rid))
        w = store.read_stages(rid)
        assert w.shape == (N_STAGES, store.run_attrs(rid)["n_params"]) and np.isfinite(w).all()
        assert np.array_equal(w, ref.read_stages(rid)), rid
        layout = store.layout(rid)
        assert layout == ref.layout(rid)
        for spec in layout:  # tensor reads address only the tensor's columns
            t = store.read_tensor(rid, spec, slice(1, 3))
            assert t.shape == (2, spec.size)
            assert np.array_equal(t, w[1:3, spec.offset : spec.stop])
        assert np.array_equal(np.asarray(store.trajectory(rid)[:, :10]), w[:, :10])  # lazy dask read

    # plain zarr with the same storage options sees the same tree
    root = zarr.open_group(url, mode="r", storage_options=store.storage_options)
    assert sorted(root["runs"].group_keys()) == sorted(run_ids)


def test_rerun_on_s3_rewrites_nothing(s3, on_s3):
    """The store is the cache on S3 too: a second collection skips both complete runs, so no
    object under runs/ gets a second version (the bucket keeps every version)."""
    from flows.collect import collect_trajectories

    url, run_ids = on_s3
    before = s3.versions(f"{PREFIX}/runs/")
    chunk_versions = {k: n for k, n in before.items() if "/weights/c/" in k}
    assert chunk_versions and set(chunk_versions.values()) == {1}, "each stage row is written once"
    assert collect_trajectories(_params(url)) == run_ids
    assert s3.versions(f"{PREFIX}/runs/") == before


@pytest.mark.parametrize("predictor", ["taskvector", "logfit"])
def test_predict_and_export_on_s3_equal_local(s3, local, on_s3, predictor, tmp_path):
    from flows.predict import PredictParams, predict_weights
    from know_core.models import ModelSpec, build_from_spec
    from storage.trajectory import TrajectoryStore
    from params.predict import ExportParams, PredictParams
    from tasks.predict import export_state, predict_run

    url, run_ids = on_s3
    rid = run_ids[0]
    runs_before = s3.versions(f"{PREFIX}/runs/")

    name = predict_weights(PredictParams(store=url, run_id=rid, predictor=predictor, steps=3))  # the flow
    ref_name = predict_run.fn(PredictParams(store=str(local[0]), run_id=rid, predictor=predictor, steps=3))  # the task
    assert name == ref_name == predictor

    store, ref = TrajectoryStore(url), TrajectoryStore(local[0])
    attrs, ref_attrs = store.prediction_attrs(rid, name), ref.prediction_attrs(rid, name)
    assert attrs["status"] == "complete" and _strip(attrs) == _strip(ref_attrs)
    assert any(k.startswith(f"{PREFIX}/predictions/{rid}/{name}/weights/c/") for k in s3.keys(PREFIX))
    theta0 = store.read_stages(rid, 0)
    for step in (1, 2, 3):
        got, _ = store.read_prediction(rid, name, step)
        want, _ = ref.read_prediction(rid, name, step)
        assert got.shape == theta0.shape and np.isfinite(got).all()
        assert np.array_equal(got, want), (predictor, step)
        assert not np.array_equal(got, theta0)
    assert s3.versions(f"{PREFIX}/runs/") == runs_before, "prediction must not write the trajectory"

    # a repeated prediction is served from the store
    pred_before = s3.versions(f"{PREFIX}/predictions/{rid}/{name}/")
    predict_run.fn(PredictParams(store=url, run_id=rid, predictor=predictor, steps=3))
    assert s3.versions(f"{PREFIX}/predictions/{rid}/{name}/") == pred_before

    # export from S3: a strict state_dict for the run's model class, equal to the local export
    out, ref_out = tmp_path / "s3.pt", tmp_path / "local.pt"
    info = export_state(ExportParams(store=url, run_id=rid, prediction=name, step=2, out=str(out)))
    export_state(ExportParams(store=str(local[0]), run_id=rid, prediction=name, step=2, out=str(ref_out)))
    state, ref_state = torch.load(out, weights_only=True), torch.load(ref_out, weights_only=True)
    model = build_from_spec(ModelSpec(**info["model_spec"]))
    model.load_state_dict(state, strict=True)
    assert state.keys() == ref_state.keys()
    assert all(torch.equal(state[k], ref_state[k]) for k in state)
    flat = np.concatenate([state[s.name].reshape(-1).numpy() for s in store.layout(rid)])
    assert np.array_equal(flat, store.read_prediction(rid, name, 2)[0])


def test_cli_reads_s3_store(s3, on_s3, capsys):
    """`know runs --store s3://...` lists the runs (the CLI passes the URL through untouched)."""
    import know_cli

    url, run_ids = on_s3
    try:
        know_cli.main(["runs", "--store", url])
    except SystemExit as e:
        assert e.code in (0, None), capsys.readouterr().err
    out = capsys.readouterr().out
    assert all(rid in out for rid in run_ids)
