"""Training loops and forgetting trajectories (method §2-3).

`iter_trajectory` yields flat weight snapshots one stage at a time, so the caller
can stream each to storage as soon as it exists:

    sequential   Θ0 = the start weights (pre-trained, or trained here on D0);
                 Θk = FineTune(Θk-1 on Dk)                    (method §2, the target model)
    independent  Θk = FineTune(Θinit on Dk) for every k       (the release's meta-data set)

Example:
    >>> from know_core.data import load_dataset
    >>> from know_core.models import build_model
    >>> ds = load_dataset("digits")
    >>> model = build_model("simple-cnn", 1, 10, 8)
    >>> cfg = TrajectoryConfig(r=0.5, stages=3, lr=1e-3, batch_size=32, seed=0)
    >>> snaps = list(iter_trajectory(model, ds, cfg))
    >>> [k for k, _ in snaps]
    [0, 1, 2]
"""
from __future__ import annotations

import copy
import itertools
import math
import threading
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data import ImageData, nested_subsets, subset_sizes
from .errors import BadInput
from .layout import flatten_state, param_layout

#: set to stop every training loop at its next batch (KeyboardInterrupt there): the CLI sets
#: it on Ctrl-C, so that runs in worker threads stop too, not only the main thread
STOP = threading.Event()


def pick_device(device: str | torch.device | None = "auto", model: nn.Module | None = None) -> torch.device:
    """'auto' -> CUDA when there is one, else CPU; None -> the device of `model`'s first
    parameter or buffer (CPU without a model, or for one with neither); else `device` itself."""
    if device is None:
        for t in itertools.chain(model.parameters(), model.buffers()) if model is not None else ():
            return t.device
        return torch.device("cpu")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def batch_slices(n: int, batch_size: int, merge_single: bool = False, drop_last: bool = False) -> list[tuple[int, int]]:
    """(start, stop) pairs covering range(n) in steps of `batch_size`.

    With `merge_single` a trailing batch of a single sample is folded into the previous
    batch: BatchNorm cannot take a batch of one in train mode.  With `drop_last` a trailing
    partial batch is left out (the release's ``steps_per_epoch = length // batch``); with
    n < batch_size that leaves nothing.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if drop_last:
        return [(i * batch_size, (i + 1) * batch_size) for i in range(n // batch_size)]
    edges = list(range(0, n, batch_size)) + [n]
    slices = [(edges[i], edges[i + 1]) for i in range(len(edges) - 1)]
    if merge_single and len(slices) > 1 and slices[-1][1] - slices[-1][0] == 1:
        last = slices.pop()
        slices[-1] = (slices[-1][0], last[1])
    return slices


def augment_batch(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The release's light augmentation: rotate ±10°, shift ±15 %, zoom ±30 %, no flip."""
    n = x.shape[0]
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(n, generator=gen, device=gen.device)
    angle = u(-10.0, 10.0) * math.pi / 180
    zoom = u(0.7, 1.3)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack(
        [torch.stack([cos, -sin, u(-0.3, 0.3)], 1), torch.stack([sin, cos, u(-0.3, 0.3)], 1)], 1
    )  # shifts are in [-1, 1] grid units: 0.3 = 15 % of the image
    grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, padding_mode="zeros", align_corners=False)


@dataclass
class TrainConfig:
    lr: float = 1e-3  # Adam, as in the release
    batch_size: int = 128
    epochs: int = 1  # per stage: the release fine-tunes 1 epoch per subset
    seed: int = 0  # data order and augmentation
    augment: bool = False  # release augmentation; off by default (costly on 2 CPU cores)
    device: str = "auto"
    drop_last: bool = False  # leave out a trailing partial batch (the release's forgetting stages do)


def run_epoch(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    gen: torch.Generator,
    device: torch.device,
    aug_gen: torch.Generator | None = None,
    merge_single: bool = False,
    drop_last: bool = False,
) -> float:
    """One epoch of `opt` on cross-entropy in train mode; returns the mean training loss.

    The order is ``torch.randperm(len(y), generator=gen)``, cut by
    :func:`batch_slices` (`merge_single`, `drop_last`); each batch is moved to `device` and, with
    `aug_gen`, augmented by :func:`augment_batch`.  The model must already be on `device`.
    """
    model.train()
    n = len(y)
    perm = torch.randperm(n, generator=gen)
    total, seen = 0.0, 0
    for start, stop in batch_slices(n, batch_size, merge_single, drop_last):
        if STOP.is_set():
            raise KeyboardInterrupt("training stopped (interrupted)")
        idx = perm[start:stop]
        xb = x[idx].to(device, non_blocking=True)
        yb = y[idx].to(device, non_blocking=True)
        if aug_gen is not None:
            xb = augment_batch(xb, aug_gen)
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        opt.step()
        total += loss.item() * (stop - start)
        seen += stop - start
    return total / max(seen, 1)


