"""Collection flows end to end: real Prefect (test harness), real Zarr stores, digits.

The store is the cache: a complete run is skipped without touching its chunks, a
`running` (crashed writer) or `failed` run is wiped and redone.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from know_core.layout import layout_from_json

pytestmark = pytest.mark.usefixtures("prefect_harness")

OLD_NS = 1_000_000_000_000_000_000  # 2001-09-09: any rewrite of a file moves its mtime off this


def _params(store: Path, **kw):
    from flows.collect import CollectParams

    base = dict(store=str(store), dataset="digits", limit=400, models="simple-cnn", runs=3, stages=4, seed=0)
    return CollectParams(**{**base, **kw})


def _weight_files(store: Path, run_id: str) -> list[Path]:
    files = sorted(p for p in (store / "runs" / run_id / "weights").rglob("*") if p.is_file())
    assert any(p.parent.name != "weights" for p in files), "no chunk files found"
    return files


def _age(files: list[Path]) -> None:
    for f in files:
        os.utime(f, ns=(OLD_NS, OLD_NS))


def _mtimes(files: list[Path]) -> dict[Path, int]:
    return {f: os.stat(f).st_mtime_ns for f in files}


@pytest.fixture(scope="module")
def collected(tmp_path_factory, prefect_harness):
    """One 3-run, 4-stage sweep on digits; tests copy the store before changing it."""
    from flows.collect import collect_trajectories, plan_sweep

    store = tmp_path_factory.mktemp("collect") / "runs.zarr"
    params = _params(store)
    run_ids = collect_trajectories(params)
    planned = [s.run_id for s in plan_sweep(params)]
    return store, run_ids, planned


def _copy(collected, tmp_path) -> Path:
    dst = tmp_path / "runs.zarr"
    shutil.copytree(collected[0], dst)
    return dst


def test_collect_writes_complete_runs(collected):
    store, run_ids, planned = collected
    assert len(run_ids) == 3 and len(set(run_ids)) == 3
    assert run_ids == planned  # the flow returns the planned (config-hash) ids

    root = zarr.open_group(str(store), mode="r")  # plain zarr, no project code
    assert sorted(root["runs"].group_keys()) == sorted(run_ids)
    rates = set()
    for rid in run_ids:
        attrs = dict(root[f"runs/{rid}"].attrs)
        assert attrs["status"] == "complete", rid
        assert attrs["stages_written"] == attrs["n_stages"] == 4
        assert attrs["mode"] == "independent" and attrs["model"] == "simple-cnn" and attrs["dataset"] == "digits"
        layout = layout_from_json(attrs["layout"])
        n = sum(s.size for s in layout)
        w = root[f"runs/{rid}/weights"][:]
        assert w.shape == (4, n) and n == attrs["n_params"]
        assert np.isfinite(w).all()
        for k in range(1, 4):
            assert not np.array_equal(w[k - 1], w[k]), f"{rid}: stages {k - 1} and {k} are identical"
        sizes = attrs["stage_subset_sizes"]
        assert sizes[0] == 400 and len(sizes) == 4
        assert all(a > b for a, b in zip(sizes, sizes[1:])), sizes
        assert 0.3 <= attrs["sampling_rate"] <= 0.9
        assert attrs["batch_size"] <= sizes[-1]
        rates.add(attrs["sampling_rate"])
    assert len(rates) == 3  # the random sweep draws r per run


def test_rerun_skips_complete_runs(collected, tmp_path):
    from flows.collect import collect_trajectories

    store = _copy(collected, tmp_path)
    run_ids = collected[1]
    files = {rid: _weight_files(store, rid) for rid in run_ids}
    for fs in files.values():
        _age(fs)
    before = {rid: _mtimes(fs) for rid, fs in files.items()}
    created = {rid: zarr.open_group(str(store), mode="r")[f"runs/{rid}"].attrs["created_at"] for rid in run_ids}

    assert collect_trajectories(_params(store)) == run_ids

    root = zarr.open_group(str(store), mode="r")
    for rid in run_ids:
        assert _mtimes(files[rid]) == before[rid], f"run {rid}: chunks were rewritten"
        assert _weight_files(store, rid) == files[rid]
        assert root[f"runs/{rid}"].attrs["created_at"] == created[rid]
        assert root[f"runs/{rid}"].attrs["status"] == "complete"


def test_rerun_restarts_running_and_failed_runs(collected, tmp_path):
    from flows.collect import collect_trajectories

    store = _copy(collected, tmp_path)
    crashed, failed, done = collected[1]
    original = {rid: zarr.open_group(str(store), mode="r")[f"runs/{rid}/weights"][:] for rid in (crashed, failed)}

    # simulate a writer killed after stage 0, and a run that failed, with plain zarr
    root = zarr.open_group(str(store), mode="a")
    root[f"runs/{crashed}"].attrs.update({"status": "running", "stages_written": 1})
    root[f"runs/{crashed}/weights"][1:, :] = np.nan
    root[f"runs/{failed}"].attrs.update({"status": "failed", "error": "RuntimeError: simulated"})
    root[f"runs/{failed}/weights"][:, :] = 0.0

    done_files = _weight_files(store, done)
    _age(done_files)
    done_before = _mtimes(done_files)

    assert collect_trajectories(_params(store)) == collected[1]

    root = zarr.open_group(str(store), mode="r")
    for rid in (crashed, failed):
        attrs = dict(root[f"runs/{rid}"].attrs)
        assert attrs["status"] == "complete", rid
        assert attrs["stages_written"] == 4 and "error" not in attrs
        w = root[f"runs/{rid}/weights"][:]
        assert np.isfinite(w).all()
        # redone from scratch with the same seeds: the same trajectory as the first time
        np.testing.assert_allclose(w, original[rid], rtol=0, atol=1e-5)
    assert _mtimes(done_files) == done_before, "the complete run's chunks were rewritten"
    assert root[f"runs/{done}"].attrs["status"] == "complete"


def test_forgetting_trajectory_flow_starts_from_checkpoint(tmp_path, prefect_harness):
    from flows.trajectory import TrajectoryParams, forgetting_trajectory, target_specs

    store = tmp_path / "target.zarr"
    params = TrajectoryParams(store=str(store), dataset="digits", limit=500, model="simple-cnn",
                              pretrain_epochs=1, stages=3, batch_size=32, r=0.5, seed=0)
    run_id = forgetting_trajectory(params)
    pre, run = target_specs(params)
    assert run_id == run.run_id

    root = zarr.open_group(str(store), mode="r")
    ckpt_attrs = dict(root[f"checkpoints/{pre.checkpoint_id}"].attrs)
    assert ckpt_attrs["status"] == "complete"
    assert 0.0 <= ckpt_attrs["test_acc"] <= 1.0
    ckpt = root[f"checkpoints/{pre.checkpoint_id}/weights"][:]
    assert ckpt.shape[0] == 1 and np.isfinite(ckpt).all()

    attrs = dict(root[f"runs/{run_id}"].attrs)
    assert attrs["status"] == "complete"
    assert attrs["mode"] == "sequential"
    assert attrs["start"] == pre.checkpoint_id
    assert attrs["stage_subset_sizes"] == [500, 250, 125]
    w = root[f"runs/{run_id}/weights"][:]
    assert w.shape == (3, ckpt.shape[1]) and np.isfinite(w).all()
    np.testing.assert_array_equal(w[0], ckpt[0])  # Θ0 is the pre-trained checkpoint, bit for bit
    assert not np.array_equal(w[1], w[0]) and not np.array_equal(w[2], w[1])
    assert layout_from_json(attrs["layout"]) == layout_from_json(ckpt_attrs["layout"])


def test_cli_collect_with_fixed_batch_collects_the_planned_runs(tmp_path, capsys):
    """`know collect --batch-size B` keeps the random sweep (r, lr drawn per run), only B fixed."""
    import know_cli
    from flows.collect import CollectParams, plan_sweep

    store = tmp_path / "cli.zarr"
    try:
        know_cli.main(["collect", "--store", str(store), "--runs", "2", "--stages", "3", "--limit", "300",
                       "--batch-size", "40", "--seed", "5"])
    except SystemExit as e:
        assert e.code in (0, None)
    out, err = capsys.readouterr()
    assert "2 runs complete" in err

    planned = plan_sweep(CollectParams(store=str(store), runs=2, stages=3, limit=300, batch_min=40, batch_max=40, seed=5))
    root = zarr.open_group(str(store), mode="r")
    assert sorted(root["runs"].group_keys()) == sorted(s.run_id for s in planned)
    attrs = [dict(root[f"runs/{s.run_id}"].attrs) for s in planned]
    assert all(a["status"] == "complete" and a["batch_size"] == 40 for a in attrs)
    assert attrs[0]["lr"] != attrs[1]["lr"] and attrs[0]["sampling_rate"] != attrs[1]["sampling_rate"]
    assert all(a["stage_subset_sizes"][-1] >= 40 for a in attrs)
