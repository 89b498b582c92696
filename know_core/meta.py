"""Meta-training KNOWN on training pairs (method.md §4).

The pairs come from ``know_core.pairs.build_pairs``: X (m, 5) windows, most-forgotten
first, and Y (m,) the next larger-data value; the model learns  Y ≈ w5 + KNOWN(w).
One model per kind (conv / fc / bias).

What lives here:
    MetaConfig, train_known   Adam + L1, early stopping, resumable per epoch

(``know_core.baselines`` compares the trained models with the simple predictors.)

Example (runs as a doctest):
    >>> import numpy as np
    >>> from know_core.layout import TensorSpec
    >>> from know_core.pairs import build_pairs
    >>> traj = np.outer(0.8 ** np.arange(8), np.linspace(-1, 1, 300)).astype(np.float32)
    >>> X, Y = build_pairs(traj, [TensorSpec("w", (300,), "fc", 0)])["fc"]
    >>> X.shape, Y.shape                               # 8 stages -> 3 windows of 300 scalars
    ((900, 5), (900,))
    >>> model, history = train_known(X, Y, X, Y, MetaConfig(epochs=2, batch_size=128))
    >>> len(history), sorted(history[0])
    (2, ['best_val_l1', 'epoch', 'train_l1', 'val_l1', 'wall_s'])
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch

from know_core.pairs import WINDOW


@dataclass
class MetaConfig:
    epochs: int = 30  # upper bound; early stopping usually ends sooner
    batch_size: int = 4096  # scalars are independent samples; big batches keep CPU busy
    lr: float = 1e-3  # Adam default, the release's choice for its models
    patience: int = 4  # epochs without a new best val L1 before stopping
    scaling: str = "raw"  # 'raw' (release) or 'minmax' (older bias version); compare both
    l1_reg: bool = True  # release: L1 on stream Dense64/Dense32 (kernel 1e-6, bias 0.1)
    # how l1_penalty() enters each batch: 'keras' adds the full penalty to every batch's
    # mean loss (what a Keras kernel_regularizer does, so the release's coefficients keep
    # their meaning); 'epoch' scales it by batch/n_train so one epoch adds one penalty.
    l1_mode: str = "keras"
    max_pairs_per_kind: int = 200_000  # per run: many runs beat many scalars of one run
    val_fraction: float = 0.25  # of RUNS (see split_runs), never of scalars
    seed: int = 0  # model init and batch order
    device: str = "cpu"  # 9,425 parameters: CPU is fine; 'cuda' for very large pair sets


# fields that change the optimisation path; a resume with different values is refused
_RESUME_KEYS = ("batch_size", "lr", "scaling", "l1_reg", "l1_mode", "seed")

_EVAL_BATCH = 1 << 16


def _known():
    from know_core import known  # imported lazily: written in parallel with this module

    return known


def _scaled(X: torch.Tensor, scaling: str) -> tuple[torch.Tensor, torch.Tensor]:
    """scale_window, with its scale broadcast to (m,) (it may return a scalar or (m,1))."""
    scaled, s = _known().scale_window(X, scaling)
    scaled = torch.as_tensor(scaled, dtype=torch.float32)
    s = torch.as_tensor(s, dtype=torch.float32)
    s = s.reshape(-1) if s.numel() == X.shape[0] else s.reshape(()).expand(X.shape[0])
    return scaled, s


def _predict(model, Xs, s, w5, device) -> torch.Tensor:
    out = model(Xs.to(device)).reshape(-1)
    return w5.to(device) + out * s.to(device)


@torch.no_grad()
def _val_l1(model, Xs, s, w5, Y, device) -> float:
    model.eval()
    total = 0.0
    for i in range(0, Y.shape[0], _EVAL_BATCH):
        sl = slice(i, i + _EVAL_BATCH)
        pred = _predict(model, Xs[sl], s[sl], w5[sl], device)
        total += float((pred - Y[sl].to(device)).abs().double().sum())
    return total / max(1, Y.shape[0])


def _cpu_state(module_state: dict) -> dict:
    return {k: v.detach().to("cpu").clone() for k, v in module_state.items()}


def train_known(
    X,
    Y,
    Xv,
    Yv,
    cfg: MetaConfig | None = None,
    resume_state: dict | None = None,
    on_epoch: Callable[[dict, dict], None] | None = None,
):
    """Meta-train one KNOWN on pairs (X (m,5), Y (m,)), early-stopping on (Xv, Yv).

    Loss: L1 between the UN-scaled prediction w5 + s·KNOWN(scaled window) and Y, where
    (scaled, s) = scale_window(X, cfg.scaling). We pick un-scaled space so the training
    loss is the same quantity as val_l1 and l1_table's numbers; for 'raw' (s = 1) both
    choices coincide. Plus KNOWN.l1_penalty() on every batch if cfg.l1_reg (see l1_mode).

    Adam, shuffled minibatches (torch.Generator seeded by cfg.seed), early stopping after
    cfg.patience epochs without a strictly lower val L1; the returned model holds the best
    weights and is in eval mode.

    on_epoch(row, state) runs after every epoch. row = {epoch, train_l1 (mean data L1 over
    the epoch, penalty excluded), val_l1, best_val_l1, wall_s (this epoch's seconds)}.
    state holds only tensors/plain values (torch.save + torch.load(weights_only=True) work)
    and owns its tensors; passing it back as resume_state continues exactly where it was
    and ends with the same weights as an uninterrupted run.
    """
    cfg = cfg or MetaConfig()
    known = _known()
    device = torch.device(cfg.device)
    X = torch.as_tensor(np.asarray(X, dtype=np.float32))
    Y = torch.as_tensor(np.asarray(Y, dtype=np.float32)).reshape(-1)
    Xv = torch.as_tensor(np.asarray(Xv, dtype=np.float32))
    Yv = torch.as_tensor(np.asarray(Yv, dtype=np.float32)).reshape(-1)
    for name, (a, b) in {"train": (X, Y), "val": (Xv, Yv)}.items():
        if a.ndim != 2 or a.shape[1] != WINDOW or a.shape[0] != b.shape[0]:
            raise ValueError(f"{name} pairs must be X (m,{WINDOW}), Y (m,); got {tuple(a.shape)}, {tuple(b.shape)}")
        if a.shape[0] == 0:
            raise ValueError(f"no {name} pairs")
    if cfg.l1_mode not in ("keras", "epoch"):
        raise ValueError(f"l1_mode must be 'keras' or 'epoch', got {cfg.l1_mode!r}")

    Xs, s = _scaled(X, cfg.scaling)
    Xvs, sv = _scaled(Xv, cfg.scaling)
    w5, w5v = X[:, -1], Xv[:, -1]
    m = Y.shape[0]
    l1_weight = 1.0 if cfg.l1_mode == "keras" else None  # 'epoch': set per batch below

    with torch.random.fork_rng(devices=[]):  # init from cfg.seed, global RNG untouched
        torch.manual_seed(cfg.seed)
        model = known.KNOWN()
    model.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    epoch, best, since_best, history = 0, math.inf, 0, []
    best_model = _cpu_state(model.state_dict())

    if resume_state is not None:
        saved = resume_state["config"]
        diff = [k for k in _RESUME_KEYS if saved.get(k) != getattr(cfg, k)]
        if diff:
            raise ValueError(f"resume_state was made with a different config: {diff}")
        model.load_state_dict(resume_state["model"])
        opt.load_state_dict(copy.deepcopy(resume_state["optimizer"]))
        gen.set_state(resume_state["rng"].clone())
        epoch = int(resume_state["epoch"])
        best = float(resume_state["best_val_l1"])
        since_best = int(resume_state["epochs_since_best"])
        history = [dict(r) for r in resume_state["history"]]
        best_model = _cpu_state(resume_state["best_model"])

    while epoch < cfg.epochs and since_best < cfg.patience:
        t0 = time.perf_counter()
        model.train()
        perm = torch.randperm(m, generator=gen)
        total = 0.0
        for i in range(0, m, cfg.batch_size):
            idx = perm[i : i + cfg.batch_size]
            pred = _predict(model, Xs[idx], s[idx], w5[idx], device)
            data_loss = (pred - Y[idx].to(device)).abs().mean()
            loss = data_loss
            if cfg.l1_reg:
                weight = l1_weight if l1_weight is not None else idx.numel() / m
                loss = loss + weight * model.l1_penalty()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(data_loss.detach()) * idx.numel()
        epoch += 1
        val = _val_l1(model, Xvs, sv, w5v, Yv, device)
        if val < best:
            best, since_best = val, 0
            best_model = _cpu_state(model.state_dict())
        else:
            since_best += 1
        row = {
            "epoch": epoch,
            "train_l1": total / m,
            "val_l1": val,
            "best_val_l1": best,
            "wall_s": time.perf_counter() - t0,
        }
        history.append(row)
        if on_epoch is not None:
            state = {
                "model": _cpu_state(model.state_dict()),
                "optimizer": copy.deepcopy(opt.state_dict()),
                "epoch": epoch,
                "best_val_l1": best,
                "epochs_since_best": since_best,
                "best_model": {k: v.clone() for k, v in best_model.items()},
                "history": [dict(r) for r in history],
                "rng": gen.get_state(),
                "config": asdict(cfg),
            }
            on_epoch(dict(row), state)

    model.load_state_dict(best_model)
    model.eval()
    return model, history