def train_epochs(
    model: nn.Module,
    data: ImageData,
    cfg: TrainConfig,
    on_epoch: Callable[[int, float], None] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> float:
    """Adam on cross-entropy, seeded data order. Returns the last epoch's mean loss.

    `optimizer`, when given, is used instead of a fresh ``Adam(lr=cfg.lr)`` (e.g. to carry
    Adam's state from one call to the next); it must hold `model`'s parameters.
    """
    mean_loss = float("nan")
    for epoch, mean_loss in _epochs(model, data, cfg, optimizer):
        if on_epoch:
            on_epoch(epoch, mean_loss)
    return mean_loss


def _epochs(model: nn.Module, data: ImageData, cfg: TrainConfig,
            optimizer: torch.optim.Optimizer | None) -> Iterator[tuple[int, float]]:
    """Up to cfg.epochs epochs of Adam (or `optimizer`) on `data` with the seeded data order
    and augmentation; yields (epoch, mean loss) after each, so a caller may stop early."""
    device = pick_device(cfg.device)
    model.to(device).train()
    opt = optimizer if optimizer is not None else torch.optim.Adam(model.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    aug_gen = torch.Generator(device=device).manual_seed(cfg.seed + 1) if cfg.augment else None
    for epoch in range(cfg.epochs):
        yield epoch, run_epoch(model, opt, data.x, data.y, cfg.batch_size, gen, device, aug_gen,
                               drop_last=cfg.drop_last)


@dataclass
class PlateauResult:
    """What :func:`train_until_plateau` did: epochs run, the kept (best) epoch, and the
    validation accuracy after each epoch."""

    epochs_run: int
    best_epoch: int
    val_acc: list[float]


def train_until_plateau(
    model: nn.Module,
    data: ImageData,
    val: ImageData,
    cfg: TrainConfig,
    patience: int,
    optimizer: torch.optim.Optimizer | None = None,
    on_epoch: Callable[[int, float, float], None] | None = None,
) -> PlateauResult:
    """Adam on `data` until the accuracy on `val` has not improved for `patience` epochs,
    `cfg.epochs` being the cap. The best epoch's weights and optimizer state are restored,
    so a carried optimizer continues from the kept weights.

    The data order and augmentation draw from the same seeded generators as
    :func:`train_epochs`: with patience >= cfg.epochs and a val accuracy that rises every
    epoch, both train the same model. `on_epoch(epoch, mean_loss, val_acc)`.
    """
    if patience < 1:
        raise ValueError("patience must be >= 1")
    model.to(pick_device(cfg.device))  # before Adam is built on its parameters, as in _epochs
    opt = optimizer if optimizer is not None else torch.optim.Adam(model.parameters(), lr=cfg.lr)
    history: list[float] = []
    best, best_epoch, best_state = -1.0, -1, None
    for epoch, loss in _epochs(model, data, cfg, opt):
        acc = accuracy(model, val, device=cfg.device)
        history.append(acc)
        if on_epoch:
            on_epoch(epoch, loss, acc)
        if acc > best:
            best, best_epoch = acc, epoch
            best_state = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()))
        elif epoch - best_epoch >= patience:
            break
    if best_epoch != len(history) - 1:
        model.load_state_dict(best_state[0])
        opt.load_state_dict(best_state[1])
    model.train()  # accuracy() left it in eval mode
    return PlateauResult(epochs_run=len(history), best_epoch=best_epoch, val_acc=history)


#: optimizer regimes of a trajectory (method §2): whether Adam's state flows across stages
OPTIMIZER_REGIMES = ("carry", "fresh")


