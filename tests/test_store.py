"""storage.trajectory: the Zarr v3 trajectory store, checked with plain zarr where it matters."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import zarr

from know_core.layout import layout_size, param_layout
from know_core.models import build_model
from storage.trajectory import StoreError, TrajectoryStore, config_hash

ATTRS = {"mode": "independent", "model": "simple-cnn", "dataset": "digits", "sampling_rate": 0.5,
         "stage_subset_sizes": [100, 50, 25]}


@pytest.fixture(scope="module")
def layout():
    return param_layout(build_model("simple-cnn", 1, 10, 8))


def _rows(layout, stages=3, seed=0):
    return np.random.default_rng(seed).standard_normal((stages, layout_size(layout))).astype(np.float32)


def _write_run(store, run_id, layout, rows, finish=True):
    store.begin_run(run_id, ATTRS, layout, len(rows))
    for k, row in enumerate(rows):
        store.append_stage(run_id, k, row)
    if finish:
        store.finish_run(run_id, train_seconds=1.5)


def test_begin_append_finish_seen_by_plain_zarr(tmp_path, layout):
    path = tmp_path / "s.zarr"
    store = TrajectoryStore(path)
    rows = _rows(layout)
    store.begin_run("r1", ATTRS, layout, 3)
    assert store.run_status("r1") == "running"
    assert store.run_attrs("r1")["stages_written"] == 0
    for k, row in enumerate(rows):
        store.append_stage("r1", k, row)
        assert store.run_attrs("r1")["stages_written"] == k + 1
    store.finish_run("r1", train_seconds=2.0)

    # no project code from here on
    root = zarr.open_group(str(path), mode="r")
    w = root["runs/r1/weights"]
    n = layout_size(layout)
    assert w.shape == (3, n) and w.dtype == np.float32
    data = w[:]
    assert np.isfinite(data).all()
    np.testing.assert_array_equal(data, rows)
    assert w.chunks == (1, n)  # one row = one whole stage
    attrs = dict(root["runs/r1"].attrs)
    assert attrs["status"] == "complete" and attrs["stages_written"] == 3 and attrs["n_stages"] == 3
    assert attrs["n_params"] == n and attrs["train_seconds"] == 2.0
    assert attrs["stage_subset_sizes"] == [100, 50, 25] and attrs["model"] == "simple-cnn"
    assert attrs["run_id"] == "r1" and "created_at" in attrs and "completed_at" in attrs
    assert "torch" in attrs["versions"] and "zarr" in attrs["versions"]
    assert [r["name"] for r in attrs["layout"]] == [s.name for s in layout]
    assert root.metadata.zarr_format == 3


def test_unwritten_rows_are_nan(make_store, layout):
    store = make_store()
    store.begin_run("r", ATTRS, layout, 3)
    store.append_stage("r", 0, _rows(layout, 1)[0])
    data = store.read_stages("r")
    assert np.isfinite(data[0]).all() and np.isnan(data[1:]).all()


def test_stages_out_of_order_rejected(make_store, layout):
    store = make_store()
    rows = _rows(layout)
    store.begin_run("r", ATTRS, layout, 3)
    with pytest.raises(StoreError, match="expected stage 0"):
        store.append_stage("r", 1, rows[1])
    store.append_stage("r", 0, rows[0])
    with pytest.raises(StoreError, match="expected stage 1"):
        store.append_stage("r", 0, rows[0])  # no rewriting a written stage
    with pytest.raises(StoreError, match="expected stage 1"):
        store.append_stage("r", 2, rows[2])
    assert store.run_attrs("r")["stages_written"] == 1
    assert np.isnan(store.read_stages("r", 2)).all()  # the rejected row was not written


def test_finish_with_missing_stages_rejected(make_store, layout):
    store = make_store()
    rows = _rows(layout)
    store.begin_run("r3", ATTRS, layout, 3)
    with pytest.raises(StoreError, match="0 of 3 stages written"):
        store.finish_run("r3")
    store.append_stage("r3", 0, rows[0])
    store.append_stage("r3", 1, rows[1])
    with pytest.raises(StoreError, match="2 of 3 stages written"):
        store.finish_run("r3")
    assert store.run_status("r3") == "running"
    with pytest.raises(StoreError, match="not complete"):
        store.require_run("r3")


def test_fail_run_marks_failed_but_never_a_complete_run(make_store, layout):
    store = make_store()
    store.begin_run("bad", ATTRS, layout, 3)
    store.fail_run("bad", "RuntimeError: boom")
    assert store.run_status("bad") == "failed"
    assert store.run_attrs("bad")["error"] == "RuntimeError: boom"
    _write_run(store, "good", layout, _rows(layout))
    store.fail_run("good", "late error")
    assert store.run_status("good") == "complete"


def test_list_runs_dataframe(make_store, layout):
    store = make_store()
    assert store.list_runs().empty
    _write_run(store, "b", layout, _rows(layout, seed=1))
    store.begin_run("a", ATTRS, layout, 3)
    df = store.list_runs()
    assert isinstance(df, pd.DataFrame)
    assert df.run_id.tolist() == ["a", "b"]
    assert df.set_index("run_id").status.to_dict() == {"a": "running", "b": "complete"}
    assert "layout" not in df.columns
    assert (df.n_stages == 3).all() and (df.model == "simple-cnn").all()
    assert store.run_ids() == ["a", "b"]


def test_trajectory_is_dask_with_right_values(make_store, layout):
    import dask.array as da

    store = make_store()
    rows = _rows(layout, seed=2)
    _write_run(store, "r", layout, rows)
    traj = store.trajectory("r")
    assert isinstance(traj, da.Array)
    assert traj.shape == rows.shape and traj.dtype == np.float32
    np.testing.assert_array_equal(traj.compute(), rows)
    np.testing.assert_allclose(traj.mean(axis=0).compute(), rows.mean(axis=0), rtol=1e-6)
    np.testing.assert_array_equal(store.read_stages("r", [0, 2]), rows[[0, 2]])


def test_read_tensor_reads_only_its_chunks(tmp_path, layout):
    path = tmp_path / "s.zarr"
    chunk = 64
    store = TrajectoryStore(path, chunk=chunk)
    rows = _rows(layout, seed=3)
    _write_run(store, "r", layout, rows)
    spec = next(s for s in layout if s.name == "fc.weight")
    np.testing.assert_array_equal(store.read_tensor("r", spec), rows[:, spec.offset : spec.stop])
    np.testing.assert_array_equal(store.read_tensor("r", spec, stages=1), rows[1, spec.offset : spec.stop])

    # Corrupt every chunk that holds none of the tensor: the full read fails, the tensor read does not.
    first, last = spec.offset // chunk, (spec.stop - 1) // chunk
    chunk_dir = path / "runs" / "r" / "weights" / "c"
    corrupted = 0
    for f in chunk_dir.rglob("*"):
        if f.is_file() and not first <= int(f.name) <= last:
            f.write_bytes(b"garbage")
            corrupted += 1
    assert corrupted > 0
    with pytest.raises(Exception):
        store.read_stages("r")
    np.testing.assert_array_equal(store.read_tensor("r", spec), rows[:, spec.offset : spec.stop])


def test_store_path_that_is_a_file(tmp_path):
    f = tmp_path / "runs.zarr"
    f.write_text("not a store")
    with pytest.raises(StoreError, match="is a file"):
        TrajectoryStore(f)
    assert f.read_text() == "not a store"


def test_begin_run_refuses_to_overwrite_complete(make_store, layout):
    store = make_store()
    rows = _rows(layout)
    _write_run(store, "r", layout, rows)
    with pytest.raises(StoreError, match="already complete"):
        store.begin_run("r", ATTRS, layout, 3)
    assert store.run_status("r") == "complete"
    np.testing.assert_array_equal(store.read_stages("r"), rows)


def test_begin_run_wipes_an_incomplete_run(make_store, layout):
    store = make_store()
    rows = _rows(layout)
    _write_run(store, "r", layout, rows[:2], finish=False)
    store.fail_run("r", "crash")
    store.begin_run("r", {**ATTRS, "mode": "sequential"}, layout, 3)
    attrs = store.run_attrs("r")
    assert attrs["status"] == "running" and attrs["stages_written"] == 0 and attrs["n_stages"] == 3
    assert "error" not in attrs and attrs["mode"] == "sequential"
    assert np.isnan(store.read_stages("r")).all()


def test_require_run_and_layout(make_store, layout):
    store = make_store()
    with pytest.raises(StoreError, match="does not exist"):
        store.require_run("nope")
    _write_run(store, "r", layout, _rows(layout))
    assert store.require_run("r").status == "complete"
    assert store.layout("r") == layout


def test_checkpoint_round_trip(make_store, layout):
    store = make_store()
    vec = _rows(layout, 1, seed=4)[0]
    with pytest.raises(StoreError, match="not found"):
        store.load_checkpoint("ck")
    store.save_checkpoint("ck", vec, layout, {"test_acc": 0.5})
    got, got_layout, attrs = store.load_checkpoint("ck")
    np.testing.assert_array_equal(got, vec)
    assert got_layout == layout and attrs["test_acc"] == 0.5 and "layout" not in attrs


def test_store_reopens_and_sees_runs(tmp_path, layout):
    rows = _rows(layout)
    _write_run(TrajectoryStore(tmp_path / "s.zarr"), "r", layout, rows)
    again = TrajectoryStore(f"file://{tmp_path / 's.zarr'}")
    assert again.run_status("r") == "complete"
    np.testing.assert_array_equal(again.read_stages("r"), rows)


def test_config_hash_stable_and_order_free():
    a = config_hash({"r": 0.5, "lr": 1e-3})
    assert a == config_hash({"lr": 1e-3, "r": 0.5}) and len(a) == 16
    assert a != config_hash({"r": 0.5, "lr": 2e-3})
