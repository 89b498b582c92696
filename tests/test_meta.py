"""know_core.pairs / meta / baselines: pairs, run split, coherence, meta-training, baselines."""
from __future__ import annotations

import doctest
import io

import numpy as np
import pytest
import torch

from know_core import baselines, meta, pairs as pairs_module
from know_core.baselines import constant_scale_fit, l1_table
from know_core.layout import TensorSpec
from know_core.meta import MetaConfig, train_known
from know_core.pairs import build_pairs, pair_log_sizes, per_kind_coherence, split_runs, step_coherence

# conv 0..1, fc 2..3, bias 4, norm 5..6 (never paired by default)
LAYOUT = [
    TensorSpec("c.weight", (1, 1, 2), "conv", 0),
    TensorSpec("f.weight", (1, 2), "fc", 2),
    TensorSpec("f.bias", (1,), "bias", 4),
    TensorSpec("n.weight", (2,), "norm", 5),
]


def handmade(S=7, n=7):
    """traj[k, j] = 100·k + j: every value names its stage and scalar."""
    return (100 * np.arange(S)[:, None] + np.arange(n)[None, :]).astype(np.float32)


# ---------------------------------------------------------------- build_pairs


def test_build_pairs_exact_rows_and_targets():
    pairs = build_pairs(handmade(), LAYOUT)
    assert list(pairs) == ["conv", "fc", "bias"]
    X, Y = pairs["conv"]
    assert X.dtype == np.float32 and Y.dtype == np.float32
    # window-major: k=0 (target = full data, stage 0) for scalars 0,1, then k=1
    np.testing.assert_array_equal(
        X,
        [
            [500, 400, 300, 200, 100],
            [501, 401, 301, 201, 101],
            [600, 500, 400, 300, 200],
            [601, 501, 401, 301, 201],
        ],
    )
    np.testing.assert_array_equal(Y, [0, 1, 100, 101])
    Xf, Yf = pairs["fc"]
    np.testing.assert_array_equal(Xf[:, -1], [102, 103, 202, 203])
    np.testing.assert_array_equal(Yf, [2, 3, 102, 103])
    Xb, Yb = pairs["bias"]
    np.testing.assert_array_equal(Xb, [[504, 404, 304, 204, 104], [604, 504, 404, 304, 204]])
    np.testing.assert_array_equal(Yb, [4, 104])


def test_build_pairs_reverse_and_extra_kinds():
    pairs = build_pairs(handmade(), LAYOUT, reverse=True)
    X, Y = pairs["bias"]
    # predict the more-forgotten value; column 4 is the stage next to the target
    np.testing.assert_array_equal(X, [[4, 104, 204, 304, 404], [104, 204, 304, 404, 504]])
    np.testing.assert_array_equal(Y, [504, 604])
    norm = build_pairs(handmade(), LAYOUT, kinds=("norm",))
    assert list(norm) == ["norm"]
    np.testing.assert_array_equal(norm["norm"][1], [5, 6, 105, 106])


def test_build_pairs_empty_kind_and_shape_checks():
    layout = [TensorSpec("c.weight", (1, 1, 3), "conv", 0)]
    pairs = build_pairs(handmade(n=3), layout)
    assert pairs["fc"][0].shape == (0, 5) and pairs["fc"][1].shape == (0,)
    with pytest.raises(ValueError, match="layout needs 3"):
        build_pairs(handmade(n=4), layout)


def test_build_pairs_max_per_kind_subsamples_scalars():
    layout = [TensorSpec("c.weight", (2, 5, 1), "conv", 0)]
    traj = handmade(S=7, n=10)
    X, Y = build_pairs(traj, layout, max_per_kind=6, rng=3)["conv"]
    assert X.shape == (6, 5)  # 2 windows -> 3 scalars
    scalars = Y[:3].astype(int)
    assert len(set(scalars)) == 3 and list(scalars) == sorted(scalars)
    np.testing.assert_array_equal(Y[3:], Y[:3] + 100)  # same scalars in every window
    np.testing.assert_array_equal(X[:, -1], Y + 100)
    again = build_pairs(traj, layout, max_per_kind=6, rng=3)["conv"]
    np.testing.assert_array_equal(again[0], X)
    seeds = {tuple(build_pairs(traj, layout, max_per_kind=6, rng=s)["conv"][1]) for s in range(10)}
    assert len(seeds) > 1
    # a cap above the row count keeps everything; a tiny cap keeps one scalar
    assert build_pairs(traj, layout, max_per_kind=1000)["conv"][0].shape == (20, 5)
    assert build_pairs(traj, layout, max_per_kind=1)["conv"][0].shape == (2, 5)


