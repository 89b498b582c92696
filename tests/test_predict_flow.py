"""`know predict` / `know export` end to end: real Prefect (test harness), real Zarr stores, digits.

One module-scoped world: a small meta sweep (simple-cnn, mlp), a resnet target trajectory
(r = 0.5, 7 stages) and a quickly meta-trained KNOWN directory. Predictions are made through
the CLI in-process; tests that break something work on a copy of the store.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import torch
import zarr

# imported at collection, not inside a test: importing prefect configures its log handlers on the
# stderr of that moment, which must not be a capture fixture's file (closed after its test)
import flows.predict  # noqa: F401
import know_cli
from conftest import REFERENCE_DIR

# slow: every test shares the module-scoped `world` (meta sweep + target run + KNOWN training)
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]

OLD_NS = 1_000_000_000_000_000_000  # 2001-09-09: any rewrite of a file moves its mtime off this
STEPS = 3


def _cli(argv: list[str]) -> int:
    """know_cli.main in-process; the exit code (0 when the command returns normally)."""
    try:
        know_cli.main([str(a) for a in argv])
    except SystemExit as e:
        return 0 if e.code is None else e.code
    return 0


def _flow_runs() -> int:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.count_flow_runs()


def _cli_err(argv, capfd, starts_flow: bool = False) -> tuple[int, str]:
    """Exit code and stderr of an in-process `know ...`. Unless `starts_flow`, the command must fail
    before any flow run starts (a failed flow run also logs its traceback to the terminal)."""
    before = _flow_runs()
    capfd.readouterr()
    code = _cli(argv)
    out, err = capfd.readouterr()
    if not starts_flow:
        assert _flow_runs() == before, "bad input was found inside a flow run, not before it"
    return code, err


def _cli_process(argv) -> tuple[int, str]:
    """`know ...` as a real process against the harness's API: what a user's terminal gets on stderr."""
    from prefect.settings import PREFECT_API_URL

    root = Path(know_cli.__file__).resolve().parent
    proc = subprocess.run([sys.executable, str(root / "know_cli.py"), *map(str, argv)], cwd=root, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()})
    return proc.returncode, proc.stderr


def _assert_one_line_error(code: int, err: str, *expected: str) -> str:
    """Exit 2 and exactly one line on stderr: the error, naming what is wrong."""
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def world(tmp_path_factory, prefect_harness):
    from conftest import collect_small_world
    from flows.meta_train import MetaTrainParams, meta_train_known

    root = tmp_path_factory.mktemp("predict")
    store = root / "runs.zarr"
    meta_ids, target = collect_small_world(store)
    known = root / "ours"
    meta_train_known(MetaTrainParams(store=str(store), out=str(known), exclude_runs=target, epochs=1,
                                     pairs_per_run=1000, compare_modes=False))
    return SimpleNamespace(root=root, store=store, target=target, meta_ids=meta_ids, known=known)


#: predictor label -> (CLI args, expected prediction name given the KNOWN dir name)
PREDICTIONS = {
    "know-official": (["--predictor", "know", "--known", "official", "--official-dir", REFERENCE_DIR], "know@official"),
    "know-ours": (["--predictor", "know", "--known", "{known}"], "know@ours"),
    "taskvector": (["--predictor", "taskvector"], "taskvector"),
    "logfit": (["--predictor", "logfit"], "logfit"),
    "know-s2": (["--predictor", "know-s2", "--known", "{known}"], "know-s2@ours"),
}


def _predict_args(world, label: str) -> list[str]:
    args, _ = PREDICTIONS[label]
    return ["predict", "--store", world.store, "--run-id", world.target, "--steps", STEPS,
            *[str(a).format(known=world.known) for a in args]]


@pytest.fixture(scope="module")
def predicted(world, reference_dir):  # know-official reads REFERENCE_DIR
    for label in PREDICTIONS:
        assert _cli(_predict_args(world, label)) == 0, label
    return {label: name for label, (_, name) in PREDICTIONS.items()}


def _root(store) -> zarr.Group:
    return zarr.open_group(str(store), mode="r")


def _chunk_files(store: Path, path: str) -> list[Path]:
    files = sorted(p for p in (store / path).rglob("*") if p.is_file())
    assert any("c" in p.relative_to(store / path).parts for p in files), f"no chunk files under {path}"
    return files


def _copy_store(world, tmp_path) -> Path:
    """A copy of the world's store without its predictions (a bad input must not leave one)."""
    dst = tmp_path / "copy.zarr"
    shutil.copytree(world.store, dst)
    root = zarr.open_group(str(dst), mode="a")
    del root["predictions"]
    root.require_group("predictions")
    return dst


