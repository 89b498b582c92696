"""Downstream evaluation: fine-tuning protocol, BN re-estimation and linear probing.

This is method §6 (the release's two-phase transfer protocol), scaled down for a CPU, plus
the two tools that §2 asks for when a predicted checkpoint is evaluated:

* ``finetune``       replace the head, train head + norm affine (phase 1), then everything
                     under a cosine schedule (phase 2); test accuracy after every epoch.
* ``recalibrate_bn`` re-estimate BatchNorm running statistics with a cumulative average over
                     forward passes (no gradients).  KNOW shrinks conv kernels, so Θ0's
                     statistics no longer fit a predicted model; this restores them.
* ``linear_probe``   frozen backbone, standardised ``forward_features``, multinomial logistic
                     regression fitted by full-batch L-BFGS.
* ``evaluate``       accuracy and mean cross-entropy in eval mode.

Models follow the project contract: an ``nn.Module`` with ``forward_features(x) -> (N, F)``
and ``head: nn.Linear``, where ``forward(x) == head(forward_features(x))``.  Images are
float32 ``(N, C, H, W)`` tensors in [0, 1], labels int64 ``(N,)``.  Everything here is pure
torch: no files, no pipeline objects.

Example (runs as is; the tiny model stands in for ``know_core.models``)::

    import torch
    from torch import nn
    from know_core.evaluate import FinetuneConfig, finetune, linear_probe, recalibrate_bn

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False),
                                      nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                                      nn.Flatten())
            self.head = nn.Linear(32, 10)
        def forward_features(self, x):
            return self.body(x)
        def forward(self, x):
            return self.head(self.forward_features(x))

    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(256, 1, 8, 8, generator=g), torch.randint(0, 3, (256,), generator=g)
    model = Tiny()
    rows = finetune(model, 3, (x[:200], y[:200]), (x[200:], y[200:]),
                    FinetuneConfig(phase1_epochs=1, phase2_epochs=2),
                    on_epoch=lambda r: print(r["epoch"], r["phase"], round(r["test_acc"], 3)))
    recalibrate_bn(model, x[:200])
    print(linear_probe(model, (x[:200], y[:200]), (x[200:], y[200:]))["acc"])
"""
from __future__ import annotations

import copy
import math
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "FinetuneConfig",
    "replace_head",
    "finetune",
    "evaluate",
    "recalibrate_bn",
    "linear_probe",
    "resolve_device",
]

# Normalisation layers whose affine parameters stay trainable in phase 1.
# _NormBase covers BatchNorm{1,2,3}d, SyncBatchNorm and InstanceNorm.
_NORM_TYPES: tuple[type, ...] = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)
if hasattr(nn, "RMSNorm"):
    _NORM_TYPES = _NORM_TYPES + (nn.RMSNorm,)

# Offset between the head-init stream and the data-order stream, so the two are not the
# same random numbers even though both derive from cfg.seed.
_SHUFFLE_SEED_OFFSET = 7919


@dataclass
class FinetuneConfig:
    """Settings of the two-phase transfer protocol (method §6), scaled for a 2-core CPU."""

    # Phase 1 (head + norm affine only).  Release: 10 epochs; 2 here is still enough for
    # a fresh head to settle before phase 2 moves the backbone.
    phase1_epochs: int = 2
    # Phase 2 (everything trainable, cosine decay).  Release: 100 epochs; 8 still spans
    # the whole cosine half-cycle (lr2 -> ~0) within a 2-core CPU budget.
    phase2_epochs: int = 8
    # Adam learning rate in phase 1 (release value, unscaled).
    lr1: float = 1e-3
    # Peak Adam learning rate of phase 2's cosine schedule (release value, unscaled).
    lr2: float = 4e-4
    # Mini-batch size in both phases and for per-epoch evaluation batches (release: 128).
    batch_size: int = 128
    # Seeds the head initialisation, the data order and the global RNG used by dropout etc.
    # Same seed -> same head and same batches for every starting point (method comparison).
    seed: int = 0
    # "cpu" or "cuda[:i]"; a CUDA request falls back to CPU with a warning if unavailable.
    device: str = "cpu"
    # Adam (coupled L2) weight decay; the release uses none.
    weight_decay: float = 0.0


# --------------------------------------------------------------------------- helpers


def resolve_device(device: str | torch.device | None, model: nn.Module | None = None) -> torch.device:
    """Return a usable device: the one asked for, CPU if CUDA was asked for but is absent,
    or (``device=None``) the device of ``model``'s first parameter/buffer, else CPU."""
    if device is None:
        if model is not None:
            for t in list(model.parameters()) + list(model.buffers()):
                return t.device
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        warnings.warn(f"device {device!r} requested but CUDA is not available; using CPU")
        return torch.device("cpu")
    return dev


