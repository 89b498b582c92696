"""Pre-training until the source validation accuracy plateaus (issue 13's pre-training axis).

Real digits data and real training: the loop stops once the held-out accuracy has not risen
for `patience` epochs, keeps the best epoch (weights and Adam state, checked against a
fixed-length run of that many epochs), never trains on its validation images, and the
pipeline records what it did in the checkpoint.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

from know_core.data import ImageData, load_dataset
from know_core.models import build_model
from know_core.train import TrainConfig, accuracy, train_epochs, train_until_plateau


def _model():
    torch.manual_seed(0)
    return build_model("simple-cnn", 1, 10, 8)


def test_holdout_is_a_seeded_disjoint_split():
    n = 101
    ds = ImageData(torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1), torch.zeros(n, dtype=torch.long), "ids", 1)
    rest, val = ds.holdout(0.1, seed=3)
    ids = lambda d: set(d.x.flatten().long().tolist())  # noqa: E731
    assert len(val) == 10 and len(rest) == 91
    assert ids(rest) | ids(val) == set(range(n)) and not ids(rest) & ids(val)
    assert ids(ds.holdout(0.1, seed=3)[1]) == ids(val) != ids(ds.holdout(0.1, seed=4)[1])
    for fraction in (0.0, 1.0):
        with pytest.raises(ValueError):
            ds.holdout(fraction, seed=0)
    with pytest.raises(ValueError, match="cannot be split"):
        ds.take([0]).holdout(0.5, seed=0)


def test_plateau_stops_keeps_the_best_epoch_and_matches_a_fixed_run_of_that_length():
    ds = load_dataset("digits")
    train, val = ds.holdout(0.2, seed=0)
    cfg = TrainConfig(lr=3e-2, batch_size=32, epochs=25, seed=0, device="cpu")  # a high lr: it plateaus early
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    calls = []
    result = train_until_plateau(model, train, val, cfg, patience=2, optimizer=opt,
                                 on_epoch=lambda e, loss, acc: calls.append((e, acc)))
    assert [e for e, _ in calls] == list(range(result.epochs_run))
    assert result.epochs_run < cfg.epochs, f"never plateaued in {cfg.epochs} epochs: {result.val_acc}"
    # it stopped exactly `patience` epochs after the best, and the best is the first maximum
    assert result.epochs_run - 1 - result.best_epoch == 2
    assert result.best_epoch == int(np.argmax(result.val_acc))
    assert accuracy(model, val, device="cpu") == pytest.approx(max(result.val_acc))

    # the kept weights and Adam state are those of a plain run of best_epoch + 1 epochs
    fixed = _model()
    fixed_opt = torch.optim.Adam(fixed.parameters(), lr=cfg.lr)
    train_epochs(fixed, train, TrainConfig(**{**cfg.__dict__, "epochs": result.best_epoch + 1}), optimizer=fixed_opt)
    for (k, a), b in zip(model.state_dict().items(), fixed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)
    for a, b in zip(opt.state_dict()["state"].values(), fixed_opt.state_dict()["state"].values()):
        for name in ("step", "exp_avg", "exp_avg_sq"):  # the moments a carried optimizer continues with
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)


def test_plateau_with_patience_beyond_the_cap_runs_every_epoch():
    ds = load_dataset("digits")
    train, val = ds.holdout(0.2, seed=0)
    cfg = TrainConfig(lr=1e-3, batch_size=64, epochs=3, seed=0, device="cpu")
    result = train_until_plateau(_model(), train, val, cfg, patience=10)
    assert result.epochs_run == 3 and len(result.val_acc) == 3


def test_trajectory_with_patience_records_the_plateau_and_keeps_old_ids(tmp_path, prefect_harness):
    from flows.trajectory import TrajectoryParams, forgetting_trajectory, target_specs

    store = tmp_path / "t.zarr"
    base = dict(store=str(store), dataset="digits", limit=500, model="simple-cnn", width=8, pretrain_epochs=12,
                pretrain_lr=3e-2, stages=2, batch_size=32, seed=0)
    fixed_pre, _ = target_specs(TrajectoryParams(**base))
    # the fields enter the id only when set: a fixed-length pre-training keeps the id it always had
    # (computed with the code before them, a611596)
    assert fixed_pre.checkpoint_id == "pre-f998b171f74b6d68"
    params = TrajectoryParams(**base, pretrain_patience=2, pretrain_val_fraction=0.2)
    pre, run = target_specs(params)
    assert pre.checkpoint_id != fixed_pre.checkpoint_id and run.start == pre.checkpoint_id

    forgetting_trajectory(params)
    attrs = dict(zarr.open_group(str(store), mode="r")[f"checkpoints/{pre.checkpoint_id}"].attrs)
    assert attrs["status"] == "complete"
    assert attrs["epochs_run"] == len(attrs["val_acc"]) <= 12
    assert attrs["best_epoch"] == int(np.argmax(attrs["val_acc"]))
    assert attrs["spec"]["patience"] == 2 and attrs["spec"]["val_fraction"] == 0.2


def test_study_plateau_axis_and_screen_variant():
    from params.study import StudyParams, meta_key

    screen = StudyParams(preset="screen").experiments()
    plateau = screen["plateau-pretraining"]
    assert plateau.pretrain_patience == 3 and plateau.pretrain_epochs == 30
    assert screen["standard"].pretrain_patience == 0
    assert meta_key(plateau) != meta_key(screen["longer-pretraining"])
    assert "pretrain_patience" not in StudyParams(preset="screen").identity()

    grid = StudyParams(preset="custom", pretrain_epochs="5,plateau:20", pretrain_patience=4)
    names = [v.name for v in grid.variants()]
    assert names == ["carry-independent-pre5-auto", "carry-independent-preplateau20-auto"]
    exps = grid.experiments()
    assert exps[names[1]].pretrain_patience == 4 and exps[names[1]].pretrain_epochs == 20
    assert exps[names[0]].pretrain_patience == 0
    for bad in ("plateau", "plateau:x", "0", "ten"):
        with pytest.raises(ValueError, match="--pretrain-epochs"):
            StudyParams(preset="custom", pretrain_epochs=bad)


def test_study_only_runs_the_named_variants():
    from params.study import StudyParams

    p = StudyParams(preset="screen", only="plateau-pretraining, standard")
    assert [v.name for v in p.variants()] == ["standard", "plateau-pretraining"]
    assert p.identity() == StudyParams(preset="screen").identity()  # a run-time choice: the same study folder
    with pytest.raises(ValueError, match="--only: no variant named nope"):
        StudyParams(preset="screen", only="nope")


#: ExperimentParams().identity()'s keys before the plateau fields (a611596): a folder made then
#: must still count as the same experiment
IDENTITY_BEFORE = ["augment", "checkpoint", "data_dir", "ft_batch_size", "full_source_limit", "head", "known_scaling",
                   "lr1", "lr2", "lr_grid_extend", "meta_classes", "meta_data_dir", "meta_dataset", "meta_epochs",
                   "meta_limit", "meta_matched_runs", "meta_models", "meta_pairs_per_run", "meta_runs",
                   "meta_sequential_runs", "meta_stages", "methods", "model", "model_kwargs", "naive_lr_grid",
                   "official_dir", "optimizer", "phase1_epochs", "phase2_epochs", "pretrain_batch_size",
                   "pretrain_epochs", "pretrain_lr", "r", "seeds", "shrink_controls", "source_classes",
                   "source_data_dir", "source_dataset", "source_limit", "target_classes", "target_data_dir",
                   "target_dataset", "target_train_size", "traj_batch_size", "traj_lr", "width", "window"]


def test_experiment_identity_gains_the_plateau_fields_only_when_used():
    from params.experiment import ExperimentParams

    assert sorted(ExperimentParams().identity()) == IDENTITY_BEFORE
    assert sorted(ExperimentParams(pretrain_val_fraction=0.2).identity()) == IDENTITY_BEFORE  # unused without patience
    used = ExperimentParams(pretrain_patience=3).identity()
    assert used["pretrain_patience"] == 3 and used["pretrain_val_fraction"] == 0.1