@dataclass
class AdamState:
    """Adam's moments for every parameter of a model, flattened in ``model.parameters()`` order.

    What a pre-training hands to the trajectory that continues from it under the `carry`
    regime (the release compiles the model once, so one Adam lives through pre-training and
    every stage).  Plain arrays, so storage can keep them next to the checkpoint's weights.

        >>> model = torch.nn.Linear(3, 2)
        >>> opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        >>> model(torch.ones(1, 3)).sum().backward(); opt.step()
        >>> state = AdamState.of(opt, model)
        >>> state.exp_avg.shape, state.step
        ((8,), 1.0)
        >>> opt2 = torch.optim.Adam(model.parameters(), lr=1e-3)
        >>> state.load_into(opt2, model)
        >>> torch.equal(opt2.state[model.weight]["exp_avg_sq"], opt.state[model.weight]["exp_avg_sq"])
        True
    """

    exp_avg: np.ndarray  # (P,) float32, P = number of parameter scalars
    exp_avg_sq: np.ndarray
    step: float

    @classmethod
    def of(cls, opt: torch.optim.Optimizer, model: nn.Module) -> "AdamState":
        avg, sq, steps = [], [], set()
        for p in model.parameters():
            st = opt.state.get(p)
            if not st:  # a parameter Adam never stepped (no gradient yet): zero moments
                avg.append(torch.zeros(p.numel()))
                sq.append(torch.zeros(p.numel()))
                continue
            avg.append(st["exp_avg"].detach().reshape(-1).float().cpu())
            sq.append(st["exp_avg_sq"].detach().reshape(-1).float().cpu())
            steps.add(float(st["step"]))
        if len(steps) > 1:
            raise ValueError(f"Adam state with different step counts per parameter: {sorted(steps)}")
        return cls(torch.cat(avg).numpy(), torch.cat(sq).numpy(), steps.pop() if steps else 0.0)

    def load_into(self, opt: torch.optim.Optimizer, model: nn.Module) -> None:
        """Put these moments into `opt` (an Adam over `model`'s parameters, on their device)."""
        n = sum(p.numel() for p in model.parameters())
        if self.exp_avg.shape != (n,) or self.exp_avg_sq.shape != (n,):
            raise ValueError(f"Adam state holds {self.exp_avg.shape[0]} scalars, the model has {n} parameters")
        at = 0
        for p in model.parameters():
            k = p.numel()
            opt.state[p] = {
                "step": torch.tensor(self.step, dtype=torch.float32),
                "exp_avg": torch.from_numpy(self.exp_avg[at : at + k].copy()).reshape(p.shape).to(p),
                "exp_avg_sq": torch.from_numpy(self.exp_avg_sq[at : at + k].copy()).reshape(p.shape).to(p),
            }
            at += k


@torch.no_grad()
def count_correct(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    device: torch.device,
    with_loss: bool = False,
) -> tuple[int, float]:
    """(correct top-1 predictions, summed cross-entropy or 0.0 without `with_loss`) of
    `model` on (x, y), in slices of `batch_size`, no grad.  The model is used as it is: the
    caller puts it on `device` and in the mode it wants."""
    correct, loss_sum = 0, 0.0
    for start in range(0, len(y), batch_size):
        xb = x[start : start + batch_size].to(device, non_blocking=True)
        yb = y[start : start + batch_size].to(device, non_blocking=True)
        logits = model(xb)
        if with_loss:
            loss_sum += F.cross_entropy(logits.float(), yb, reduction="sum").item()
        correct += (logits.argmax(1) == yb).sum().item()
    return correct, loss_sum


@torch.no_grad()
def accuracy(model: nn.Module, data: ImageData, batch_size: int = 512, device: str = "auto") -> float:
    """Top-1 accuracy of `model` on `data`; leaves the model on the device, in eval mode."""
    dev = pick_device(device)
    model.to(dev).eval()
    correct, _ = count_correct(model, data.x, data.y, batch_size, dev)
    return correct / max(len(data), 1)


@dataclass
class TrajectoryConfig:
    r: float = 0.5  # |Dk| = r^k |D0|
    stages: int = 5  # snapshots Θ0..Θ(S-1)
    lr: float = 1e-3
    batch_size: int = 128
    epochs_per_stage: int = 1
    seed: int = 0  # subset shuffle, data order, init
    mode: str = "sequential"  # or "independent"
    augment: bool = False
    device: str = "auto"
    optimizer: str = "carry"  # carry: one Adam through every stage (release) | fresh: a new Adam per stage

    def validate(self, n_data: int) -> None:
        """Raise a one-line ValueError for a config that cannot produce a trajectory."""
        if not 0.0 < self.r < 1.0:
            raise BadInput(f"sampling rate r={self.r} is out of range; it must satisfy 0 < r < 1")
        if self.stages < 2:
            raise BadInput(f"stages={self.stages} is too few; a trajectory needs at least 2 stages")
        if self.mode not in ("sequential", "independent"):
            raise BadInput(f"mode {self.mode!r} is unknown; use 'sequential' or 'independent'")
        if self.optimizer not in OPTIMIZER_REGIMES:
            raise BadInput(f"optimizer regime {self.optimizer!r} is unknown; use 'carry' or 'fresh'")
        if self.lr <= 0:
            raise BadInput(f"lr={self.lr} must be positive")
        smallest = subset_sizes(n_data, self.r, self.stages)[-1]
        if self.batch_size < 1 or self.batch_size > smallest:
            raise BadInput(
                f"batch size {self.batch_size} is larger than the smallest subset ({smallest} of {n_data} "
                f"images at r={self.r}, {self.stages} stages); lower --batch-size, raise r or use fewer stages"
            )