def _batch_slices(n: int, batch_size: int) -> list[tuple[int, int]]:
    """(start, stop) pairs covering range(n).  A trailing batch of a single sample is
    folded into the previous batch: BatchNorm cannot take a batch of one in train mode."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    edges = list(range(0, n, batch_size)) + [n]
    slices = [(edges[i], edges[i + 1]) for i in range(len(edges) - 1)]
    if len(slices) > 1 and slices[-1][1] - slices[-1][0] == 1:
        last = slices.pop()
        slices[-1] = (slices[-1][0], last[1])
    return slices


def _module_modes(model: nn.Module) -> list[tuple[nn.Module, bool]]:
    return [(m, m.training) for m in model.modules()]


def _restore_modes(modes: list[tuple[nn.Module, bool]]) -> None:
    for m, training in modes:
        m.training = training


def _check_pair(data: tuple[Tensor, Tensor], name: str) -> tuple[Tensor, Tensor]:
    x, y = data
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{name}: {x.shape[0]} images but {y.shape[0]} labels")
    return x, y.long()


def _cuda_indices(device: torch.device) -> list[int]:
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


# --------------------------------------------------------------------------- head


def replace_head(model: nn.Module, num_classes: int, seed: int) -> nn.Module:
    """Give ``model`` a freshly initialised ``head = nn.Linear(F, num_classes)``.

    The initialisation is PyTorch's default for ``nn.Linear`` (uniform in ±1/sqrt(F) for
    weight and bias) drawn from a CPU generator seeded with ``seed``, so every method gets
    the identical head for the same seed and feature width, whatever the global RNG state or
    device (which is left untouched).  The new head has the old head's device and dtype.  Returns ``model``.
    """
    old = model.head
    if not isinstance(old, nn.Linear):
        raise TypeError(f"model.head must be nn.Linear, got {type(old).__name__}")
    in_features = old.in_features
    gen = torch.Generator().manual_seed(int(seed))
    bound = 1.0 / math.sqrt(in_features) if in_features > 0 else 0.0
    weight = (torch.rand(num_classes, in_features, generator=gen) * 2 - 1) * bound
    bias = (torch.rand(num_classes, generator=gen) * 2 - 1) * bound
    # skip_init: no default init, so the caller's global RNG is not consumed
    head = nn.utils.skip_init(nn.Linear, in_features, num_classes, bias=True)
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(bias)
    model.head = head.to(device=old.weight.device, dtype=old.weight.dtype)
    return model


def _phase1_trainable(model: nn.Module) -> set[int]:
    """ids of parameters trainable in phase 1: the head and every norm layer's affine."""
    keep = {id(p) for p in model.head.parameters()}
    for m in model.modules():
        if isinstance(m, _NORM_TYPES):
            keep.update(id(p) for p in m.parameters(recurse=False))
    return keep


# --------------------------------------------------------------------------- evaluate


@torch.no_grad()
def evaluate(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    batch_size: int = 512,
    device: str | torch.device | None = None,
) -> tuple[float, float]:
    """Accuracy and mean cross-entropy of ``model`` on ``(x, y)``, in eval mode, no grad.

    ``device=None`` uses the model's current device; otherwise the model is moved there.
    Every module's train/eval flag is restored afterwards.
    """
    x, y = _check_pair((x, y), "evaluate")
    dev = resolve_device(device, model)
    model.to(dev)
    n = x.shape[0]
    if n == 0:
        return float("nan"), float("nan")
    modes = _module_modes(model)
    model.eval()
    correct = 0
    loss_sum = 0.0
    try:
        for start in range(0, n, batch_size):
            xb = x[start:start + batch_size].to(dev, non_blocking=True)
            yb = y[start:start + batch_size].to(dev, non_blocking=True)
            logits = model(xb)
            loss_sum += F.cross_entropy(logits.float(), yb, reduction="sum").item()
            correct += (logits.argmax(1) == yb).sum().item()
    finally:
        _restore_modes(modes)
    return correct / n, loss_sum / n


# --------------------------------------------------------------------------- fine-tune


def _train_epoch(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    x: Tensor,
    y: Tensor,
    batch_size: int,
    gen: torch.Generator,
    dev: torch.device,
) -> float:
    model.train()
    n = x.shape[0]
    order = torch.randperm(n, generator=gen)
    loss_sum = 0.0
    for start, stop in _batch_slices(n, batch_size):
        idx = order[start:stop]
        xb = x[idx].to(dev, non_blocking=True)
        yb = y[idx].to(dev, non_blocking=True)
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        opt.step()
        loss_sum += loss.item() * (stop - start)
    return loss_sum / n


