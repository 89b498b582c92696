"""The optimizer regime of a trajectory (issue 11): `carry` keeps one Adam from pre-training
through every sequential stage (the release compiles once and calls fit per stage), `fresh`
builds a new Adam per stage. Real digits data, real Zarr stores, real tasks (`.fn`).

The reference loops below are written out by hand with plain torch, so a regression in
`iter_trajectory` (a new Adam slipping in, the moments not loaded, the partial batch kept)
shows up as a weight mismatch.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from know_core.data import load_dataset, nested_subsets, subset_sizes
from know_core.layout import flatten_state, param_layout
from know_core.models import build_model
from know_core.train import AdamState, TrajectoryConfig, batch_slices, iter_trajectory

LR, BATCH, STAGES = 2e-3, 48, 3


@pytest.fixture(scope="module")
def digits():
    ds = load_dataset("digits")
    return ds.take(np.arange(400))


def _model(seed=0):
    torch.manual_seed(seed)
    return build_model("simple-cnn", 1, 10, 8)


def _manual(model, data, seed, carry: bool, opt=None):
    """Sequential trajectory by hand: one epoch per stage, seeded order, full batches only."""
    layout = param_layout(model)
    out = [flatten_state(model.state_dict(), layout)]
    subsets = nested_subsets(len(data), 0.5, STAGES, seed)
    if carry and opt is None:
        opt = torch.optim.Adam(model.parameters(), lr=LR)
    for k, idx in enumerate(subsets):
        if k == 0:
            continue  # start_trained: stage 0 is the start weights
        sub = data.take(idx)
        if not carry:
            opt = torch.optim.Adam(model.parameters(), lr=LR)
        gen = torch.Generator().manual_seed(seed * 1000 + k)
        perm = torch.randperm(len(sub.y), generator=gen)
        model.train()
        for i in range(len(sub.y) // BATCH):
            b = perm[i * BATCH:(i + 1) * BATCH]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(sub.x[b]), sub.y[b]).backward()
            opt.step()
        out.append(flatten_state(model.state_dict(), layout))
    return np.stack(out)


def _run(model, data, optimizer, state=None, mode="sequential"):
    cfg = TrajectoryConfig(r=0.5, stages=STAGES, lr=LR, batch_size=BATCH, seed=3, mode=mode, device="cpu",
                           optimizer=optimizer)
    return np.stack([v for _, v in iter_trajectory(model, data, cfg, start_trained=mode == "sequential",
                                                   optimizer_state=state)])


@pytest.mark.parametrize("optimizer", ["carry", "fresh"])
def test_sequential_trajectory_matches_a_hand_written_loop(digits, optimizer):
    got = _run(_model(), digits, optimizer)
    want = _manual(_model(), digits, 3, carry=optimizer == "carry")
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_carry_and_fresh_give_different_trajectories(digits):
    carry, fresh = _run(_model(), digits, "carry"), _run(_model(), digits, "fresh")
    np.testing.assert_array_equal(carry[0], fresh[0])  # the same start
    assert np.abs(carry[1] - fresh[1]).max() == 0  # stage 1 starts from empty moments in both
    assert np.abs(carry[2] - fresh[2]).max() > 1e-4  # stage 2: carried moments differ from fresh ones


def test_carry_continues_the_pretraining_moments(digits):
    """The moments saved after pre-training are the ones stage 1 continues with."""
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    model.train()
    for i in range(5):  # a short "pre-training"
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(digits.x[i * 32:(i + 1) * 32]), digits.y[i * 32:(i + 1) * 32]).backward()
        opt.step()
    state = AdamState.of(opt, model)
    assert state.step == 5.0 and np.abs(state.exp_avg_sq).sum() > 0
    start = copy.deepcopy(model)
    got = _run(copy.deepcopy(start), digits, "carry", state)
    want = _manual(start, digits, 3, carry=True, opt=_continued(start, opt, model))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    without = _run(copy.deepcopy(model), digits, "carry")  # same weights, empty moments
    assert np.abs(got[1] - without[1]).max() > 1e-5


def _continued(start, opt, trained):
    """An Adam over `start`'s parameters holding `opt`'s moments (what the checkpoint carries)."""
    new = torch.optim.Adam(start.parameters(), lr=LR)
    for p_new, p_old in zip(start.parameters(), trained.parameters()):
        new.state[p_new] = {k: v.clone() for k, v in opt.state[p_old].items()}
    return new


def test_independent_mode_is_the_same_under_both_regimes(digits):
    """Independent stages each start from the init with a new Adam (the release rebuilds the
    model per stage), so the regime is recorded but changes nothing."""
    a = _run(_model(), digits, "carry", mode="independent")
    b = _run(_model(), digits, "fresh", mode="independent")
    np.testing.assert_array_equal(a, b)


def test_the_last_partial_batch_is_left_out():
    assert batch_slices(100, 48, drop_last=True) == [(0, 48), (48, 96)]
    assert batch_slices(100, 48) == [(0, 48), (48, 96), (96, 100)]
    assert subset_sizes(400, 0.5, 3) == [400, 200, 100]


def test_regime_is_part_of_the_run_id_and_the_record(tmp_path, prefect_harness):
    from flows.trajectory import forgetting_trajectory, target_specs
    from params.collect import TrajectoryParams
    from storage.trajectory import TrajectoryStore

    store = tmp_path / "runs.zarr"
    base = dict(store=str(store), dataset="digits", limit=300, model="simple-cnn", width=8, pretrain_epochs=1,
                stages=3, batch_size=32, pretrain_batch_size=64, device="cpu")
    ids = {}
    for regime in ("carry", "fresh"):
        ids[regime] = forgetting_trajectory(TrajectoryParams(**base, optimizer=regime))
    assert ids["carry"] != ids["fresh"]
    ts = TrajectoryStore(store)
    assert ts.require_run(ids["carry"]).optimizer == "carry"
    assert ts.require_run(ids["fresh"]).optimizer == "fresh"
    pre, _ = target_specs(TrajectoryParams(**base))
    adam = ts.load_optimizer_state(pre.checkpoint_id)
    steps = -(-300 // 64)  # one pre-training epoch, the partial batch kept
    assert adam is not None and adam.step == steps
    from know_core.models import build_from_spec

    net = build_from_spec(ts.require_run(ids["carry"]).model_spec_obj())
    assert adam.exp_avg.shape == (sum(p.numel() for p in net.parameters()),)
    carry, fresh = ts.read_stages(ids["carry"]), ts.read_stages(ids["fresh"])
    np.testing.assert_array_equal(carry[0], fresh[0])  # the same Θ0
    assert np.abs(carry[1] - fresh[1]).max() > 1e-5  # stage 1 already differs: the pre-training moments


def test_a_checkpoint_without_adam_state_is_refused_by_carry(tmp_path, prefect_harness):
    from know_core.errors import StoreState
    from know_core.layout import flatten_state as flat
    from storage.records import CheckpointInfo
    from storage.trajectory import TrajectoryStore
    from tasks.collect import collect_run
    from tasks.specs import RunSpec

    store = TrajectoryStore(tmp_path / "runs.zarr")
    store.prepare()
    model = build_model("simple-cnn", 1, 10, 8)
    layout = param_layout(model)
    store.save_checkpoint("pre-old", flat(model.state_dict(), layout), layout, CheckpointInfo())
    assert store.load_optimizer_state("pre-old") is None
    spec = RunSpec(dataset="digits", limit=300, model="simple-cnn", width=8, r=0.5, stages=3, lr=1e-3, batch_size=32,
                   epochs_per_stage=1, seed=0, mode="sequential", optimizer="carry", start="pre-old")
    with pytest.raises(StoreState, match="no Adam state"):
        collect_run.fn(str(tmp_path / "runs.zarr"), spec, "cpu")
    fresh = spec.model_copy(update={"optimizer": "fresh"})
    run_id = collect_run.fn(str(tmp_path / "runs.zarr"), fresh, "cpu")
    assert store.require_run(run_id).is_complete