def test_build_pairs_too_short():
    with pytest.raises(ValueError) as e:
        build_pairs(handmade(S=5), LAYOUT)
    assert str(e.value) == "run has 5 stages; meta-training needs at least window+1 = 6"
    assert build_pairs(handmade(S=6), LAYOUT)["conv"][0].shape == (2, 5)


def test_pair_log_sizes_matches_rows():
    sizes = [64, 32, 16, 8, 4, 2, 1]
    ls = pair_log_sizes(sizes, n_rows=4)  # 2 windows x 2 scalars
    expect0 = np.log([2, 4, 8, 16, 32, 64])
    expect1 = np.log([1, 2, 4, 8, 16, 32])
    np.testing.assert_allclose(ls, [expect0, expect0, expect1, expect1])
    rev = pair_log_sizes(sizes, n_rows=2, reverse=True)
    np.testing.assert_allclose(rev[0], np.log([64, 32, 16, 8, 4, 2]))
    with pytest.raises(ValueError):
        pair_log_sizes(sizes, n_rows=3)


# ---------------------------------------------------------------- split_runs


def test_split_runs_by_run_and_deterministic():
    ids = [f"run-{i}" for i in range(10)]
    train, val = split_runs(ids, 0.25, seed=0)
    assert not set(train) & set(val)
    assert sorted(train + val) == sorted(ids)
    assert len(val) == 2  # round(2.5) under banker's rounding
    assert split_runs(list(reversed(ids)), 0.25, seed=0) == (train, val)
    assert len({tuple(split_runs(ids, 0.25, seed=s)[1]) for s in range(20)}) > 1
    t2, v2 = split_runs(["a", "b"], 0.01, seed=1)
    assert len(t2) == 1 and len(v2) == 1
    t3, v3 = split_runs(["a", "b", "c"], 0.99, seed=1)
    assert len(t3) == 1 and len(v3) == 2
    with pytest.raises(ValueError):
        split_runs(["only"], 0.25, seed=0)
    with pytest.raises(ValueError):
        split_runs(["a", "a", "b"], 0.25, seed=0)


# ---------------------------------------------------------------- coherence


def test_step_coherence_parallel_and_random():
    rng = np.random.default_rng(0)
    n = 20_000
    base, step = rng.normal(size=n), rng.normal(size=n)
    # steps of different lengths, all in one direction
    steps = np.cumsum([0.0, 1.0, 0.5, 2.0, 0.3, 1.7])
    parallel = np.stack([base + t * step for t in steps[::-1]]).astype(np.float32)
    assert step_coherence(parallel) == pytest.approx(1.0, abs=1e-6)
    walk = np.cumsum(rng.normal(size=(6, n)), axis=0).astype(np.float32)
    assert abs(step_coherence(walk)) < 0.03
    zigzag = np.stack([base, base + step, base, base + step]).astype(np.float32)
    assert step_coherence(zigzag) == pytest.approx(-1.0, abs=1e-6)
    with pytest.raises(ValueError):
        step_coherence(parallel[:2])


def test_per_kind_coherence():
    rng = np.random.default_rng(1)
    layout = [TensorSpec("c.weight", (10, 10, 10), "conv", 0), TensorSpec("f.weight", (50, 20), "fc", 1000)]
    traj = np.cumsum(rng.normal(size=(6, 2000)), axis=0)
    traj[:, :1000] = np.arange(6)[::-1, None] * rng.normal(size=1000)  # straight conv
    out = per_kind_coherence(traj.astype(np.float32), layout)
    assert set(out) == {"conv", "fc"}
    assert out["conv"] == pytest.approx(1.0, abs=1e-6)
    assert abs(out["fc"]) < 0.1


# ---------------------------------------------------------------- training

try:
    from know_core import known
except ImportError:  # written in parallel; the tests below need it
    known = None
needs_known = pytest.mark.skipif(known is None, reason="know_core.known not present yet")


def shrink_pairs(m, seed):
    """Windows of random weights with Y = 0.8·w5 ('official KNOWN is mostly shrinkage')."""
    rng = np.random.default_rng(seed)
    w5 = rng.normal(0, 0.3, m)
    X = np.stack([w5 * 1.25 ** (5 - j) + rng.normal(0, 0.05, m) for j in range(1, 5)] + [w5], 1)
    return X.astype(np.float32), (0.8 * w5).astype(np.float32)


