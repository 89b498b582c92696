"""KNOWN, the KNOW hyper-model (method §4): module, official-weight loader, fast inference.

KNOWN works element-wise: every scalar weight of a target network is one sample. Its input is
a window w = (w1..w5) of that scalar's values along the forgetting trajectory, ordered from
most-forgotten to full-data (column 4 is the newest value), plus the diffs d = (w2-w1..w5-w4).
Its output is a residual r; the prediction for the next, larger-data value is w5 + r.

    stream(x)  = LeakyReLU_0.3( Dense32( T( Dense64(x) ) ) )
    T(h)       = Dense64_base(z) + Dense64_coef(z) * exp( Dense64_rate(z) * h ),  z = ReLU(Dense8(h))
    KNOWN(w,d) = tanh( Dense1( concat[ stream_A(w), stream_B(d) ] ) )

There are three models, one per kind of tensor ('conv', 'fc', 'bias'); a `KnownSet` holds
them together with the input scaling they were trained with.

Example:
    >>> import torch
    >>> from know_core.known import KNOWN, KnownSet, known_residual, save_known_set, known_set_from_dict
    >>> _ = torch.manual_seed(0)
    >>> model = KNOWN()
    >>> sum(p.numel() for p in model.parameters())
    9425
    >>> window = 0.01 * torch.randn(1000, 5).cumsum(1)  # 1000 scalars, oldest -> newest
    >>> residual = known_residual(model, window, batch_size=256)
    >>> residual.shape, torch.allclose(residual, model(window), atol=1e-6)
    (torch.Size([1000]), True)
    >>> ks = KnownSet({"conv": model, "fc": KNOWN(), "bias": KNOWN()}, scaling="minmax", source="demo")
    >>> ks.residual("conv", window).shape
    torch.Size([1000])
    >>> known_set_from_dict(save_known_set(ks)).scaling  # plain dict, fit for torch.save
    'minmax'

The authors' pretrained weights: `load_official(directory)` (the three h5 files of
OFFICIAL_FILES) or `load_keras_h5(path)` for one file.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from know_core.errors import BadInput, MissingData
from know_core.layout import PREDICTED_KINDS

WINDOW = 5  # values per scalar the model reads (S = 5 in the paper)
SCALINGS = ("raw", "minmax")
LEAKY_SLOPE = 0.3
INIT_SCALE = 0.1  # VarianceScaling(0.1, fan_in, uniform), as in the release
L1_KERNEL, L1_BIAS = 1e-6, 0.1  # the release's L1 regulariser weights
MINMAX_EPS = 1e-8 + 1e-5  # the two epsilons of the older release's min-max scaling
OFFICIAL_FILES = {"conv": "KNOWN_Conv.h5", "fc": "KNOWN_FC.h5", "bias": "KNOWN_Bias.h5"}
KNOWN_SET_FORMAT = "know.known_set/v1"

#: Keras layer name in the authors' HDF5 -> submodule of KNOWN (reference README table)
KERAS_LAYER_MAP = {
    "dense": "stream_a.inp",
    "dense_1": "stream_a.z",
    "dense_2": "stream_a.base",
    "dense_3": "stream_a.coef",
    "dense_4": "stream_a.rate",
    "dense_5": "stream_a.out",
    "dense_6": "stream_b.inp",
    "dense_7": "stream_b.z",
    "dense_8": "stream_b.base",
    "dense_9": "stream_b.coef",
    "dense_10": "stream_b.rate",
    "dense_11": "stream_b.out",
    "dense_12": "head",
}


class KnownFormatError(BadInput):
    """A file or dict that does not hold a KNOWN model."""


def _init_linear(layer: nn.Linear) -> nn.Linear:
    """VarianceScaling(0.1, fan_in, uniform) kernel, zero bias."""
    limit = math.sqrt(3.0 * INIT_SCALE / layer.in_features)
    nn.init.uniform_(layer.weight, -limit, limit)
    nn.init.zeros_(layer.bias)
    return layer


class KnownStream(nn.Module):
    """One stream: LeakyReLU(Dense32(T(Dense64(x)))) with the exponential transform T."""

    def __init__(self, in_features: int):
        super().__init__()
        self.inp = _init_linear(nn.Linear(in_features, 64))  # Dense64 on the input
        self.z = _init_linear(nn.Linear(64, 8))  # Dense8 (+ReLU): the transform's code z
        self.base = _init_linear(nn.Linear(8, 64))
        self.coef = _init_linear(nn.Linear(8, 64))
        self.rate = _init_linear(nn.Linear(8, 64))
        self.out = _init_linear(nn.Linear(64, 32))  # Dense32 (+LeakyReLU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        z = F.relu(self.z(h))
        t = self.base(z) + self.coef(z) * torch.exp(self.rate(z) * h)  # rate multiplies h inside exp
        return F.leaky_relu(self.out(t), LEAKY_SLOPE)


class KNOWN(nn.Module):
    """The KNOW hyper-model: 9,425 parameters (stream A 4,712 + stream B 4,648 + head 65)."""

    def __init__(self):
        super().__init__()
        self.stream_a = KnownStream(WINDOW)  # reads the window w
        self.stream_b = KnownStream(WINDOW - 1)  # reads the diffs d
        self.head = _init_linear(nn.Linear(64, 1))  # rows 0-31 see stream A, 32-63 stream B

    def forward(self, window: torch.Tensor) -> torch.Tensor:
        """window (N, 5), most-forgotten -> full-data; returns the residual (N,)."""
        _check_window(window)
        diffs = window[:, 1:] - window[:, :-1]
        feats = torch.cat([self.stream_a(window), self.stream_b(diffs)], dim=1)
        return torch.tanh(self.head(feats)).squeeze(1)

    def l1_penalty(self, kernel: float = L1_KERNEL, bias: float = L1_BIAS) -> torch.Tensor:
        """The release's L1 regulariser, to add to the meta-training loss.

        Covers, in each stream, the input Dense64 (`inp`) and the Dense32 (`out`): the two
        layers the formula names Dense64/Dense32. The transform's Dense64_base/coef/rate, the
        Dense8 and the head are not regularised. Keras semantics: weight * sum(|x|).
        """
        layers = (self.stream_a.inp, self.stream_a.out, self.stream_b.inp, self.stream_b.out)
        return sum(kernel * l.weight.abs().sum() + bias * l.bias.abs().sum() for l in layers)


def _check_window(window: torch.Tensor) -> None:
    if window.dim() != 2 or window.shape[1] != WINDOW:
        raise ValueError(f"KNOWN needs windows of shape (N, {WINDOW}), got {tuple(window.shape)}")


def scale_window(window: torch.Tensor, scaling: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Input scaling of KNOWN windows; returns (scaled window, per-scalar scale s of shape (N,)).

    'raw' feeds the values as they are (s = 1). 'minmax' (the older release) uses
    s = 2*(max(w) - min(w) + 1e-8 + 1e-5) and w' = (w - w1) / s; the model's output is then
    in the scaled space, so the raw residual is out * s.
    """
    if scaling == "raw":
        return window, torch.ones(window.shape[0], dtype=window.dtype, device=window.device)
    if scaling == "minmax":
        lo, hi = torch.aminmax(window, dim=1)
        s = 2.0 * (hi - lo + MINMAX_EPS)
        return (window - window[:, :1]) / s[:, None], s
    raise ValueError(f"unknown scaling {scaling!r}; valid: {', '.join(SCALINGS)}")


