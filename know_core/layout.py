"""Parameter layout: one model state <-> one flat float32 vector.

A trajectory snapshot is a model's state flattened in `state_dict` order. The layout
records, for every state_dict entry, where it sits in that vector and which KNOWN model
(if any) may predict it:

    conv       kernels with >= 3 dims (3x3, 1x1, 7x7 ...)      -> KNOWN Conv
    fc         2-D kernels                                       -> KNOWN FC
    bias       1-D biases of conv/linear layers                  -> KNOWN Bias
    norm       BatchNorm/LayerNorm/GroupNorm affine (gamma/beta) -> KNOWN Bias, if asked
    norm_stat  BatchNorm running statistics (never predicted; re-estimated instead)

Example:
    >>> from know_core.models import build_model
    >>> m = build_model("simple-cnn", in_channels=1, num_classes=10, image_size=8)
    >>> layout = param_layout(m)
    >>> vec = flatten_state(m.state_dict(), layout)
    >>> state = unflatten_state(vec, layout)
    >>> all(torch.equal(state[k], v) for k, v in m.state_dict().items())
    True
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

KINDS = ("conv", "fc", "bias", "norm", "norm_stat")
#: kinds that KNOWN models are trained for and predict by default
PREDICTED_KINDS = ("conv", "fc", "bias")

_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


@dataclass(frozen=True)
class TensorSpec:
    name: str  # state_dict key
    shape: tuple[int, ...]
    kind: str  # one of KINDS
    offset: int  # start index in the flat vector
    dtype: str = "float32"  # original dtype; restored on unflatten (e.g. int64 counters)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def stop(self) -> int:
        return self.offset + self.size


def _kind(module: nn.Module, name: str, tensor: torch.Tensor, is_buffer: bool) -> str:
    if isinstance(module, _NORM_TYPES):
        return "norm_stat" if is_buffer else "norm"
    if tensor.dim() >= 3:
        return "conv"
    if tensor.dim() == 2:
        return "fc"
    return "bias"


def param_layout(model: nn.Module) -> list[TensorSpec]:
    """Ordered layout of every state_dict entry of `model`."""
    owner: dict[str, tuple[nn.Module, bool]] = {}
    for mod_name, module in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        for p_name, _ in module.named_parameters(recurse=False):
            owner[prefix + p_name] = (module, False)
        for b_name, _ in module.named_buffers(recurse=False):
            owner[prefix + b_name] = (module, True)
    layout, offset = [], 0
    for key, tensor in model.state_dict().items():
        module, is_buffer = owner[key]
        spec = TensorSpec(
            name=key,
            shape=tuple(tensor.shape),
            kind=_kind(module, key, tensor, is_buffer),
            offset=offset,
            dtype=str(tensor.dtype).removeprefix("torch."),
        )
        layout.append(spec)
        offset += spec.size
    return layout


def layout_size(layout: list[TensorSpec]) -> int:
    return layout[-1].stop if layout else 0


def flatten_state(state: dict[str, torch.Tensor], layout: list[TensorSpec]) -> np.ndarray:
    """Concatenate the state's tensors, in layout order, into one float32 vector."""
    missing = [s.name for s in layout if s.name not in state]
    if missing:
        raise KeyError(f"state is missing {len(missing)} layout entries, e.g. {missing[0]!r}")
    out = np.empty(layout_size(layout), dtype=np.float32)
    for s in layout:
        t = state[s.name]
        if tuple(t.shape) != s.shape:
            raise ValueError(f"tensor {s.name!r} has shape {tuple(t.shape)}, layout says {s.shape}")
        out[s.offset : s.stop] = t.detach().to("cpu", torch.float32).reshape(-1).numpy()
    return out


def unflatten_state(vec, layout: list[TensorSpec]) -> dict[str, torch.Tensor]:
    """Inverse of flatten_state: a state_dict with original shapes and dtypes."""
    vec = torch.as_tensor(np.asarray(vec, dtype=np.float32))
    if vec.numel() != layout_size(layout):
        raise ValueError(f"vector has {vec.numel()} values, layout needs {layout_size(layout)}")
    return {
        s.name: vec[s.offset : s.stop].reshape(s.shape).to(getattr(torch, s.dtype)).clone()
        for s in layout
    }


def layout_to_json(layout: list[TensorSpec]) -> str:
    return json.dumps([asdict(s) for s in layout])


def layout_from_json(text: str | list) -> list[TensorSpec]:
    rows = json.loads(text) if isinstance(text, str) else text
    return [TensorSpec(**{**r, "shape": tuple(r["shape"])}) for r in rows]
