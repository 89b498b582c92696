"""KNOWN: architecture, parity with the authors' TensorFlow outputs, loaders, serialisation."""
from __future__ import annotations

import doctest
import math
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from know_core import known as known_module
from know_core.known import (
    KNOWN,
    OFFICIAL_FILES,
    KnownFormatError,
    KnownSet,
    known_residual,
    known_set_from_dict,
    load_keras_h5,
    load_official,
    save_known_set,
    scale_window,
)

from conftest import REFERENCE_DIR as REF_DIR

KINDS = ("conv", "fc", "bias")
# Keras layer names of each stream, in the order Dense64, Dense8, base, coef, rate, Dense32
STREAM_A = ("dense", "dense_1", "dense_2", "dense_3", "dense_4", "dense_5")
STREAM_B = ("dense_6", "dense_7", "dense_8", "dense_9", "dense_10", "dense_11")
HEAD = "dense_12"
LAYER_SHAPES = {  # Keras kernel shapes (in, out)
    **dict(zip(STREAM_A, [(5, 64), (64, 8), (8, 64), (8, 64), (8, 64), (64, 32)])),
    **dict(zip(STREAM_B, [(4, 64), (64, 8), (8, 64), (8, 64), (8, 64), (64, 32)])),
    HEAD: (64, 1),
}

needs_reference = pytest.mark.needs_reference  # skipped by conftest when REF_DIR is absent


# ---- an independent float64 numpy forward pass, written from method §4 -------------------
def read_h5_layers(path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    with h5py.File(path, "r") as f:
        return {n: (f[n][n]["kernel:0"][()].astype(np.float64), f[n][n]["bias:0"][()].astype(np.float64))
                for n in LAYER_SHAPES}


def numpy_known(layers, window: np.ndarray) -> np.ndarray:
    def dense(x, name):
        kernel, bias = layers[name]
        return x @ kernel + bias

    def stream(x, names):
        inp, z_name, base, coef, rate, out = names
        h = dense(x, inp)
        z = np.maximum(dense(h, z_name), 0.0)
        t = dense(z, base) + dense(z, coef) * np.exp(dense(z, rate) * h)
        y = dense(t, out)
        return np.where(y > 0, y, 0.3 * y)

    w = window.astype(np.float64)
    d = w[:, 1:] - w[:, :-1]
    feats = np.concatenate([stream(w, STREAM_A), stream(d, STREAM_B)], axis=1)
    return np.tanh(dense(feats, HEAD))[:, 0]


def write_h5(path, layers: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """A Keras-2-layout weight file: /<name>/<name>/kernel:0 and bias:0."""
    with h5py.File(path, "w") as f:
        for name, (kernel, bias) in layers.items():
            g = f.create_group(f"{name}/{name}")
            g["kernel:0"] = kernel.astype(np.float32)
            g["bias:0"] = bias.astype(np.float32)


def random_layers(seed=0):
    rng = np.random.default_rng(seed)
    return {n: (rng.normal(0, 0.3, s), rng.normal(0, 0.1, s[1])) for n, s in LAYER_SHAPES.items()}


@pytest.fixture(scope="module")
def official(reference_dir) -> KnownSet:
    return load_official(reference_dir)


@pytest.fixture(scope="module")
def reference(reference_dir):
    return dict(np.load(reference_dir / "known_reference_outputs.npz"))


# ---- architecture --------------------------------------------------------------------------
def test_parameter_count():
    m = KNOWN()
    assert sum(p.numel() for p in m.parameters()) == 9425
    assert sum(p.numel() for p in m.stream_a.parameters()) == 4712
    assert sum(p.numel() for p in m.stream_b.parameters()) == 4648
    assert sum(p.numel() for p in m.head.parameters()) == 65


def test_init_is_variance_scaling_uniform_with_zero_bias():
    torch.manual_seed(0)
    for name, layer in KNOWN().named_modules():
        if isinstance(layer, torch.nn.Linear):
            limit = math.sqrt(3 * 0.1 / layer.in_features)
            assert layer.weight.abs().max() <= limit, name
            assert layer.weight.abs().max() > 0.8 * limit, name  # spans the range, not a tiny init
            assert torch.all(layer.bias == 0), name


def test_forward_rejects_wrong_window_shape():
    with pytest.raises(ValueError, match=r"\(N, 5\)"):
        KNOWN()(torch.zeros(3, 4))


def test_l1_penalty_covers_stream_dense64_and_dense32():
    torch.manual_seed(1)
    m = KNOWN()
    for p in m.parameters():
        torch.nn.init.normal_(p)
    layers = [m.stream_a.inp, m.stream_a.out, m.stream_b.inp, m.stream_b.out]
    expected = sum(1e-6 * l.weight.abs().sum() + 0.1 * l.bias.abs().sum() for l in layers)
    penalty = m.l1_penalty()
    assert torch.allclose(penalty, expected)
    penalty.backward()
    assert m.stream_a.inp.weight.grad is not None and m.stream_a.base.weight.grad is None


# ---- parity with the authors' model --------------------------------------------------------
@needs_reference
@pytest.mark.parametrize("kind", KINDS)
def test_official_parity_with_tensorflow_outputs(official, reference, kind):
    x = torch.from_numpy(reference[f"{kind}_input"])
    expected = reference[f"{kind}_raw_output"]
    with torch.no_grad():
        out = official.models[kind](x).numpy()
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5)
    fast = official.residual(kind, x).numpy()
    np.testing.assert_allclose(fast, expected, rtol=0, atol=1e-5)
    layer_pred = reference[f"{kind}_layer_pred"]
    pred = (x[:, 4].numpy() + fast).reshape(layer_pred.shape)
    np.testing.assert_allclose(pred, layer_pred, rtol=0, atol=1e-5)


@needs_reference
@pytest.mark.parametrize("kind", KINDS)
def test_official_matches_numpy_forward_on_fresh_inputs(official, kind):
    layers = read_h5_layers(REF_DIR / OFFICIAL_FILES[kind])
    rng = np.random.default_rng(1234)
    for scale in (1e-3, 1e-2, 1e-1, 1.0):
        noise = rng.standard_normal((2000, 5))
        trajectory = scale * (rng.standard_normal((2000, 1)) + 0.05 * noise.cumsum(1))  # smooth paths
        for window in (scale * noise, trajectory):
            window = window.astype(np.float32)
            expected = numpy_known(layers, window)
            got = known_residual(official.models[kind], torch.from_numpy(window), batch_size=512)
            np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-5, err_msg=f"scale {scale}")