def finetune(
    model: nn.Module,
    num_classes: int,
    train: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    cfg: FinetuneConfig | None = None,
    on_epoch: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Two-phase transfer of ``model`` to a ``num_classes`` task (method §6); in place.

    1. ``replace_head(model, num_classes, cfg.seed)``.
    2. Phase 1, ``cfg.phase1_epochs`` epochs: only the head and the norm layers' affine
       parameters are trainable (BN keeps updating its running stats); Adam at ``lr1``.
    3. Phase 2, ``cfg.phase2_epochs`` epochs: every parameter trainable; a fresh Adam whose
       lr at phase-2 epoch e = 0..E2-1 is ``0.5*lr2*(1 + cos(pi*e/E2))``.

    The data order (a ``torch.Generator`` seeded from ``cfg.seed``), the head init and the
    global RNG (dropout) are all seeded, so two runs from the same weights with the same seed
    are identical on CPU (CUDA kernels may add tiny non-determinism).  The caller's global
    RNG state is left as it was.  The parameters' ``requires_grad`` flags are restored at
    the end.

    Returns one row per epoch, also passed to ``on_epoch``::

        {"epoch": 1.., "phase": 1|2, "test_acc", "test_loss", "train_loss", "wall_s"}

    where ``train_loss`` is the mean training loss over the epoch (train mode, while the
    weights change) and ``wall_s`` the seconds that epoch took, evaluation included.
    """
    cfg = cfg or FinetuneConfig()
    xtr, ytr = _check_pair(train, "train")
    xte, yte = _check_pair(test, "test")
    if xtr.shape[0] == 0:
        raise ValueError("empty training set")
    dev = resolve_device(cfg.device)

    replace_head(model, num_classes, cfg.seed)
    model.to(dev)
    params = list(model.parameters())
    original_flags = [p.requires_grad for p in params]
    gen = torch.Generator().manual_seed(int(cfg.seed) + _SHUFFLE_SEED_OFFSET)
    rows: list[dict] = []

    def finish_epoch(epoch: int, phase: int, train_loss: float, t0: float) -> None:
        acc, loss = evaluate(model, xte, yte, batch_size=max(cfg.batch_size, 512), device=dev)
        row = {
            "epoch": epoch,
            "phase": phase,
            "test_acc": acc,
            "test_loss": loss,
            "train_loss": train_loss,
            "wall_s": time.perf_counter() - t0,
        }
        rows.append(row)
        if on_epoch is not None:
            on_epoch(row)

    with torch.random.fork_rng(devices=_cuda_indices(dev)):
        torch.manual_seed(int(cfg.seed))
        try:
            # ---- phase 1: head + norm affine
            if cfg.phase1_epochs > 0:
                keep = _phase1_trainable(model)
                for p in params:
                    p.requires_grad_(id(p) in keep)
                opt = torch.optim.Adam([p for p in params if p.requires_grad],
                                       lr=cfg.lr1, weight_decay=cfg.weight_decay)
                for e in range(cfg.phase1_epochs):
                    t0 = time.perf_counter()
                    tl = _train_epoch(model, opt, xtr, ytr, cfg.batch_size, gen, dev)
                    finish_epoch(len(rows) + 1, 1, tl, t0)

            # ---- phase 2: everything, cosine lr per epoch
            if cfg.phase2_epochs > 0:
                for p in params:
                    p.requires_grad_(True)
                opt = torch.optim.Adam(params, lr=cfg.lr2, weight_decay=cfg.weight_decay)
                e2 = cfg.phase2_epochs
                for e in range(e2):
                    lr = 0.5 * cfg.lr2 * (1.0 + math.cos(math.pi * e / e2))
                    for group in opt.param_groups:
                        group["lr"] = lr
                    t0 = time.perf_counter()
                    tl = _train_epoch(model, opt, xtr, ytr, cfg.batch_size, gen, dev)
                    finish_epoch(len(rows) + 1, 2, tl, t0)
        finally:
            for p, flag in zip(params, original_flags):
                p.requires_grad_(flag)
            model.eval()
    return rows


# --------------------------------------------------------------------------- BN stats


def _batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [
        m for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]


@torch.no_grad()
def recalibrate_bn(
    model: nn.Module,
    x: Tensor,
    batch_size: int = 128,
    max_batches: int | None = None,
    device: str | torch.device | None = None,
    shuffle: bool = True,
    seed: int = 0,
) -> nn.Module:
    """Re-estimate every BatchNorm layer's running mean/var from images ``x``; in place.

    Running stats are reset and ``momentum`` set to ``None``, so PyTorch keeps a cumulative
    (equal-weight per batch) average of the batch statistics; ``x`` is passed through the
    model in batches with no gradients, with the BN layers in train mode.  Other modules
    (dropout etc.) stay in eval mode so the statistics match what inference sees.  Then the
    original momenta are restored and the model is put in eval mode.

    ``shuffle`` (seeded by ``seed``) mixes classes within each batch, which matters when
    ``x`` is sorted by class: per-batch variances of class-sorted batches underestimate the
    data variance.  ``max_batches`` limits the passes.  A trailing batch of one sample is
    merged into the previous one.  No BN layer tracking stats -> ``model`` is returned
    untouched.
    """
    bns = _batchnorms(model)
    if not bns:
        return model
    n = x.shape[0]
    if n == 0:
        raise ValueError("recalibrate_bn needs at least one image")
    dev = resolve_device(device, model)
    model.to(dev)
    momenta = [bn.momentum for bn in bns]
    order = (torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
             if shuffle else torch.arange(n))
    slices = _batch_slices(n, batch_size)
    if max_batches is not None:
        slices = slices[:max(1, int(max_batches))]
    model.eval()
    try:
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None
            bn.train()
        for start, stop in slices:
            model(x[order[start:stop]].to(dev, non_blocking=True))
    finally:
        for bn, mom in zip(bns, momenta):
            bn.momentum = mom
        model.eval()
    return model


# --------------------------------------------------------------------------- linear probe


@torch.no_grad()
def _features(model: nn.Module, x: Tensor, batch_size: int, dev: torch.device) -> Tensor:
    out = []
    for start in range(0, x.shape[0], batch_size):
        out.append(model.forward_features(x[start:start + batch_size].to(dev)).flatten(1))
    if not out:
        raise ValueError("no images to extract features from")
    return torch.cat(out)


def linear_probe(
    model: nn.Module,
    train: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    recalibrate: bool = True,
    max_iter: int = 200,
    l2: float = 1e-3,
    batch_size: int = 512,
    device: str | torch.device | None = None,
    num_classes: int | None = None,
    tol: float = 1e-6,
) -> dict:
    """Linear-probe accuracy of ``model``'s frozen features.

    With ``recalibrate`` the BN statistics are first re-estimated on the training images
    (on a deep copy: the caller's model is never changed).  Features from
    ``forward_features`` in eval mode are standardised with the training mean/std, and a
    multinomial logistic regression (weights W, bias b; loss = mean CE + l2/2·||W||²) is
    fitted in float64 by full-batch L-BFGS with strong-Wolfe line search, for at most
    ``max_iter`` iterations or until the largest gradient entry falls below ``tol``.

    Returns ``{"acc", "loss"}`` on the test set (loss: mean CE, no penalty) plus
    ``train_acc``, ``train_loss`` (penalised objective), ``n_iter``, ``grad_max`` and
    ``converged``.
    """
    xtr, ytr = _check_pair(train, "train")
    xte, yte = _check_pair(test, "test")
    dev = resolve_device(device, model)
    modes = _module_modes(model)
    net = model
    if recalibrate and _batchnorms(model):
        net = recalibrate_bn(copy.deepcopy(model), xtr, batch_size=128, device=dev)
    net.to(dev)
    net.eval()
    try:
        ftr = _features(net, xtr, batch_size, dev).double()
        fte = _features(net, xte, batch_size, dev).double()
    finally:
        _restore_modes(modes)

    mean = ftr.mean(0)
    std = ftr.std(0, unbiased=False)
    std = torch.where(std > 1e-8, std, torch.ones_like(std))  # constant features -> 0
    ftr = (ftr - mean) / std
    fte = (fte - mean) / std
    ytr = ytr.to(dev)
    yte = yte.to(dev)

    k = int(num_classes) if num_classes is not None else int(max(ytr.max(), yte.max()).item()) + 1
    w = torch.zeros(ftr.shape[1], k, dtype=torch.float64, device=dev, requires_grad=True)
    b = torch.zeros(k, dtype=torch.float64, device=dev, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b], lr=1.0, max_iter=max_iter, max_eval=max_iter * 5 // 4 + 10,
        tolerance_grad=tol, tolerance_change=1e-12, history_size=20,
        line_search_fn="strong_wolfe",
    )

    def objective() -> Tensor:
        return F.cross_entropy(ftr @ w + b, ytr) + 0.5 * l2 * (w * w).sum()

    def closure() -> Tensor:
        opt.zero_grad()
        with torch.enable_grad():
            loss = objective()
            loss.backward()
        return loss

    opt.step(closure)
    with torch.enable_grad():
        final = closure()
    grad_max = max(w.grad.abs().max().item(), b.grad.abs().max().item())
    n_iter = int(opt.state[w].get("n_iter", 0))

    logits_te = fte @ w.detach() + b.detach()
    logits_tr = ftr @ w.detach() + b.detach()
    return {
        "acc": (logits_te.argmax(1) == yte).double().mean().item(),
        "loss": F.cross_entropy(logits_te, yte).item(),
        "train_acc": (logits_tr.argmax(1) == ytr).double().mean().item(),
        "train_loss": final.item(),
        "n_iter": n_iter,
        "grad_max": grad_max,
        "converged": grad_max <= tol,
    }
