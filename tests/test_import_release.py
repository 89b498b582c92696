"""`know import-release`: the authors' .mat (v7.3, HDF5) meta-data files as runs of a store.

The files here are small synthetic ones written with h5py in both axis orders: as h5py shows
a real MATLAB v7.3 file (every axis reversed, behind MATLAB's 512-byte header) and in MATLAB's
own order. Each file's values are drawn in MATLAB's indexing, so the expected store row k is
MATLAB's ConvWeights(:,:,:,s)(:), FCWeights(:,s), Bias(:,s) with s = 6 - k (numpy order="F").
"""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import zarr

import flows.release  # noqa: F401 - imported at collection (prefect's log handlers; see test_meta_flow)
import know_cli
from know_core.release import NAME_PATTERN

pytestmark = pytest.mark.usefixtures("prefect_harness")

S, N_CONV, M_FC, K_BIAS = 7, 6, 40, 10


def release_values(seed: int, n_conv: int = N_CONV, m: int = M_FC, k: int = K_BIAS):
    """(ConvWeights (3,3,N,S), FCWeights (M,S), Bias (K,S)) in MATLAB's indexing: a smooth
    forgetting trajectory per scalar, file stage S-1 being the full data."""
    rng = np.random.default_rng(seed)

    def pool(shape):
        full = rng.normal(0, 0.1, shape)
        drift = rng.normal(0, 0.02, shape)
        forgotten = np.arange(S - 1, -1, -1) ** 1.5  # file stage S-1 (full data) is 0 away from it
        return (full[..., None] + drift[..., None] * forgotten).astype(np.float64)

    return pool((3, 3, n_conv)), pool((m,)), pool((k,))


def write_mat(path: Path, conv, fc, bias, order: str = "hdf5", skip: str = "", conv_shape=None) -> Path:
    """Write a release-like .mat: order 'hdf5' is how h5py sees MATLAB v7.3 (axes reversed)."""
    arrays = {"ConvWeights": conv, "FCWeights": fc, "Bias": bias}
    with h5py.File(path, "w", userblock_size=512) as f:
        for key, a in arrays.items():
            if key == skip:
                continue
            data = a.T if order == "hdf5" else a
            if key == "ConvWeights" and conv_shape is not None:
                data = np.zeros(conv_shape)
            ds = f.create_dataset(key, data=data, chunks=True)
            ds.attrs["MATLAB_class"] = np.bytes_("double")
    with open(path, "r+b") as fh:  # MATLAB's text header in the userblock
        fh.write(b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: test HDF5 schema 1.00 .")
    return path


def expected_rows(conv, fc, bias) -> np.ndarray:
    return np.stack([np.concatenate([conv[..., S - 1 - k].reshape(-1, order="F"), fc[:, S - 1 - k],
                                     bias[:, S - 1 - k]]) for k in range(S)]).astype(np.float32)


def know(*argv) -> int:
    try:
        know_cli.main([str(a) for a in argv])
    except SystemExit as e:
        return 0 if e.code is None else e.code
    return 0


def test_both_axis_orders_import_the_files_values_in_store_stage_order(tmp_path, capfd):
    from storage.trajectory import TrajectoryStore

    store = tmp_path / "runs.zarr"
    values = release_values(0)
    a = write_mat(tmp_path / "simplenet_cifar10_r0.5_lr0.001_bs64.mat", *values, order="hdf5")
    b = write_mat(tmp_path / "SimpleNet-CIFAR10-R0.5-LR1e-3-BS64-matlab-order.mat", *values, order="matlab")
    c = write_mat(tmp_path / "weights.mat", *release_values(1), order="hdf5")
    assert know("import-release", a, b, "--store", store, "--block-values", 5) == 0
    assert "imported 2 of 2 files" in capfd.readouterr().err
    assert know("import-release", c, "--store", store, "--model", "resnet18", "--dataset", "mnist",
                "--sampling-rate", 0.35, "--lr", 2e-4, "--batch-size", 32, "--n-data", 60000) == 0

    ts = TrajectoryStore(store)
    runs = {Path(r.source_file).name: r for r in ts.runs()}
    assert len(runs) == 3 and all(r.is_complete and r.run_id.startswith("rel-") for r in runs.values())
    want = expected_rows(*values)
    for name in (a.name, b.name):
        run = runs[name]
        got = ts.read_stages(run.run_id)
        assert got.shape == (S, want.shape[1])
        np.testing.assert_array_equal(got, want)  # stage 0 = the file's stage index 6
        assert [(t.name, t.kind, t.shape) for t in run.layout] == [
            ("ConvWeights", "conv", (N_CONV, 3, 3)), ("FCWeights", "fc", (M_FC,)), ("Bias", "bias", (K_BIAS,))]
        assert (run.mode, run.model, run.dataset, run.sampling_rate, run.lr, run.batch_size, run.n_stages) == \
            ("independent", "simplenet", "cifar10", 0.5, 1e-3, 64, S)
        assert run.stage_subset_sizes == [int(50000 * 0.5**k) for k in range(S)]
        assert run.optimizer == "fresh" and run.epochs_per_stage == 1
    assert runs[a.name].axis_order == "hdf5" and runs[b.name].axis_order == "matlab"
    assert runs[a.name].run_id != runs[b.name].run_id  # other bytes, other run
    other = runs["weights.mat"]
    assert (other.model, other.dataset, other.sampling_rate, other.lr, other.batch_size) == \
        ("resnet18", "mnist", 0.35, 2e-4, 32)
    assert other.stage_subset_sizes == [int(60000 * 0.35**k) for k in range(S)]
    np.testing.assert_array_equal(ts.read_stages(other.run_id), expected_rows(*release_values(1)))


def test_reimport_is_skipped_and_a_changed_file_imports_anew(tmp_path, capfd):
    from storage.trajectory import TrajectoryStore

    store = tmp_path / "runs.zarr"
    values = release_values(2)
    path = write_mat(tmp_path / "mlp_mnist_r0.6_lr0.002_bs32.mat", *values)
    assert know("import-release", path, "--store", store) == 0
    [first] = TrajectoryStore(store).run_ids()
    files = {p: p.stat().st_mtime_ns for p in (store / "runs" / first).rglob("*") if p.is_file()}
    capfd.readouterr()
    assert know("import-release", path, "--store", store) == 0
    assert "imported 0 of 1 files" in capfd.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in files} == files  # nothing rewritten
    conv, fc, bias = values
    fc = fc.copy()
    fc[3, 0] += 1.0
    write_mat(path, conv, fc, bias)
    assert know("import-release", path, "--store", store) == 0
    ts = TrajectoryStore(store)
    assert len(ts.run_ids()) == 2 and all(r.is_complete for r in ts.runs())
    [second] = set(ts.run_ids()) - {first}
    np.testing.assert_array_equal(ts.read_stages(second), expected_rows(conv, fc, bias))


