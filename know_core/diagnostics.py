"""Predictors scored on a trajectory's own held-out windows (the target diagnostic).

For every stage k that has `window` older stages behind it, each predictor sees stages
k+1..k+window (smaller data) and predicts stage k (the next larger size); the L1 error is
taken per predicted kind (conv, fc, bias) and over all of them. It measures how well a
predictor extrapolates *this* trajectory one step, without any downstream training.

Example:
    >>> import numpy as np
    >>> from know_core.layout import TensorSpec
    >>> from know_core.predict import PredictorConfig
    >>> layout = [TensorSpec("w", (2, 2), "fc", 0)]
    >>> traj = np.stack([np.full(4, 1.0 - 0.1 * k, np.float32) for k in range(7)])  # stage 0 first
    >>> rows = held_out_window_l1(traj, layout, [640, 320, 160, 80, 40, 20, 10], 0.5,
    ...                           {"identity": PredictorConfig("naive")})
    >>> sorted({row["held_out_stage"] for row in rows}), round(rows[0]["l1"], 3)
    ([0, 1], 0.1)
"""
from __future__ import annotations

import numpy as np
import torch

from .known import WINDOW
from .layout import PREDICTED_KINDS, TensorSpec
from .predict import PredictorConfig, predict_next, sizes_from_stages, window_from_stages


def held_out_window_l1(traj: np.ndarray, layout: list[TensorSpec], stage_sizes, r: float,
                       configs: dict[str, PredictorConfig], window: int = WINDOW) -> list[dict]:
    """Rows {predictor, held_out_stage, kind, l1, n}: each predictor's mean absolute error
    when it predicts stage k from the `window` stages after it, per predicted kind and 'all'."""
    rows = []
    for k in range(0, traj.shape[0] - window):
        target = traj[k]
        later = traj[k + 1 : k + 1 + window]
        for label, cfg in configs.items():
            w = window_from_stages(torch.from_numpy(later[: cfg.rows].copy()), cfg.rows)
            sz = sizes_from_stages(stage_sizes[k + 1 : k + 1 + cfg.rows], cfg.rows)
            err: dict[str, list[np.ndarray]] = {kind: [] for kind in PREDICTED_KINDS}
            for s in layout:
                if s.kind in PREDICTED_KINDS:
                    pred = predict_next(cfg, w[:, s.offset : s.stop], s.kind, sz, r).numpy()
                    err[s.kind].append(np.abs(pred - target[s.offset : s.stop]))
            for kind, parts in err.items():
                if parts:
                    e = np.concatenate(parts)
                    rows.append({"predictor": label, "held_out_stage": k, "kind": kind, "l1": float(e.mean()),
                                 "n": int(e.size)})
            allv = np.concatenate([np.concatenate(p) for p in err.values() if p])
            rows.append({"predictor": label, "held_out_stage": k, "kind": "all", "l1": float(allv.mean()),
                         "n": int(allv.size)})
    return rows


__all__ = ["held_out_window_l1"]
