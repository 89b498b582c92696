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


def _new_model(cfg: MetaConfig, device) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    with torch.random.fork_rng(devices=[]):  # init from cfg.seed, global RNG untouched
        torch.manual_seed(cfg.seed)
        model = _known().KNOWN()
    model.to(device)
    return model, torch.optim.Adam(model.parameters(), lr=cfg.lr)


def _step(model, opt, Xs, s, w5, Y, cfg: MetaConfig, m: int, device) -> float:
    """One Adam step on a minibatch; returns its summed data L1 (penalty excluded).
    m is the number of pairs of an epoch (l1_mode 'epoch' spreads one penalty over it)."""
    pred = _predict(model, Xs, s, w5, device)
    data_loss = (pred - Y.to(device)).abs().mean()
    loss = data_loss
    if cfg.l1_reg:
        loss = loss + (1.0 if cfg.l1_mode == "keras" else Y.shape[0] / m) * model.l1_penalty()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(data_loss.detach()) * Y.shape[0]


def _snapshot(model, opt, cfg, epoch, best, since_best, best_model, history, **extra) -> dict:
    """A resumable training state: tensors and plain values only (torch.load(weights_only=True))."""
    return {"model": _cpu_state(model.state_dict()), "optimizer": copy.deepcopy(opt.state_dict()), "epoch": epoch,
            "best_val_l1": best, "epochs_since_best": since_best,
            "best_model": {k: v.clone() for k, v in best_model.items()}, "history": [dict(r) for r in history],
            "config": asdict(cfg), **extra}


def _restore(model, opt, state: dict, cfg: MetaConfig):
    """Load a _snapshot into model and opt; returns (epoch, best, since_best, history, best_model)."""
    diff = [k for k in _RESUME_KEYS if state["config"].get(k) != getattr(cfg, k)]
    if diff:
        raise ValueError(f"resume_state was made with a different config: {diff}")
    model.load_state_dict(state["model"])
    opt.load_state_dict(copy.deepcopy(state["optimizer"]))
    return (int(state["epoch"]), float(state["best_val_l1"]), int(state["epochs_since_best"]),
            [dict(r) for r in state["history"]], _cpu_state(state["best_model"]))


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
    model, opt = _new_model(cfg, device)
    gen = torch.Generator().manual_seed(cfg.seed)
    epoch, best, since_best, history = 0, math.inf, 0, []
    best_model = _cpu_state(model.state_dict())

    if resume_state is not None:
        epoch, best, since_best, history, best_model = _restore(model, opt, resume_state, cfg)
        gen.set_state(resume_state["rng"].clone())

    while epoch < cfg.epochs and since_best < cfg.patience:
        t0 = time.perf_counter()
        model.train()
        perm = torch.randperm(m, generator=gen)
        total = 0.0
        for i in range(0, m, cfg.batch_size):
            idx = perm[i : i + cfg.batch_size]
            total += _step(model, opt, Xs[idx], s[idx], w5[idx], Y[idx], cfg, m, device)
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
            state = _snapshot(model, opt, cfg, epoch, best, since_best, best_model, history, rng=gen.get_state())
            on_epoch(dict(row), state)

    model.load_state_dict(best_model)
    model.eval()
    return model, history


