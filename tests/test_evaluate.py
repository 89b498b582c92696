"""Tests for know_core.evaluate on real data (scikit-learn's 8x8 digits), no mocks."""
from __future__ import annotations

import copy
import logging
import math
import textwrap

import pytest
import torch
from torch import nn

from know_core import evaluate as ev
from know_core.evaluate import FinetuneConfig, evaluate, finetune, replace_head
from know_core.probe import linear_probe, recalibrate_bn

CHANCE = 0.1  # ten digit classes


# --------------------------------------------------------------------------- models
# Tiny models that satisfy the project contract: forward_features -> (N, F), head: nn.Linear.


class BNNet(nn.Module):
    """Conv-BN-ReLU x2, bias-free convs (so scaling a conv kernel scales its output)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
            nn.MaxPool2d(2), nn.Flatten(),
        )
        self.head = nn.Linear(128, num_classes)

    def forward_features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.head(self.forward_features(x))


class PlainNet(nn.Module):
    """No normalisation at all; a dropout layer exercises the seeded global RNG."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.1),
        )
        self.head = nn.Linear(32, num_classes)

    def forward_features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.head(self.forward_features(x))


def make(cls, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return cls()


def states_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def strip_time(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "wall_s"} for r in rows]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny ops: one thread avoids oversubscription on a shared 2-core box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits():
    """(train, test) from load_digits as (N, 1, 8, 8) float32 in [0, 1]; fixed split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return (x[:1200], y[:1200]), (x[1200:], y[1200:])


# Faster learning rates than the release so a from-scratch tiny net learns in a few epochs.
FAST = dict(lr1=1e-2, lr2=5e-3, batch_size=64)


@pytest.fixture(scope="module")
def trained_bn(digits):
    train, test = digits
    model = make(BNNet)
    rows = finetune(model, 10, train, test, FinetuneConfig(phase1_epochs=1, phase2_epochs=3, **FAST))
    return model, rows


@pytest.fixture(scope="module")
def trained_plain(digits):
    train, test = digits
    model = make(PlainNet)
    start = copy.deepcopy(model)
    rows = finetune(model, 10, train, test, FinetuneConfig(phase1_epochs=1, phase2_epochs=5, **FAST))
    return model, rows, start


# --------------------------------------------------------------------------- config / head


def test_config_defaults():
    cfg = FinetuneConfig()
    assert (cfg.phase1_epochs, cfg.phase2_epochs) == (2, 8)
    assert (cfg.lr1, cfg.lr2, cfg.batch_size) == (1e-3, 4e-4, 128)
    assert (cfg.seed, cfg.device, cfg.weight_decay) == (0, "cpu", 0.0)


def test_replace_head_is_seeded_and_independent_of_global_rng():
    a, b = make(BNNet, seed=1), make(BNNet, seed=2)
    torch.manual_seed(123)
    replace_head(a, 5, seed=7)
    torch.manual_seed(456)
    replace_head(b, 5, seed=7)
    assert a.head.weight.shape == (5, 128) and a.head.bias.shape == (5,)
    assert torch.equal(a.head.weight, b.head.weight) and torch.equal(a.head.bias, b.head.bias)
    bound = 1 / math.sqrt(128)
    assert a.head.weight.abs().max() <= bound and a.head.weight.std() > bound / 4
    replace_head(b, 5, seed=8)
    assert not torch.equal(a.head.weight, b.head.weight)
    # the rest of the model is untouched
    c = make(BNNet, seed=1)
    replace_head(c, 5, seed=7)
    assert states_equal(a, c)


def test_replace_head_keeps_dtype():
    m = make(PlainNet).double()
    replace_head(m, 3, seed=0)
    assert m.head.weight.dtype == torch.float64
    assert m(torch.rand(2, 1, 8, 8, dtype=torch.float64)).shape == (2, 3)


# --------------------------------------------------------------------------- evaluate


def test_evaluate_matches_direct_computation(digits):
    _, (x, y) = digits
    m = make(BNNet)
    m.train()
    acc, loss = evaluate(m, x, y, batch_size=100)
    assert m.training and all(mod.training for mod in m.modules())  # mode restored
    m.eval()
    with torch.no_grad():
        logits = m(x)
    assert acc == pytest.approx((logits.argmax(1) == y).float().mean().item())
    assert loss == pytest.approx(nn.functional.cross_entropy(logits, y).item(), rel=1e-5)


# --------------------------------------------------------------------------- finetune


def test_finetune_rows_and_learning_bn(trained_bn, digits):
    model, rows = trained_bn
    assert len(rows) == 1 + 3
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert [r["phase"] for r in rows] == [1, 2, 2, 2]
    for r in rows:
        assert set(r) == {"epoch", "phase", "test_acc", "test_loss", "train_loss", "wall_s"}
        assert 0 < r["test_acc"] <= 1
        assert math.isfinite(r["test_loss"]) and math.isfinite(r["train_loss"])
        assert r["wall_s"] > 0
    assert rows[-1]["test_acc"] > 0.85  # chance is 0.1
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    # the last row is the returned model's accuracy
    assert evaluate(model, *digits[1])[0] == pytest.approx(rows[-1]["test_acc"])
    assert not model.training
    assert all(p.requires_grad for p in model.parameters())


def test_finetune_rows_and_learning_plain(trained_plain):
    _, rows, _ = trained_plain
    assert len(rows) == 1 + 5
    assert [r["phase"] for r in rows] == [1] + [2] * 5
    assert all(0 < r["test_acc"] <= 1 for r in rows)
    assert rows[-1]["test_acc"] > 0.7  # 0.85-0.88 over four seeds; dropout, few epochs


def test_finetune_on_epoch_and_new_class_count(digits):
    (x, y), (xt, yt) = digits
    # a 5-class task from a 10-class model: labels 0..4 only
    tr, te = y < 5, yt < 5
    m = make(BNNet)
    seen = []
    rows = finetune(m, 5, (x[tr][:300], y[tr][:300]), (xt[te], yt[te]),
                    FinetuneConfig(phase1_epochs=1, phase2_epochs=1, **FAST), on_epoch=seen.append)
    assert m.head.out_features == 5
    assert seen == rows and len(rows) == 2


def test_phase1_freezes_all_but_head_and_norm_affine(digits):
    (x, y), test = digits
    train = (x[:500], y[:500])
    cfg = FinetuneConfig(phase1_epochs=2, phase2_epochs=0, **FAST)

    m = make(BNNet)
    before = copy.deepcopy(m)
    rows = finetune(m, 10, train, test, cfg)
    assert len(rows) == 2 and all(r["phase"] == 1 for r in rows)
    for i in (0, 4):  # both convs
        assert torch.equal(m.body[i].weight, before.body[i].weight)
    for i in (1, 5):  # both BNs: affine trained, running stats updated
        assert not torch.equal(m.body[i].weight, before.body[i].weight)
        assert not torch.equal(m.body[i].bias, before.body[i].bias)
        assert not torch.equal(m.body[i].running_mean, before.body[i].running_mean)
    fresh = replace_head(copy.deepcopy(before), 10, cfg.seed).head
    assert not torch.equal(m.head.weight, fresh.weight)  # the head did train
    assert all(p.requires_grad for p in m.parameters())  # flags restored

    p = make(PlainNet)
    before = copy.deepcopy(p)
    p.body[0].weight.requires_grad_(False)  # a caller's flag survives finetune
    finetune(p, 10, train, test, cfg)
    for i in (0, 3, 7):  # conv, conv, linear: nothing but the head may move
        assert torch.equal(p.body[i].weight, before.body[i].weight)
        assert torch.equal(p.body[i].bias, before.body[i].bias)
    assert not p.body[0].weight.requires_grad and p.body[3].weight.requires_grad


def test_phase2_trains_everything(digits):
    (x, y), test = digits
    m = make(PlainNet)
    before = copy.deepcopy(m)
    finetune(m, 10, (x[:300], y[:300]), test, FinetuneConfig(phase1_epochs=0, phase2_epochs=1, **FAST))
    for (name, a), b in zip(m.body.named_parameters(), before.body.parameters()):
        assert not torch.equal(a, b), name


def test_phase2_cosine_schedule(digits, monkeypatch):
    """lr of phase-2 epoch e is 0.5*lr2*(1+cos(pi*e/E2)); phase 1 uses lr1."""
    (x, y), test = digits
    seen = []
    real = ev._train_epoch

    def spy(model, opt, *args):
        seen.append(opt.param_groups[0]["lr"])
        return real(model, opt, *args)

    monkeypatch.setattr(ev, "_train_epoch", spy)
    cfg = FinetuneConfig(phase1_epochs=1, phase2_epochs=4, lr1=1e-3, lr2=4e-4)
    finetune(make(PlainNet), 10, (x[:200], y[:200]), (test[0][:50], test[1][:50]), cfg)
    expect = [1e-3] + [0.5 * 4e-4 * (1 + math.cos(math.pi * e / 4)) for e in range(4)]
    assert seen == pytest.approx(expect)


def test_finetune_is_deterministic_per_seed(digits):
    (x, y), (xt, yt) = digits
    train, test = (x[:400], y[:400]), (xt[:200], yt[:200])
    start = make(PlainNet, seed=3)  # has dropout: needs the seeded global RNG too
    cfg = FinetuneConfig(phase1_epochs=1, phase2_epochs=1, **FAST)

    runs = []
    for s in (0, 0, 1):
        torch.manual_seed(1000 + len(runs))  # caller's global RNG must not matter
        m = copy.deepcopy(start)
        rows = finetune(m, 10, train, test, FinetuneConfig(**{**cfg.__dict__, "seed": s}))
        runs.append((m, strip_time(rows)))
    (m0, r0), (m1, r1), (m2, r2) = runs
    assert r0 == r1 and states_equal(m0, m1)
    assert r0 != r2 and not states_equal(m0, m2)


def test_finetune_leaves_global_rng_alone(digits):
    (x, y), test = digits
    model = make(PlainNet)
    torch.manual_seed(42)
    expected = torch.rand(3)
    torch.manual_seed(42)
    finetune(model, 10, (x[:100], y[:100]), (test[0][:50], test[1][:50]),
             FinetuneConfig(phase1_epochs=1, phase2_epochs=0))
    assert torch.equal(torch.rand(3), expected)


def test_finetune_singleton_last_batch(digits):
    """129 samples at batch 128 would leave a BN batch of one; it is merged instead."""
    (x, y), test = digits
    rows = finetune(make(BNNet), 10, (x[:129], y[:129]), test,
                    FinetuneConfig(phase1_epochs=1, phase2_epochs=1))
    assert len(rows) == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_finetune_cuda(digits):
    (x, y), test = digits
    m = make(BNNet)
    rows = finetune(m, 10, (x[:600], y[:600]), test,
                    FinetuneConfig(phase1_epochs=1, phase2_epochs=2, device="cuda", **FAST))
    assert next(m.parameters()).is_cuda and rows[-1]["test_acc"] > 0.5
    m2 = recalibrate_bn(m, x[:600])
    assert next(m2.parameters()).is_cuda
    assert linear_probe(m, (x[:600], y[:600]), test)["acc"] > 0.5


# --------------------------------------------------------------------------- BN recalibration


def test_recalibrate_restores_shrunk_model(trained_bn, digits):
    train, test = digits
    model, _ = trained_bn
    acc0, _ = evaluate(model, *test)
    assert acc0 > 0.85

    shrunk = copy.deepcopy(model)
    with torch.no_grad():
        for mod in shrunk.modules():
            if isinstance(mod, nn.Conv2d):
                mod.weight.mul_(0.4)
    acc_old_stats, _ = evaluate(shrunk, *test)
    assert acc_old_stats < 0.3  # collapses towards chance with Θ0's statistics

    out = recalibrate_bn(shrunk, train[0])
    assert out is shrunk and not shrunk.training
    assert all(bn.momentum == 0.1 for bn in shrunk.modules() if isinstance(bn, nn.BatchNorm2d))
    acc_recal, _ = evaluate(shrunk, *test)
    assert acc_recal >= acc0 - 0.03
    # the first conv is linear and bias-free, so on the same data its BN's statistics
    # must be exactly 0.4x (mean) and 0.16x (var) those of the unshrunk model
    ref = recalibrate_bn(copy.deepcopy(model), train[0])
    assert torch.allclose(shrunk.body[1].running_mean, 0.4 * ref.body[1].running_mean, atol=1e-5)
    assert torch.allclose(shrunk.body[1].running_var, 0.16 * ref.body[1].running_var, rtol=1e-4)


class OnlyBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3, momentum=0.3)
        self.drop = nn.Dropout(0.5)  # must stay in eval mode during recalibration

    def forward(self, x):
        return self.bn(self.drop(x))


def _bn_data(n=130):
    g = torch.Generator().manual_seed(5)
    # per-channel offsets and scales, plus a drift across the data so batches differ
    x = torch.randn(n, 3, 4, 4, generator=g) * torch.tensor([1.0, 2.0, 0.5]).view(1, 3, 1, 1)
    x = x + torch.tensor([0.0, 3.0, -1.0]).view(1, 3, 1, 1)
    return x + torch.linspace(0, 2, n).view(n, 1, 1, 1)


def _batch_stats(xb):
    flat = xb.transpose(0, 1).reshape(3, -1)
    return flat.mean(1), flat.var(1, unbiased=True)


def test_recalibrate_equals_cumulative_average_of_batch_stats():
    x = _bn_data(130)  # batches of 50, 50, 30
    m = OnlyBN()
    m.bn.running_mean.fill_(7.0)  # stale stats that must be discarded
    m.bn.running_var.fill_(9.0)
    m.train()
    recalibrate_bn(m, x, batch_size=50, shuffle=False)

    stats = [_batch_stats(x[s:s + 50]) for s in (0, 50, 100)]
    mean = torch.stack([s[0] for s in stats]).mean(0)
    var = torch.stack([s[1] for s in stats]).mean(0)
    assert torch.allclose(m.bn.running_mean, mean, atol=1e-5)
    assert torch.allclose(m.bn.running_var, var, atol=1e-5)
    assert m.bn.num_batches_tracked.item() == 3
    assert m.bn.momentum == 0.3 and not m.training and not m.bn.training

    recalibrate_bn(m, x, batch_size=50, max_batches=1, shuffle=False)
    mean1, var1 = _batch_stats(x[:50])
    assert torch.allclose(m.bn.running_mean, mean1, atol=1e-5)
    assert torch.allclose(m.bn.running_var, var1, atol=1e-5)


def test_recalibrate_shuffle_is_seeded():
    x = _bn_data(130)
    a, b, c = OnlyBN(), OnlyBN(), OnlyBN()
    recalibrate_bn(a, x, batch_size=50, seed=1)
    recalibrate_bn(b, x, batch_size=50, seed=1)
    recalibrate_bn(c, x, batch_size=50, shuffle=False)
    assert torch.equal(a.bn.running_var, b.bn.running_var)
    assert not torch.equal(a.bn.running_var, c.bn.running_var)
    # shuffled batches see the whole drift, so their variance is the larger one
    assert (a.bn.running_var > c.bn.running_var).all()


def test_recalibrate_without_bn_is_noop(digits):
    m = make(PlainNet)
    m.train()
    before = copy.deepcopy(m)
    assert recalibrate_bn(m, digits[0][0]) is m
    assert states_equal(m, before) and m.training


# --------------------------------------------------------------------------- linear probe


def test_linear_probe_trained_beats_random(trained_plain, digits):
    train, test = digits
    model, _, untrained = trained_plain
    trained = linear_probe(model, train, test)
    random = linear_probe(untrained, train, test)
    for r in (trained, random):
        assert r["converged"] and r["grad_max"] <= 1e-6 and 0 < r["n_iter"] <= 200
        assert 0 < r["acc"] <= 1 and math.isfinite(r["loss"])
    assert trained["acc"] > 0.9
    assert random["acc"] > 3 * CHANCE
    assert trained["acc"] > random["acc"] + 0.05
    assert trained["loss"] < random["loss"]


def test_linear_probe_bn_recalibrates_on_a_copy(trained_bn, digits):
    train, test = digits
    model, _ = trained_bn
    shrunk = copy.deepcopy(model)
    with torch.no_grad():
        for mod in shrunk.modules():
            if isinstance(mod, nn.Conv2d):
                mod.weight.mul_(0.4)
    before = copy.deepcopy(shrunk)
    with_recal = linear_probe(shrunk, train, test, recalibrate=True)
    without = linear_probe(shrunk, train, test, recalibrate=False)
    assert states_equal(shrunk, before)  # caller's model untouched
    assert with_recal["acc"] > 0.9
    assert with_recal["acc"] >= without["acc"] - 0.02
    # recalibrated probe of the shrunk model ~ probe of the original (BN undoes the scale)
    assert with_recal["acc"] == pytest.approx(linear_probe(model, train, test)["acc"], abs=0.03)


def test_linear_probe_max_iter_is_respected(trained_plain, digits):
    train, test = digits
    r = linear_probe(trained_plain[0], train, test, max_iter=3)
    assert r["n_iter"] <= 3 and not r["converged"]


# --------------------------------------------------------------------------- docs


def test_module_docstring_example_runs(capsys):
    doc = ev.__doc__
    code = textwrap.dedent(doc.split("::\n", 1)[1])
    exec(compile(code, "<evaluate docstring>", "exec"), {})
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 4  # three epoch lines and the probe accuracy


def _cell_base(tmp_path, **extra) -> dict:
    """CellSpec fields of a tiny target trajectory's Θ0 start (digits 0-4 -> 5-9)."""
    from flows.trajectory import forgetting_trajectory
    from params.collect import TrajectoryParams
    from tasks.evaluate import TargetSpec

    store = str(tmp_path / "runs.zarr")
    run_id = forgetting_trajectory(TrajectoryParams(store=store, dataset="digits", classes="0-4", limit=300,
                                                    model="simple-cnn", width=8, pretrain_epochs=1, stages=2,
                                                    batch_size=32, device="cpu"))
    return {**dict(out=str(tmp_path / "exp"), store=store, run_id=run_id, seed=0, phase1_epochs=0, phase2_epochs=1,
                   lr1=1e-3, lr2=1e-3, batch_size=32, device="cpu", probe=False,
                   target=TargetSpec(dataset="digits", classes="5-9", train_size=100)), **extra}