def _fold_stream(stream: KnownStream, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """A stream's layers refolded for inference (composed in float64, then cast to dtype).

    The rewrites are exact in real arithmetic:
      - Dense8 reads h = x·K_in + b_in, which is linear in x, so its pre-activation is
        x·(K_in·K_z) + (b_in·K_z + b_z): one (in, 72) matmul yields [h | z_pre].
      - Dense32 reads base + coef·e with base = z·K_base + b_base linear in z, so
        out = (coef·e)·K_out + z·(K_base·K_out) + (b_base·K_out + b_out): the base term joins
        the (8, 160) matmul of z as 32 columns [coef | rate | base·K_out].
      - exp(rate·h) = exp2((rate·log2 e)·h), log2 e folded into the rate columns: torch's
        CPU exp2 is ~2.5x faster than exp.
    """
    def kb(layer):  # (in, out) kernel and bias, float64
        return layer.weight.detach().double().t(), layer.bias.detach().double()

    (k_in, b_in), (k_z, b_z), (k_b, b_b), (k_c, b_c), (k_r, b_r), (k_o, b_o) = map(
        kb, (stream.inp, stream.z, stream.base, stream.coef, stream.rate, stream.out))
    log2e = 1.0 / math.log(2.0)
    k1, b1 = torch.cat([k_in, k_in @ k_z], 1), torch.cat([b_in, b_in @ k_z + b_z])
    k2 = torch.cat([k_c, k_r * log2e, k_b @ k_o], 1)
    b2 = torch.cat([b_c, b_r * log2e, b_b @ k_o + b_o])
    return tuple(t.to(dtype).contiguous() for t in (k1, b1, k2, b2, k_o))


def _stream_folded(x: torch.Tensor, folded: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """KnownStream.forward on the weights of _fold_stream: 3 matmuls, in-place elementwise ops."""
    k1, b1, k2, b2, k_o = folded
    hz = torch.addmm(b1, x, k1)  # [h (64) | z_pre (8)]
    h, z = hz[:, :64], hz[:, 64:].relu_()
    t = torch.addmm(b2, z, k2)  # [coef (64) | rate·log2e (64) | base·K_out + b_out (32)]
    u = h.mul_(t[:, 64:128]).exp2_().mul_(t[:, :64])  # coef * exp(rate * h)
    return F.leaky_relu_(torch.addmm(t[:, 128:], u, k_o), LEAKY_SLOPE)


#: known_residual's CPU chunk per intra-op thread (one stream's activations for 4096 scalars:
#: ~4 MB, cache-resident). Measured (benchmarks/bench_known.py, 2-core EPYC): 1 thread is
#: fastest at 4096 (4.5x faster than 65536), 2 threads at 8192.
CPU_BATCH = 4096


def known_residual(model: KNOWN, window: torch.Tensor, batch_size: int | None = None,
                   *, scaling: str = "raw") -> torch.Tensor:
    """KNOWN's residual (N,) for windows (N, 5), without autograd, in chunks of batch_size.

    Same numbers as model(window) to float32 rounding (the layers are refolded, see
    _fold_stream; measured max deviation on the reference inputs: 1e-7), and ~2x faster than
    chunked model(window) on CPU. batch_size None picks CPU_BATCH x torch's intra-op threads on
    CPU and 65536 elsewhere.
    `scaling` is applied per chunk (see scale_window).
    The result is a normal tensor on window's device, in the model's dtype.
    """
    _check_window(window)
    param = model.head.weight
    if batch_size is None:
        batch_size = CPU_BATCH * torch.get_num_threads() if param.device.type == "cpu" else 65536
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out = torch.empty(window.shape[0], dtype=param.dtype, device=param.device)
    with torch.inference_mode():
        fa, fb = _fold_stream(model.stream_a, param.dtype), _fold_stream(model.stream_b, param.dtype)
        k_head = model.head.weight.detach().t()
        ka, kb = k_head[:32, 0].contiguous(), k_head[32:, 0].contiguous()  # stream A / B rows
        for start in range(0, window.shape[0], batch_size):
            x = window[start : start + batch_size].to(param.device, param.dtype)
            x, s = scale_window(x, scaling)
            diffs = x[:, 1:] - x[:, :-1]
            y = torch.addmv(model.head.bias, _stream_folded(x, fa), ka)
            y.addmv_(_stream_folded(diffs, fb), kb)  # head over concat[A, B] without the concat
            r = y.tanh_()
            out[start : start + x.shape[0]] = r if scaling == "raw" else r * s
    return out.to(window.device)


@dataclass
class KnownSet:
    """The three KNOWN models with the input scaling they expect."""

    models: dict[str, KNOWN]  # keys 'conv', 'fc', 'bias'
    scaling: str = "raw"  # 'raw' (the release) or 'minmax' (older release); see scale_window
    source: str = ""  # where the weights came from, e.g. 'official' or a meta-training run
    provenance: dict = field(default_factory=dict)  # json-able details: hashes, configs ...

    def __post_init__(self):
        if set(self.models) != set(PREDICTED_KINDS):
            raise ValueError(f"KnownSet needs models {list(PREDICTED_KINDS)}, got {sorted(self.models)}")
        if self.scaling not in SCALINGS:
            raise ValueError(f"unknown scaling {self.scaling!r}; valid: {', '.join(SCALINGS)}")

    def residual(self, kind: str, window: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        """Residual (N,) of the `kind` model for windows (N, 5), in raw weight units."""
        if kind not in self.models:
            raise ValueError(f"no KNOWN model for kind {kind!r}; valid: {', '.join(PREDICTED_KINDS)}")
        return known_residual(self.models[kind], window, batch_size, scaling=self.scaling)


def save_known_set(ks: KnownSet) -> dict:
    """A plain dict (tensors, str, lists, dicts) that torch.load(weights_only=True) reads back."""
    try:
        provenance = json.loads(json.dumps(ks.provenance))
    except (TypeError, ValueError) as err:
        raise ValueError(f"KnownSet provenance is not json-able: {err}") from None
    return {
        "format": KNOWN_SET_FORMAT,
        "scaling": ks.scaling,
        "source": ks.source,
        "provenance": provenance,
        "models": {k: {n: t.detach().cpu().clone() for n, t in m.state_dict().items()}
                   for k, m in ks.models.items()},
    }


def known_set_from_dict(d: dict) -> KnownSet:
    """Inverse of save_known_set."""
    if not isinstance(d, dict) or d.get("format") != KNOWN_SET_FORMAT:
        found = d.get("format") if isinstance(d, dict) else type(d).__name__
        raise KnownFormatError(f"not a saved KnownSet: format is {found!r}, expected {KNOWN_SET_FORMAT!r}")
    models = {}
    for kind in PREDICTED_KINDS:
        model = KNOWN()
        try:
            model.load_state_dict(d["models"][kind])
        except (KeyError, RuntimeError) as err:
            reason = str(err).strip().splitlines()[0]
            raise KnownFormatError(f"saved KnownSet model {kind!r} does not load: {reason}") from None
        models[kind] = model.eval()
    return KnownSet(models, scaling=d["scaling"], source=d["source"], provenance=d["provenance"])


def load_keras_h5(path) -> KNOWN:
    """Read one of the authors' Keras 2 HDF5 weight files into a KNOWN (eval mode).

    Layers sit at /<name>/<name>/kernel:0 (in x out, transposed here) and .../bias:0; a full
    model file keeps them under /model_weights. Anything else raises KnownFormatError.
    """
    import h5py  # lazy: only this loader needs it

    if not os.path.isfile(path):
        raise MissingData(f"{path}: no such file")
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise KnownFormatError(f"{path}: not an HDF5 file ({reason})") from None
    model = KNOWN()
    with f, torch.no_grad():
        root = f["model_weights"] if isinstance(f.get("model_weights"), h5py.Group) else f
        for name, target in KERAS_LAYER_MAP.items():
            layer = model.get_submodule(target)
            group = root.get(f"{name}/{name}")
            if not isinstance(group, h5py.Group):
                raise KnownFormatError(f"{path}: not a KNOWN model: layer {name!r} is missing")
            for part, param, expected in (("kernel", layer.weight, layer.weight.T.shape),
                                          ("bias", layer.bias, layer.bias.shape)):
                ds = group.get(f"{part}:0")
                if not isinstance(ds, h5py.Dataset):
                    raise KnownFormatError(f"{path}: not a KNOWN model: layer {name!r} has no {part}:0")
                if ds.shape != tuple(expected):
                    raise KnownFormatError(f"{path}: not a KNOWN model: layer {name!r} {part} has shape "
                                           f"{ds.shape}, expected {tuple(expected)}")
                value = torch.as_tensor(ds[()], dtype=torch.float32)
                if not torch.isfinite(value).all():
                    raise KnownFormatError(f"{path}: layer {name!r} {part} holds non-finite values")
                param.copy_(value.T if part == "kernel" else value)  # Keras kernel is in x out
    return model.eval()


def _sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def missing_official_files(directory) -> list[str]:
    """The OFFICIAL_FILES names that `directory` lacks."""
    return [name for name in OFFICIAL_FILES.values() if not os.path.isfile(os.path.join(directory, name))]


def load_official(directory, scaling: str = "raw") -> KnownSet:
    """The authors' three pretrained models from `directory` (files OFFICIAL_FILES).

    The release feeds raw weights, hence scaling='raw' by default. Provenance records the
    file names and their sha256, not the directory.
    """
    paths = {k: os.path.join(directory, name) for k, name in OFFICIAL_FILES.items()}
    missing = missing_official_files(directory)
    if missing:
        raise MissingData(f"{directory}: missing {', '.join(missing)}; --official-dir must hold "
                                f"the three h5 files {', '.join(OFFICIAL_FILES.values())}")
    return KnownSet(
        models={k: load_keras_h5(p) for k, p in paths.items()},
        scaling=scaling,
        source="official",
        provenance={"files": dict(OFFICIAL_FILES), "sha256": {k: _sha256(p) for k, p in paths.items()}},
    )
