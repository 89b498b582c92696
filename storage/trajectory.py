"""The Zarr v3 trajectory store: the only code that knows Zarr paths and layout.

Layout of a store (a local path or any fsspec URL, e.g. ``s3://bucket/prefix``)::

    runs/<run_id>/weights                 float32 (n_stages, n_params), chunks (1, chunk)
                                          row k = stage k (stage 0 = full data)
    runs/<run_id>            attrs        status, mode, model, dataset, sampling_rate, lr,
                                          batch_size, epochs_per_stage, seed,
                                          stage_subset_sizes, layout, created_at, versions, ...
    checkpoints/<ckpt_id>/weights         float32 (n_params,): pre-trained start points
    predictions/<run_id>/<predictor>/weights   float32 (n_steps, n_params)

Rows are preallocated and written one whole stage at a time as each snapshot is produced
(a row spans whole chunks, so one writer per run never shares a chunk with another).
`stages_written` counts the rows that hold data; `status` goes running -> complete, or
failed with the error. A run that is not `complete` is wiped and restarted by `begin_run`.

Example:
    >>> store = TrajectoryStore("/tmp/example.zarr")
    >>> store.list_runs()  # doctest: +SKIP
"""
from __future__ import annotations

import asyncio
import datetime as _dt
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd
import zarr
from zarr.core.buffer import Buffer
from zarr.storage import LocalStore
from zarr.storage._local import _atomic_write  # zarr is pinned to 3.1.x (pyproject)

from know_core.errors import StoreState
from know_core.layout import TensorSpec, layout_from_json, layout_size, layout_to_json
from know_core.train import AdamState

from .records import CheckpointInfo, CheckpointRecord, PredictionInfo, PredictionRecord, RunInfo, RunRecord

#: default chunk length along the parameter axis (16 MiB of float32). Chosen by
#: benchmarks/bench_store.py: rows write 1.1-1.5x faster than with 1M-value chunks (fewer files
#: and zarr calls) and reads are as fast; it equals PredictSpec.block_values (4M), so one
#: prediction block is one chunk per row, and a larger chunk would widen every block past it
#: (block_length). Models under 4M parameters get one chunk per row either way.
DEFAULT_CHUNK = 1 << 22

RUNS, CHECKPOINTS, PREDICTIONS = "runs", "checkpoints", "predictions"

#: files at least this large are preallocated before they are written (PreallocatingLocalStore)
PREALLOCATE_MIN_BYTES = 1 << 16

#: how rows are written: zarr's default (write_empty_chunks False) first compares every chunk
#: with the fill value, a full extra pass over each row, to skip all-NaN chunks that never
#: occur here (rows are finite weights). Turning it off: 1.2-1.5x faster row writes
#: (benchmarks/bench_store.py); the bytes read back are the same either way.
WRITE_CONFIG = {"write_empty_chunks": True}


class StoreError(StoreState, ValueError):
    """A problem with the store or a run in it; the message is one actionable line."""