def test_loader_maps_every_layer(tmp_path):
    """A file written here with random weights loads into a model equal to the numpy pass."""
    layers = random_layers(seed=3)
    write_h5(tmp_path / "random.h5", layers)
    model = load_keras_h5(tmp_path / "random.h5")
    window = np.random.default_rng(4).normal(0, 0.1, (300, 5)).astype(np.float32)
    f32 = {n: (k.astype(np.float32).astype(np.float64), b.astype(np.float32).astype(np.float64))
           for n, (k, b) in layers.items()}
    with torch.no_grad():
        got = model(torch.from_numpy(window)).numpy()
    np.testing.assert_allclose(got, numpy_known(f32, window), rtol=0, atol=1e-5)


# ---- loader errors ---------------------------------------------------------------------------
def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_load_rejects_non_hdf5(tmp_path):
    path = tmp_path / "notes.h5"
    path.write_text("this is not HDF5\n")
    with pytest.raises(KnownFormatError) as err:
        load_keras_h5(path)
    msg = _one_line(err)
    assert str(path) in msg and "not an HDF5 file" in msg


def test_load_rejects_missing_layer(tmp_path):
    layers = random_layers()
    del layers["dense_7"]
    write_h5(tmp_path / "partial.h5", layers)
    with pytest.raises(KnownFormatError) as err:
        load_keras_h5(tmp_path / "partial.h5")
    msg = _one_line(err)
    assert "partial.h5" in msg and "'dense_7'" in msg and "missing" in msg


def test_load_rejects_missing_bias(tmp_path):
    write_h5(tmp_path / "nobias.h5", random_layers())
    with h5py.File(tmp_path / "nobias.h5", "a") as f:
        del f["dense_12/dense_12/bias:0"]
    with pytest.raises(KnownFormatError, match=r"'dense_12' has no bias:0") as err:
        load_keras_h5(tmp_path / "nobias.h5")
    _one_line(err)


@pytest.mark.parametrize("part", ["kernel", "bias"])
def test_load_rejects_wrong_shape(tmp_path, part):
    layers = random_layers()
    kernel, bias = layers["dense"]
    layers["dense"] = (kernel[:, :32], bias) if part == "kernel" else (kernel, bias[:10])
    write_h5(tmp_path / "shape.h5", layers)
    with pytest.raises(KnownFormatError) as err:
        load_keras_h5(tmp_path / "shape.h5")
    msg = _one_line(err)
    expected = "(5, 32), expected (5, 64)" if part == "kernel" else "(10,), expected (64,)"
    assert "shape.h5" in msg and f"'dense' {part} has shape {expected}" in msg


def test_load_rejects_non_finite_weights(tmp_path):
    layers = random_layers()
    layers["dense_3"][1][5] = np.nan
    write_h5(tmp_path / "nan.h5", layers)
    with pytest.raises(KnownFormatError, match=r"'dense_3' bias holds non-finite"):
        load_keras_h5(tmp_path / "nan.h5")