def test_a_cached_cell_is_reported_under_the_row_that_asked_for_it(tmp_path, prefect_harness):
    """naive-lr at the fixed lr2 is the naive cell: computed once, but each row keeps its own
    name (a row read back under the other's name vanished from the report)."""
    from tasks.evaluate import CellSpec, finetune_cell

    base = _cell_base(tmp_path)
    a = finetune_cell.fn(CellSpec(**base, method="naive"))
    b = finetune_cell.fn(CellSpec(**base, method="naive-lr"))
    assert (a["method"], b["method"]) == ("naive", "naive-lr")
    assert a["rows"] == b["rows"]
    assert len(list((tmp_path / "exp" / "cells").glob("*.json"))) == 1


def test_one_cell_asked_for_at_once_by_four_writers_is_fine_tuned_once(tmp_path, prefect_harness, caplog):
    """Rows (or study variants run side by side) that share a start and protocol ask for one
    cell at the same moment: one fine-tunes it while the others wait on its lock, then read it."""
    import threading

    from tasks.evaluate import CellSpec, finetune_cell

    base = _cell_base(tmp_path, phase2_epochs=3)
    caplog.set_level(logging.INFO, logger="know")
    start = threading.Barrier(4)
    results: list[dict] = []

    def ask(method: str) -> None:
        start.wait()
        results.append(finetune_cell.fn(CellSpec(**base, method=method)))

    threads = [threading.Thread(target=ask, args=(m,)) for m in ("naive", "naive-lr", "naive", "naive-lr")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert len(results) == 4 and all(r["rows"] == results[0]["rows"] for r in results)
    messages = [r.getMessage() for r in caplog.records]
    assert sum("final acc" in m for m in messages) == 1, messages
    assert sum(m.endswith("(test): cached") for m in messages) == 3