def config_hash(config: dict[str, Any], length: int = 16) -> str:
    """Stable id of a config: sha256 of its canonical JSON."""
    blob = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def versions() -> dict[str, str]:
    """Package versions and git commit recorded with every run (provenance)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("know-pipeline", "torch", "zarr", "numpy", "prefect"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    head = Path(__file__).resolve().parents[1] / ".git" / "HEAD"
    try:
        ref = head.read_text().strip()
        if ref.startswith("ref: "):
            ref = (head.parent / ref[5:]).read_text().strip()
        out["git_commit"] = ref
    except OSError:
        pass
    return out


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _is_url(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


class PreallocatingLocalStore(LocalStore):
    """zarr's LocalStore, but each file is preallocated (posix_fallocate) before it is written,
    as numpy.tofile does. On ext4 a 16 MB chunk file then writes in ~4 ms instead of ~14 ms
    (measured; without it blocks are allocated page by page), and whole rows ~1.3x faster
    (bench_store.py). Writes stay atomic (zarr's temp file + rename); where the filesystem
    refuses fallocate, the file is written without it."""

    async def _set(self, key: str, value: Buffer, exclusive: bool = False) -> None:
        if not self._is_open:
            await self._open()
        self._check_writable()
        if not isinstance(value, Buffer):
            raise TypeError(f"PreallocatingLocalStore.set(): value must be a Buffer, got {type(value)}")
        await asyncio.to_thread(_put_preallocated, self.root / key, value, exclusive)


def _put_preallocated(path: Path, value: Buffer, exclusive: bool = False) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    view = memoryview(value.as_buffer_like()).cast("B")
    with _atomic_write(path, "wb", exclusive=exclusive) as f:
        if view.nbytes >= PREALLOCATE_MIN_BYTES:
            try:
                os.posix_fallocate(f.fileno(), 0, view.nbytes)
            except OSError:
                pass
        return f.write(view)


class TrajectoryStore:
    """A handle on one store. Cheap to create; safe to create in every worker."""

    def __init__(self, url: str | os.PathLike, storage_options: dict | None = None, chunk: int = DEFAULT_CHUNK,
                 compressors: Any = None):
        self.url = str(url)
        if not _is_url(self.url):
            p = Path(self.url.removeprefix("file://"))
            if p.exists() and not p.is_dir():
                raise StoreError(f"store path {p} is a file, not a Zarr store; pass a directory path or URL")
            self.url = str(p)
        if storage_options is None and self.url.startswith("s3://"):
            storage_options = s3_options_from_env()
        self.storage_options = storage_options
        self.chunk = int(chunk)
        self.compressors = compressors  # None: uncompressed (float weights barely compress)
        try:
            store = self.url if _is_url(self.url) else PreallocatingLocalStore(self.url)
            self.root = zarr.open_group(store, mode="a", storage_options=storage_options)
        except Exception as e:  # noqa: BLE001 - one line for any backend failure
            raise StoreError(f"cannot open store {self.url}: {type(e).__name__}: {e}") from e

    # -- groups ---------------------------------------------------------------------
    def prepare(self) -> None:
        """Create the parent groups; call once before fanning out writers."""
        for name in (RUNS, CHECKPOINTS, PREDICTIONS):
            self.root.require_group(name)

    def _group(self, path: str) -> zarr.Group | None:
        try:
            node = self.root[path]
        except KeyError:
            return None
        return node if isinstance(node, zarr.Group) else None

    def _array(self, path: str, shape: tuple[int, ...], attrs: dict, fill=np.nan, chunk: int | None = None) -> zarr.Array:
        chunks = (1,) * (len(shape) - 1) + (min(chunk or self.chunk, max(shape[-1], 1)),)
        return self.root.create_array(
            path, shape=shape, chunks=chunks, dtype="float32", fill_value=fill,
            compressors=self.compressors, attributes=attrs, overwrite=True, config=WRITE_CONFIG,
        )

    def _write_row(self, arr: zarr.Array, row: int, vector: np.ndarray) -> None:
        """arr[row, :] = vector. On a local store, one zarr call per chunk: zarr 3.1 writes a
        value shaped exactly like its chunk as is, but first copies a larger one into
        fill-valued chunk buffers (two more passes over the row); chunk by chunk, rows write
        ~1.5x faster (bench_store.py). Remote stores keep the single call, which uploads the
        chunks concurrently."""
        vector = np.asarray(vector, dtype=np.float32)
        if vector.shape != arr.shape[1:]:
            raise StoreError(f"a row of {arr.path} holds {arr.shape[-1]} values, got an array of shape {vector.shape}")
        arr = arr.with_config(WRITE_CONFIG)
        if _is_url(self.url):
            arr[row, :] = vector
            return
        step = arr.chunks[-1]
        for c0 in range(0, vector.shape[0], step):
            arr[row : row + 1, c0 : c0 + step] = vector[None, c0 : c0 + step]

    def _delete(self, path: str) -> None:
        parent, _, name = path.rpartition("/")
        grp = self.root[parent] if parent else self.root
        if name in grp:
            del grp[name]

    # -- runs -----------------------------------------------------------------------
    def run_attrs(self, run_id: str) -> dict[str, Any] | None:
        """The run's raw attrs (storage's own view; other layers use `run`)."""
        g = self._group(f"{RUNS}/{run_id}")
        return None if g is None else dict(g.attrs)

    def run(self, run_id: str) -> RunRecord | None:
        """The run's typed record, or None when the store has no such run."""
        attrs = self.run_attrs(run_id)
        return None if attrs is None else RunRecord.model_validate({"run_id": run_id, **attrs})

    def run_status(self, run_id: str) -> str | None:
        attrs = self.run_attrs(run_id)
        return None if attrs is None else attrs.get("status")

    def require_run(self, run_id: str, complete: bool = True) -> RunRecord:
        run = self.run(run_id)
        if run is None:
            raise StoreError(f"run {run_id!r} does not exist in store {self.url}; list runs with `know runs --store {self.url}`")
        if complete and not run.is_complete:
            raise StoreError(f"run {run_id!r} is {run.status!r}, not complete; finish it with `know collect` first")
        return run

    def begin_run(self, run_id: str, info: RunInfo | dict[str, Any], layout: list[TensorSpec], n_stages: int) -> zarr.Array:
        """(Re)create a run in state `running`, wiping any incomplete earlier attempt."""
        if self.run_status(run_id) == "complete":
            raise StoreError(f"run {run_id} is already complete; refusing to overwrite it")
        info = info if isinstance(info, RunInfo) else RunInfo.model_validate(info)
        self.root.require_group(RUNS)
        self._delete(f"{RUNS}/{run_id}")
        group = self.root.create_group(f"{RUNS}/{run_id}")
        arr = self._array(f"{RUNS}/{run_id}/weights", (n_stages, layout_size(layout)), {})
        group.update_attributes({
            **info.attrs(), "run_id": run_id, "status": "running", "stages_written": 0,
            "n_stages": n_stages, "n_params": layout_size(layout), "layout": json.loads(layout_to_json(layout)),
            "created_at": _now(), "versions": versions(),
        })
        return arr

    def append_stage(self, run_id: str, stage: int, vector: np.ndarray) -> None:
        """Write one whole snapshot row; stages must arrive in order."""
        group = self.root[f"{RUNS}/{run_id}"]
        written = group.attrs["stages_written"]
        if stage != written:
            raise StoreError(f"run {run_id}: got stage {stage}, expected stage {written}")
        self._write_row(group["weights"], stage, vector)
        group.attrs["stages_written"] = stage + 1

    def finish_run(self, run_id: str, **extra: Any) -> None:
        group = self.root[f"{RUNS}/{run_id}"]
        if group.attrs["stages_written"] != group.attrs["n_stages"]:
            raise StoreError(f"run {run_id}: {group.attrs['stages_written']} of {group.attrs['n_stages']} stages written")
        group.update_attributes({**extra, "status": "complete", "completed_at": _now()})

    def fail_run(self, run_id: str, error: str) -> None:
        g = self._group(f"{RUNS}/{run_id}")
        if g is not None and g.attrs.get("status") != "complete":
            g.update_attributes({"status": "failed", "error": error[:2000], "failed_at": _now()})

    def run_ids(self) -> list[str]:
        g = self._group(RUNS)
        return sorted(g.group_keys()) if g is not None else []

    def runs(self) -> list[RunRecord]:
        """Every run's record, in run-id order."""
        return [r for r in (self.run(run_id) for run_id in self.run_ids()) if r is not None]

    def list_runs(self) -> pd.DataFrame:
        """One row per run (RunRecord.summary: the layout and nested dicts are left out)."""
        return pd.DataFrame([r.summary() for r in self.runs()])

    def layout(self, run_id: str) -> list[TensorSpec]:
        return self.require_run(run_id, complete=False).layout

    def weights(self, run_id: str) -> zarr.Array:
        return self.root[f"{RUNS}/{run_id}/weights"]

    def trajectory(self, run_id: str):
        """The run's (n_stages, n_params) trajectory as a lazy dask array."""
        import dask.array as da

        return da.from_zarr(self.weights(run_id))

    def read_stages(self, run_id: str, stages=slice(None)) -> np.ndarray:
        return np.asarray(self.weights(run_id)[stages, :])

    def read_tensor(self, run_id: str, spec: TensorSpec, stages=slice(None)) -> np.ndarray:
        """Rows `stages` of one tensor, (n, size): reads only the chunks that hold it."""
        return np.asarray(self.weights(run_id)[stages, spec.offset : spec.stop])

    @staticmethod
    def block_length(chunk: int, max_values: int) -> int:
        """Largest multiple of the chunk length <= max_values (at least one chunk)."""
        return max(chunk, (max_values // chunk) * chunk)

    def iter_column_blocks(self, run_id: str, stages, max_values: int) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (c0, block) with block = weights[stages, c0:c0+L], L chunk-aligned.

        Memory stays bounded by `max_values` columns whatever the model size, and each
        block covers whole chunks, so the matching prediction write is whole-chunk too.
        """
        arr = self.weights(run_id)
        step = self.block_length(arr.chunks[-1], max_values)
        for c0 in range(0, arr.shape[1], step):
            yield c0, np.asarray(arr[stages, c0 : c0 + step])

    # -- checkpoints (pre-trained start points) ------------------------------------------
    def checkpoint_attrs(self, ckpt_id: str) -> dict[str, Any] | None:
        g = self._group(f"{CHECKPOINTS}/{ckpt_id}")
        return None if g is None else dict(g.attrs)

    def checkpoint(self, ckpt_id: str) -> CheckpointRecord | None:
        attrs = self.checkpoint_attrs(ckpt_id)
        return None if attrs is None else CheckpointRecord.model_validate({"ckpt_id": ckpt_id, "status": "", **attrs})

    def save_checkpoint(self, ckpt_id: str, vector: np.ndarray, layout: list[TensorSpec],
                        info: CheckpointInfo | dict[str, Any], optimizer: AdamState | None = None) -> None:
        """Write a checkpoint's weights (and, given, the Adam moments that produced them; the
        `carry` regime continues from them). It is marked complete only after every array."""
        attrs = (info if isinstance(info, CheckpointInfo) else CheckpointInfo.model_validate(info)).attrs()
        self.root.require_group(CHECKPOINTS)
        self._delete(f"{CHECKPOINTS}/{ckpt_id}")
        g = self.root.create_group(f"{CHECKPOINTS}/{ckpt_id}")
        arr = self._array(f"{CHECKPOINTS}/{ckpt_id}/weights", (1, layout_size(layout)), {})
        self._write_row(arr, 0, vector)
        extra: dict[str, Any] = {}
        if optimizer is not None:
            opt = self._array(f"{CHECKPOINTS}/{ckpt_id}/adam", (2, optimizer.exp_avg.shape[0]), {})
            self._write_row(opt, 0, optimizer.exp_avg)
            self._write_row(opt, 1, optimizer.exp_avg_sq)
            extra["adam_step"] = optimizer.step
        g.update_attributes({**attrs, **extra, "layout": json.loads(layout_to_json(layout)), "created_at": _now(),
                             "versions": versions(), "status": "complete"})

    def load_optimizer_state(self, ckpt_id: str) -> AdamState | None:
        """The Adam moments saved with a complete checkpoint, or None (none were saved)."""
        attrs = self.checkpoint_attrs(ckpt_id)
        if attrs is None or attrs.get("status") != "complete":
            raise StoreError(f"checkpoint {ckpt_id!r} not found in store {self.url}")
        path = f"{CHECKPOINTS}/{ckpt_id}/adam"
        if "adam_step" not in attrs or "adam" not in self.root[f"{CHECKPOINTS}/{ckpt_id}"]:
            return None
        arr = np.asarray(self.root[path][:, :])
        return AdamState(arr[0].copy(), arr[1].copy(), float(attrs["adam_step"]))

    def load_checkpoint(self, ckpt_id: str) -> tuple[np.ndarray, list[TensorSpec], dict[str, Any]]:
        attrs = self.checkpoint_attrs(ckpt_id)
        if attrs is None or attrs.get("status") != "complete":
            raise StoreError(f"checkpoint {ckpt_id!r} not found in store {self.url}")
        vec = np.asarray(self.root[f"{CHECKPOINTS}/{ckpt_id}/weights"][0, :])
        return vec, layout_from_json(attrs.pop("layout")), attrs

    # -- predictions ----------------------------------------------------------------
    def prediction_path(self, run_id: str, predictor: str) -> str:
        return f"{PREDICTIONS}/{run_id}/{predictor}"

    def prediction_attrs(self, run_id: str, predictor: str) -> dict[str, Any] | None:
        g = self._group(self.prediction_path(run_id, predictor))
        return None if g is None else dict(g.attrs)

    def prediction(self, run_id: str, name: str) -> PredictionRecord | None:
        """The typed record of prediction `name` of a run, or None."""
        attrs = self.prediction_attrs(run_id, name)
        if attrs is None:
            return None
        return PredictionRecord.model_validate({"run_id": run_id, "name": name, "status": "", "predictor": name,
                                                "factors": [], "steps": 0, **attrs})

    def prediction_names(self, run_id: str) -> list[str]:
        g = self._group(f"{PREDICTIONS}/{run_id}")
        return sorted(g.group_keys()) if g is not None else []

    def begin_prediction(self, run_id: str, predictor: str, n_steps: int, n_params: int,
                         info: PredictionInfo | dict[str, Any]) -> zarr.Array:
        attrs = (info if isinstance(info, PredictionInfo) else PredictionInfo.model_validate(info)).attrs()
        path = self.prediction_path(run_id, predictor)
        self.root.require_group(f"{PREDICTIONS}/{run_id}")
        self._delete(path)
        g = self.root.create_group(path)
        # same chunking as the run's weights, so column blocks map onto whole chunks of both
        arr = self._array(f"{path}/weights", (n_steps, n_params), {}, chunk=self.weights(run_id).chunks[-1])
        g.update_attributes({**attrs, "run_id": run_id, "predictor": predictor, "status": "running",
                        "created_at": _now(), "versions": versions()})
        return arr

    def finish_prediction(self, run_id: str, predictor: str, **extra: Any) -> None:
        self.root[self.prediction_path(run_id, predictor)].update_attributes({**extra, "status": "complete"})

    def drop_prediction(self, run_id: str, predictor: str) -> None:
        self._delete(self.prediction_path(run_id, predictor))

    def read_prediction(self, run_id: str, predictor: str, step: int) -> tuple[np.ndarray, dict[str, Any]]:
        """Prediction row `step` (1-based: step 1 = the first x(1/r) factor)."""
        attrs = self.prediction_attrs(run_id, predictor)
        if attrs is None or attrs.get("status") != "complete":
            have = [n for n in self.prediction_names(run_id)
                    if (self.prediction_attrs(run_id, n) or {}).get("status") == "complete"]
            hint = f" (it has: {', '.join(have)})" if have else ""
            raise StoreError(f"no complete prediction {predictor!r} for run {run_id}{hint}; run `know predict` first")
        arr = self.root[f"{self.prediction_path(run_id, predictor)}/weights"]
        if not 1 <= step <= arr.shape[0]:
            raise StoreError(f"step {step} out of range; prediction {predictor!r} has steps 1..{arr.shape[0]}")
        return np.asarray(arr[step - 1, :]), attrs


def s3_options_from_env() -> dict[str, Any] | None:
    """s3fs options from the usual AWS variables, plus AWS_ENDPOINT_URL for local servers."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("KNOW_S3_ENDPOINT_URL")
    return {"client_kwargs": {"endpoint_url": endpoint}} if endpoint else None


__all__ = ["TrajectoryStore", "StoreError", "config_hash", "versions", "DEFAULT_CHUNK", "RunInfo", "RunRecord",
           "PredictionInfo", "PredictionRecord", "CheckpointInfo", "CheckpointRecord"]
