"""Meta-training KNOWN on forgetting trajectories (method.md §3, §4).

A trajectory is a float32 array (S, n_params): stage 0 is the full-data model, stage S-1
the most-forgotten one (smallest subset). KNOWN works element-wise, so every scalar of every
window of 5 consecutive stages is one training pair:

    X row = (w1..w5) = stages [k+5, k+4, k+3, k+2, k+1]   most-forgotten -> newest
    Y     = stage k                                         the next larger-data value

and the model learns  Y ≈ w5 + KNOWN(w).  One model per kind (conv / fc / bias).

What lives here:
    step_coherence, per_kind_coherence   how straight a trajectory is (a cheap data check)
    build_pairs, pair_log_sizes          trajectory -> {kind: (X (m,5), Y (m,))}
    split_runs                           train/val split BY RUN (never by scalar)
    MetaConfig, train_known              Adam + L1, early stopping, resumable per epoch
    constant_scale_fit, l1_table         baselines and the comparison table

Example (runs as a doctest):
    >>> import numpy as np, torch
    >>> from know_core.layout import TensorSpec
    >>> layout = [TensorSpec("c.weight", (4, 2, 3, 3), "conv", 0),
    ...           TensorSpec("c.bias", (4,), "bias", 72),
    ...           TensorSpec("f.weight", (3, 4), "fc", 76)]
    >>> rng = np.random.default_rng(0)
    >>> full = rng.normal(0, 0.1, 88)
    >>> traj = np.stack([full * 0.9 ** k for k in range(7)]).astype(np.float32)  # (7, 88)
    >>> pairs = build_pairs(traj, layout)              # 7 stages -> 2 windows per scalar
    >>> {k: X.shape for k, (X, Y) in pairs.items()}
    {'conv': (144, 5), 'fc': (24, 5), 'bias': (8, 5)}
    >>> X, Y = pairs["conv"]
    >>> model, history = train_known(X, Y, X, Y, MetaConfig(epochs=1, batch_size=64))
    >>> sorted(history[0])
    ['best_val_l1', 'epoch', 'train_l1', 'val_l1', 'wall_s']
    >>> round(constant_scale_fit(X, Y), 4)             # Y = w5 / 0.9 here
    1.1111
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from know_core.layout import PREDICTED_KINDS, TensorSpec, layout_size

if TYPE_CHECKING:  # pandas is imported lazily, only l1_table needs it
    import pandas as pd

WINDOW = 5  # KNOWN's input width: its first Dense takes exactly 5 values

Pairs = dict[str, tuple[np.ndarray, np.ndarray]]


# ---------------------------------------------------------------------------
# trajectory diagnostics


def _coherence(traj, slices: list[slice]) -> float:
    """Mean cosine between consecutive steps Δk = θk − θk+1, restricted to `slices`.

    Steps with zero norm make their cosines undefined (NaN); they are left out of the mean,
    and NaN is returned when nothing is left.
    """
    S = traj.shape[0]
    if S < 3:
        raise ValueError(f"run has {S} stages; coherence needs at least 3 (two steps)")
    dot = np.zeros(S - 2)
    sq = np.zeros(S - 1)
    for sl in slices:
        prev = None
        for k in range(S - 1):
            d = np.asarray(traj[k, sl], np.float64) - np.asarray(traj[k + 1, sl], np.float64)
            sq[k] += d @ d
            if prev is not None:
                dot[k - 1] += prev @ d
            prev = d
    den = np.sqrt(sq[:-1] * sq[1:])
    cos = np.divide(dot, den, out=np.full_like(dot, np.nan), where=den > 0)
    return float(np.nanmean(cos)) if np.isfinite(cos).any() else float("nan")


def step_coherence(traj) -> float:
    """Mean cosine similarity of consecutive stage differences, over the whole vector.

    Δk = θk − θk+1 points in the data-growing direction. 1 means every step is parallel
    (a straight-line trajectory, where even the task vector extrapolates well); ~0 means
    the steps are unrelated noise and there is little for KNOWN to learn.
    """
    traj = _check_traj(traj)
    return _coherence(traj, [slice(None)])


def per_kind_coherence(traj, layout: list[TensorSpec]) -> dict[str, float]:
    """step_coherence restricted to each kind present in `layout` (conv, fc, bias, ...)."""
    traj = _check_traj(traj, layout)
    by_kind: dict[str, list[slice]] = {}
    for s in layout:
        by_kind.setdefault(s.kind, []).append(slice(s.offset, s.stop))
    return {kind: _coherence(traj, sl) for kind, sl in by_kind.items()}


def _check_traj(traj, layout: list[TensorSpec] | None = None) -> np.ndarray:
    traj = np.asarray(traj)
    if traj.ndim != 2:
        raise ValueError(f"trajectory must be 2-D (stages, params), got shape {traj.shape}")
    if layout is not None and traj.shape[1] != layout_size(layout):
        raise ValueError(
            f"trajectory has {traj.shape[1]} params per stage, layout needs {layout_size(layout)}"
        )
    return traj


# ---------------------------------------------------------------------------
# pairs


def _as_rng(rng) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(0 if rng is None else rng)


def _window_stages(S: int, window: int, reverse: bool) -> list[tuple[list[int], int]]:
    """(input stages oldest->newest, target stage) for every window, k = 0..S-1-window."""
    out = []
    for k in range(S - window):
        if reverse:  # target k+window (more forgotten); column `window-1` = stage k+window-1
            out.append((list(range(k, k + window)), k + window))
        else:  # target k (more data); column `window-1` = stage k+1
            out.append((list(range(k + window, k, -1)), k))
    return out


def build_pairs(
    traj,
    layout: list[TensorSpec],
    window: int = WINDOW,
    max_per_kind: int | None = None,
    rng: np.random.Generator | int | None = None,
    reverse: bool = False,
    kinds: tuple[str, ...] = PREDICTED_KINDS,
) -> Pairs:
    """Element-wise training pairs {kind: (X float32 (m, window), Y float32 (m,))}.

    Forward (default, what KNOWN is trained for): for every k = 0..S-1-window,
        X row = stages [k+window, ..., k+1]  (oldest -> newest: most-forgotten first)
        Y     = stage k                       (the next larger-data value)
    so column `window-1` is the stage adjacent to the target, as in prediction (§5).

    reverse=True builds the mirrored task, predicting the MORE forgotten value from the
    `window` larger-data ones: X row = stages [k, k+1, ..., k+window-1], Y = stage k+window.
    Columns run in forgetting (fine-tuning time) order, so column `window-1` is again the
    stage adjacent to the target and `w5 + residual` keeps its meaning. Useful as a
    symmetry/sanity check and as extra data; it is not how KNOW predicts.

    Rows are window-major: all scalars of the first window (the one whose forward target is
    the full-data stage), then the next window, ...; within a window, scalars are in
    flat-vector order. Every kind in `kinds` is returned, with (0, window)/(0,) arrays if
    the layout has none of it.

    max_per_kind caps the ROWS per kind. It keeps a uniform random subset of scalars
    (seeded by `rng`; None means seed 0), the same scalars in every window, so at most
    max(1, max_per_kind // n_windows) scalars survive.
    """
    traj = _check_traj(traj, layout)
    S = traj.shape[0]
    if S < window + 1:
        raise ValueError(
            f"run has {S} stages; meta-training needs at least window+1 = {window + 1}"
        )
    windows = _window_stages(S, window, reverse)
    gen = _as_rng(rng)
    out: Pairs = {}
    for kind in kinds:
        specs = [s for s in layout if s.kind == kind]
        idx = (
            np.concatenate([np.arange(s.offset, s.stop) for s in specs])
            if specs
            else np.zeros(0, dtype=np.int64)
        )
        if max_per_kind is not None:
            keep = max(1, max_per_kind // len(windows))
            if keep < idx.size:
                idx = np.sort(gen.choice(idx, size=keep, replace=False))
        sub = np.asarray(traj[:, idx], dtype=np.float32)  # (S, n_kept)
        X = np.concatenate([sub[stages].T for stages, _ in windows], axis=0)
        Y = np.concatenate([sub[target] for _, target in windows], axis=0)
        out[kind] = (np.ascontiguousarray(X, dtype=np.float32), Y.astype(np.float32))
    return out


def pair_log_sizes(
    stage_subset_sizes, n_rows: int, window: int = WINDOW, reverse: bool = False
) -> np.ndarray:
    """log subset sizes (n_rows, window+1) for the rows of one run's build_pairs output.

    Columns: the `window` input stages in X's column order, then the target. Feed it to
    l1_table(sizes=...) so 'logfit' uses each run's real sizes (concatenate across runs
    in the same order as the pairs).
    """
    sizes = np.asarray(stage_subset_sizes, dtype=np.float64)
    windows = _window_stages(sizes.size, window, reverse)
    if n_rows % len(windows):
        raise ValueError(f"{n_rows} rows is not a multiple of {len(windows)} windows")
    per_window = np.log(np.array([sizes[stages + [t]] for stages, t in windows]))
    return np.repeat(per_window, n_rows // len(windows), axis=0)


def split_runs(run_ids, val_fraction: float, seed: int) -> tuple[list, list]:
    """Split run ids into (train_ids, val_ids) by RUN, so no run's scalars leak across.

    Deterministic for a given set of ids and seed (the input order does not matter).
    round(n * val_fraction) runs go to val, clamped so both sides get at least one.
    """
    ids = list(run_ids)
    if len(set(ids)) != len(ids):
        raise ValueError("run ids are not unique")
    if len(ids) < 2:
        raise ValueError(f"need at least 2 runs to split into train and val, got {len(ids)}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    ordered = sorted(ids, key=str)
    perm = np.random.default_rng(seed).permutation(len(ordered))
    n_val = min(max(1, round(len(ordered) * val_fraction)), len(ordered) - 1)
    val = {ordered[i] for i in perm[:n_val]}
    return [r for r in ordered if r not in val], [r for r in ordered if r in val]


def split_runs_grouped(run_ids, groups, val_fraction: float, seed: int) -> tuple[list, list]:
    """split_runs within each group (e.g. the model architecture), so that every group, and so
    every kind of weight, appears on both sides. A group with a single run goes to train."""
    by_group: dict = {}
    for rid, g in zip(run_ids, groups):
        by_group.setdefault(g, []).append(rid)
    train, val = [], []
    for g in sorted(by_group, key=str):
        ids = by_group[g]
        if len(ids) < 2:
            train += ids
            continue
        t, v = split_runs(ids, val_fraction, seed)
        train += t
        val += v
    if not val:
        raise ValueError("no group has 2 runs, so no run can be held out for validation; collect more runs")
    return sorted(train, key=str), sorted(val, key=str)


# ---------------------------------------------------------------------------
# training


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


# ---------------------------------------------------------------------------
# baselines and the comparison table


def constant_scale_fit(X, Y) -> float:
    """Least-squares c for Y ≈ c·w5 (the "KNOWN is mostly shrinkage" control, §6).

    Returns 1.0 (identity) when w5 is all zeros.
    """
    w5 = np.asarray(X, dtype=np.float64)[:, -1]
    y = np.asarray(Y, dtype=np.float64).reshape(-1)
    den = float(w5 @ w5)
    return float(w5 @ y) / den if den > 0 else 1.0


def _logfit(X: np.ndarray, log_sizes: np.ndarray) -> np.ndarray:
    """Per-row least-squares line w ≈ a + b·log(size) over the window, evaluated at the target."""
    x = log_sizes[:, :-1]
    xt = log_sizes[:, -1]
    xm = x.mean(axis=1, keepdims=True)
    wm = X.mean(axis=1, keepdims=True)
    var = ((x - xm) ** 2).sum(axis=1)
    slope = ((x - xm) * (X - wm)).sum(axis=1) / np.where(var > 0, var, 1.0)
    return wm[:, 0] + slope * (xt - xm[:, 0])


def _known_predict(ks, kind: str, X: np.ndarray) -> np.ndarray:
    out = np.empty(X.shape[0], dtype=np.float64)
    for i in range(0, X.shape[0], _EVAL_BATCH):
        xb = torch.as_tensor(X[i : i + _EVAL_BATCH], dtype=torch.float32)
        with torch.no_grad():
            res = ks.residual(kind, xb)
        res = torch.as_tensor(res).reshape(-1).double().numpy()
        out[i : i + xb.shape[0]] = X[i : i + _EVAL_BATCH, -1] + res
    return out


def l1_table(
    pairs_train: Pairs,
    pairs_val: Pairs,
    known_sets: dict | None = None,
    sizes: dict[str, np.ndarray] | None = None,
    r: float = 0.5,
) -> pd.DataFrame:
    """Validation L1 of every method on every kind: columns method, kind, val_l1, n_pairs.

    Methods (prediction of Y from the window w1..w5):
      <name>          each KnownSet in known_sets: w5 + ks.residual(kind, window)
      taskvector      w5 + (w5 − w4)
      logfit          per scalar, least-squares line of w against log(subset size) over the
                      5 window values, evaluated at the target's log size. `sizes[kind]` is
                      (window+1,) or (m, window+1) log sizes (see pair_log_sizes); without
                      it sizes are geometric with ratio r. For geometric sizes the fit is
                      linear in stage index, so r cancels: the default only assumes
                      equally spaced log sizes.
      identity        w5
      constant-scale  c·w5, c = constant_scale_fit on the TRAIN pairs of that kind
    Plus a kind='all' row per method: mean over kinds weighted by n_pairs. Kinds with no
    val pairs are skipped.
    """
    import pandas as pd

    rows = []
    known_sets = known_sets or {}
    for kind, (Xv, Yv) in pairs_val.items():
        Xv = np.asarray(Xv, dtype=np.float64)
        Yv = np.asarray(Yv, dtype=np.float64).reshape(-1)
        m, W = Xv.shape
        if m == 0:
            continue
        if sizes is not None and kind in sizes:
            ls = np.broadcast_to(np.asarray(sizes[kind], dtype=np.float64), (m, W + 1))
        else:
            ls = np.broadcast_to(np.arange(W + 1) * math.log(1.0 / r), (m, W + 1))
        preds = {name: _known_predict(ks, kind, Xv) for name, ks in known_sets.items()}
        preds["taskvector"] = 2 * Xv[:, -1] - Xv[:, -2]
        preds["logfit"] = _logfit(Xv, ls)
        preds["identity"] = Xv[:, -1]
        if kind in pairs_train and len(pairs_train[kind][1]):
            c = constant_scale_fit(*pairs_train[kind])
        else:
            c = 1.0
        preds["constant-scale"] = c * Xv[:, -1]
        for method, p in preds.items():
            rows.append(
                {"method": method, "kind": kind, "val_l1": float(np.abs(p - Yv).mean()), "n_pairs": m}
            )
    df = pd.DataFrame(rows, columns=["method", "kind", "val_l1", "n_pairs"])
    if len(df):
        agg = [
            {
                "method": method,
                "kind": "all",
                "val_l1": float((g.val_l1 * g.n_pairs).sum() / g.n_pairs.sum()),
                "n_pairs": int(g.n_pairs.sum()),
            }
            for method, g in df.groupby("method", sort=False)
        ]
        df = pd.concat([df, pd.DataFrame(agg)], ignore_index=True)
    return df
