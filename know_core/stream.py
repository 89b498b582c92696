"""Streaming prediction over a flat weight vector, one column block at a time.

A block is a slice [c0, c1) of the flat parameter axis for the stages the predictor
needs. Inside a block, columns are grouped by the kind of the tensor they belong to, and
each kind is predicted with one call (element-wise predictors don't care where a tensor
ends). Memory is bounded by the block size, not the model size.

Example:
    >>> import numpy as np
    >>> from know_core.layout import TensorSpec
    >>> from know_core.predict import PredictorConfig
    >>> layout = [TensorSpec("w", (4, 3), "fc", 0), TensorSpec("b", (3,), "bias", 12)]
    >>> stages = np.stack([np.full(15, 2.0 - 0.5 * k, np.float32) for k in range(5)])  # stage 0 first
    >>> out = predict_block(PredictorConfig("taskvector"), stages, layout, 0, [80, 40, 20, 10, 5], 2)
    >>> out[:, 0].tolist()
    [2.5, 3.0]
"""
from __future__ import annotations

import numpy as np
import torch

from .layout import TensorSpec
from .predict import NonFiniteError, PredictorConfig, predict_steps, sizes_from_stages


def segments(layout: list[TensorSpec], c0: int, c1: int) -> list[tuple[TensorSpec, int, int]]:
    """(spec, start, stop) of every tensor overlapping [c0, c1), in block coordinates."""
    out = []
    for spec in layout:
        lo, hi = max(spec.offset, c0), min(spec.stop, c1)
        if lo < hi:
            out.append((spec, lo - c0, hi - c0))
    return out


#: columns predicted per predict_steps call: the recurrence keeps ~5 arrays the size of its
#: input (the window, its transpose, the shifted window, the predictions), so pieces of 1M
#: columns bound that to ~100 MB whatever the block; a 4M-value block of a 100M-parameter
#: model peaked 0.3 GB lower (benchmarks/bench_stream.py), at the same speed
PIECE_COLUMNS = 1 << 20


def column_pieces(spans: list[tuple[int, int]], size: int = PIECE_COLUMNS):
    """Cover the column spans [a, b), in order, with selections of at most `size` columns: a
    slice where a piece is one contiguous span, else an index array."""
    piece, n = [], 0
    for a, b in spans:
        while a < b:
            take = min(b - a, size - n)
            piece.append((a, a + take))
            n, a = n + take, a + take
            if n == size:
                yield _selection(piece)
                piece, n = [], 0
    if piece:
        yield _selection(piece)


def _selection(piece: list[tuple[int, int]]):
    if len(piece) == 1:
        return slice(*piece[0])
    return np.concatenate([np.arange(a, b) for a, b in piece])


def predict_block(
    cfg: PredictorConfig,
    stages: np.ndarray,
    layout: list[TensorSpec],
    c0: int,
    stage_sizes: list[int],
    steps: int,
    r: float | None = None,
) -> np.ndarray:
    """Predict `steps` recurrent steps for columns [c0, c0 + stages.shape[1]).

    `stages` holds rows in store order (stage 0 = full data first), as many as the
    predictor's window; `stage_sizes` are their subset sizes and `r` the run's sampling rate
    (None: the ratio of the two newest sizes). Returns (steps, m) float32.
    Raises NonFiniteError naming the first tensor with a non-finite prediction.
    """
    rows, m = stages.shape
    sizes = sizes_from_stages(stage_sizes[:rows], rows)
    out = np.empty((steps, m), dtype=np.float32)
    segs = segments(layout, c0, c0 + m)
    for kind in {spec.kind for spec, _, _ in segs}:
        for cols in column_pieces([(a, b) for spec, a, b in segs if spec.kind == kind]):
            # one copy: gather the columns and reverse the rows (store order -> window order, as
            # window_from_stages) together; flipping first, then gathering, copied twice
            window = torch.from_numpy(np.ascontiguousarray(stages[::-1][:, cols]))
            out[:, cols] = predict_steps(cfg, window, kind, sizes, steps, r).numpy()
    bad = ~np.isfinite(out).all(axis=0)
    if bad.any():
        col = int(np.argmax(bad))
        name = next(spec.name for spec, a, b in segs if a <= col < b)
        raise NonFiniteError(f"predictor {cfg.name!r} produced non-finite values for tensor {name!r}")
    return out
