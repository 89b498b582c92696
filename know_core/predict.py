"""Weight predictors on plain tensors: naive, task vector, log-fit and KNOW (method §5, §6).

A *window* is a float tensor (W, n): W snapshots of one tensor (flattened to n values),
ordered oldest/most-forgotten -> newest/full-data, so row -1 is Θ0 (full data). `sizes` are
the W subset sizes of those rows, increasing. The trajectory store keeps stage 0 (full data)
first; `window_from_stages` / `sizes_from_stages` turn store order into window order.

Predictors (each gives the next, larger-data value; `predict_steps` repeats them):
    naive        Θ0 unchanged.
    taskvector   Θ0 + α(Θ0 − Θ1). Repeated with α = 1 this gives Θ0 + k(Θ0 − Θ1) at step k.
    logfit       per weight, least squares w = a + b·log(size) over all W rows, evaluated at
                 the next size sizes[-1]**2 / sizes[-2] (one more geometric step).
    know         Θ0 + KNOWN(window of the newest 5 rows), the model chosen by the tensor's kind.
    know-s<k>    KNOW reading only the newest k rows (k = 2, 3, 4): the window is padded to 5
                 by repeating the oldest of those k rows at the front, so the older diffs are
                 zero. know-s2 sees only Θ1 and Θ0. `know` is know-s5.

Kinds (know_core.layout): 'conv', 'fc', 'bias' are predicted ('conv' -> KNOWN Conv, 'fc' ->
KNOWN FC, 'bias' -> KNOWN Bias); 'norm' (γ/β) is predicted (with KNOWN Bias for know*) only
when predict_norm is set, else returned unchanged; 'norm_stat' is always returned unchanged.
Predictions are not checked for finiteness here: call check_finite with the tensor's name.

Example:
    >>> import torch
    >>> from know_core.predict import PredictorConfig, predict_steps, virtual_factors
    >>> window = torch.tensor([[1.0, 0.0], [2.0, 0.5], [3.0, 1.0]])  # 3 stages, 2 weights
    >>> sizes = [250, 500, 1000]
    >>> predict_steps(PredictorConfig("taskvector"), window, "fc", sizes, steps=3)
    tensor([[4.0000, 1.5000],
            [5.0000, 2.0000],
            [6.0000, 2.5000]])
    >>> virtual_factors(sizes, 3)
    [2.0, 4.0, 8.0]
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from know_core.known import WINDOW, KnownSet
from know_core.layout import KINDS

PREDICTORS = ("naive", "taskvector", "logfit", "know", "know-s2", "know-s3", "know-s4")


class NonFiniteError(ValueError):
    """A tensor holds NaN or inf."""


@dataclass
class PredictorConfig:
    name: str  # one of PREDICTORS
    alpha: float = 1.0  # task-vector step; 1 keeps the recurrence linear in k
    known: KnownSet | None = None  # the KNOWN models; required by know*
    predict_norm: bool = False  # also predict norm γ/β (KNOWN Bias); the release leaves BN alone
    batch_size: int | None = None  # KNOWN inference chunk; None: known_residual's device default

    def __post_init__(self):
        if self.name not in PREDICTORS:
            raise ValueError(f"unknown predictor {self.name!r}; valid: {', '.join(PREDICTORS)}")
        if self.name.startswith("know") and self.known is None:
            raise ValueError(f"predictor {self.name!r} needs a KnownSet (known=...)")

    @property
    def min_rows(self) -> int:
        """Trajectory stages the predictor reads."""
        if self.name.startswith("know-s"):
            return int(self.name.removeprefix("know-s"))
        return {"naive": 1, "taskvector": 2, "logfit": 2, "know": WINDOW}[self.name]


def window_from_stages(stages, window: int = WINDOW) -> torch.Tensor:
    """Store order (S, n), stage 0 = full data first -> window order, oldest -> newest.

    Returns stages [m-1, ..., 0] with m = min(window, S); a short trajectory stays short, so
    that predict_next reports which predictor needs more stages.
    """
    stages = torch.as_tensor(stages)
    return stages[:window].flip(0)


def sizes_from_stages(stage_subset_sizes, window: int = WINDOW) -> list[float]:
    """Subset sizes in store order (decreasing) -> the increasing sizes of window_from_stages."""
    return [float(s) for s in list(stage_subset_sizes)[:window]][::-1]


def next_size(sizes) -> float:
    """One more geometric step past the newest size: sizes[-1]**2 / sizes[-2]."""
    return sizes[-1] ** 2 / sizes[-2]


def virtual_factors(sizes, steps: int) -> list[float]:
    """Data factor of each predicted step relative to full data: (1/r)^k, r = sizes[-2]/sizes[-1]."""
    ratio = sizes[-1] / sizes[-2]
    return [ratio**k for k in range(1, steps + 1)]


def check_finite(tensor: torch.Tensor, name: str) -> torch.Tensor:
    """Return tensor if all its values are finite, else raise NonFiniteError naming it."""
    bad = tensor.numel() - int(torch.isfinite(tensor).sum())
    if bad:
        raise NonFiniteError(f"{name}: {bad} of {tensor.numel()} values are NaN or inf")
    return tensor


def shrink_control(theta0: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """c·θ0 with c = <pred, θ0> / <θ0, θ0> (one tensor); θ0 unchanged when it is all zero."""
    if theta0.shape != pred.shape:
        raise ValueError(f"shrink_control: shapes differ, θ0 {tuple(theta0.shape)} vs pred {tuple(pred.shape)}")
    t0 = theta0.reshape(-1).double()
    norm2 = torch.dot(t0, t0)
    if norm2 == 0:
        return theta0.clone()
    c = torch.dot(pred.reshape(-1).double(), t0) / norm2
    return (c * theta0.double()).to(theta0.dtype)


def _validate(cfg: PredictorConfig, window: torch.Tensor, kind: str, sizes) -> None:
    if window.dim() != 2:
        raise ValueError(f"window must be (W, n), got shape {tuple(window.shape)}")
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; valid: {', '.join(KINDS)}")
    if window.shape[0] < cfg.min_rows:
        raise ValueError(f"trajectory has {window.shape[0]} stages, predictor {cfg.name} "
                         f"needs at least {cfg.min_rows}")
    if len(sizes) != window.shape[0]:
        raise ValueError(f"{len(sizes)} sizes for a window of {window.shape[0]} stages")
    if min(sizes) <= 0 or any(b <= a for a, b in zip(sizes, sizes[1:])):
        raise ValueError(f"sizes must be positive and increasing (oldest -> newest), got {list(sizes)}")


def _logfit_coefficients(sizes) -> torch.Tensor:
    """λ (W,) such that Σ λ_i w_i is the least-squares line in log(size), at next_size(sizes)."""
    x = torch.tensor([math.log(s) for s in sizes], dtype=torch.float64)
    xc = x - x.mean()
    x_next = math.log(next_size(sizes)) - x.mean().item()
    return 1.0 / len(sizes) + x_next * xc / torch.dot(xc, xc)  # affine: sums to 1


def _know_window(window: torch.Tensor, k: int) -> torch.Tensor:
    """(n, 5) KNOWN input from the newest k rows, the oldest of them repeated to fill 5."""
    rows = window[-k:]
    padded = torch.cat([rows[:1].expand(WINDOW - k, -1), rows]) if k < WINDOW else rows
    return padded.t().contiguous()


def predict_next(cfg: PredictorConfig, window: torch.Tensor, kind: str, sizes) -> torch.Tensor:
    """The next, larger-data value (n,) of one tensor from its window (W, n)."""
    _validate(cfg, window, kind, sizes)
    newest = window[-1]
    if kind == "norm_stat" or (kind == "norm" and not cfg.predict_norm) or cfg.name == "naive":
        return newest.clone()
    if cfg.name == "taskvector":
        return newest + cfg.alpha * (newest - window[-2])
    if cfg.name == "logfit":
        lam = _logfit_coefficients(sizes).to(window)  # dtype and device of the window
        return torch.tensordot(lam, window, dims=1)
    model_kind = "bias" if kind == "norm" else kind  # γ/β go through KNOWN Bias
    residual = cfg.known.residual(model_kind, _know_window(window, cfg.min_rows), cfg.batch_size)
    return newest + residual.to(newest.dtype)


def predict_steps(cfg: PredictorConfig, window: torch.Tensor, kind: str, sizes, steps: int) -> torch.Tensor:
    """`steps` recurrent predictions (steps, n) (method §5): predict, drop the oldest row,
    append the prediction (its size one geometric step larger), repeat.

    Row k-1 is the prediction at virtual_factors(sizes, steps)[k-1] times the full data.
    """
    sizes = [float(s) for s in sizes]
    preds = []
    for _ in range(steps):
        new = predict_next(cfg, window, kind, sizes)
        preds.append(new)
        window = torch.cat([window[1:], new[None]])
        sizes = sizes[1:] + [next_size(sizes)]
    return torch.stack(preds) if preds else window.new_empty((0, window.shape[1]))