def test_rows_stream_in_whole_chunks_in_bounded_blocks(tmp_path, monkeypatch):
    """A tiny store chunk and block: every block read is at most one block (or one kernel), and
    every chunk is written whole, exactly once per row."""
    import know_core.release as release
    from know_core.layout import TensorSpec
    from storage.release_import import import_release_file
    from storage.trajectory import StoreError, TrajectoryStore

    values = release_values(3, n_conv=5, m=23, k=7)  # 45 + 23 + 7 = 75 values a row
    path = write_mat(tmp_path / "cnn_fmnist_r0.7_lr0.003_bs40.mat", *values)
    sizes = []
    read = release.read_units
    monkeypatch.setattr(release, "read_units", lambda *a: sizes.append(len(out := read(*a))) or out)
    ts = TrajectoryStore(tmp_path / "s.zarr", chunk=16)
    writes = []
    setitem = zarr.Array.__setitem__

    def spy(arr, key, value):
        if arr.path.endswith("/weights"):
            writes.append((key[0].start, key[1].start, key[1].stop))
        return setitem(arr, key, value)

    monkeypatch.setattr(zarr.Array, "__setitem__", spy)
    run_id, status = import_release_file(ts, path, block_values=10)
    monkeypatch.undo()
    assert status == "imported"
    assert max(sizes) <= 10 and set(sizes[:5]) == {9}  # a block is <= 10 values, or one 3x3 kernel
    chunks = [(0, 16), (16, 32), (32, 48), (48, 64), (64, 75)]
    assert sorted(writes) == sorted((k, c0, c1) for k in range(S) for c0, c1 in chunks)  # each chunk once, whole
    np.testing.assert_array_equal(ts.read_stages(run_id), expected_rows(*values))
    # a row of the wrong length is refused, and the row is not counted as written
    ts2 = TrajectoryStore(tmp_path / "t.zarr", chunk=4)
    ts2.begin_run("x", {"mode": "independent"}, [TensorSpec("w", (10,), "fc", 0)], 2)
    with pytest.raises(StoreError, match="9 of its 10 values"):
        ts2.append_stage_blocks("x", 0, [np.zeros(5), np.zeros(4)])
    with pytest.raises(StoreError, match="more than its 10 values"):
        ts2.append_stage_blocks("x", 0, [np.zeros(7), np.zeros(4)])
    assert ts2.run("x").stages_written == 0
    ts2.append_stage_blocks("x", 0, [np.arange(3), np.arange(3, 10)])
    np.testing.assert_array_equal(ts2.read_stages("x", 0), np.arange(10))