def _theta0_and_layout(store, run_id):
    from storage.trajectory import TrajectoryStore

    s = TrajectoryStore(store)
    return s.read_stages(run_id, 0), s.layout(run_id), s.run_attrs(run_id)


# ------------------------------------------------------------------ predictions in the store


@pytest.mark.needs_reference
def test_predictions_have_shape_factors_and_keep_norm_stats(world, predicted):
    from know_core.layout import PREDICTED_KINDS

    theta0, layout, attrs = _theta0_and_layout(world.store, world.target)
    n = attrs["n_params"]
    assert attrs["sampling_rate"] == 0.5
    root = _root(world.store)
    assert sorted(root[f"predictions/{world.target}"].group_keys()) == sorted(predicted.values())
    traj = root[f"runs/{world.target}/weights"][:]
    rows = {}
    for label, name in predicted.items():
        group = root[f"predictions/{world.target}/{name}"]
        pa = dict(group.attrs)
        w = group["weights"][:]
        assert w.shape == (STEPS, n), label
        assert w.dtype == np.float32
        assert np.isfinite(w).all(), label
        assert pa["status"] == "complete" and pa["steps"] == STEPS
        assert pa["factors"] == [2.0, 4.0, 8.0], (label, pa["factors"])
        rows[label] = w
        for s in layout:
            if s.kind in ("norm_stat", "norm"):  # never predicted (predict_norm is off)
                for k in range(STEPS):
                    np.testing.assert_array_equal(w[k, s.offset:s.stop], theta0[s.offset:s.stop], err_msg=f"{label} {s.name}")
        # every scalar that moved along the trajectory moves in the prediction (some resnet
        # kernel taps only ever see padding on 8x8 digits: zero gradient, never trained)
        cols = np.concatenate([np.arange(s.offset, s.stop) for s in layout if s.kind in PREDICTED_KINDS])
        cols = cols[traj[0, cols] != traj[1, cols]]
        assert len(cols) > 1000
        assert (w[:, cols] != theta0[cols]).mean() > 0.9, f"{label}: predicted tensors barely differ from theta0"
    # the KNOWN sources and predictors really differ
    assert not np.allclose(rows["know-official"], rows["know-ours"])
    assert not np.allclose(rows["know-ours"], rows["know-s2"])
    assert not np.allclose(rows["taskvector"], rows["logfit"])
    # taskvector at alpha 1: theta0 + k (theta0 - theta1) on predicted kinds
    conv = next(s for s in layout if s.kind == "conv")
    sl = slice(conv.offset, conv.stop)
    for k in range(1, STEPS + 1):
        np.testing.assert_allclose(rows["taskvector"][k - 1, sl], traj[0, sl] + k * (traj[0, sl] - traj[1, sl]), rtol=1e-5, atol=1e-6)
    ours = dict(root[f"predictions/{world.target}/know@ours"].attrs)
    assert ours["known_source"] == str(world.known) and ours["known_scaling"] in ("raw", "minmax")


@pytest.mark.needs_reference
def test_repeated_prediction_is_not_recomputed(world, predicted):
    from storage.trajectory import TrajectoryStore

    store = world.store
    name = predicted["know-official"]
    path = f"predictions/{world.target}/{name}"
    files = _chunk_files(store, path + "/weights")
    for f in files:
        os.utime(f, ns=(OLD_NS, OLD_NS))
    before = dict(_root(store)[path].attrs)

    assert _cli(_predict_args(world, "know-official")) == 0

    assert all(os.stat(f).st_mtime_ns == OLD_NS for f in files), "prediction chunks were rewritten"
    assert _chunk_files(store, path + "/weights") == files
    assert dict(_root(store)[path].attrs) == before
    # a different option is a different cache key: recomputed (and then restored)
    from flows.predict import PredictParams, predict_weights

    spec = dict(store=str(store), run_id=world.target, predictor="know", known="official",
                official_dir=str(REFERENCE_DIR), steps=2)
    assert predict_weights(PredictParams(**spec)) == name
    assert _root(store)[path]["weights"].shape[0] == 2
    assert TrajectoryStore(store).prediction_attrs(world.target, name)["input_hash"] != before["input_hash"]
    assert _cli(_predict_args(world, "know-official")) == 0
    assert _root(store)[path]["weights"].shape[0] == STEPS


