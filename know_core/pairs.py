"""Training pairs from forgetting trajectories (method.md §3, §4), and the checks around them.

A trajectory is a float32 array (S, n_params): stage 0 is the full-data model, stage S-1
the most-forgotten one (smallest subset). KNOWN works element-wise, so every scalar of every
window of 5 consecutive stages is one training pair:

    X row = (w1..w5) = stages [k+5, k+4, k+3, k+2, k+1]   most-forgotten -> newest
    Y     = stage k                                         the next larger-data value

and the model learns  Y ≈ w5 + KNOWN(w) (``know_core.meta.train_known``).

What lives here:
    step_coherence, per_kind_coherence   how straight a trajectory is (a cheap data check)
    build_pairs, pair_log_sizes          trajectory -> {kind: (X (m,5), Y (m,))}
    split_runs, split_runs_grouped       train/val split BY RUN (never by scalar)

Pure numpy: no torch, no files.

Example (runs as a doctest):
    >>> import numpy as np
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
    >>> round(step_coherence(traj), 6)                 # every step is parallel
    1.0
    >>> split_runs(["r0", "r1", "r2", "r3"], val_fraction=0.25, seed=0)
    (['r0', 'r1', 'r3'], ['r2'])
"""
from __future__ import annotations

import numpy as np

from know_core.known import WINDOW  # noqa: F401 - KNOWN's input width, re-exported for the pair builders
from know_core.layout import PREDICTED_KINDS, TensorSpec, layout_size
from know_core.pair_stream import as_index, select_columns

Pairs = dict[str, tuple[np.ndarray, np.ndarray]]


# ---------------------------------------------------------------------------
# trajectory diagnostics


def coherence_sums(traj, slices: list[slice]) -> tuple[np.ndarray, np.ndarray]:
    """(dot (S-2,), sq (S-1,)): Σ Δk·Δk+1 and Σ |Δk|² over the columns `slices` of traj, with
    Δk = θk − θk+1. Additive over disjoint columns, so a trajectory read in column blocks sums
    its blocks' parts; coherence_of turns the totals into the coherence."""
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
    return dot, sq


def coherence_of(dot: np.ndarray, sq: np.ndarray) -> float:
    """Mean cosine between consecutive steps from coherence_sums' totals.

    Steps with zero norm make their cosines undefined (NaN); they are left out of the mean,
    and NaN is returned when nothing is left.
    """
    den = np.sqrt(sq[:-1] * sq[1:])
    cos = np.divide(dot, den, out=np.full_like(dot, np.nan), where=den > 0)
    return float(np.nanmean(cos)) if np.isfinite(cos).any() else float("nan")


def _coherence(traj, slices: list[slice]) -> float:
    """Mean cosine between consecutive steps Δk = θk − θk+1, restricted to `slices`."""
    return coherence_of(*coherence_sums(traj, slices))


def step_coherence(traj, layout: list[TensorSpec] | None = None) -> float:
    """Mean cosine similarity of consecutive stage differences.

    Δk = θk − θk+1 points in the data-growing direction. 1 means every step is parallel
    (a straight-line trajectory, where even the task vector extrapolates well); ~0 means
    the steps are unrelated noise and there is little for KNOWN to learn.

    With a layout, only what KNOWN predicts counts (conv, fc, bias): BatchNorm running
    statistics and the integer num_batches_tracked counters grow the same way at every
    stage and would otherwise hold nearly all of each step's norm, making a random walk of
    the weights look straight. Without one, the whole vector (a plain weight array).
    """
    traj = _check_traj(traj, layout)
    if layout is None:
        return _coherence(traj, [slice(None)])
    return _coherence(traj, [slice(s.offset, s.stop) for s in layout if s.kind in PREDICTED_KINDS])


def per_kind_coherence(traj, layout: list[TensorSpec]) -> dict[str, float]:
    """step_coherence restricted to each predicted kind present in `layout` (conv, fc, bias)."""
    traj = _check_traj(traj, layout)
    by_kind: dict[str, list[slice]] = {}
    for s in layout:
        if s.kind in PREDICTED_KINDS:
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
    selected = select_columns(layout, S, max_per_kind, _as_rng(rng), window, kinds)
    out: Pairs = {}
    for kind in kinds:
        idx = as_index(selected[kind])
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
