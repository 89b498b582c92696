"""Training pairs streamed in blocks, for meta-training on stores larger than memory.

`build_pairs` (know_core.pairs) turns a whole trajectory into pairs at once. Here the same
pairs are described as **blocks**: one block is a chunk-aligned column span of one run and
the columns of one kind in it that meta-training uses. A block is read on demand (by the
caller: this module knows no store), turned into pairs straight into a preallocated buffer,
and forgotten; so memory is bounded by the buffer, not by the data.

    select_columns   the scalars of each kind a run contributes (the same as build_pairs' cap)
    plan_blocks      those scalars as chunk-aligned blocks of at most a given number of pairs
    group_blocks     an epoch's block order packed into buffer-sized groups
    fill_pairs       one block's raw values -> its pairs, written into a buffer

With the same cap and seed, the pairs of a run's blocks are exactly the rows of
`build_pairs(traj, layout, max_per_kind=cap, rng=seed)[kind]` (tests/test_meta_stream.py).

Example (runs as a doctest):
    >>> import numpy as np
    >>> from know_core.layout import TensorSpec
    >>> layout = [TensorSpec("c.weight", (4, 2, 3, 3), "conv", 0), TensorSpec("f.weight", (3, 4), "fc", 72)]
    >>> cols = select_columns(layout, n_stages=7, cap=None, seed=0)
    >>> {k: len(v) for k, v in cols.items()}
    {'conv': 72, 'fc': 12, 'bias': 0}
    >>> blocks = plan_blocks("run-a", "conv", cols["conv"], n_stages=7, chunk=32, max_pairs=64)
    >>> [(b.c0, b.c1, b.n_pairs) for b in blocks]      # 2 windows per scalar, one chunk per block
    [(0, 32, 64), (32, 64, 64), (64, 72, 16)]
    >>> [len(g) for g in group_blocks(blocks, order=[2, 0, 1], buffer_pairs=100)]
    [2, 1]
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from know_core.layout import PREDICTED_KINDS, TensorSpec


@dataclass(frozen=True)
class Block:
    """Columns `cols` (sorted, relative to c0) of columns [c0, c1) of run `source`, one kind."""

    source: str
    kind: str
    c0: int
    c1: int
    cols: np.ndarray
    n_windows: int

    @property
    def n_pairs(self) -> int:
        return int(self.cols.size) * self.n_windows


def n_windows(n_stages: int, window: int) -> int:
    if n_stages < window + 1:
        raise ValueError(f"run has {n_stages} stages; meta-training needs at least window+1 = {window + 1}")
    return n_stages - window


def select_columns(layout: list[TensorSpec], n_stages: int, cap: int | None, seed, window: int = 5,
                   kinds: tuple[str, ...] = PREDICTED_KINDS) -> dict[str, np.ndarray]:
    """{kind: sorted flat-vector indices} of the scalars that give a run's pairs.

    cap (pairs per kind; None = every scalar) keeps max(1, cap // windows) scalars, drawn
    uniformly with numpy's default_rng(seed) in the order of `kinds`: build_pairs' rule.
    """
    windows = n_windows(n_stages, window)
    gen = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(0 if seed is None else seed)
    out = {}
    for kind in kinds:
        specs = [s for s in layout if s.kind == kind]
        idx = np.concatenate([np.arange(s.offset, s.stop) for s in specs]) if specs else np.zeros(0, np.int64)
        if cap is not None:
            keep = max(1, cap // windows)
            if keep < idx.size:
                idx = np.sort(gen.choice(idx, size=keep, replace=False))
        out[kind] = idx
    return out


def plan_blocks(source: str, kind: str, columns: np.ndarray, n_stages: int, chunk: int, max_pairs: int,
                window: int = 5) -> list[Block]:
    """Split a run's selected columns of one kind into blocks that each lie within one span of
    whole chunks (a multiple of `chunk` columns, as many as fit `max_pairs`, at least one)."""
    windows = n_windows(n_stages, window)
    span = max(chunk, (max(1, max_pairs // windows) // chunk) * chunk)
    columns = np.asarray(columns, dtype=np.int64)
    if columns.size == 0:
        return []
    keys = columns // span
    cuts = np.flatnonzero(np.diff(keys)) + 1
    blocks = []
    for part in np.split(columns, cuts):
        c0, c1 = int(part[0]), int(part[-1]) + 1
        blocks.append(Block(source, kind, c0, c1, part - c0, windows))
    return blocks


def group_blocks(blocks: list[Block], order, buffer_pairs: int) -> list[list[Block]]:
    """Blocks in `order`, packed greedily into groups of at most buffer_pairs pairs (a block
    larger than the buffer is a group of its own)."""
    groups: list[list[Block]] = []
    current: list[Block] = []
    size = 0
    for i in order:
        b = blocks[int(i)]
        if current and size + b.n_pairs > buffer_pairs:
            groups.append(current)
            current, size = [], 0
        current.append(b)
        size += b.n_pairs
    if current:
        groups.append(current)
    return groups


def fill_pairs(values: np.ndarray, block: Block, X: np.ndarray, Y: np.ndarray, at: int = 0,
               window: int = 5, stride: int | None = None) -> int:
    """Write the pairs of `block` from its raw values (n_stages, c1 - c0) into X[at:], Y[at:]
    (window-major, as build_pairs: window k's rows start at at + k·stride, stride = the
    block's scalars unless given; a whole run's blocks with stride = the run's scalars give
    build_pairs' row order). Returns the number of rows written."""
    S = values.shape[0]
    sub = values[:, block.cols] if block.cols.size != values.shape[1] else values
    n = block.cols.size
    stride = n if stride is None else stride
    for k in range(S - window):  # target stage k, inputs k+window (oldest) .. k+1 (newest)
        rows = slice(at + k * stride, at + k * stride + n)
        X[rows] = sub[k + window:k:-1].T
        Y[rows] = sub[k]
    return n * (S - window)


__all__ = ["Block", "select_columns", "plan_blocks", "group_blocks", "fill_pairs", "n_windows"]
