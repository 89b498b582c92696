"""Weight predictors on plain tensors: naive, task vector, log-fit and KNOW (method §5, §6).

A *window* is a float tensor (W, n): W snapshots of one tensor (flattened to n values),
ordered oldest/most-forgotten -> newest/full-data, so row -1 is Θ0 (full data). `sizes` are
the W subset sizes of those rows, increasing. The trajectory store keeps stage 0 (full data)
first; `window_from_stages` / `sizes_from_stages` turn store order into window order.

Predictors (each gives the next, larger-data value; `predict_steps` repeats them):
    naive        Θ0 unchanged.
    taskvector   Θ0 + α(Θ0 − Θ1). Repeated with α = 1 this gives Θ0 + k(Θ0 − Θ1) at step k.
    logfit       per weight, one least-squares line w = a + b·log(size) over all W rows of
                 the window, evaluated at each larger size N0·(1/r)^k. It is fitted once:
                 later steps extrapolate the same line, never refit on earlier predictions.
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
    >>> from know_core.predict import PredictorConfig, predict_steps, step_for_factor, virtual_factors
    >>> window = torch.tensor([[1.0, 0.0], [2.0, 0.5], [3.0, 1.0]])  # 3 stages, 2 weights
    >>> sizes = [250, 500, 1000]
    >>> predict_steps(PredictorConfig("taskvector"), window, "fc", sizes, steps=3)
    tensor([[4.0000, 1.5000],
            [5.0000, 2.0000],
            [6.0000, 2.5000]])
    >>> virtual_factors(0.5, 3)
    [2.0, 4.0, 8.0]
    >>> step_for_factor(9, 1 / 3)
    2
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from know_core.errors import BadInput, NonFinite
from know_core.known import WINDOW, KnownSet
from know_core.layout import KINDS

PREDICTORS = ("naive", "taskvector", "logfit", "know", "know-s2", "know-s3", "know-s4")


class NonFiniteError(NonFinite, ValueError):
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
            raise BadInput(f"unknown predictor {self.name!r}; choose one of: {', '.join(PREDICTORS)}")
        if self.name.startswith("know") and self.known is None:
            raise ValueError(f"predictor {self.name!r} needs a KnownSet (known=...)")

    @property
    def min_rows(self) -> int:
        """Fewest trajectory stages the predictor can work from."""
        return min_rows(self.name)

    @property
    def rows(self) -> int:
        """Trajectory stages the predictor reads from the store (its window)."""
        return window_rows(self.name)


def min_rows(predictor: str) -> int:
    """Fewest stages `predictor` can work from: logfit fits a line through 2 or more."""
    return 2 if predictor == "logfit" else window_rows(predictor)


def window_rows(predictor: str) -> int:
    """Stages `predictor` reads: KNOWN's window of 5 (logfit fits over the same 5), k for
    know-s<k>, the newest 2 for taskvector, Θ0 alone for naive."""
    if predictor.startswith("know-s"):
        return int(predictor.removeprefix("know-s"))
    return {"naive": 1, "taskvector": 2, "logfit": WINDOW, "know": WINDOW}[predictor]


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


def virtual_factors(r: float, steps: int) -> list[float]:
    """The virtual-data factor of each predicted step: step k acts as (1/r)^k times the full
    data (method §5). `r` is the run's sampling rate, not a ratio of rounded subset sizes."""
    _check_rate(r)
    return [(1.0 / r) ** k for k in range(1, steps + 1)]


def step_for_factor(factor: float, r: float, option: str = "factor") -> int:
    """The prediction step whose virtual-data factor is `factor` at sampling rate r.

    Refuses (BadInput naming `option`) a factor that is not a whole power (1/r)^k, k >= 1:
    the recurrence only reaches those, so any other label would misstate what was run.
    """
    _check_rate(r)
    k = math.log(factor) / math.log(1.0 / r) if factor > 0 else float("nan")
    if not k >= 0.5 or abs(k - round(k)) > 1e-6:
        valid = ", ".join(f"{f:g}" for f in virtual_factors(r, 4))
        raise BadInput(f"{option} {factor:g} is not a power of 1/r = {1 / r:g}; at r = {r:g} the factors are "
                       f"{valid}, ...")
    return int(round(k))


