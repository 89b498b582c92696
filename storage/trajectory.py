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

One writer per run (and per checkpoint), enforced by a lease (protocol: storage/lease.py):
a writer takes `lease_run` before `begin_run`. On a local store the lease is an exclusive
flock on ``locks/<runs|checkpoints>/<id>.lock`` (free the moment its process dies); every
record also carries ``lease_owner`` (host:pid:token) and ``lease_heartbeat``, refreshed on
each `append_stage` and every 10 s, which on a remote store is the whole (weaker) lease:
dead 60 s after its last heartbeat, or at once when its pid on this host is gone. A writer
that finds a live lease waits, then skips the run once complete or takes the lease over.

Every chunk carries a crc32c checksum (the last codec; arrays written before it still read).
Reads of a complete run, prediction or checkpoint need every chunk present and intact: a
missing, truncated or checksum-failing chunk raises `DamagedRun` (one line naming the run,
the stage and the chunk file) and marks the item `damaged`, which, like any status but
`complete`, a re-collect wipes and rewrites. `verify` reads and checks every chunk.

Example:
    >>> store = TrajectoryStore("/tmp/example.zarr")
    >>> store.list_runs()  # doctest: +SKIP
"""
from __future__ import annotations

import asyncio
import contextlib
import datetime as _dt
import hashlib
import json
import os
from dataclasses import dataclass, field as dataclass_field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec
from zarr.errors import ContainsGroupError
from zarr.core.buffer import Buffer
from zarr.core.sync import sync as _zarr_sync
from zarr.storage import LocalStore
from zarr.storage._local import _atomic_write  # zarr is pinned to 3.1.x (pyproject)

from know_core.errors import StoreState, one_line
from know_core.layout import TensorSpec, layout_from_json, layout_size, layout_to_json
from know_core.train import AdamState

from . import lease as _lease
from .locks import exclusive
from .records import CheckpointInfo, CheckpointRecord, PredictionInfo, PredictionRecord, RunInfo, RunRecord

if TYPE_CHECKING:
    import pandas as pd

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


class DamagedRun(StoreError):
    """A chunk of a complete run, prediction or checkpoint is missing, truncated or fails its
    crc32c checksum: it is never read as data. The message is one line naming the run, the
    stage (row) and the chunk file.

    kind: run | prediction | checkpoint; run_id: the run's id (the checkpoint's id for a
    checkpoint); name: the prediction's name (the array's for a checkpoint); stage: the row
    (a prediction's step, 1-based) or None when the whole array is gone; path: the chunk key
    in the store; reason: what is wrong with it ("fails its checksum", "is missing", ...)."""

    def __init__(self, message: str, *, kind: str = "run", run_id: str = "", name: str = "",
                 stage: int | None = None, path: str = "", reason: str = ""):
        super().__init__(message)
        self.kind, self.run_id, self.name, self.stage, self.path, self.reason = kind, run_id, name, stage, path, reason

    def record(self) -> dict[str, Any]:
        """What the store keeps of the damage in the damaged item's attrs."""
        return {"kind": self.kind, "run_id": self.run_id, "name": self.name, "stage": self.stage,
                "path": self.path, "reason": self.reason}


@dataclass(frozen=True)
class _Held:
    """What a checked read reads (a run, a prediction of a run, a checkpoint): names it in a
    DamagedRun and says where its status lives."""

    kind: str  # run | prediction | checkpoint
    owner: str  # run id, or checkpoint id
    name: str = ""  # prediction name, or the checkpoint's array (weights | adam)
    target: bool = False  # a run written by `know trajectory` (it has a pre-trained start)

    @property
    def group(self) -> str:
        if self.kind == "run":
            return f"{RUNS}/{self.owner}"
        if self.kind == "prediction":
            return f"{PREDICTIONS}/{self.owner}/{self.name}"
        return f"{CHECKPOINTS}/{self.owner}"

    def damaged(self, url: str, stage: int | None, path: str, reason: str) -> DamagedRun:
        where = f"chunk {url.rstrip('/')}/{path} {reason}"
        if self.kind == "run":
            what = f"stage {stage}" if stage is not None else "its weights array"
            command = "know trajectory" if self.target else "know collect"
            message = (f"run {self.owner}: {what} is damaged ({where}); re-collect it (the same `{command}` "
                       f"command rewrites a damaged run) or delete {url.rstrip('/')}/{RUNS}/{self.owner}")
        elif self.kind == "prediction":
            what = f"step {stage}" if stage is not None else "its weights array"
            message = (f"run {self.owner}: prediction {self.name!r} {what} is damaged ({where}); run the same "
                       "`know predict` again to rewrite it")
        else:
            what = f"{self.name} row {stage}" if stage is not None else f"its {self.name} array"
            message = (f"checkpoint {self.owner}: {what} is damaged ({where}); run the same `know trajectory` "
                       "again to pre-train it anew")
        return DamagedRun(message, kind=self.kind, run_id=self.owner, name=self.name, stage=stage, path=path,
                          reason=reason)


def _recorded_damage(attrs: dict[str, Any], kind: str, owner: str, name: str = "") -> DamagedRun:
    """The DamagedRun that marked an item 'damaged' (as `mark_damaged` recorded it)."""
    rec = attrs.get("damage") or {}
    message = attrs.get("error") or f"{kind} {owner} {name}".strip() + " is damaged; write it again"
    return DamagedRun(one_line(message), kind=kind, run_id=owner, name=rec.get("name", name),
                      stage=rec.get("stage"), path=rec.get("path", ""), reason=rec.get("reason", ""))


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
    try:
        with _atomic_write(path, "wb", exclusive=exclusive) as f:
            if view.nbytes >= PREALLOCATE_MIN_BYTES:
                try:
                    os.posix_fallocate(f.fileno(), 0, view.nbytes)
                except OSError:
                    pass
            return f.write(view)
    except OSError as e:
        if e.filename is None:  # a failed write (ENOSPC, EDQUOT) names no file: name the one written
            e.filename = str(path)
        raise


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
            try:
                self.root = zarr.open_group(store, mode="a", storage_options=storage_options)
            except ContainsGroupError:  # another process created the root between zarr's check and write
                self.root = zarr.open_group(store, mode="a", storage_options=storage_options)
        except Exception as e:  # noqa: BLE001 - one line for any backend failure
            raise StoreError(f"cannot open store {self.url}: {type(e).__name__}: {e}") from e

    # -- groups ---------------------------------------------------------------------
    def prepare(self) -> None:
        """Create the parent groups; call once before fanning out writers."""
        for name in (RUNS, CHECKPOINTS, PREDICTIONS):
            self._require_group(name)

    def _require_group(self, path: str) -> zarr.Group:
        """`require_group` that survives another process creating the same group at the same
        moment: zarr checks that no node exists, then writes, so the slower of two writers gets
        ContainsGroupError for a group that is now there (two `know collect` on one store)."""
        try:
            return self.root.require_group(path)
        except ContainsGroupError:
            group = self._group(path)
            if group is None:
                raise
            return group

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
            compressors=self._bytes_codecs(), attributes=attrs, overwrite=True, config=WRITE_CONFIG,
        )

    def _bytes_codecs(self) -> tuple:
        """The array's bytes-to-bytes codecs: the configured compressors (none by default), then
        a crc32c checksum of every chunk as written, so a flipped or lost byte is an error on
        read and never data. Arrays written before carry none; they still read."""
        given = self.compressors
        if given is None:
            given = ()
        elif isinstance(given, str) and given == "auto":  # zarr's default compressor
            given = zarr.core.array.default_compressors_v3(zarr.core.dtype.parse_dtype("float32", zarr_format=3))
        elif isinstance(given, (dict, zarr.abc.codec.Codec)):
            given = (given,)
        given = tuple(c for c in given if not isinstance(c, Crc32cCodec) and c != {"name": "crc32c"})
        return (*given, Crc32cCodec())

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

    # -- checked reads: a damaged chunk is an error, never data --------------------------
    @staticmethod
    def _chunk_key(arr: zarr.Array, coords: tuple[int, ...]) -> str:
        return f"{arr.path}/{arr.metadata.chunk_key_encoding.encode_chunk_key(coords)}"

    @staticmethod
    def _listing(arr: zarr.Array) -> set[str]:
        """Every key stored under the array: one listing (a directory walk, one S3 LIST)."""
        async def keys() -> set[str]:
            return {k async for k in arr.store.list_prefix(f"{arr.path}/")}

        return _zarr_sync(keys())

    def _node(self, held: _Held, path: str) -> zarr.Array:
        """The array at `path` of a complete item; its absence is damage, not a KeyError."""
        try:
            node = self.root[path]
        except KeyError:
            node = None
        if not isinstance(node, zarr.Array):
            raise self._report(held.damaged(self.url, None, f"{path}/zarr.json", "is missing"))
        return node

    @staticmethod
    def _cells(arr: zarr.Array, stages, c0: int, c1: int) -> tuple[np.ndarray, range]:
        """The rows `stages` selects and the column-chunk indices [c0, c1) spans."""
        rows = np.atleast_1d(np.arange(arr.shape[0])[stages])
        step = arr.chunks[-1]
        return rows, range(c0 // step, -(-c1 // step) if c1 > c0 else c0 // step)

    def _read(self, held: _Held, arr: zarr.Array, stages, c0: int = 0, c1: int | None = None,
              complete: bool = True, listing: set[str] | None = None, row_base: int = 0) -> np.ndarray:
        """arr[stages, c0:c1], or a DamagedRun naming the first bad chunk. A complete item must
        hold every chunk it is read from (zarr would fill a missing one with NaN); a chunk that
        does not decode (truncated, crc32c mismatch) is damage whatever the item's status.
        `listing` reuses one listing over many reads; `row_base` numbers rows in messages."""
        c1 = arr.shape[-1] if c1 is None else min(c1, arr.shape[-1])
        rows, cols = self._cells(arr, stages, c0, c1)
        if complete:
            have = self._listing(arr) if listing is None else listing
            for r in rows:
                for j in cols:
                    key = self._chunk_key(arr, (int(r), j))
                    if key not in have:
                        raise self._report(held.damaged(self.url, int(r) + row_base, key, "is missing"))
        try:
            return np.asarray(arr[stages, c0:c1])
        except (OSError, MemoryError):
            raise  # I/O trouble (permissions, network) is not damage
        except Exception as e:  # noqa: BLE001 - zarr raises ValueError/RuntimeError for bad chunk bytes
            damage = self._locate(held, arr, rows, cols, row_base)
            if damage is None:
                raise
            raise self._report(damage) from e

    def _locate(self, held: _Held, arr: zarr.Array, rows: np.ndarray, cols: range, row_base: int) -> DamagedRun | None:
        """Read the chunks one by one (only after a read failed) to name the first bad one."""
        step, n = arr.chunks[-1], arr.shape[-1]
        for r in rows:
            for j in cols:
                try:
                    arr[int(r) : int(r) + 1, j * step : min((j + 1) * step, n)]
                except (OSError, MemoryError):
                    raise
                except Exception as e:  # noqa: BLE001
                    key = self._chunk_key(arr, (int(r), j))
                    return held.damaged(self.url, int(r) + row_base, key, self._reason(arr, key, e))
        return None

    @staticmethod
    def _reason(arr: zarr.Array, key: str, error: Exception) -> str:
        """Why a chunk does not decode, in a few words."""
        codecs = arr.metadata.codecs
        if all(type(c).__name__ in ("BytesCodec", "Crc32cCodec") for c in codecs):  # fixed size when stored
            expected = int(np.prod(arr.chunks)) * np.dtype(arr.dtype).itemsize
            expected += 4 * sum(isinstance(c, Crc32cCodec) for c in codecs)
            try:
                size = _zarr_sync(arr.store.getsize(key))
            except Exception:  # noqa: BLE001
                size = None
            if size is not None and size != expected:
                return f"is truncated ({size} of {expected} bytes)" if size < expected else \
                    f"has the wrong size ({size} bytes, not {expected})"
        if "checksum" in str(error):
            return "fails its checksum"
        return f"cannot be decoded ({type(error).__name__}: {one_line(error)})"

    def _report(self, damage: DamagedRun) -> DamagedRun:
        """Mark the damaged item (best effort: a read-only store stays as it is) and return the error."""
        try:
            self.mark_damaged(damage)
        except Exception:  # noqa: BLE001 - the one-line error matters more than the mark
            pass
        return damage

    def mark_damaged(self, damage: DamagedRun) -> bool:
        """Set a complete run, prediction or checkpoint to status 'damaged', keeping the one-line
        error and what was damaged; a re-collect (re-predict, re-pre-train) then rewrites it,
        as it rewrites any item that is not complete. False when nothing was marked."""
        held = _Held(damage.kind, damage.run_id, damage.name if damage.kind == "prediction" else "")
        g = self._group(held.group)
        if g is None or g.attrs.get("status") != "complete":
            return False
        g.update_attributes({"status": "damaged", "error": str(damage)[:2000], "damaged_at": _now(),
                             "damage": damage.record()})
        return True

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
        if complete and run.status == "damaged":
            raise _recorded_damage(self.run_attrs(run_id) or {}, "run", run_id)
        if complete and not run.is_complete:
            raise StoreError(f"run {run_id!r} is {run.status!r}, not complete; finish it with `know collect` first")
        return run

    def begin_run(self, run_id: str, info: RunInfo | dict[str, Any], layout: list[TensorSpec], n_stages: int) -> zarr.Array:
        """(Re)create a run in state `running`, wiping any incomplete earlier attempt and its
        error. Holding the run's lease (`lease_run`), the record names it; without the lease,
        a run that another live writer holds is never wiped (StoreError)."""
        path = f"{RUNS}/{run_id}"
        if self.run_status(run_id) == "complete":
            raise StoreError(f"run {run_id} is already complete; refusing to overwrite it")
        lease = self._held_lease(path)
        if lease is None:
            holder = self._live_holder(path)
            if holder is not None:
                raise StoreError(f"run {run_id} is being written by {holder}; refusing to wipe it "
                                 "(wait for that process to end, or stop it)")
        info = info if isinstance(info, RunInfo) else RunInfo.model_validate(info)
        with self._lease_lock(lease):
            if lease is not None and self._lock_path(path) is None:  # remote: the record is the lease
                self._fence(lease, self.run_attrs(run_id) or {})
            self._require_group(RUNS)
            group = self._group(path)
            if group is None:
                self._delete(path)
                group = self.root.create_group(path)
            else:  # keep the node (on a remote store its attrs hold the lease), drop its arrays
                for name in list(group.keys()):
                    self._delete(f"{path}/{name}")
            arr = self._array(f"{path}/weights", (n_stages, layout_size(layout)), {})
            self.root[path].attrs.put({  # every attr replaced: nothing of an earlier attempt stays
                **info.attrs(), "run_id": run_id, "status": "running", "stages_written": 0,
                "n_stages": n_stages, "n_params": layout_size(layout), "layout": json.loads(layout_to_json(layout)),
                "created_at": _now(), "versions": versions(), **self._lease_fields(lease),
            })
        return arr

    def append_stage(self, run_id: str, stage: int, vector: np.ndarray) -> None:
        """Write one whole snapshot row; stages must arrive in order. Holding the lease, the
        heartbeat is refreshed, and the record must still name this writer (LeaseLost if
        another one took the run over)."""
        path = f"{RUNS}/{run_id}"
        lease = self._held_lease(path)
        with self._lease_lock(lease):
            group = self.root[path]
            self._fence(lease, group.attrs)
            written = group.attrs["stages_written"]
            if stage != written:
                raise StoreError(f"run {run_id}: got stage {stage}, expected stage {written}")
            self._write_row(group["weights"], stage, vector)
            if lease is not None:
                group = self.root[path]
                self._fence(lease, group.attrs)
            group.update_attributes({"stages_written": stage + 1, **self._lease_fields(lease)})

    def append_stage_blocks(self, run_id: str, stage: int, blocks) -> None:
        """append_stage for a row too large to hold: `blocks` yields consecutive pieces of the
        row (any lengths, in column order). Each chunk is written once, whole, as soon as the
        pieces fill it, so memory is one chunk plus one piece. The row counts as written (and
        the record is fenced, as in append_stage) only after its last column; the lease lock is
        not held in between, so the heartbeat goes on while the pieces are produced."""
        path = f"{RUNS}/{run_id}"
        lease = self._held_lease(path)
        with self._lease_lock(lease):
            group = self.root[path]
            self._fence(lease, group.attrs)
            written = group.attrs["stages_written"]
        if stage != written:
            raise StoreError(f"run {run_id}: got stage {stage}, expected stage {written}")
        arr = self.weights(run_id).with_config(WRITE_CONFIG)
        n, step = arr.shape[1], arr.chunks[-1]
        buf, fill, c0 = np.empty(min(step, n), dtype=np.float32), 0, 0  # buf[:fill] = columns c0.. of the row
        for block in blocks:
            block = np.asarray(block, dtype=np.float32).reshape(-1)
            i = 0
            while i < block.size:
                need = min(step, n - c0)  # the chunk at c0 (the last one may be shorter)
                if need == 0:
                    raise StoreError(f"run {run_id}: stage {stage} got more than its {n} values")
                if fill == 0 and block.size - i >= need:  # a whole chunk inside this piece: no copy
                    arr[stage : stage + 1, c0 : c0 + need] = block[None, i : i + need]
                    i, c0 = i + need, c0 + need
                    continue
                take = min(need - fill, block.size - i)
                buf[fill : fill + take] = block[i : i + take]
                fill, i = fill + take, i + take
                if fill == need:
                    arr[stage : stage + 1, c0 : c0 + need] = buf[None, :need]
                    c0, fill = c0 + need, 0
        if c0 != n:
            raise StoreError(f"run {run_id}: stage {stage} got {c0 + fill} of its {n} values")
        with self._lease_lock(lease):
            group = self.root[path]
            self._fence(lease, group.attrs)
            group.update_attributes({"stages_written": stage + 1, **self._lease_fields(lease)})

    def finish_run(self, run_id: str, **extra: Any) -> None:
        """Mark a fully written run complete; its lease fields and any stale error are dropped."""
        path = f"{RUNS}/{run_id}"
        lease = self._held_lease(path)
        with self._lease_lock(lease):
            group = self.root[path]
            attrs = dict(group.attrs)
            self._fence(lease, attrs)
            if attrs["stages_written"] != attrs["n_stages"]:
                raise StoreError(f"run {run_id}: {attrs['stages_written']} of {attrs['n_stages']} stages written")
            for key in (*_lease.LEASE_FIELDS, "error", "failed_at"):
                attrs.pop(key, None)
            group.attrs.put({**attrs, **extra, "status": "complete", "completed_at": _now()})

    def fail_run(self, run_id: str, error: str) -> None:
        """Mark a run failed with its error; never a complete run, nor one that another live
        writer holds (a writer that lost its lease leaves the run to the new one)."""
        path = f"{RUNS}/{run_id}"
        lease = self._held_lease(path)
        with self._lease_lock(lease):
            g = self._group(path)
            if g is None or g.attrs.get("status") == "complete":
                return
            attrs = dict(g.attrs)
            owner = attrs.get("lease_owner")
            if lease is not None:
                if owner and owner != str(lease.owner):
                    return
            elif self._live_holder(path) is not None:
                return
            for key in _lease.LEASE_FIELDS:
                attrs.pop(key, None)
            g.attrs.put({**attrs, "status": "failed", "error": error[:2000], "failed_at": _now()})

    # -- leases: one live writer per run or checkpoint (the protocol: storage/lease.py) -----
    def lease_run(self, run_id: str, log: Any = None, timeout: float | None = None) -> _lease.Lease | None:
        """Take the lease of a run before (re)writing it, waiting while a live writer holds it.
        None when the run is complete (or became complete while waiting): skip it. Otherwise
        the Lease (a context manager): hold it from `begin_run` to `finish_run`/`fail_run`.
        A dead writer's lease is taken over (`lease.previous` names it). `log` gets a line when
        waiting starts; `timeout` (s): LeaseBusy instead of waiting longer."""
        return self._lease(f"{RUNS}/{run_id}", f"run {run_id}", lambda: self.run_status(run_id) == "complete",
                           {"run_id": run_id, "status": "running", "stages_written": 0, "n_stages": 0}, log, timeout)

    def lease_checkpoint(self, ckpt_id: str, done: Any = None, log: Any = None,
                         timeout: float | None = None) -> _lease.Lease | None:
        """As lease_run, for pre-training checkpoint `ckpt_id`; `done()` (default: it is
        complete) says when it needs no writing."""
        if done is None:
            def done() -> bool:
                return (self.checkpoint_attrs(ckpt_id) or {}).get("status") == "complete"
        return self._lease(f"{CHECKPOINTS}/{ckpt_id}", f"checkpoint {ckpt_id}", done, {"status": "running"}, log,
                           timeout)

    def lease_holder(self, kind: str, item_id: str) -> str | None:
        """`host:pid:token` of the live writer holding a run's (kind 'runs') or checkpoint's
        ('checkpoints') lease, or None."""
        return self._live_holder(f"{kind}/{item_id}")

    def _lease(self, path: str, name: str, done, placeholder: dict[str, Any], log, timeout) -> _lease.Lease | None:
        if self._held_lease(path) is not None:
            raise StoreError(f"{name}: this store handle already holds its lease")
        lease = _lease.acquire(lambda: self._try_lease(path, name, placeholder), done, name, log, timeout)
        if lease is not None:
            table = self._held_leases()
            table[path] = lease
            lease._on_release = lambda: table.pop(path, None) if table.get(path) is lease else None
        return lease

    def _held_leases(self) -> dict[str, _lease.Lease]:
        return self.__dict__.setdefault("_leases", {})

    def _held_lease(self, path: str) -> _lease.Lease | None:
        lease = self._held_leases().get(path)
        return lease if lease is not None and not lease.released else None

    @staticmethod
    def _lease_lock(lease: _lease.Lease | None):
        return _lease.NO_LOCK if lease is None else lease.lock

    @staticmethod
    def _lease_fields(lease: _lease.Lease | None) -> dict[str, str]:
        return {} if lease is None else {"lease_owner": str(lease.owner), "lease_heartbeat": _lease.now_iso()}

    @staticmethod
    def _fence(lease: _lease.Lease | None, attrs) -> None:
        """LeaseLost unless the record still names the lease (no-op without one)."""
        if lease is None:
            return
        if attrs.get("lease_owner") != str(lease.owner):
            lease.lost = True
        lease.check()

    def _lock_path(self, path: str) -> Path | None:
        """<store>/locks/<path>.lock on a local store; None on a remote one (record lease only)."""
        if _is_url(self.url) or not _lease.lock_files_supported():
            return None
        return Path(self.url) / _lease.LOCK_DIR / f"{path}.lock"

    def _ensure_lock_group(self) -> None:
        """locks/ is a group, so the store's tree stays plain Zarr (local stores only)."""
        if not (Path(self.url) / _lease.LOCK_DIR / "zarr.json").exists():
            self._require_group(_lease.LOCK_DIR)

    def _live_holder(self, path: str) -> str | None:
        """The live writer holding the lease of `path` (runs/<id>, checkpoints/<id>), or None."""
        lock = self._lock_path(path)
        if lock is not None:
            return _lease.LockFile.holder(lock)
        attrs = self._attrs_at(path)
        if attrs.get("status") == "complete":
            return None
        owner = attrs.get("lease_owner")
        return str(owner) if _lease.record_lease_live(owner, attrs.get("lease_heartbeat")) else None

    def _try_lease(self, path: str, name: str, placeholder: dict[str, Any]) -> tuple[_lease.Lease | None, str]:
        """One attempt at the lease of `path`: (the Lease, '') or (None, who holds it)."""
        owner = _lease.Owner.new()
        lock = self._lock_path(path)
        lock_file = None
        if lock is not None:  # local: an exclusive flock, dropped by the kernel when its holder dies
            self._ensure_lock_group()
            lock_file = _lease.LockFile(lock)
            if not lock_file.acquire(owner):
                return None, _lease.LockFile.holder(lock) or "another process"
            try:
                attrs = self._attrs_at(path)
            except BaseException:
                lock_file.release()
                raise
        else:  # remote: write the record lease, read it back after a pause
            g = self._group(path)
            attrs = {} if g is None else dict(g.attrs)
            current = attrs.get("lease_owner")
            if attrs.get("status") != "complete" and _lease.record_lease_live(current, attrs.get("lease_heartbeat")):
                return None, str(current)
            fields = {"lease_owner": str(owner), "lease_heartbeat": _lease.now_iso()}
            if g is None:
                self._require_group(path.rpartition("/")[0])
                g = self._require_group(path)
                g.update_attributes({**placeholder, **fields} if not g.attrs else fields)
            else:
                g.update_attributes(fields)
            _lease.confirm_pause()
            now = self._attrs_at(path).get("lease_owner")
            if now != str(owner):
                return None, str(now or "another writer")
        previous = attrs.get("lease_owner") if attrs.get("status") != "complete" else None
        previous = str(previous) if previous and previous != str(owner) else ""
        return _lease.Lease(name, owner, lock_file, beat=lambda: self._beat(path, owner, remote=lock is None),
                            previous=previous), ""

    def _attrs_at(self, path: str) -> dict[str, Any]:
        g = self._group(path)
        return {} if g is None else dict(g.attrs)

    def _beat(self, path: str, owner: _lease.Owner, remote: bool) -> bool:
        """The heartbeat: refresh the record's lease_heartbeat while it names `owner`. False
        when the lease was lost (remote stores: the record names another writer)."""
        g = self._group(path)
        if g is None or g.attrs.get("status") == "complete":
            return True
        current = g.attrs.get("lease_owner")
        if current == str(owner):
            g.update_attributes({"lease_heartbeat": _lease.now_iso()})
            return True
        return not (remote and current)

    def run_ids(self) -> list[str]:
        g = self._group(RUNS)
        return sorted(g.group_keys()) if g is not None else []

    def runs(self) -> list[RunRecord]:
        """Every run's record, in run-id order."""
        return [r for r in (self.run(run_id) for run_id in self.run_ids()) if r is not None]

    def list_runs(self) -> pd.DataFrame:
        """One row per run (RunRecord.summary: the layout and nested dicts are left out)."""
        import pandas as pd  # here, not at the top: a prediction process never needs pandas (~40 MB)

        return pd.DataFrame([r.summary() for r in self.runs()])

    def layout(self, run_id: str) -> list[TensorSpec]:
        return self.require_run(run_id, complete=False).layout

    def weights(self, run_id: str) -> zarr.Array:
        return self.root[f"{RUNS}/{run_id}/weights"]

    def trajectory(self, run_id: str):
        """The run's (n_stages, n_params) trajectory as a lazy dask array."""
        import dask.array as da

        return da.from_zarr(self.weights(run_id))

    def _run_source(self, run_id: str) -> tuple[_Held, zarr.Array, bool]:
        """(what it is, its weights, whether every chunk must be there) for a checked read of a
        run. A run marked damaged is read as a complete one: its intact chunks still read (a
        tensor elsewhere in the row), its damaged ones raise again."""
        attrs = self.run_attrs(run_id)
        if attrs is None:
            raise StoreError(f"run {run_id!r} does not exist in store {self.url}; list runs with `know runs --store {self.url}`")
        held = _Held("run", run_id, target=bool(attrs.get("start")))
        complete = attrs.get("status") in ("complete", "damaged")
        arr = self._node(held, f"{RUNS}/{run_id}/weights") if complete else self.weights(run_id)
        return held, arr, complete

    def read_stages(self, run_id: str, stages=slice(None)) -> np.ndarray:
        """Rows `stages` of the run's weights. For a complete run every chunk must be there and
        decode (crc32c): otherwise a DamagedRun names the stage and chunk, and the run is marked
        damaged. Rows of an unfinished run not yet written read as NaN."""
        held, arr, complete = self._run_source(run_id)
        return self._read(held, arr, stages, complete=complete)

    def read_tensor(self, run_id: str, spec: TensorSpec, stages=slice(None)) -> np.ndarray:
        """Rows `stages` of one tensor, (n, size): reads (and checks) only the chunks that hold it."""
        held, arr, complete = self._run_source(run_id)
        return self._read(held, arr, stages, spec.offset, spec.stop, complete=complete)

    @staticmethod
    def block_length(chunk: int, max_values: int) -> int:
        """Largest multiple of the chunk length <= max_values (at least one chunk)."""
        return max(chunk, (max_values // chunk) * chunk)

    def iter_column_blocks(self, run_id: str, stages, max_values: int) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (c0, block) with block = weights[stages, c0:c0+L], L chunk-aligned.

        Memory stays bounded by `max_values` columns whatever the model size, and each
        block covers whole chunks, so the matching prediction write is whole-chunk too.
        Blocks are checked as read_stages checks rows (one chunk listing for all of them).
        """
        held, arr, complete = self._run_source(run_id)
        listing = self._listing(arr) if complete else None
        step = self.block_length(arr.chunks[-1], max_values)
        for c0 in range(0, arr.shape[1], step):
            yield c0, self._read(held, arr, stages, c0, c0 + step, complete=complete, listing=listing)

    def column_reader(self, run_id: str):
        """(chunk length, read) for block reads of one run: read(c0, c1) = weights[:, c0:c1],
        checked as read_stages checks rows, with one chunk listing for every read. Rows are read
        one at a time into the result, so a read holds one row's chunks beside it, not all."""
        held, arr, complete = self._run_source(run_id)
        listing = self._listing(arr) if complete else None

        def read(c0: int, c1: int) -> np.ndarray:
            c1 = min(c1, arr.shape[-1])
            out = np.empty((arr.shape[0], c1 - c0), dtype=arr.dtype)
            for r in range(arr.shape[0]):
                out[r] = self._read(held, arr, slice(r, r + 1), c0, c1, complete=complete, listing=listing,
                                    row_base=0)[0]
            return out

        return arr.chunks[-1], read

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
        self._require_group(CHECKPOINTS)
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
        attrs = self._complete_checkpoint(ckpt_id)
        path = f"{CHECKPOINTS}/{ckpt_id}/adam"
        if "adam_step" not in attrs:
            return None
        held = _Held("checkpoint", ckpt_id, "adam")
        arr = self._read(held, self._node(held, path), slice(None))
        return AdamState(arr[0].copy(), arr[1].copy(), float(attrs["adam_step"]))

    def load_checkpoint(self, ckpt_id: str) -> tuple[np.ndarray, list[TensorSpec], dict[str, Any]]:
        """(weights, layout, attrs) of a complete checkpoint; a missing, truncated or corrupt
        chunk is a DamagedRun (and marks the checkpoint damaged)."""
        attrs = self._complete_checkpoint(ckpt_id)
        held = _Held("checkpoint", ckpt_id, "weights")
        vec = self._read(held, self._node(held, f"{CHECKPOINTS}/{ckpt_id}/weights"), 0)
        return vec, layout_from_json(attrs.pop("layout")), attrs

    def _complete_checkpoint(self, ckpt_id: str) -> dict[str, Any]:
        attrs = self.checkpoint_attrs(ckpt_id)
        if attrs is not None and attrs.get("status") == "damaged":
            raise _recorded_damage(attrs, "checkpoint", ckpt_id)
        if attrs is None or attrs.get("status") != "complete":
            raise StoreError(f"checkpoint {ckpt_id!r} not found in store {self.url}")
        return attrs

    def checkpoint_ids(self) -> list[str]:
        g = self._group(CHECKPOINTS)
        return sorted(g.group_keys()) if g is not None else []

    # -- predictions ----------------------------------------------------------------
    def prediction_path(self, run_id: str, predictor: str) -> str:
        return f"{PREDICTIONS}/{run_id}/{predictor}"

    def prediction_lock(self, run_id: str, predictor: str, log: Any = None):
        """A context manager held while checking and (re)writing one prediction, so that two
        writers of the same prediction (two study variants on one target) make it once. On a
        local store an flock on locks/predictions/<run>/<name>.lock; on a remote one nothing
        (predictions there have one writer per experiment)."""
        lock = self._lock_path(self.prediction_path(run_id, predictor))
        if lock is None:
            return contextlib.nullcontext()
        self._ensure_lock_group()
        return exclusive(lock, f"prediction {predictor} of run {run_id}", log)

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
        self._require_group(f"{PREDICTIONS}/{run_id}")
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
        if attrs is not None and attrs.get("status") == "damaged":
            raise _recorded_damage(attrs, "prediction", run_id, predictor)
        if attrs is None or attrs.get("status") != "complete":
            have = [n for n in self.prediction_names(run_id)
                    if (self.prediction_attrs(run_id, n) or {}).get("status") == "complete"]
            hint = f" (it has: {', '.join(have)})" if have else ""
            raise StoreError(f"no complete prediction {predictor!r} for run {run_id}{hint}; run `know predict` first")
        held = _Held("prediction", run_id, predictor)
        arr = self._node(held, f"{self.prediction_path(run_id, predictor)}/weights")
        if not 1 <= step <= arr.shape[0]:
            raise StoreError(f"step {step} out of range; prediction {predictor!r} has steps 1..{arr.shape[0]}")
        return self._read(held, arr, step - 1, row_base=1), attrs

    # -- verification ---------------------------------------------------------------
    def _verify_array(self, held: _Held, path: str, row_base: int = 0, max_values: int = 1 << 24) -> DamagedRun | None:
        """Read every chunk of one complete array (a row block at a time); the damage found, or None."""
        try:
            arr = self._node(held, path)
            listing = self._listing(arr)
            step = self.block_length(arr.chunks[-1], max_values)
            for r in range(arr.shape[0]):
                for c0 in range(0, arr.shape[1], step):
                    self._read(held, arr, r, c0, c0 + step, listing=listing, row_base=row_base)
        except DamagedRun as e:
            return e
        return None

    def verify(self) -> Verification:
        """Read every chunk of every complete run, prediction and checkpoint. Each damaged one
        (a missing, truncated or checksum-failing chunk) is marked 'damaged' with its one-line
        error, so a re-collect rewrites it; items already marked damaged are reported as such."""
        out = Verification()
        for run in self.runs():
            if run.status == "damaged":
                out.damaged.append(_recorded_damage(self.run_attrs(run.run_id) or {}, "run", run.run_id))
            elif run.is_complete:
                out.runs += 1
                damage = self._verify_array(_Held("run", run.run_id, target=bool(run.start)), f"{RUNS}/{run.run_id}/weights")
                if damage is not None:
                    out.damaged.append(damage)
            for name in self.prediction_names(run.run_id):
                attrs = self.prediction_attrs(run.run_id, name) or {}
                if attrs.get("status") == "damaged":
                    out.damaged.append(_recorded_damage(attrs, "prediction", run.run_id, name))
                elif attrs.get("status") == "complete":
                    out.predictions += 1
                    damage = self._verify_array(_Held("prediction", run.run_id, name),
                                                f"{self.prediction_path(run.run_id, name)}/weights", row_base=1)
                    if damage is not None:
                        out.damaged.append(damage)
        for ckpt in self.checkpoint_ids():
            attrs = self.checkpoint_attrs(ckpt) or {}
            if attrs.get("status") == "damaged":
                out.damaged.append(_recorded_damage(attrs, "checkpoint", ckpt))
            elif attrs.get("status") == "complete":
                out.checkpoints += 1
                arrays = ["weights"] + (["adam"] if "adam_step" in attrs else [])
                for name in arrays:
                    damage = self._verify_array(_Held("checkpoint", ckpt, name), f"{CHECKPOINTS}/{ckpt}/{name}")
                    if damage is not None:
                        out.damaged.append(damage)
                        break
        return out


@dataclass
class Verification:
    """What `TrajectoryStore.verify` read: how many complete runs, predictions and checkpoints,
    and the damage found (one DamagedRun per damaged item, in store order)."""

    runs: int = 0
    predictions: int = 0
    checkpoints: int = 0
    damaged: list[DamagedRun] = dataclass_field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.damaged


def s3_options_from_env() -> dict[str, Any] | None:
    """s3fs options from the usual AWS variables, plus AWS_ENDPOINT_URL for local servers."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("KNOW_S3_ENDPOINT_URL")
    return {"client_kwargs": {"endpoint_url": endpoint}} if endpoint else None


__all__ = ["TrajectoryStore", "StoreError", "DamagedRun", "Verification", "config_hash", "versions", "DEFAULT_CHUNK", "RunInfo", "RunRecord",
           "PredictionInfo", "PredictionRecord", "CheckpointInfo", "CheckpointRecord"]