def train_known_streamed(
    train_blocks: list,
    val_blocks: list,
    read: Callable[[object], np.ndarray],
    cfg: MetaConfig | None = None,
    buffer_pairs: int = 1 << 22,
    resume_state: dict | None = None,
    on_epoch: Callable[[dict, dict], None] | None = None,
    on_group: Callable[[dict], None] | None = None,
):
    """train_known on pairs streamed from blocks (know_core.pair_stream.Block), in memory
    bounded by `buffer_pairs` pairs (or the largest block), whatever the number of blocks.

    read(block) returns the block's raw values (n_stages, c1 - c0). Every epoch reads every
    training block once: in an order drawn from (cfg.seed, epoch), packed into groups that fill
    the buffer; a group's pairs are shuffled (seeded by seed, epoch and group) and cut into
    minibatches. So pairs mix across the runs of a group, and the group order changes every
    epoch. The validation L1 streams the validation blocks the same way, unshuffled.

    on_group(state) runs after every group with a state from which `resume_state` continues
    mid-epoch at the next group, ending with the same weights as an uninterrupted run (all
    randomness is derived from seed, epoch and group; no buffer content is saved).
    on_epoch(row, state) as in train_known.
    """
    from know_core.pair_stream import fill_pairs, group_blocks

    cfg = cfg or MetaConfig()
    device = torch.device(cfg.device)
    if not train_blocks or not val_blocks:
        raise ValueError(f"no {'train' if not train_blocks else 'val'} pairs")
    m = sum(b.n_pairs for b in train_blocks)
    size = max(buffer_pairs, *(b.n_pairs for b in (*train_blocks, *val_blocks)))
    X, Y = np.empty((size, WINDOW), np.float32), np.empty(size, np.float32)

    def load(group) -> tuple[torch.Tensor, torch.Tensor]:
        """The pairs of a group of blocks, in the buffer (views, valid until the next load)."""
        n = 0
        for b in group:
            n += fill_pairs(read(b), b, X, Y, n, WINDOW)
        return torch.from_numpy(X[:n]), torch.from_numpy(Y[:n])

    @torch.no_grad()
    def val_l1() -> float:
        model.eval()
        total, count = 0.0, 0
        for group in group_blocks(val_blocks, range(len(val_blocks)), buffer_pairs):
            Xg, Yg = load(group)
            Xs, s = _scaled(Xg, cfg.scaling)
            total += _val_l1(model, Xs, s, Xg[:, -1], Yg, device) * Yg.shape[0]
            count += Yg.shape[0]
        return total / max(1, count)

    model, opt = _new_model(cfg, device)
    epoch, best, since_best, history = 0, math.inf, 0, []
    best_model = _cpu_state(model.state_dict())
    start_group, total, t_spent = 0, 0.0, 0.0
    if resume_state is not None:
        epoch, best, since_best, history, best_model = _restore(model, opt, resume_state, cfg)
        start_group = int(resume_state.get("group", 0))
        total, t_spent = float(resume_state.get("train_sum", 0.0)), float(resume_state.get("wall_s", 0.0))

    while epoch < cfg.epochs and since_best < cfg.patience:
        t0 = time.perf_counter() - t_spent
        model.train()
        order = np.random.default_rng([cfg.seed, epoch]).permutation(len(train_blocks))
        groups = group_blocks(train_blocks, order, buffer_pairs)
        for g in range(start_group, len(groups)):
            Xg, Yg = load(groups[g])
            gen = torch.Generator().manual_seed(int(np.random.default_rng([cfg.seed, epoch, g]).integers(1 << 62)))
            perm = torch.randperm(Yg.shape[0], generator=gen)
            for i in range(0, Yg.shape[0], cfg.batch_size):
                idx = perm[i : i + cfg.batch_size]
                Xb = Xg[idx]
                Xs, s = _scaled(Xb, cfg.scaling)
                total += _step(model, opt, Xs, s, Xb[:, -1], Yg[idx], cfg, m, device)
            if on_group is not None:
                model.eval()
                on_group(_snapshot(model, opt, cfg, epoch, best, since_best, best_model, history, group=g + 1,
                                   train_sum=total, wall_s=time.perf_counter() - t0))
                model.train()
        epoch += 1
        val = val_l1()
        if val < best:
            best, since_best = val, 0
            best_model = _cpu_state(model.state_dict())
        else:
            since_best += 1
        row = {"epoch": epoch, "train_l1": total / m, "val_l1": val, "best_val_l1": best,
               "wall_s": time.perf_counter() - t0}
        history.append(row)
        start_group, total, t_spent = 0, 0.0, 0.0
        if on_epoch is not None:
            on_epoch(dict(row), _snapshot(model, opt, cfg, epoch, best, since_best, best_model, history, group=0,
                                          train_sum=0.0, wall_s=0.0))

    model.load_state_dict(best_model)
    model.eval()
    return model, history
