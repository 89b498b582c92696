"""The authors' released meta-data files: their names, their axes, their values in store order.

A release file is a MATLAB v7.3 .mat (an HDF5 file) of one trajectory with three pools
(method.md §3, "Released layout"), in MATLAB's own axis order:

    ConvWeights   (3, 3, N, S)   every 3x3 kernel of the network
    FCWeights     (M, S)         every other kernel
    Bias          (K, S)         every bias
    S = 7 stages; file stage index S-1 is the full data set, index 0 the smallest subset

MATLAB writes column-major, so h5py sees every axis reversed: (S, N, 3, 3), (S, M), (S, K).
Both orders are accepted (`detect_order`): the stage axis is found by its length S and the
kernel axes by their 3, 3; one order holds for the whole file, and when a shape fits both
(FCWeights with M = S) the file's other pools decide, else the v7.3 (h5py) order is taken.

Store order of one imported run (`pool_layout`, `stage_blocks`): row k is file stage
S-1-k, so row 0 is the full data, as for collected runs. A row is the three pools one after
another, each in MATLAB's column-major order of that stage: ConvWeights(:,:,:,s)(:), then
FCWeights(:,s), then Bias(:,s). The conv tensor's layout shape is (N, 3, 3), so row-major its
[n, a, b] is MATLAB's ConvWeights(b+1, a+1, n+1, s) (each kernel transposed against MATLAB's
row/column, which KNOWN, working scalar by scalar, does not see). A pool of size 0 is left out.

File names carry the hyper-parameters (`parse_release_name`), in the pattern NAME_PATTERN:

    <model>_<dataset>_r<rate>_lr<lr>_bs<batch>[_<anything>].mat

with `_` or `-` between the parts and any letter case, e.g. simplenet_cifar10_r0.5_lr0.001_bs64.mat
or ResNet18-MNIST-r0.35-lr1e-4-bs128-seed3.mat. The model is everything before the data set;
the data set is one word without `-`/`_` (write fashionmnist, or pass the data set as an
override). Each value can be overridden, so a file named otherwise imports when every value
the name cannot give is given.

Pure numpy: the readers take any array-like with `.shape` and numpy indexing (an h5py
Dataset, a numpy array); opening files is storage/release_import.py.

Example:
    >>> parse_release_name("simplenet_cifar10_r0.5_lr1e-3_bs64_seed2.mat")
    ReleaseMeta(model='simplenet', dataset='cifar10', sampling_rate=0.5, lr=0.001, batch_size=64)
    >>> pools = inspect_pools({"ConvWeights": (7, 2, 3, 3), "FCWeights": (7, 5), "Bias": (7, 3)})
    >>> [(p.key, p.order, p.values) for p in pools]
    [('ConvWeights', 'hdf5', 18), ('FCWeights', 'hdf5', 5), ('Bias', 'hdf5', 3)]
    >>> [(s.name, s.shape, s.kind, s.offset) for s in pool_layout(pools)]
    [('ConvWeights', (2, 3, 3), 'conv', 0), ('FCWeights', (5,), 'fc', 18), ('Bias', (3,), 'bias', 23)]
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import numpy as np

from know_core.data import subset_sizes
from know_core.errors import BadInput
from know_core.layout import TensorSpec

#: the release's stage count (k = 0..6)
RELEASE_STAGES = 7
#: (dataset key in the file, layout kind), in store-row order
POOLS = (("ConvWeights", "conv"), ("FCWeights", "fc"), ("Bias", "bias"))
#: the documented file-name pattern, as shown in errors
NAME_PATTERN = "<model>_<dataset>_r<rate>_lr<lr>_bs<batch>[_<anything>].mat"
#: the orders a pool can be stored in: MATLAB's (3,3,N,S) / (M,S), or h5py's view of v7.3, reversed
ORDERS = ("matlab", "hdf5")

_NUM = r"(?:\d+(?:\.\d*)?|\.\d+)"
_NAME_RE = re.compile(
    rf"^(?P<model>.+?)[-_](?P<dataset>[a-z0-9]+)[-_]r(?P<rate>{_NUM})[-_]lr(?P<lr>{_NUM}(?:e[-+]?\d+)?)"
    r"[-_]bs(?P<batch>\d+)(?:[-_].*)?\.mat$", re.IGNORECASE)


@dataclass(frozen=True)
class ReleaseMeta:
    """The hyper-parameters of one release file."""

    model: str
    dataset: str
    sampling_rate: float  # r: |Dk| = r^k |D0|
    lr: float
    batch_size: int


def parse_release_name(filename: str, model: str = "", dataset: str = "", sampling_rate: float = 0.0,
                       lr: float = 0.0, batch_size: int = 0) -> ReleaseMeta:
    """The hyper-parameters in a file name (NAME_PATTERN), each replaced by its override when
    that is given (non-empty, non-zero). A name that does not match is fine when every value
    is overridden; otherwise BadInput shows the pattern and the options that would do."""
    base = filename.replace("\\", "/").rsplit("/", 1)[-1]
    given = {"model": model, "dataset": dataset, "sampling_rate": sampling_rate, "lr": lr, "batch_size": batch_size}
    match = _NAME_RE.match(base)
    if match is None:
        lacking = [k for k, v in given.items() if not v]
        if lacking:
            options = " ".join("--" + k.replace("_", "-") for k in lacking)
            raise BadInput(f"{base}: the name does not match {NAME_PATTERN} (e.g. simplenet_cifar10_r0.5_lr0.001_bs64"
                           f".mat); rename the file or give {options}")
        parsed: dict[str, Any] = {}
    else:
        parsed = {"model": match["model"].lower(), "dataset": match["dataset"].lower(),
                  "sampling_rate": float(match["rate"]), "lr": float(match["lr"]), "batch_size": int(match["batch"])}
    values = {k: (v if v else parsed[k]) for k, v in given.items()}
    meta = ReleaseMeta(model=str(values["model"]), dataset=str(values["dataset"]),
                       sampling_rate=float(values["sampling_rate"]), lr=float(values["lr"]),
                       batch_size=int(values["batch_size"]))
    where = "its name" if match is not None else "the options"
    if not 0.0 < meta.sampling_rate < 1.0:
        raise BadInput(f"{base}: sampling rate {meta.sampling_rate:g} from {where} must satisfy 0 < r < 1; "
                       "fix the name or give --sampling-rate")
    if meta.lr <= 0:
        raise BadInput(f"{base}: learning rate {meta.lr:g} from {where} must be positive; fix the name or give --lr")
    if meta.batch_size < 1:
        raise BadInput(f"{base}: batch size {meta.batch_size} from {where} must be at least 1; fix the name or give "
                       "--batch-size")
    return meta


@dataclass(frozen=True)
class Pool:
    """One dataset of a release file: where it goes in a store row and how it is stored."""

    key: str  # ConvWeights | FCWeights | Bias
    kind: str  # conv | fc | bias
    shape: tuple[int, ...]  # as the file (h5py) holds it
    order: str  # matlab | hdf5 (see ORDERS)
    stages: int

    @property
    def unit(self) -> int:
        """Values per unit (a 3x3 kernel, or one scalar); blocks are whole units."""
        return 9 if self.kind == "conv" else 1

    @property
    def units(self) -> int:
        """N kernels, M or K scalars."""
        if self.order == "hdf5":  # (S, N, 3, 3), (S, M), (S, K)
            return self.shape[1]
        return self.shape[2] if self.kind == "conv" else self.shape[0]  # (3, 3, N, S), (M, S), (K, S)

    @property
    def values(self) -> int:
        """Values of this pool in one stage (one store row)."""
        return self.units * self.unit

    def layout_shape(self) -> tuple[int, ...]:
        return (self.units, 3, 3) if self.kind == "conv" else (self.units,)


def _orders_of(key: str, kind: str, shape: tuple[int, ...], stages: int) -> set[str]:
    """The orders that `shape` fits (empty when it fits neither)."""
    if kind == "conv":
        fits = {"matlab": len(shape) == 4 and shape[:2] == (3, 3) and shape[3] == stages,
                "hdf5": len(shape) == 4 and shape[0] == stages and shape[2:] == (3, 3)}
    else:
        fits = {"matlab": len(shape) == 2 and shape[1] == stages, "hdf5": len(shape) == 2 and shape[0] == stages}
    return {o for o, ok in fits.items() if ok}


def _expected(key: str, kind: str, stages: int) -> str:
    if kind == "conv":
        return f"(3, 3, N, {stages}) or, as h5py shows a v7.3 file, ({stages}, N, 3, 3)"
    letter = "M" if kind == "fc" else "K"
    return f"({letter}, {stages}) or, as h5py shows a v7.3 file, ({stages}, {letter})"


def detect_order(shapes: Mapping[str, tuple[int, ...]], stages: int = RELEASE_STAGES, where: str = "") -> str:
    """The one axis order ('matlab' or 'hdf5') of a file's pools; BadInput for a missing pool,
    a shape that fits neither order, or pools stored in different orders."""
    prefix = f"{where}: " if where else ""
    fits: dict[str, set[str]] = {}
    for key, kind in POOLS:
        if key not in shapes:
            raise BadInput(f"{prefix}no dataset {key!r} (it has: {', '.join(sorted(shapes)) or 'none'}); a release "
                           "meta-data file holds ConvWeights, FCWeights and Bias")
        shape = tuple(int(n) for n in shapes[key])
        fits[key] = _orders_of(key, kind, shape, stages)
        if not fits[key]:
            raise BadInput(f"{prefix}{key} has shape {shape}, expected {_expected(key, kind, stages)}"
                           + ("" if stages == RELEASE_STAGES else f" (--stages {stages})"))
    common = set(ORDERS)
    for f in fits.values():
        common &= f
    if not common:
        described = ", ".join(f"{k} {tuple(shapes[k])}" for k, _ in POOLS)
        raise BadInput(f"{prefix}its pools are stored in different axis orders ({described}); re-save the file "
                       "with all three in one order")
    return "hdf5" if "hdf5" in common else "matlab"


def inspect_pools(shapes: Mapping[str, tuple[int, ...]], stages: int = RELEASE_STAGES, where: str = "") -> list[Pool]:
    """The file's non-empty pools, in store-row order (BadInput as detect_order, or when all are empty)."""
    order = detect_order(shapes, stages, where)
    pools = [Pool(key, kind, tuple(int(n) for n in shapes[key]), order, stages) for key, kind in POOLS]
    pools = [p for p in pools if p.values > 0]
    if not pools:
        raise BadInput(f"{where + ': ' if where else ''}ConvWeights, FCWeights and Bias are all empty; nothing to import")
    return pools


