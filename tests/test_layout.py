"""know_core.layout: flat vector <-> state_dict, tensor kinds, JSON round trip."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from know_core.layout import (
    KINDS,
    TensorSpec,
    flatten_state,
    layout_from_json,
    layout_size,
    layout_to_json,
    param_layout,
    unflatten_state,
)
from know_core.models import MODELS, build_model

# small enough to build and step quickly; resnet18 at width 8 instead of its 11M-param default
SMALL = {
    "simple-cnn": dict(in_channels=1, num_classes=10, image_size=8),
    "mlp": dict(in_channels=1, num_classes=10, image_size=8, width=16),
    "resnet": dict(in_channels=3, num_classes=5, image_size=16, width=8),
    "resnet18": dict(in_channels=3, num_classes=5, image_size=16, width=8),
}


def test_every_registered_model_is_covered():
    assert set(SMALL) == set(MODELS)


def _trained(name: str, seed: int = 0) -> nn.Module:
    """A model whose state differs from its init everywhere, BN running stats included."""
    torch.manual_seed(seed)
    kw = SMALL[name]
    m = build_model(name, **kw)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    m.train()
    for _ in range(3):
        x = torch.rand(6, kw["in_channels"], kw["image_size"], kw["image_size"])
        loss = m(x).logsumexp(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m


@pytest.mark.parametrize("name", sorted(SMALL))
def test_flatten_unflatten_round_trip_exact(name):
    m = _trained(name)
    state = m.state_dict()
    layout = param_layout(m)
    vec = flatten_state(state, layout)
    assert vec.dtype == np.float32 and vec.ndim == 1
    assert vec.size == layout_size(layout) == sum(t.numel() for t in state.values())
    assert [s.name for s in layout] == list(state)  # state_dict order

    back = unflatten_state(vec, layout)
    assert list(back) == list(state)
    for key, t in state.items():
        assert back[key].dtype == t.dtype, key
        assert back[key].shape == t.shape, key
        assert torch.equal(back[key], t), key

    # and the vector drives a fresh model to the identical function
    kw = SMALL[name]
    torch.manual_seed(123)
    fresh = build_model(name, **kw)
    fresh.load_state_dict(back)
    x = torch.rand(4, kw["in_channels"], kw["image_size"], kw["image_size"])
    m.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(m(x), fresh(x))
    np.testing.assert_array_equal(flatten_state(fresh.state_dict(), layout), vec)


@pytest.mark.parametrize("name", ["resnet", "resnet18"])
def test_bn_buffers_round_trip(name):
    m = _trained(name)
    layout = param_layout(m)
    by_name = {s.name: s for s in layout}
    counters = [k for k in m.state_dict() if k.endswith("num_batches_tracked")]
    assert counters
    for k in counters:
        assert by_name[k].dtype == "int64" and by_name[k].shape == () and by_name[k].size == 1
    back = unflatten_state(flatten_state(m.state_dict(), layout), layout)
    assert back["bn.num_batches_tracked"].dtype == torch.int64
    assert int(back["bn.num_batches_tracked"]) == 3  # three training forward passes
    # running stats have moved off their init (0 / 1) and survive exactly
    assert not torch.equal(back["bn.running_mean"], torch.zeros_like(back["bn.running_mean"]))
    assert not torch.equal(back["bn.running_var"], torch.ones_like(back["bn.running_var"]))
    assert torch.equal(back["bn.running_var"], m.bn.running_var)


def test_resnet_kinds():
    m = build_model("resnet", in_channels=3, num_classes=5, image_size=16, width=8)
    kinds = {s.name: s.kind for s in param_layout(m)}
    assert set(kinds.values()) == set(KINDS)
    assert kinds["stem.weight"] == "conv"
    assert kinds["layers.0.conv1.weight"] == "conv"
    assert kinds["layers.1.shortcut.0.weight"] == "conv"  # 1x1 projection: still conv
    assert kinds["head.weight"] == "fc"
    assert kinds["head.bias"] == "bias"
    for k in ("bn.weight", "bn.bias", "layers.1.shortcut.1.weight", "layers.2.bn2.bias"):
        assert kinds[k] == "norm", k
    for k in ("bn.running_mean", "bn.running_var", "bn.num_batches_tracked", "layers.1.shortcut.1.running_var"):
        assert kinds[k] == "norm_stat", k
    # every tensor is classified by its module, not only by its rank
    for name, kind in kinds.items():
        if name.endswith("running_mean") or name.endswith("num_batches_tracked"):
            assert kind == "norm_stat"
        elif ".bn" in f".{name}" and kind not in ("norm", "norm_stat"):
            pytest.fail(f"{name} is a BN tensor but has kind {kind}")


def test_simple_cnn_and_mlp_kinds():
    cnn = {s.name: s.kind for s in param_layout(build_model("simple-cnn", 1, 10, 8))}
    assert cnn["features.0.weight"] == "conv" and cnn["features.0.bias"] == "bias"
    assert cnn["fc.weight"] == "fc" and cnn["head.bias"] == "bias"
    assert "norm" not in cnn.values() and "norm_stat" not in cnn.values()
    mlp = {s.kind for s in param_layout(build_model("mlp", 1, 10, 8, width=16))}
    assert mlp == {"fc", "bias"}


@pytest.mark.parametrize("name", sorted(SMALL))
def test_offsets_contiguous(name):
    layout = param_layout(build_model(name, **SMALL[name]))
    assert layout[0].offset == 0
    for a, b in zip(layout, layout[1:]):
        assert b.offset == a.stop
    assert layout_size(layout) == layout[-1].stop
    assert all(s.size == int(np.prod(s.shape)) for s in layout)


def test_resnet18_default_shape_of_layout():
    # the width-64 ResNet-18 has 11.2M parameters: check the count without allocating more than once
    m = build_model("resnet18", in_channels=3, num_classes=10, image_size=32)
    n_params = sum(p.numel() for p in m.parameters())
    assert 11.1e6 < n_params < 11.3e6
    layout = param_layout(m)
    n_conv = sum(s.size for s in layout if s.kind == "conv")
    assert n_conv > 0.99 * n_params - 10 * 512  # nearly all of ResNet-18 is conv kernels


def test_layout_json_round_trip():
    m = build_model("resnet", in_channels=1, num_classes=3, image_size=8, width=4)
    layout = param_layout(m)
    text = layout_to_json(layout)
    assert isinstance(json.loads(text), list)
    back = layout_from_json(text)
    assert back == layout
    assert all(isinstance(s.shape, tuple) for s in back)
    assert layout_from_json(json.loads(text)) == layout  # also from the parsed list (zarr attrs)
    # a vector flattened with the original layout unflattens with the restored one
    vec = flatten_state(m.state_dict(), layout)
    restored = unflatten_state(vec, back)
    assert all(torch.equal(restored[k], v) for k, v in m.state_dict().items())


def test_shape_and_size_mismatches_are_errors():
    m = build_model("simple-cnn", 1, 10, 8)
    layout = param_layout(m)
    state = m.state_dict()
    with pytest.raises(ValueError, match="layout needs"):
        unflatten_state(np.zeros(layout_size(layout) - 1, np.float32), layout)
    bad = dict(state)
    bad["fc.weight"] = bad["fc.weight"].T
    with pytest.raises(ValueError, match="fc.weight"):
        flatten_state(bad, layout)
    del bad["fc.weight"]
    with pytest.raises(KeyError, match="fc.weight"):
        flatten_state(bad, layout)


def test_tensorspec_size_and_stop():
    s = TensorSpec("w", (2, 3, 4), "conv", 10)
    assert s.size == 24 and s.stop == 34 and s.dtype == "float32"
    assert TensorSpec("n", (), "norm_stat", 0, "int64").size == 1