def _bad_files(root: Path) -> dict[str, Path]:
    v = release_values(4)
    good = write_mat(root / "good_cifar10_r0.5_lr0.001_bs64.mat", *v)
    (root / "text_cifar10_r0.5_lr0.001_bs64.mat").write_text("MATLAB 5.0 MAT-file, not HDF5\n")
    return {
        "good": good,
        "bad-name": write_mat(root / "weights-of-some-net.mat", *v),
        "missing-key": write_mat(root / "net_cifar10_r0.5_lr0.001_bs64.mat", *v, skip="FCWeights"),
        "wrong-shape": write_mat(root / "net_cifar10_r0.5_lr0.001_bs64_bad.mat", *v, conv_shape=(7, 6, 5, 5)),
        "six-stages": write_mat(root / "net_cifar10_r0.5_lr0.001_bs64_six.mat", v[0][..., :6], v[1][:, :6],
                                v[2][:, :6]),
        "mixed-orders": _mixed(root / "net_cifar10_r0.5_lr0.001_bs64_mixed.mat", v),
        "not-hdf5": root / "text_cifar10_r0.5_lr0.001_bs64.mat",
        "missing": root / "nope_cifar10_r0.5_lr0.001_bs64.mat",
        "rate-1": write_mat(root / "net_cifar10_r1.5_lr0.001_bs64.mat", *v),
    }


def _mixed(path: Path, v) -> Path:
    write_mat(path, *v)
    with h5py.File(path, "r+") as f:
        del f["FCWeights"]
        f["FCWeights"] = v[1]  # MATLAB order, the others reversed
    return path


BAD = [  # (file, extra options, text the one line must contain)
    ("bad-name", [], NAME_PATTERN),
    ("missing-key", [], "no dataset 'FCWeights'"),
    ("wrong-shape", [], "ConvWeights has shape (7, 6, 5, 5)"),
    ("six-stages", [], "(7, N, 3, 3)"),
    ("mixed-orders", [], "different axis orders"),
    ("not-hdf5", [], "not a MATLAB v7.3 (HDF5) file"),
    ("missing", [], "no such file"),
    ("rate-1", [], "0 < r < 1"),
    ("good", ["--n-data", "10"], "give --n-data 64 or more"),
    ("good", ["--sampling-rate", "1.5"], "--sampling-rate"),
]


@pytest.mark.parametrize("case", BAD, ids=[f"{c[0]}{''.join(c[1][:1])}" for c in BAD])
def test_bad_files_are_one_line_exit_2_and_import_nothing(case, tmp_path, capfd):
    key, extra, needle = case
    files = _bad_files(tmp_path)
    store = tmp_path / "runs.zarr"
    capfd.readouterr()
    argv = [files["good"], files[key]] if key != "good" else [files["good"]]
    code = know("import-release", *argv, "--store", store, *extra)
    lines = capfd.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
    assert needle in lines[0], lines[0]
    assert not store.exists() or not any((store / "runs").glob("*")), "nothing may be written"


def test_meta_train_on_imported_runs_writes_known(tmp_path, capfd):
    import torch

    from know_core.known import known_set_from_dict
    from storage.known_files import load_known_payload

    store, out = tmp_path / "runs.zarr", tmp_path / "known"
    files = [write_mat(tmp_path / f"simplenet_cifar10_r0.{5 + i}_lr0.00{i + 1}_bs64_seed{i}.mat", *release_values(10 + i))
             for i in range(3)]
    files.append(write_mat(tmp_path / "resnet18_mnist_r0.4_lr0.001_bs32.mat", *release_values(20, n_conv=9, m=30, k=6),
                           order="matlab"))
    assert know("import-release", *files, "--store", store) == 0
    assert know("meta-train", "--store", store, "--out", out, "--epochs", 2, "--pairs-per-run", 600,
                "--batch-size", 256) == 0, capfd.readouterr().err
    assert (out / "known.pt").is_file()
    payload = load_known_payload(out)
    prov = payload["provenance"]
    assert len(prov["train_runs"]) + len(prov["val_runs"]) == 4 and all(r.startswith("rel-") for r in prov["val_runs"])
    ks = known_set_from_dict(payload)
    for kind in ("conv", "fc", "bias"):
        assert torch.isfinite(ks.residual(kind, 0.01 * torch.randn(16, 5).cumsum(1))).all()
