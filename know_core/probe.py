"""Checkpoint tools for evaluating a start point: BatchNorm re-estimation and the linear probe.

* ``recalibrate_bn`` re-estimate BatchNorm running statistics with a cumulative average over
                     forward passes (no gradients). KNOW shrinks conv kernels, so Θ0's
                     statistics no longer fit a predicted model; this restores them (method §6).
* ``linear_probe``   frozen backbone, standardised features (the input of the model's head,
                     taken by a forward hook, so any architecture works: know_core.models
                     .find_head), multinomial logistic regression fitted by full-batch L-BFGS.

Example:
    >>> import torch
    >>> from know_core.models import build_model
    >>> from know_core.probe import linear_probe, recalibrate_bn
    >>> torch.manual_seed(0) and None
    >>> model = build_model("resnet", 1, 3, 8, width=4)
    >>> x, y = torch.rand(60, 1, 8, 8), torch.arange(60) % 3
    >>> model = recalibrate_bn(model, x)
    >>> sorted(linear_probe(model, (x, y), (x, y), recalibrate=False))[:2]
    ['acc', 'converged']
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .evaluate import _check_pair, _module_modes, _restore_modes, resolve_device
from .models import head_inputs
from .train import batch_slices


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
    slices = batch_slices(n, batch_size, merge_single=True)
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
def _features(model: nn.Module, x: Tensor, batch_size: int, dev: torch.device, head: str | None = None) -> Tensor:
    """The head's input for every image (a forward hook on the head: any architecture)."""
    out = []
    with head_inputs(model, head) as grab:
        for start in range(0, x.shape[0], batch_size):
            model(x[start:start + batch_size].to(dev))
            out.append(grab())
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
    head: str | None = None,
) -> dict:
    """Linear-probe accuracy of ``model``'s frozen features.

    With ``recalibrate`` the BN statistics are first re-estimated on the training images
    (on a deep copy: the caller's model is never changed).  Features, the input of the
    model's head (``head``; None: the model's own, see know_core.models.find_head) in eval
    mode, taken by a forward hook, are standardised with the training mean/std, and a
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
        ftr = _features(net, xtr, batch_size, dev, head).double()
        fte = _features(net, xte, batch_size, dev, head).double()
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