def _check_rate(r: float) -> None:
    if not 0.0 < r < 1.0:
        raise BadInput(f"sampling rate r={r} is out of range; it must satisfy 0 < r < 1")


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


def _logfit_coefficients(sizes, at: float) -> torch.Tensor:
    """λ (W,) such that Σ λ_i w_i is the least-squares line in log(size), evaluated at size `at`."""
    x = torch.tensor([math.log(s) for s in sizes], dtype=torch.float64)
    xc = x - x.mean()
    x_at = math.log(at) - x.mean().item()
    return 1.0 / len(sizes) + x_at * xc / torch.dot(xc, xc)  # affine: sums to 1


def _rate_of(sizes) -> float:
    """The sampling rate the sizes imply, for callers that do not pass the run's r."""
    return sizes[-2] / sizes[-1]


def _know_window(window: torch.Tensor, k: int) -> torch.Tensor:
    """(n, 5) KNOWN input from the newest k rows, the oldest of them repeated to fill 5."""
    rows = window[-k:]
    padded = torch.cat([rows[:1].expand(WINDOW - k, -1), rows]) if k < WINDOW else rows
    return padded.t().contiguous()


def _unchanged(cfg: PredictorConfig, kind: str) -> bool:
    return kind == "norm_stat" or (kind == "norm" and not cfg.predict_norm) or cfg.name == "naive"


def predict_next(cfg: PredictorConfig, window: torch.Tensor, kind: str, sizes, r: float | None = None) -> torch.Tensor:
    """The next, larger-data value (n,) of one tensor from its window (W, n): the value at
    size sizes[-1] / r (r defaults to the ratio of the two newest sizes)."""
    _validate(cfg, window, kind, sizes)
    newest = window[-1]
    if _unchanged(cfg, kind):
        return newest.clone()
    if cfg.name == "taskvector":
        return newest + cfg.alpha * (newest - window[-2])
    if cfg.name == "logfit":
        return _logfit_at(window, sizes, [sizes[-1] / (r or _rate_of(sizes))])[0]
    model_kind = "bias" if kind == "norm" else kind  # γ/β go through KNOWN Bias
    residual = cfg.known.residual(model_kind, _know_window(window, cfg.min_rows), cfg.batch_size)
    return newest + residual.to(newest.dtype)


def _logfit_at(window: torch.Tensor, sizes, at: list[float]) -> torch.Tensor:
    """(len(at), n): the per-weight least-squares line in log(size) through the window,
    evaluated at each size in `at` (one fit, many evaluations)."""
    lam = torch.stack([_logfit_coefficients(sizes, a) for a in at]).to(window)  # dtype/device of the window
    return lam @ window


def predict_steps(cfg: PredictorConfig, window: torch.Tensor, kind: str, sizes, steps: int,
                  r: float | None = None) -> torch.Tensor:
    """`steps` predictions (steps, n); row k-1 acts as virtual_factors(r, steps)[k-1] times
    the full data, i.e. size sizes[-1] / r^k (method §5).

    taskvector and KNOW recur: predict, drop the oldest row, append the prediction, repeat.
    logfit fits its line once and evaluates it at every larger size.
    r: the run's sampling rate; None takes the ratio of the two newest sizes.
    """
    sizes = [float(s) for s in sizes]
    if steps < 1:
        return window.new_empty((0, window.shape[1]))
    if r is None:  # a one-row window (naive) has no ratio, and needs none
        r = _rate_of(sizes) if len(sizes) > 1 else 1.0
    if cfg.name == "logfit" and not _unchanged(cfg, kind):
        _validate(cfg, window, kind, sizes)
        return _logfit_at(window, sizes, [sizes[-1] / r**k for k in range(1, steps + 1)])
    preds = []
    for _ in range(steps):
        new = predict_next(cfg, window, kind, sizes, r)
        preds.append(new)
        window = torch.cat([window[1:], new[None]])
        sizes = sizes[1:] + [sizes[-1] / r]
    return torch.stack(preds)
