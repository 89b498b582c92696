"""Predictors on plain tensors: naive, task vector, log-fit, KNOW and its S-ablation."""
from __future__ import annotations

import doctest
import math

import pytest
import torch

from know_core import predict as predict_module
from know_core.known import KNOWN, KnownSet, known_residual, load_official
from know_core.predict import (
    PREDICTORS,
    NonFiniteError,
    PredictorConfig,
    check_finite,
    predict_next,
    predict_steps,
    shrink_control,
    sizes_from_stages,
    virtual_factors,
    window_from_stages,
)

from conftest import REFERENCE_DIR as REF_DIR

SIZES5 = [3125.0, 6250.0, 12500.0, 25000.0, 50000.0]  # r = 0.5, oldest -> newest


@pytest.fixture(scope="module")
def known_set() -> KnownSet:
    """Three distinct KNOWN models with trained-looking (not near-zero) weights."""
    torch.manual_seed(0)
    models = {}
    for kind in ("conv", "fc", "bias"):
        m = KNOWN()
        for p in m.parameters():
            torch.nn.init.normal_(p, std=0.3)
        models[kind] = m.eval()
    return KnownSet(models, scaling="raw", source="test")


def trajectory(n=64, rows=5, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    start = 0.1 * torch.randn(n, generator=g)
    steps = 0.01 * torch.randn(rows, n, generator=g)
    return start + steps.cumsum(0)  # (rows, n), oldest -> newest


def cfg_for(name, known_set, **kw) -> PredictorConfig:
    return PredictorConfig(name, known=known_set if name.startswith("know") else None, **kw)


# ---- config ----------------------------------------------------------------------------------
def test_unknown_predictor_lists_valid_names():
    with pytest.raises(ValueError) as err:
        PredictorConfig("know-s9")
    msg = str(err.value)
    assert "\n" not in msg and all(name in msg for name in PREDICTORS)


def test_know_without_known_set_is_rejected():
    with pytest.raises(ValueError, match="needs a KnownSet"):
        PredictorConfig("know-s3")


# ---- baselines -------------------------------------------------------------------------------
def test_naive_is_newest_row():
    w = trajectory()
    out = predict_steps(PredictorConfig("naive"), w, "conv", SIZES5, steps=3)
    assert all(torch.equal(row, w[-1]) for row in out)


def test_taskvector_recurrence_is_linear_in_k():
    w = trajectory()
    out = predict_steps(PredictorConfig("taskvector"), w, "fc", SIZES5, steps=3)
    for k in (1, 2, 3):
        torch.testing.assert_close(out[k - 1], w[-1] + k * (w[-1] - w[-2]))


def test_taskvector_alpha_scales_the_step():
    w = trajectory()
    out = predict_next(PredictorConfig("taskvector", alpha=0.5), w, "bias", SIZES5)
    torch.testing.assert_close(out, w[-1] + 0.5 * (w[-1] - w[-2]))


def test_logfit_extrapolates_log_linear_data_exactly():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(32, generator=g), 0.1 * torch.randn(32, generator=g)
    sizes = [1000 * 3.0**k for k in range(5)]  # r = 1/3
    w = a + b * torch.tensor([math.log(s) for s in sizes])[:, None]
    out = predict_steps(PredictorConfig("logfit"), w, "conv", sizes, steps=3)
    for k in (1, 2, 3):
        torch.testing.assert_close(out[k - 1], a + b * math.log(sizes[-1] * 3.0**k), rtol=1e-5, atol=1e-5)


def test_logfit_is_least_squares_fit():
    w = trajectory(n=8)
    sizes = SIZES5
    x = torch.tensor([math.log(s) for s in sizes], dtype=torch.float64)
    design = torch.stack([torch.ones(5, dtype=torch.float64), x], 1)
    coef = torch.linalg.lstsq(design, w.double()).solution  # (2, n)
    expected = coef[0] + coef[1] * math.log(sizes[-1] ** 2 / sizes[-2])
    got = predict_next(PredictorConfig("logfit"), w, "fc", sizes)
    torch.testing.assert_close(got, expected.float(), rtol=1e-5, atol=1e-6)


# ---- kinds that are left alone ----------------------------------------------------------------
@pytest.mark.parametrize("name", PREDICTORS)
def test_norm_stat_and_norm_unchanged_for_every_predictor(name, known_set):
    w = trajectory()
    cfg = cfg_for(name, known_set)
    for kind in ("norm_stat", "norm"):
        out = predict_steps(cfg, w, kind, SIZES5, steps=2)
        assert all(torch.equal(row, w[-1]) for row in out), kind
    # with predict_norm, γ/β are predicted, but running statistics still never are
    cfg = cfg_for(name, known_set, predict_norm=True)
    assert torch.equal(predict_next(cfg, w, "norm_stat", SIZES5), w[-1])
    if name != "naive":
        assert not torch.equal(predict_next(cfg, w, "norm", SIZES5), w[-1])


def test_norm_with_predict_norm_uses_the_bias_model(known_set):
    w = trajectory()
    cfg = cfg_for("know", known_set, predict_norm=True)
    torch.testing.assert_close(predict_next(cfg, w, "norm", SIZES5), predict_next(cfg, w, "bias", SIZES5))


def test_unknown_kind_is_rejected():
    with pytest.raises(ValueError, match="unknown kind 'weight'"):
        predict_next(PredictorConfig("naive"), trajectory(), "weight", SIZES5)


# ---- KNOW ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["conv", "fc", "bias"])
def test_know_routes_kind_to_its_model(known_set, kind):
    w = trajectory()
    with torch.no_grad():
        expected = w[-1] + known_set.models[kind](w.t().contiguous())
    torch.testing.assert_close(predict_next(cfg_for("know", known_set), w, kind, SIZES5), expected,
                               rtol=1e-5, atol=1e-6)
    others = [m for k, m in known_set.models.items() if k != kind]
    with torch.no_grad():
        assert all(not torch.allclose(expected, w[-1] + m(w.t().contiguous())) for m in others)


def test_know_uses_the_newest_five_rows(known_set):
    w = trajectory(rows=7)
    sizes = [1000 * 2.0**k for k in range(7)]
    cfg = cfg_for("know", known_set)
    torch.testing.assert_close(predict_next(cfg, w, "conv", sizes), predict_next(cfg, w[-5:], "conv", sizes[-5:]))


@pytest.mark.parametrize("k", [2, 3, 4])
def test_know_s_pads_with_the_oldest_of_its_rows(known_set, k):
    w = trajectory()
    padded = torch.cat([w[-k : -k + 1].expand(5 - k, -1), w[-k:]])  # zero older diffs
    expected = predict_next(cfg_for("know", known_set), padded, "fc", SIZES5)
    got = predict_next(cfg_for(f"know-s{k}", known_set), w, "fc", SIZES5)
    torch.testing.assert_close(got, expected)
    older = w.clone()
    older[: 5 - k] += 1.0  # rows the ablation must not read
    torch.testing.assert_close(predict_next(cfg_for(f"know-s{k}", known_set), older, "fc", SIZES5), got)


def test_know_s2_runs_on_two_stages(known_set):
    w = trajectory(rows=2)
    out = predict_steps(cfg_for("know-s2", known_set), w, "bias", SIZES5[-2:], steps=3)
    assert out.shape == (3, w.shape[1]) and torch.isfinite(out).all()


def test_know_steps_shift_the_window(known_set):
    w = trajectory()
    cfg = cfg_for("know", known_set)
    out = predict_steps(cfg, w, "conv", SIZES5, steps=3)
    window, sizes = w, list(SIZES5)
    for k in range(3):
        new = predict_next(cfg, window, "conv", sizes)
        torch.testing.assert_close(out[k], new)
        window, sizes = torch.cat([window[1:], new[None]]), sizes[1:] + [sizes[-1] * 2]


def test_know_minmax_set_adds_scaled_residual(known_set):
    ks = KnownSet(known_set.models, scaling="minmax", source="test")
    w = trajectory()
    got = predict_next(PredictorConfig("know", known=ks), w, "fc", SIZES5)
    torch.testing.assert_close(got, w[-1] + ks.residual("fc", w.t().contiguous()))


@pytest.mark.needs_reference
def test_official_know_prediction_is_finite_and_small():
    ks = load_official(REF_DIR)
    w = trajectory(n=4096)
    out = predict_steps(PredictorConfig("know", known=ks), w, "conv", SIZES5, steps=3)
    assert torch.isfinite(out).all()
    assert (out - w[-1]).abs().max() < 1.0  # the residual is a tanh: at most 1 per step


# ---- short trajectories --------------------------------------------------------------------------
@pytest.mark.parametrize("name,needed", [("know", 5), ("know-s4", 4), ("know-s3", 3), ("taskvector", 2), ("logfit", 2)])
def test_too_short_window_names_stages_and_need(known_set, name, needed):
    w = trajectory(rows=needed - 1)
    with pytest.raises(ValueError) as err:
        predict_next(cfg_for(name, known_set), w, "conv", SIZES5[-(needed - 1):])
    assert str(err.value) == f"trajectory has {needed - 1} stages, predictor {name} needs at least {needed}"


def test_sizes_must_match_and_increase():
    w = trajectory()
    with pytest.raises(ValueError, match="4 sizes for a window of 5"):
        predict_next(PredictorConfig("logfit"), w, "fc", SIZES5[1:])
    with pytest.raises(ValueError, match="increasing"):
        predict_next(PredictorConfig("logfit"), w, "fc", SIZES5[::-1])


# ---- store order, factors ---------------------------------------------------------------------------
def test_window_from_stages_reverses_store_order():
    stages = torch.arange(7, dtype=torch.float32)[:, None].expand(7, 3)  # row i = stage i
    w = window_from_stages(stages, window=5)
    assert w[:, 0].tolist() == [4, 3, 2, 1, 0]  # oldest (stage 4) -> full data (stage 0)
    assert window_from_stages(stages[:3])[:, 0].tolist() == [2, 1, 0]  # short stays short
    assert sizes_from_stages([1000, 500, 250, 125, 62.5, 31.25], window=5) == [62.5, 125, 250, 500, 1000]


def test_virtual_factors():
    assert virtual_factors(0.5, 3) == pytest.approx([2, 4, 8])
    assert virtual_factors(1 / 3, 2) == pytest.approx([3, 9])


# ---- helpers ----------------------------------------------------------------------------------------
def test_shrink_control_is_the_projection():
    g = torch.Generator().manual_seed(2)
    theta0 = torch.randn(4, 3, 3, 3, generator=g)
    pred = 0.45 * theta0 + 0.01 * torch.randn(4, 3, 3, 3, generator=g)
    c = (pred * theta0).sum() / (theta0 * theta0).sum()
    out = shrink_control(theta0, pred)
    torch.testing.assert_close(out, c * theta0)
    torch.testing.assert_close((pred - out).flatten() @ theta0.flatten(), torch.tensor(0.0), atol=1e-4, rtol=0)
    zeros = torch.zeros(5)
    assert torch.equal(shrink_control(zeros, torch.ones(5)), zeros)


def test_check_finite_names_the_tensor():
    t = torch.tensor([1.0, float("nan"), float("inf")])
    with pytest.raises(NonFiniteError, match=r"layer1\.0\.conv1\.weight: 2 of 3 values"):
        check_finite(t, "layer1.0.conv1.weight")
    ok = torch.ones(3)
    assert check_finite(ok, "x") is ok


def test_known_residual_equals_forward_on_predict_windows(known_set):
    w = trajectory(n=5000).t().contiguous()
    m = known_set.models["conv"]
    with torch.no_grad():
        expected = m(w)
    torch.testing.assert_close(known_residual(m, w, batch_size=1024), expected, rtol=1e-5, atol=1e-6)


def test_module_docstring_example_runs():
    result = doctest.testmod(predict_module)
    assert result.attempted > 0 and result.failed == 0


def test_logfit_fits_once_and_extrapolates_that_line_to_every_step():
    """On a saturating curve a refit on its own predictions drifts; logfit evaluates the one
    least-squares line of the observed window at sizes N0 / r^k."""
    sizes = [62.5, 125, 250, 500, 1000]
    x = torch.tensor([math.log(s) for s in sizes], dtype=torch.float64)
    w = (1 - torch.exp(-x / 3))[:, None].float().expand(5, 4).contiguous()  # saturating in log(size)
    design = torch.stack([torch.ones(5, dtype=torch.float64), x], 1)
    coef = torch.linalg.lstsq(design, w.double()).solution
    out = predict_steps(PredictorConfig("logfit"), w, "fc", sizes, steps=3, r=0.5)
    for k in (1, 2, 3):
        expected = coef[0] + coef[1] * math.log(1000 * 2.0**k)
        torch.testing.assert_close(out[k - 1], expected.float(), rtol=1e-5, atol=1e-6)
    # the recurrence (refit on its own predictions) gives a different third step
    window, sz, rec = w.clone(), list(sizes), []
    for _ in range(3):
        new = predict_next(PredictorConfig("logfit"), window, "fc", sz, 0.5)
        rec.append(new)
        window, sz = torch.cat([window[1:], new[None]]), sz[1:] + [sz[-1] * 2]
    assert not torch.allclose(rec[2], out[2], rtol=1e-4, atol=1e-5)
