"""Import the authors' released meta-data (.mat v7.3 files) into a trajectory store.

Each file becomes one complete `independent`-mode run (the release restarts every stage from
one saved initialisation, method §3). What a file holds, how its axes are read and in which
order its values land in a row: know_core/release.py. This module opens the files (h5py),
names the runs and streams the values in:

    run id     "rel-" + sha256 of {the file's content digest, the hyper-parameters, n_data, stages}:
               the same file imported again is the same run (skipped once complete); a changed
               file, or other hyper-parameters or --n-data, is a new run. The digest costs one
               sequential read of the file.
    writing    row k (file stage S-1-k) is read from the file one block of at most
               `block_values` values at a time and written with `append_stage_blocks`, which
               writes each store chunk once, whole. Memory is bounded by one block as read
               (block_values x the file's itemsize, 8 bytes for MATLAB doubles) plus its
               float32 copy, plus one store chunk (TrajectoryStore.chunk float32 values,
               16 MiB by default), plus h5py's chunk cache: never a whole row or file.
    records    RunInfo mode=independent, model/dataset/r/lr/batch from the name (or the
               options), stage_subset_sizes int(n_data * r^k), epochs_per_stage 1, optimizer
               fresh; plus source="release", source_file, source_sha256, n_data, axis_order.

A run is written under its lease (storage/lease.py), like a collected run: a failure marks it
failed (a re-import rewrites it), and nothing is marked complete before its last row.

Example:
    >>> from storage.release_import import inspect_release  # doctest: +SKIP
    >>> inspect_release("simplenet_cifar10_r0.5_lr0.001_bs64.mat").run_info(50000).sampling_rate  # doctest: +SKIP
    0.5
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from know_core.errors import BadInput, MissingData, NonFinite
from know_core.release import (Pool, ReleaseMeta, file_stage, inspect_pools, nominal_sizes, parse_release_name,
                               pool_layout, stage_blocks)

from .lease import LeaseLost
from .records import RunInfo
from .trajectory import TrajectoryStore, config_hash

#: bytes per read while hashing a file
HASH_BLOCK = 1 << 24


def open_mat(path: str | Path):
    """The .mat file as an open h5py.File; BadInput when it is not HDF5 (MATLAB v7.3)."""
    import h5py

    path = Path(path)
    if not path.is_file():
        raise MissingData(f"{path}: no such file; name the release's .mat meta-data files")
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise BadInput(f"{path}: not a MATLAB v7.3 (HDF5) file ({str(e).splitlines()[0] if str(e) else e}); "
                       "re-save it in MATLAB with save(file, ..., '-v7.3')") from None


def _shape(node) -> tuple[int, ...] | None:
    """A dataset's shape, (0, ...) for a MATLAB empty array; None for what is not a dataset."""
    import h5py

    if not isinstance(node, h5py.Dataset):
        return None
    if node.attrs.get("MATLAB_empty"):  # MATLAB stores [] as its dims in a uint64 dataset
        return (0,) * max(1, len(node.shape))
    return tuple(node.shape)


@dataclass(frozen=True)
class ReleaseFile:
    """One release file, inspected: its hyper-parameters and its pools (no values read)."""

    path: str
    meta: ReleaseMeta
    pools: list[Pool]
    stages: int

    @property
    def order(self) -> str:
        return self.pools[0].order

    def run_info(self, n_data: int, sha256: str = "") -> RunInfo:
        sizes = nominal_sizes(n_data, self.meta.sampling_rate, self.stages, Path(self.path).name)
        spec = {"source": "release", "source_sha256": sha256, "model": self.meta.model, "dataset": self.meta.dataset,
                "sampling_rate": self.meta.sampling_rate, "lr": self.meta.lr, "batch_size": self.meta.batch_size,
                "n_data": n_data, "stages": self.stages}
        return RunInfo(mode="independent", model=self.meta.model, dataset=self.meta.dataset,
                       sampling_rate=self.meta.sampling_rate, lr=self.meta.lr, batch_size=self.meta.batch_size,
                       epochs_per_stage=1, seed=0, stage_subset_sizes=sizes, spec=spec, optimizer="fresh",
                       source="release", source_file=str(Path(self.path).resolve()), source_sha256=sha256,
                       n_data=n_data, axis_order=self.order)