def pool_layout(pools: list[Pool]) -> list[TensorSpec]:
    """The store layout of an imported run: one tensor per pool, named after it."""
    layout, offset = [], 0
    for p in pools:
        layout.append(TensorSpec(name=p.key, shape=p.layout_shape(), kind=p.kind, offset=offset))
        offset += p.values
    return layout


def file_stage(store_stage: int, stages: int = RELEASE_STAGES) -> int:
    """The file's stage index of store row `store_stage` (row 0 = full data = file index S-1)."""
    if not 0 <= store_stage < stages:
        raise ValueError(f"stage {store_stage} is outside 0..{stages - 1}")
    return stages - 1 - store_stage


def read_units(ds, pool: Pool, stage: int, u0: int, u1: int) -> np.ndarray:
    """Units [u0, u1) of file stage `stage` of one pool, as float32 values in store order
    (MATLAB's column-major order within the stage). Reads only that slab of `ds`."""
    if pool.kind == "conv":
        if pool.order == "hdf5":  # (S, N, 3, 3): [s, n, col, row] is already column-major within a stage
            block = np.asarray(ds[stage, u0:u1])
        else:  # (3, 3, N, S): [row, col, n] -> [n, col, row]
            block = np.asarray(ds[:, :, u0:u1, stage]).transpose(2, 1, 0)
    else:
        block = np.asarray(ds[stage, u0:u1] if pool.order == "hdf5" else ds[u0:u1, stage])
    return np.ascontiguousarray(block, dtype=np.float32).reshape(-1)


