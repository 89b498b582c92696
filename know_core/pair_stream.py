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
    >>> cols                                         # every scalar: ranges, not index lists
    {'conv': [(0, 72)], 'fc': [(72, 84)], 'bias': []}
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
    """Columns `cols` (sorted, relative to c0) of columns [c0, c1) of run `source`, one kind;
    or, for every scalar of the kind (no cap), cols None and `ranges` ((start, stop) relative
    to c0): memory per block stays a few numbers whatever the model size."""

    source: str
    kind: str
    c0: int
    c1: int
    cols: np.ndarray | None
    n_windows: int
    ranges: tuple[tuple[int, int], ...] = ()

    @property
    def n_scalars(self) -> int:
        return int(self.cols.size) if self.cols is not None else sum(b - a for a, b in self.ranges)

    @property
    def n_pairs(self) -> int:
        return self.n_scalars * self.n_windows


def kind_ranges(layout: list[TensorSpec], kind: str) -> list[tuple[int, int]]:
    """The flat-vector (start, stop) ranges of a kind's tensors, adjacent ones merged."""
    out: list[tuple[int, int]] = []
    for s in sorted((s for s in layout if s.kind == kind), key=lambda s: s.offset):
        if s.size == 0:
            continue
        if out and out[-1][1] == s.offset:
            out[-1] = (out[-1][0], s.stop)
        else:
            out.append((s.offset, s.stop))
    return out


def as_index(columns) -> np.ndarray:
    """A selection (index array or list of ranges) as a sorted int64 index array."""
    if isinstance(columns, np.ndarray):
        return columns
    return np.concatenate([np.arange(a, b) for a, b in columns]) if columns else np.zeros(0, np.int64)


def n_windows(n_stages: int, window: int) -> int:
    if n_stages < window + 1:
        raise ValueError(f"run has {n_stages} stages; meta-training needs at least window+1 = {window + 1}")
    return n_stages - window


def select_columns(layout: list[TensorSpec], n_stages: int, cap: int | None, seed, window: int = 5,
                   kinds: tuple[str, ...] = PREDICTED_KINDS) -> dict[str, np.ndarray | list[tuple[int, int]]]:
    """{kind: the flat-vector columns that give a run's pairs}: a sorted index array when
    capped, else the kind's (start, stop) ranges (every scalar; as_index() lists them).

    cap (pairs per kind; None = every scalar) keeps max(1, cap // windows) scalars, drawn
    uniformly with numpy's default_rng(seed) in the order of `kinds`: build_pairs' rule. The
    draw picks positions among the kind's scalars and maps them to columns, which is what
    choice() over the listed columns does, without listing them.
    """
    windows = n_windows(n_stages, window)
    gen = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(0 if seed is None else seed)
    out: dict = {}
    for kind in kinds:
        ranges = kind_ranges(layout, kind)
        total = sum(b - a for a, b in ranges)
        keep = total if cap is None else max(1, cap // windows)
        if keep >= total:
            out[kind] = ranges if cap is None else as_index(ranges)
            continue
        pos = gen.choice(total, size=keep, replace=False)
        starts = np.array([a for a, _ in ranges], np.int64)
        before = np.concatenate([[0], np.cumsum([b - a for a, b in ranges])[:-1]]).astype(np.int64)
        which = np.searchsorted(before, pos, side="right") - 1
        out[kind] = np.sort(starts[which] + (pos - before[which]))
    return out


def plan_blocks(source: str, kind: str, columns: np.ndarray, n_stages: int, chunk: int, max_pairs: int,
                window: int = 5) -> list[Block]:
    """Split a run's selected columns of one kind into blocks that each lie within one span of
    whole chunks (a multiple of `chunk` columns, as many as fit `max_pairs`, at least one)."""
    windows = n_windows(n_stages, window)
    span = max(chunk, (max(1, max_pairs // windows) // chunk) * chunk)
    if not isinstance(columns, np.ndarray):  # every scalar: ranges cut at span boundaries
        pieces: dict[int, list[tuple[int, int]]] = {}
        for a, b in columns:
            for s0 in range(a // span * span, b, span):
                lo, hi = max(a, s0), min(b, s0 + span)
                if hi > lo:
                    pieces.setdefault(s0 // span, []).append((lo, hi))
        return [Block(source, kind, rs[0][0], rs[-1][1], None, windows, tuple((a - rs[0][0], b - rs[0][0]) for a, b in rs))
                for _, rs in sorted(pieces.items())]
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


def selected_values(values: np.ndarray, block: Block) -> np.ndarray:
    """The block's own columns of its raw values (n_stages, c1 - c0): a view when that is all of them."""
    if block.cols is None:
        if len(block.ranges) == 1 and block.ranges[0] == (0, values.shape[1]):
            return values
        return np.concatenate([values[:, a:b] for a, b in block.ranges], axis=1)
    return values[:, block.cols] if block.cols.size != values.shape[1] else values


def fill_pairs(values: np.ndarray, block: Block, X: np.ndarray, Y: np.ndarray, at: int = 0,
               window: int = 5, stride: int | None = None) -> int:
    """Write the pairs of `block` from its raw values (n_stages, c1 - c0) into X[at:], Y[at:]
    (window-major, as build_pairs: window k's rows start at at + k·stride, stride = the
    block's scalars unless given; a whole run's blocks with stride = the run's scalars give
    build_pairs' row order). Returns the number of rows written."""
    S = values.shape[0]
    sub = selected_values(values, block)
    n = block.n_scalars
    stride = n if stride is None else stride
    for k in range(S - window):  # target stage k, inputs k+window (oldest) .. k+1 (newest)
        rows = slice(at + k * stride, at + k * stride + n)
        X[rows] = sub[k + window:k:-1].T
        Y[rows] = sub[k]
    return n * (S - window)


__all__ = ["Block", "kind_ranges", "as_index", "selected_values", "select_columns", "plan_blocks", "group_blocks", "fill_pairs", "n_windows"]