def _rechunked_copy(world, tmp_path, chunk: int) -> Path:
    """The target run copied into a store whose chunks are `chunk` columns wide."""
    from storage.trajectory import TrajectoryStore

    src = TrajectoryStore(world.store)
    dst_path = tmp_path / "rechunked.zarr"
    dst = TrajectoryStore(dst_path, chunk=chunk)
    dst.prepare()
    attrs = src.run_attrs(world.target)
    own = {"layout", "status", "stages_written", "n_stages", "n_params", "created_at", "versions", "completed_at", "run_id"}
    dst.begin_run(world.target, {k: v for k, v in attrs.items() if k not in own}, src.layout(world.target), attrs["n_stages"])
    for k in range(attrs["n_stages"]):
        dst.append_stage(world.target, k, src.read_stages(world.target, k))
    dst.finish_run(world.target)
    return dst_path


@pytest.mark.needs_reference
def test_streamed_prediction_equals_in_memory_per_tensor(world, predicted, tmp_path):
    from flows.predict import PredictParams, predict_weights
    from know_core.known import known_set_from_dict, load_official
    from know_core.predict import PredictorConfig, predict_steps, sizes_from_stages, window_from_stages
    from storage.known_files import load_known_payload
    from storage.trajectory import TrajectoryStore
    from know_core.predict import window_rows

    # block_values can't go below one chunk, and the flow's stores use one chunk for a model
    # this small: re-chunk the run so a small block_values gives many blocks
    store = _rechunked_copy(world, tmp_path, chunk=1000)
    ts = TrajectoryStore(store)
    n = ts.run_attrs(world.target)["n_params"]
    blocks = [c0 for c0, _ in ts.iter_column_blocks(world.target, slice(0, 5), 2500)]
    assert blocks == list(range(0, n, 2000)) and len(blocks) >= 8

    traj = ts.read_stages(world.target)
    layout = ts.layout(world.target)
    assert any(s.offset // 2000 != (s.stop - 1) // 2000 for s in layout)  # tensors straddle blocks
    sizes = ts.run_attrs(world.target)["stage_subset_sizes"]
    r = ts.run_attrs(world.target)["sampling_rate"]  # the run's r, as the flow uses it
    ours = known_set_from_dict(load_known_payload(world.known))
    official = load_official(REFERENCE_DIR)
    cases = {"know-official": ("know", dict(known="official", official_dir=str(REFERENCE_DIR)), official),
             "know-s2": ("know-s2", dict(known=str(world.known)), ours),
             "logfit": ("logfit", {}, None),
             "taskvector": ("taskvector", {}, None)}
    for label, (predictor, kw, ks) in cases.items():
        name = predict_weights(PredictParams(store=str(store), run_id=world.target, predictor=predictor, steps=STEPS,
                                             block_values=2500, **kw))
        assert name == predicted[label]
        arr = _root(store)[f"predictions/{world.target}/{name}/weights"]
        assert arr.chunks == (1, 1000)
        streamed = arr[:]
        rows = window_rows(predictor)
        cfg = PredictorConfig(predictor, known=ks)
        for s in layout:
            window = window_from_stages(torch.from_numpy(traj[:rows, s.offset:s.stop].copy()), rows)
            ref = predict_steps(cfg, window, s.kind, sizes_from_stages(sizes[:rows], rows), STEPS, r).numpy()
            np.testing.assert_allclose(streamed[:, s.offset:s.stop], ref, rtol=1e-5, atol=1e-7,
                                       err_msg=f"{label}: tensor {s.name}")
        # one block (the flow's store) and many blocks give the same prediction
        one_block = _root(world.store)[f"predictions/{world.target}/{name}/weights"][:]
        np.testing.assert_allclose(streamed, one_block, rtol=1e-5, atol=1e-7, err_msg=label)


# ------------------------------------------------------------------ export


def _digits_test_x():
    from tasks.specs import DataSpec

    return DataSpec(dataset="digits", classes="0-4").load("test").x


def _load_exported(path: Path, attrs: dict):
    from know_core.models import ModelSpec, build_from_spec

    state = torch.load(path, weights_only=True)
    model = build_from_spec(ModelSpec(**attrs["model_spec"]))
    model.load_state_dict(state, strict=True)
    return model.eval(), state


@pytest.mark.needs_reference
def test_export_loads_strict_and_gives_finite_logits(world, predicted, tmp_path):
    from know_core.layout import unflatten_state

    theta0, layout, attrs = _theta0_and_layout(world.store, world.target)
    pred = _root(world.store)[f"predictions/{world.target}/{predicted['know-official']}/weights"][STEPS - 1]
    out = tmp_path / "export" / "model.pt"
    assert _cli(["export", "--store", world.store, "--run-id", world.target, "--prediction", predicted["know-official"],
                 "--step", STEPS, "--out", out]) == 0
    model, state = _load_exported(out, attrs)
    expected = unflatten_state(pred, layout)
    t0 = unflatten_state(theta0, layout)
    for s in layout:
        torch.testing.assert_close(state[s.name], expected[s.name], rtol=0, atol=0, msg=s.name)
        if s.kind == "norm_stat":  # no recalibration asked: Θ0's statistics
            assert torch.equal(state[s.name], t0[s.name]), s.name
    x = _digits_test_x()
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == (len(x), 5) and torch.isfinite(logits).all()

    # --predictor shorthand and Θ0 export
    out0 = tmp_path / "theta0.pt"
    assert _cli(["export", "--store", world.store, "--run-id", world.target, "--out", out0]) == 0
    _, s0 = _load_exported(out0, attrs)
    assert all(torch.equal(s0[k], t0[k]) for k in t0)
    out_tv = tmp_path / "tv.pt"
    assert _cli(["export", "--store", world.store, "--run-id", world.target, "--predictor", "taskvector", "--step", 1,
                 "--out", out_tv]) == 0
    _, stv = _load_exported(out_tv, attrs)
    assert not torch.equal(stv["stem.weight"], t0["stem.weight"])


@pytest.mark.needs_reference
def test_export_recalibrates_batchnorm(world, predicted, tmp_path):
    from know_core.layout import unflatten_state

    theta0, layout, attrs = _theta0_and_layout(world.store, world.target)
    t0 = unflatten_state(theta0, layout)
    out = tmp_path / "recal.pt"
    assert _cli(["export", "--store", world.store, "--run-id", world.target, "--prediction", predicted["know-ours"],
                 "--step", 2, "--out", out, "--recalibrate-bn", "digits", "--recalibrate-classes", "0-4"]) == 0
    model, state = _load_exported(out, attrs)
    stats = [s.name for s in layout if s.name.endswith(("running_mean", "running_var"))]
    assert len(stats) >= 10
    for name in stats:
        assert torch.isfinite(state[name]).all()
        assert not torch.allclose(state[name], t0[name]), f"{name} kept Θ0's statistics"
    pred = unflatten_state(_root(world.store)[f"predictions/{world.target}/{predicted['know-ours']}/weights"][1], layout)
    assert torch.equal(state["stem.weight"], pred["stem.weight"])  # weights untouched by recalibration
    with torch.no_grad():
        assert torch.isfinite(model(_digits_test_x())).all()


# ------------------------------------------------------------------ bad input


def _no_prediction(store: Path, run_id: str, name: str) -> None:
    from storage.trajectory import TrajectoryStore

    assert TrajectoryStore(store).prediction_attrs(run_id, name) is None
    assert not (store / "predictions" / run_id / name).exists()
    group = zarr.open_group(str(store), mode="r")["predictions"]
    assert run_id not in group or list(group[run_id].group_keys()) == []


@pytest.mark.needs_reference
def test_trajectory_shorter_than_window(world, tmp_path, capfd):
    from storage.trajectory import TrajectoryStore

    store = _copy_store(world, tmp_path)
    s = TrajectoryStore(store)
    src = world.meta_ids[0]
    attrs = s.run_attrs(src)
    own = {"layout", "status", "stages_written", "n_stages", "n_params", "created_at", "versions", "completed_at", "run_id"}
    short = "short4"
    s.begin_run(short, {**{k: v for k, v in attrs.items() if k not in own},
                        "stage_subset_sizes": attrs["stage_subset_sizes"][:4]}, s.layout(src), 4)
    for k in range(4):
        s.append_stage(short, k, s.read_stages(src, k))
    s.finish_run(short)

    code, err = _cli_err(["predict", "--store", store, "--run-id", short, "--predictor", "know", "--known", "official",
                          "--official-dir", REFERENCE_DIR], capfd)
    _assert_one_line_error(code, err, "4 stages", "'know'", "at least 5")
    _no_prediction(store, short, "know@official")
    # taskvector needs only 2 stages: the same run works
    assert _cli(["predict", "--store", store, "--run-id", short, "--predictor", "taskvector"]) == 0


def test_unknown_run(world, tmp_path, capfd):
    store = _copy_store(world, tmp_path)
    code, err = _cli_err(["predict", "--store", store, "--run-id", "nope123", "--predictor", "taskvector"], capfd)
    _assert_one_line_error(code, err, "'nope123'", "does not exist")
    assert not (store / "predictions" / "nope123").exists()


def test_incomplete_run(world, tmp_path):
    store = _copy_store(world, tmp_path)
    zarr.open_group(str(store), mode="a")[f"runs/{world.target}"].attrs["status"] = "running"
    # a real process: no flow may start (Prefect would log the failure and its traceback to stderr)
    code, err = _cli_process(["predict", "--store", store, "--run-id", world.target, "--predictor", "logfit"])
    _assert_one_line_error(code, err, "'running'", "not complete")
    _no_prediction(store, world.target, "logfit")


def test_h5_that_is_not_known(world, tmp_path, capfd):
    store = _copy_store(world, tmp_path)
    bad = tmp_path / "fake_official"
    bad.mkdir()
    for name in ("KNOWN_Conv.h5", "KNOWN_FC.h5", "KNOWN_Bias.h5"):
        with h5py.File(bad / name, "w") as f:
            f.create_dataset("weights", data=np.zeros((3, 3), np.float32))
    code, err = _cli_err(["predict", "--store", store, "--run-id", world.target, "--predictor", "know", "--known",
                          "official", "--official-dir", bad, "--steps", 1], capfd)
    _assert_one_line_error(code, err, "KNOWN_Conv.h5", "not a KNOWN model")
    _no_prediction(store, world.target, "know@official")
    # the official source needs its directory
    code, err = _cli_err(["predict", "--store", store, "--run-id", world.target, "--predictor", "know"], capfd)
    _assert_one_line_error(code, err, "--official-dir")
    # a directory without a trained KNOWN
    code, err = _cli_err(["predict", "--store", store, "--run-id", world.target, "--predictor", "know", "--known",
                          tmp_path / "empty"], capfd)
    _assert_one_line_error(code, err, "no trained KNOWN")
    _no_prediction(store, world.target, "know@empty")


def test_export_layout_mismatch(world, tmp_path, capfd):
    store = _copy_store(world, tmp_path)
    group = zarr.open_group(str(store), mode="a")[f"runs/{world.target}"]
    spec = dict(group.attrs["model_spec"])
    assert spec["width"] == 8
    group.attrs["model_spec"] = {**spec, "width": 16}
    out = tmp_path / "model.pt"
    code, err = _cli_err(["export", "--store", store, "--run-id", world.target, "--out", out], capfd)
    _assert_one_line_error(code, err, world.target, "stem.weight")
    assert not out.exists()


def test_nan_in_trajectory_names_the_tensor(world, tmp_path, capfd):
    from flows.predict import PredictParams, predict_weights
    from know_core.predict import NonFiniteError
    from storage.trajectory import TrajectoryStore

    store = _copy_store(world, tmp_path)
    layout = TrajectoryStore(store).layout(world.target)
    victim = next(s for s in layout if s.name == "layers.1.conv1.weight")
    w = zarr.open_group(str(store), mode="a")[f"runs/{world.target}/weights"]
    row = w[1]
    row[victim.offset + 7] = np.nan
    w[1] = row

    with pytest.raises(NonFiniteError, match="layers.1.conv1.weight"):
        predict_weights(PredictParams(store=str(store), run_id=world.target, predictor="taskvector", steps=STEPS))
    _no_prediction(store, world.target, "taskvector")

    code, err = _cli_err(["predict", "--store", store, "--run-id", world.target, "--predictor", "know", "--known",
                          world.known], capfd, starts_flow=True)
    # found while streaming, inside the flow: Prefect logs the failed run above the error line
    assert code == 2, err
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert errors == [lines[-1]], err
    assert "'layers.1.conv1.weight'" in lines[-1] and "non-finite" in lines[-1]
    _no_prediction(store, world.target, "know@ours")