def stage_blocks(datasets: Mapping[str, Any], pools: list[Pool], stage: int, block_values: int) -> Iterator[np.ndarray]:
    """The store row of file stage `stage`, as consecutive float32 blocks of at most
    `block_values` values (at least one unit: a 3x3 kernel or one scalar), read one block at
    a time from `datasets[pool.key]`: memory is one block whatever the file size."""
    for pool in pools:
        per = max(1, block_values // pool.unit)
        for u0 in range(0, pool.units, per):
            yield read_units(datasets[pool.key], pool, stage, u0, min(u0 + per, pool.units))


def nominal_sizes(n_data: int, sampling_rate: float, stages: int, where: str = "") -> list[int]:
    """|Dk| = int(n_data * r^k) for k = 0..stages-1 (store order); BadInput when one is below 1
    (meta-training takes their logs)."""
    sizes = subset_sizes(n_data, sampling_rate, stages)
    if sizes[-1] < 1:
        need = math.ceil(1 / sampling_rate ** (stages - 1))
        raise BadInput(f"{where + ': ' if where else ''}--n-data {n_data} at r = {sampling_rate:g} leaves stage "
                       f"{stages - 1} with {n_data * sampling_rate ** (stages - 1):.3g} examples; give --n-data {need} "
                       "or more")
    return sizes


__all__ = ["RELEASE_STAGES", "POOLS", "NAME_PATTERN", "ORDERS", "ReleaseMeta", "Pool", "parse_release_name",
           "detect_order", "inspect_pools", "pool_layout", "file_stage", "read_units", "stage_blocks", "nominal_sizes"]