@pytest.fixture(scope="module")
def data():
    X, Y = shrink_pairs(20_000, 0)
    Xv, Yv = shrink_pairs(5_000, 1)
    return X, Y, Xv, Yv


def test_constant_scale_fit_recovers_shrinkage(data):
    X, Y, _, _ = data
    assert constant_scale_fit(X, Y) == pytest.approx(0.8, abs=1e-6)
    assert constant_scale_fit(np.zeros((3, 5)), np.ones(3)) == 1.0


@needs_known
def test_train_known_beats_identity(data):
    X, Y, Xv, Yv = data
    cfg = MetaConfig(epochs=8, batch_size=512, lr=3e-3, patience=3)
    model, hist = train_known(X, Y, Xv, Yv, cfg)
    identity = float(np.abs(Xv[:, -1] - Yv).mean())
    best = min(r["val_l1"] for r in hist)
    assert best < 0.5 * identity, (best, identity)
    assert hist[-1]["best_val_l1"] == best
    assert not model.training
    # returned weights are the best epoch's
    with torch.no_grad():
        scaled, s = known.scale_window(torch.as_tensor(Xv), cfg.scaling)
        pred = torch.as_tensor(Xv[:, -1]) + model(scaled).reshape(-1) * torch.as_tensor(s).reshape(-1)
    assert float((pred - torch.as_tensor(Yv)).abs().double().mean()) == pytest.approx(best, rel=1e-5)


@needs_known
def test_early_stopping_when_val_stalls(data):
    X, Y, Xv, Yv = data
    # lr = 0: val L1 never improves after epoch 1, so training stops after 1 + patience
    hist = train_known(X, Y, Xv, Yv, MetaConfig(epochs=30, batch_size=4096, lr=0.0, patience=2))[1]
    assert [r["epoch"] for r in hist] == [1, 2, 3]
    # val wants the opposite of train (grow, not shrink): stops early, keeps the best weights
    cfg = MetaConfig(epochs=30, batch_size=1024, lr=3e-3, patience=2)
    model, hist = train_known(X, Y, Xv, 1.25 * Xv[:, -1], cfg)
    assert len(hist) < cfg.epochs
    assert hist[-1]["best_val_l1"] == min(r["val_l1"] for r in hist)


@needs_known
def test_resume_gives_same_result(data):
    X, Y, Xv, Yv = data
    X, Y = X[:6000], Y[:6000]
    cfg = MetaConfig(epochs=5, batch_size=1000, lr=3e-3, patience=10)
    saved = {}

    def keep(row, state):
        assert row["epoch"] == state["epoch"] == len(state["history"])
        buf = io.BytesIO()
        torch.save(state, buf)
        saved[row["epoch"]] = buf.getvalue()

    full, hist_full = train_known(X, Y, Xv, Yv, cfg, on_epoch=keep)
    assert sorted(saved) == [1, 2, 3, 4, 5]
    state = torch.load(io.BytesIO(saved[2]), weights_only=True)
    resumed_rows = []
    resumed, hist_res = train_known(
        X, Y, Xv, Yv, cfg, resume_state=state, on_epoch=lambda r, s: resumed_rows.append(r)
    )
    assert [r["epoch"] for r in resumed_rows] == [3, 4, 5]
    a, b = full.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["val_l1"] for r in hist_res] == [r["val_l1"] for r in hist_full]
    # a finished state resumes to the same model without training
    done = torch.load(io.BytesIO(saved[5]), weights_only=True)
    again, hist_again = train_known(X, Y, Xv, Yv, cfg, resume_state=done)
    assert len(hist_again) == 5
    assert all(torch.equal(a[k], again.state_dict()[k]) for k in a)
    with pytest.raises(ValueError, match="lr"):
        train_known(X, Y, Xv, Yv, MetaConfig(epochs=5, lr=1e-2), resume_state=state)


@needs_known
def test_train_known_minmax_and_epoch_penalty_run(data):
    X, Y, Xv, Yv = data
    for cfg in (MetaConfig(epochs=1, scaling="minmax"), MetaConfig(epochs=1, l1_mode="epoch")):
        _, hist = train_known(X[:2000], Y[:2000], Xv[:500], Yv[:500], cfg)
        assert np.isfinite(hist[0]["val_l1"])