def inspect_release(path: str | Path, stages: int = 7, overrides: dict[str, Any] | None = None,
                    n_data: int | None = None) -> ReleaseFile:
    """Check one file without reading its values: the name (or overrides) gives the
    hyper-parameters, the three datasets are there with fitting shapes and float values, and
    (given n_data) every nominal subset holds an example. BadInput/MissingData say what is wrong."""
    path = Path(path)
    meta = parse_release_name(path.name, **(overrides or {}))
    with open_mat(path) as f:
        shapes = {key: shape for key in f.keys() if (shape := _shape(f[key])) is not None}
        pools = inspect_pools(shapes, stages, path.name)
        for p in pools:
            dtype = f[p.key].dtype
            if not np.issubdtype(dtype, np.floating):
                raise BadInput(f"{path.name}: {p.key} holds {dtype} values, expected floating-point weights")
    rel = ReleaseFile(str(path), meta, pools, stages)
    if n_data is not None:
        rel.run_info(n_data)
    return rel


def file_sha256(path: str | Path) -> str:
    """sha256 of the file's bytes, read HASH_BLOCK bytes at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(HASH_BLOCK):
            digest.update(chunk)
    return digest.hexdigest()


def release_run_id(info: RunInfo) -> str:
    """The run id of an imported file: its content digest and import config, hashed."""
    return "rel-" + config_hash(info.spec)


def import_release_file(store: TrajectoryStore, path: str | Path, stages: int = 7, n_data: int = 50000,
                        block_values: int = 1 << 22, overrides: dict[str, Any] | None = None,
                        log: logging.Logger | None = None) -> tuple[str, str]:
    """Import one file as a complete run: (run id, 'imported' | 'skipped'). `log` (a logger)
    gets a line per stage written."""
    log = log or logging.getLogger("know.release")
    rel = inspect_release(path, stages, overrides, n_data)
    info = rel.run_info(n_data, file_sha256(path))
    run_id = release_run_id(info)
    name = Path(path).name
    if store.run_status(run_id) == "complete":
        log.info("%s: run %s already complete: skipped", name, run_id)
        return run_id, "skipped"
    while True:
        lease = store.lease_run(run_id, log=log)
        if lease is None:
            log.info("%s: run %s completed by another process: skipped", name, run_id)
            return run_id, "skipped"
        with lease:
            try:
                _write(store, rel, info, run_id, block_values, log)
                return run_id, "imported"
            except LeaseLost as e:  # another writer took it over: wait for it, as for any live writer
                log.warning("%s; waiting for that writer", e)


def _write(store: TrajectoryStore, rel: ReleaseFile, info: RunInfo, run_id: str, block_values: int, log) -> None:
    name = Path(rel.path).name
    store.begin_run(run_id, info, pool_layout(rel.pools), rel.stages)
    try:
        with open_mat(rel.path) as f:
            datasets = {p.key: f[p.key] for p in rel.pools}
            for k in range(rel.stages):
                s = file_stage(k, rel.stages)
                store.append_stage_blocks(run_id, k, _finite(stage_blocks(datasets, rel.pools, s, block_values),
                                                             name, s))
                log.info("%s: stage %d (file stage index %d, |D%d| = %d) written", name, k, s, k,
                         info.stage_subset_sizes[k])
        store.finish_run(run_id)
    except LeaseLost:
        raise  # the run is the new writer's now: not ours to mark failed
    except BaseException as e:
        store.fail_run(run_id, f"{type(e).__name__}: {e}")
        raise


def _finite(blocks, name: str, stage: int):
    for block in blocks:
        if not np.isfinite(block).all():
            raise NonFinite(f"{name}: file stage index {stage} holds NaN or inf weights; it cannot train KNOWN")
        yield block


__all__ = ["ReleaseFile", "open_mat", "inspect_release", "file_sha256", "release_run_id", "import_release_file"]
