"""Downstream evaluation: fine-tuning protocol, BN re-estimation and linear probing.

This is method §6 (the release's two-phase transfer protocol), scaled down for a CPU, plus
the two tools that §2 asks for when a predicted checkpoint is evaluated:

* ``finetune``       replace the head, train head + norm affine (phase 1), then everything
                     under a cosine schedule (phase 2); test accuracy after every epoch.
* ``recalibrate_bn`` and ``linear_probe`` are in know_core.probe.
* ``evaluate``       accuracy and mean cross-entropy in eval mode.

A model is any ``nn.Module`` mapping images to logits whose head is an ``nn.Linear``: the
module named by ``model.know_head`` (set by know_core.models.build_model) or the ``head``
argument, else its last ``nn.Linear`` in ``named_modules()`` order (know_core.models.find_head).
``replace_head`` swaps that module in place; nothing else of the model is touched.  Images are
float32 ``(N, C, H, W)`` tensors in [0, 1], labels int64 ``(N,)``.  Everything here is pure
torch: no files, no pipeline objects.  The epoch loop, the device choice and the accuracy
count are ``know_core.train``'s (``run_epoch``, ``pick_device``, ``count_correct``).

Example (runs as is; the tiny model stands in for ``know_core.models``)::

    import torch
    from torch import nn
    from know_core.evaluate import FinetuneConfig, finetune
    from know_core.probe import linear_probe, recalibrate_bn

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

from .models import find_head, set_module
from .train import batch_slices, count_correct, pick_device, run_epoch

__all__ = [
    "FinetuneConfig",
    "replace_head",
    "finetune",
    "evaluate",
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
    """``train.pick_device`` (``device=None``: the device of ``model``'s first parameter/
    buffer, else CPU), except that a CUDA request without CUDA falls back to CPU with a
    warning."""
    dev = pick_device(device, model)
    if dev.type == "cuda" and not torch.cuda.is_available():
        warnings.warn(f"device {device!r} requested but CUDA is not available; using CPU")
        return torch.device("cpu")
    return dev


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


def replace_head(model: nn.Module, num_classes: int, seed: int, head: str | None = None) -> nn.Module:
    """Replace the model's head with a freshly initialised ``nn.Linear(F, num_classes)``, in place.

    The head is the module named ``head`` (None: ``model.know_head``, else the last
    ``nn.Linear`` in ``named_modules()`` order; see know_core.models.find_head); the new one
    is set on its parent module under the same name.  The initialisation is PyTorch's
    default for ``nn.Linear`` (uniform in ±1/sqrt(F) for weight and bias) drawn from a CPU
    generator seeded with ``seed``, so every method gets the identical head for the same seed
    and feature width, whatever the global RNG state or device (which is left untouched).
    The new head has the old head's device and dtype.  Returns ``model``.
    """
    name, old = find_head(model, head)
    in_features = old.in_features
    gen = torch.Generator().manual_seed(int(seed))
    bound = 1.0 / math.sqrt(in_features) if in_features > 0 else 0.0
    weight = (torch.rand(num_classes, in_features, generator=gen) * 2 - 1) * bound
    bias = (torch.rand(num_classes, generator=gen) * 2 - 1) * bound
    # skip_init: no default init, so the caller's global RNG is not consumed
    new = nn.utils.skip_init(nn.Linear, in_features, num_classes, bias=True)
    with torch.no_grad():
        new.weight.copy_(weight)
        new.bias.copy_(bias)
    set_module(model, name, new.to(device=old.weight.device, dtype=old.weight.dtype))
    return model


def _phase1_trainable(model: nn.Module, head: str | None = None) -> set[int]:
    """ids of parameters trainable in phase 1: the head and every norm layer's affine."""
    keep = {id(p) for p in find_head(model, head)[1].parameters()}
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
    try:
        correct, loss_sum = count_correct(model, x, y, batch_size, dev, with_loss=True)
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
    """``train.run_epoch`` as fine-tuning runs it: no augmentation, and a trailing batch
    of one sample merged into the previous one (BatchNorm in train mode)."""
    return run_epoch(model, opt, x, y, batch_size, gen, dev, merge_single=True)


def finetune(
    model: nn.Module,
    num_classes: int,
    train: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    cfg: FinetuneConfig | None = None,
    on_epoch: Callable[[dict], None] | None = None,
    head: str | None = None,
) -> list[dict]:
    """Two-phase transfer of ``model`` to a ``num_classes`` task (method §6); in place.

    1. ``replace_head(model, num_classes, cfg.seed, head)`` (``head`` None: the model's own,
       see know_core.models.find_head).
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

    head_name = find_head(model, head)[0]
    replace_head(model, num_classes, cfg.seed, head_name)
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
                keep = _phase1_trainable(model, head_name)
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