# ---------------------------------------------------------------- l1_table


@needs_known
def test_l1_table(data):
    X, Y, Xv, Yv = data
    model, _ = train_known(X, Y, Xv, Yv, MetaConfig(epochs=1, batch_size=2048))
    ks = known.KnownSet({k: model for k in ("conv", "fc", "bias")}, "raw", "test", {})
    train = {"conv": (X, Y), "bias": (X[:100], Y[:100])}
    # bias: windows linear in stage index -> taskvector and logfit are exact there
    lin = np.random.default_rng(2).normal(size=(300, 2)).astype(np.float32)
    Xb = (lin[:, :1] + lin[:, 1:] * np.arange(5)).astype(np.float32)
    Yb = (lin[:, 0] + lin[:, 1] * 5).astype(np.float32)
    val = {"conv": (Xv, Yv), "bias": (Xb, Yb)}
    df = l1_table(train, val, {"known-raw": ks})
    methods = ["known-raw", "taskvector", "logfit", "identity", "constant-scale"]
    assert list(df.columns) == ["method", "kind", "val_l1", "n_pairs"]
    assert set(zip(df.method, df.kind)) == {(m, k) for m in methods for k in ("conv", "bias", "all")}
    assert len(df) == 15
    t = df.set_index(["method", "kind"])
    assert t.loc[("identity", "conv"), "val_l1"] == pytest.approx(np.abs(Xv[:, -1] - Yv).mean(), rel=1e-6)
    assert t.loc[("constant-scale", "conv"), "val_l1"] < 1e-6
    assert t.loc[("taskvector", "bias"), "val_l1"] < 1e-5
    assert t.loc[("logfit", "bias"), "val_l1"] < 1e-5
    assert t.loc[("identity", "all"), "n_pairs"] == len(Yv) + len(Yb)
    w = (t.loc[("identity", "conv"), "val_l1"] * len(Yv) + t.loc[("identity", "bias"), "val_l1"] * len(Yb)) / (
        len(Yv) + len(Yb)
    )
    assert t.loc[("identity", "all"), "val_l1"] == pytest.approx(w)
    # explicit log sizes: geometric sizes give the same logfit as the default
    sizes = {"bias": pair_log_sizes([2.0**-k for k in range(6)], n_rows=len(Yb))}
    df2 = l1_table(train, val, {}, sizes=sizes)
    t2 = df2.set_index(["method", "kind"])
    assert t2.loc[("logfit", "bias"), "val_l1"] == pytest.approx(t.loc[("logfit", "bias"), "val_l1"], abs=1e-6)
    assert "known-raw" not in set(df2.method)


@needs_known
def test_module_docstring_example_runs():
    res = doctest.testmod(meta, verbose=False)
    assert res.attempted > 0 and res.failed == 0


@pytest.mark.parametrize("module", [pairs_module, baselines], ids=lambda m: m.__name__)
def test_other_module_docstring_examples_run(module):  # meta: test_module_docstring_example_runs
    res = doctest.testmod(module, verbose=False)
    assert res.attempted > 0 and res.failed == 0


def test_coherence_ignores_growing_counters_and_norm_statistics():
    """A trajectory whose BN counters and running statistics grow the same way every stage,
    while its weights random-walk: the coherence of what KNOWN predicts is about 0."""
    from know_core.layout import TensorSpec
    from know_core.pairs import per_kind_coherence, step_coherence

    rng = np.random.default_rng(0)
    layout = [TensorSpec("conv.weight", (64, 8, 3, 3), "conv", 0), TensorSpec("bn.running_var", (64,), "norm_stat", 4608),
              TensorSpec("bn.num_batches_tracked", (), "norm_stat", 4672, "int64")]
    S = 7
    traj = np.zeros((S, 4673))
    traj[:, :4608] = np.cumsum(rng.normal(0, 1e-3, (S, 4608)), axis=0)  # a random walk
    traj[:, 4608:4672] = np.arange(S)[::-1, None] * 0.5  # statistics drift one way
    traj[:, 4672] = np.array([118 * 2 ** -k for k in range(S)]).cumsum()[::-1] * 1000  # counters grow
    assert step_coherence(traj) > 0.99  # the whole vector: the counters dominate
    coh = step_coherence(traj, layout)
    assert abs(coh) < 0.1 and abs(per_kind_coherence(traj, layout)["conv"] - coh) < 1e-12
    assert set(per_kind_coherence(traj, layout)) == {"conv"}
