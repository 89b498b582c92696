"""Simple predictors of the next larger-data value and the validation L1 table (method.md §6).

Every method predicts Y from the window w1..w5 of ``know_core.pairs.build_pairs`` pairs;
the table puts trained KNOWN sets (``know_core.known.KnownSet``) next to the controls a gain
has to beat.

What lives here:
    constant_scale_fit   least-squares c for Y ≈ c·w5 (the "KNOWN is mostly shrinkage" control)
    l1_table             val L1 of KNOWN sets, taskvector, logfit, identity and constant-scale

Example (runs as a doctest):
    >>> import numpy as np
    >>> w = np.random.default_rng(1).normal(0, 0.1, (50, 1))
    >>> X = (w * 0.9 ** np.arange(5, 0, -1)).astype(np.float32)   # most-forgotten first
    >>> Y = w[:, 0].astype(np.float32)                              # Y = w5 / 0.9
    >>> round(constant_scale_fit(X, Y), 4)
    1.1111
    >>> table = l1_table({"fc": (X, Y)}, {"fc": (X, Y)})
    >>> table[table.kind == "all"].method.tolist()
    ['taskvector', 'logfit', 'identity', 'constant-scale']
    >>> float(table.set_index(["method", "kind"]).loc[("constant-scale", "fc"), "val_l1"]) < 1e-6
    True
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch

from know_core.pairs import Pairs

if TYPE_CHECKING:  # pandas is imported lazily, only l1_table needs it
    import pandas as pd

_PREDICT_BATCH = 1 << 16  # rows per KNOWN call in _known_predict


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
    for i in range(0, X.shape[0], _PREDICT_BATCH):
        xb = torch.as_tensor(X[i : i + _PREDICT_BATCH], dtype=torch.float32)
        with torch.no_grad():
            res = ks.residual(kind, xb)
        res = torch.as_tensor(res).reshape(-1).double().numpy()
        out[i : i + xb.shape[0]] = X[i : i + _PREDICT_BATCH, -1] + res
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