def test_load_official_names_missing_files(tmp_path):
    write_h5(tmp_path / OFFICIAL_FILES["conv"], random_layers())
    with pytest.raises(FileNotFoundError) as err:
        load_official(tmp_path)
    msg = _one_line(err)
    assert "missing KNOWN_FC.h5, KNOWN_Bias.h5;" in msg  # only the absent files are named
    assert "--official-dir must hold the three h5 files" in msg


@needs_reference
def test_load_official_records_provenance(official, tmp_path):
    assert official.source == "official" and official.scaling == "raw"
    assert official.provenance["files"] == OFFICIAL_FILES
    assert all(len(h) == 64 for h in official.provenance["sha256"].values())
    # a copied directory loads to the same hashes: provenance does not depend on where files are
    for name in OFFICIAL_FILES.values():
        shutil.copy(REF_DIR / name, tmp_path / name)
    assert load_official(tmp_path).provenance == official.provenance


# ---- scaling, KnownSet, serialisation ------------------------------------------------------
def _random_set(scaling="raw", seed=0) -> KnownSet:
    torch.manual_seed(seed)
    models = {}
    for kind in KINDS:
        m = KNOWN()
        for p in m.parameters():  # trained-looking weights, not the near-zero init
            torch.nn.init.normal_(p, std=0.3)
        models[kind] = m.eval()
    return KnownSet(models, scaling=scaling, source="test", provenance={"seed": seed, "note": ["a", 1.5]})


def test_scale_window_minmax_formula():
    w = torch.tensor([[1.0, 3.0, 2.0, 5.0, 4.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    scaled, s = scale_window(w, "minmax")
    expected_s = torch.tensor([2 * (4 + 1e-8 + 1e-5), 2 * (1e-8 + 1e-5)])
    torch.testing.assert_close(s, expected_s)
    torch.testing.assert_close(scaled, (w - w[:, :1]) / expected_s[:, None])
    raw, ones = scale_window(w, "raw")
    assert raw is w and torch.all(ones == 1)
    with pytest.raises(ValueError, match="unknown scaling"):
        scale_window(w, "zscore")


def test_known_set_residual_applies_minmax_scaling():
    ks = _random_set("minmax")
    w = 0.02 * torch.randn(500, 5).cumsum(1)
    scaled, s = scale_window(w, "minmax")
    with torch.no_grad():
        expected = ks.models["fc"](scaled) * s
    torch.testing.assert_close(ks.residual("fc", w, batch_size=128), expected, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="no KNOWN model for kind 'norm'"):
        ks.residual("norm", w)


def test_known_set_validates_keys_and_scaling():
    with pytest.raises(ValueError, match="needs models"):
        KnownSet({"conv": KNOWN()})
    with pytest.raises(ValueError, match="unknown scaling"):
        KnownSet({k: KNOWN() for k in KINDS}, scaling="log")


def test_save_and_load_round_trip_with_weights_only(tmp_path):
    ks = _random_set("minmax", seed=5)
    torch.save(save_known_set(ks), tmp_path / "ks.pt")
    back = known_set_from_dict(torch.load(tmp_path / "ks.pt", weights_only=True))
    assert (back.scaling, back.source, back.provenance) == (ks.scaling, ks.source, ks.provenance)
    w = 0.05 * torch.randn(300, 5)
    for kind in KINDS:
        assert torch.equal(back.residual(kind, w), ks.residual(kind, w))


def test_save_rejects_non_json_provenance():
    ks = _random_set()
    ks.provenance = {"path": Path("/tmp")}
    with pytest.raises(ValueError, match="not json-able"):
        save_known_set(ks)


def test_known_set_from_dict_rejects_foreign_dicts():
    with pytest.raises(KnownFormatError, match="not a saved KnownSet"):
        known_set_from_dict({"state": 1})
    d = save_known_set(_random_set())
    d["models"]["bias"].pop("head.bias")
    with pytest.raises(KnownFormatError, match="model 'bias' does not load") as err:
        known_set_from_dict(d)
    _one_line(err)


# ---- fast inference --------------------------------------------------------------------------
@pytest.mark.parametrize("batch_size", [None, 1, 333, 100_000])
def test_known_residual_equals_forward(batch_size):
    ks = _random_set(seed=7)
    w = 0.1 * torch.randn(1000, 5).cumsum(1)
    m = ks.models["conv"]
    with torch.no_grad():
        expected = m(w)
    got = known_residual(m, w, batch_size=batch_size)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert not got.is_inference() and not got.requires_grad
    got.add_(1)  # a normal tensor: callers may update it in place


def test_known_residual_empty_and_float64_input():
    m = _random_set().models["bias"]
    assert known_residual(m, torch.zeros(0, 5)).shape == (0,)
    w = 0.1 * torch.randn(50, 5, dtype=torch.float64)
    with torch.no_grad():
        expected = m(w.float())
    torch.testing.assert_close(known_residual(m, w), expected)


def test_module_docstring_example_runs():
    result = doctest.testmod(known_module)
    assert result.attempted > 0 and result.failed == 0