def iter_trajectory(
    model: nn.Module,
    data: ImageData,
    cfg: TrajectoryConfig,
    start_trained: bool = False,
    on_progress: Callable[[int, float], None] | None = None,
    optimizer_state: AdamState | None = None,
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (stage, flat float32 weights) for stages 0..S-1, one at a time.

    `model` holds the start weights. In sequential mode with `start_trained=True` it is Θ0
    itself (a pre-trained model); otherwise stage 0 trains it on the full data first.
    In independent mode every stage trains a fresh copy of the start weights on Dk.

    Each stage is `cfg.epochs_per_stage` epochs of Adam(`cfg.lr`) over |Dk| = int(N·r^k)
    images, the last partial batch left out (as the release).  The optimizer regime:
        carry  sequential: one Adam for the whole trajectory, starting from `optimizer_state`
               (the pre-training's moments) when given, its lr set to `cfg.lr`.
               Independent: each stage is its own run from the start weights with a new Adam
               (the release rebuilds and recompiles the model per stage), so it is the same
               computation as `fresh`; the regime is still recorded.
        fresh  a new Adam at every stage (zero moments), in both modes.
    """
    cfg.validate(len(data))
    layout = param_layout(model)
    subsets = nested_subsets(len(data), cfg.r, cfg.stages, cfg.seed)
    init_state = copy.deepcopy(model.state_dict())
    carried = None
    if cfg.optimizer == "carry" and cfg.mode == "sequential":
        model.to(pick_device(cfg.device))
        carried = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        if optimizer_state is not None:
            optimizer_state.load_into(carried, model)
    for k, idx in enumerate(subsets):
        tcfg = TrainConfig(cfg.lr, cfg.batch_size, cfg.epochs_per_stage, cfg.seed * 1000 + k, cfg.augment, cfg.device,
                           drop_last=True)
        if cfg.mode == "independent":
            model.load_state_dict(init_state)
            loss = train_epochs(model, data.take(idx), tcfg)
        elif k == 0 and start_trained:
            loss = float("nan")
        else:
            loss = train_epochs(model, data.take(idx), tcfg, optimizer=carried)
        if on_progress:
            on_progress(k, loss)
        yield k, flatten_state(model.state_dict(), layout)


@dataclass
class SweepRanges:
    """Per-trajectory random hyper-parameters of the release (method §3)."""

    r_min: float = 0.3
    r_max: float = 0.9
    lr_min: float = 1e-5
    lr_max: float = 4e-3
    batch_min: int = 32
    batch_max: int = 256  # the release's upper bound N·r^(S-1) is capped to keep CPU epochs short


def sample_hyperparameters(n_data: int, stages: int, ranges: SweepRanges, rng: np.random.Generator) -> tuple[float, float, int]:
    """Draw (r, lr, batch) so that the smallest subset still holds one batch.

    r is drawn from U(max(r_min, r_floor), r_max), where r_floor makes N·r^(S-1) >= batch_min;
    the batch is drawn from U(batch_min, min(batch_max, N·r^(S-1))).
    """
    r_floor = (ranges.batch_min / n_data) ** (1.0 / max(stages - 1, 1)) + 1e-6
    lo = max(ranges.r_min, r_floor)
    if lo > ranges.r_max:
        raise BadInput(
            f"{n_data} images cannot give {stages} stages with a batch of {ranges.batch_min} "
            f"at r <= {ranges.r_max}; use fewer stages, a smaller batch size or a larger data set"
        )
    r = float(rng.uniform(lo, ranges.r_max)) if ranges.r_max > lo else lo
    lr = float(rng.uniform(ranges.lr_min, ranges.lr_max))
    smallest = subset_sizes(n_data, r, stages)[-1]
    hi = max(ranges.batch_min, min(ranges.batch_max, smallest))
    batch = int(rng.integers(min(ranges.batch_min, hi), hi + 1))
    return r, lr, batch
