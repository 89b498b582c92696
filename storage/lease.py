"""Leases: at most one live writer per run (or checkpoint) of a trajectory store.

storage.trajectory (TrajectoryStore.lease_run / lease_checkpoint) uses this module; nothing
above storage/ sees how a lease is kept. The protocol:

* Owner: ``host:pid:token``, the token random and new for every lease.
* Local store (a path): the lease is an exclusive ``flock`` on
  ``<store>/locks/<runs|checkpoints>/<id>.lock``. The file is created with O_CREAT and never
  deleted; it holds its last owner as JSON, for people. Taking the flock is atomic, and the
  kernel drops it when its process ends in any way (kill -9 included), so a dead writer's
  lease is free at once and a live writer's can never be taken: no clock and no pid guessing
  decide anything. (An O_EXCL-created file would outlive a killed owner and have to be stolen,
  and two stealers can race; a flock cannot be stolen. Over NFS, flock maps to NFS locks.)
* Every store: the run's record (its attrs) carries ``lease_owner`` and ``lease_heartbeat``
  (UTC ISO time). The holder writes them in ``begin_run``, refreshes the heartbeat on every
  ``append_stage`` and from a background thread every HEARTBEAT_S (10 s); ``finish_run`` and
  ``fail_run`` remove both (a complete run holds no lease fields, nor a stale ``error``).
* Remote store (an fsspec URL; no lock file): the record is the lease, a weaker guarantee. A
  lease is live while its heartbeat is younger than LEASE_TIMEOUT_S (60 s; KNOW_LEASE_TIMEOUT_S
  overrides), except that an owner on this host whose pid is gone is dead at once. A writer
  takes a free or dead lease by writing its owner into the record (a placeholder record if
  there is none), waiting CONFIRM_S and reading it back: it holds the lease if it is still the
  owner named there. Object stores have no atomic create-if-absent through zarr, so two writers
  that both read the old record and write more than CONFIRM_S apart could both start; every
  ``append_stage``/``finish_run`` checks the owner, so the one that lost raises LeaseLost at
  its next stage instead of writing on, and waits for the other.
* A writer that finds a live lease waits for it (polls every POLL_S): until the run is
  complete (it is then skipped) or the lease is free or dead (it then takes the lease over and
  restarts the run from scratch, saying so in the log). Nothing wipes a run under a live
  lease: ``begin_run`` without the lease refuses to.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import math
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: local stores fall back to the record lease
    fcntl = None  # type: ignore[assignment]

from know_core.errors import StoreState

#: a record lease whose heartbeat is older than this (seconds) is dead
LEASE_TIMEOUT_S = float(os.environ.get("KNOW_LEASE_TIMEOUT_S", "60"))
#: how often the holder refreshes its heartbeat from a background thread (seconds)
HEARTBEAT_S = float(os.environ.get("KNOW_LEASE_HEARTBEAT_S", "10"))
#: how often a waiting writer looks again (seconds)
POLL_S = 1.0
#: remote stores: how long a writer waits before reading its record lease back (seconds)
CONFIRM_S = 1.0

#: the lease fields of a record (the attrs a finished or failed run drops)
LEASE_FIELDS = ("lease_owner", "lease_heartbeat")
#: the store's folder (a Zarr group) of lock files: <store>/locks/<runs|checkpoints>/<id>.lock
LOCK_DIR = "locks"
#: a lock for code paths where no lease is held
NO_LOCK = contextlib.nullcontext()

_log = logging.getLogger("know.lease")


class LeaseLost(RuntimeError):
    """Another writer took over this lease: stop writing (the run is not ours to mark failed)."""


class LeaseBusy(StoreState):
    """A live writer holds the lease and the caller would not wait (any longer)."""


def lock_files_supported() -> bool:
    return fcntl is not None


def confirm_pause() -> None:
    """Remote stores: the pause between writing a record lease and reading it back."""
    time.sleep(CONFIRM_S)


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def age_s(iso: str | None) -> float:
    """Seconds since an ISO timestamp (inf when there is none or it does not parse)."""
    try:
        t = _dt.datetime.fromisoformat(str(iso))
    except (TypeError, ValueError):
        return math.inf
    if t.tzinfo is None:
        t = t.replace(tzinfo=_dt.timezone.utc)
    return (_dt.datetime.now(_dt.timezone.utc) - t).total_seconds()


@dataclass(frozen=True)
class Owner:
    host: str
    pid: int
    token: str

    @classmethod
    def new(cls) -> "Owner":
        return cls(socket.gethostname(), os.getpid(), secrets.token_hex(6))

    @classmethod
    def parse(cls, text: object) -> "Owner | None":
        try:
            host, pid, token = str(text).rsplit(":", 2)
            return cls(host, int(pid), token)
        except (TypeError, ValueError):
            return None

    def __str__(self) -> str:
        return f"{self.host}:{self.pid}:{self.token}"

    def dead_here(self) -> bool:
        """True when this owner ran on this host and its process no longer exists."""
        if self.host != socket.gethostname():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, someone else's
            return False
        return False


def record_lease_live(owner: object, heartbeat: object, timeout: float | None = None) -> bool:
    """Whether a record lease (owner text, heartbeat time) belongs to a live writer."""
    who = Owner.parse(owner) if owner else None
    if who is None or who.dead_here():
        return False
    return age_s(heartbeat) <= (LEASE_TIMEOUT_S if timeout is None else timeout)


class LockFile:
    """An exclusive flock on one file, held from `acquire` to `release` (or process exit)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.fd: int | None = None

    def acquire(self, owner: Owner) -> bool:
        """Take the lock without blocking; False when another open file holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        blob = json.dumps({"owner": str(owner), "host": owner.host, "pid": owner.pid, "token": owner.token,
                           "acquired_at": now_iso()}).encode()
        os.ftruncate(fd, 0)  # the same inode: renaming a new file over it would split the lock
        os.pwrite(fd, blob, 0)
        self.fd = fd
        return True

    def release(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)

    @staticmethod
    def holder(path: Path) -> str | None:
        """The owner named in a held lock file; None when the file is absent or not held."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                try:
                    return str(json.loads(os.pread(fd, 1 << 16, 0)).get("owner") or "another process")
                except (ValueError, AttributeError):
                    return "another process"  # its owner is writing it right now
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)


class Lease:
    """A held lease: the lock file (local stores), and a thread that refreshes the heartbeat.

    `lock` serialises the holder's writes of the record with the heartbeat thread's (each
    rewrites the whole attrs document). `previous` names the owner of a dead writer's lease
    that this one took over ('' when the run was free)."""

    def __init__(self, name: str, owner: Owner, lock_file: LockFile | None, beat: Callable[[], bool],
                 previous: str = "", heartbeat_s: float | None = None, on_release: Callable[[], None] | None = None):
        self.name, self.owner, self.previous = name, owner, previous
        self.lock = threading.RLock()
        self.lost = False
        self.released = False
        self._lock_file, self._beat, self._on_release = lock_file, beat, on_release
        self._every = HEARTBEAT_S if heartbeat_s is None else heartbeat_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"lease {name}", daemon=True)

    def start(self) -> "Lease":
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self._every):
            with self.lock:
                if self.released:
                    return
                try:
                    ok = self._beat()
                except Exception as e:  # noqa: BLE001 - flaky I/O: the next beat tries again
                    _log.warning("%s: lease heartbeat failed: %s: %s", self.name, type(e).__name__, e)
                    continue
                if not ok:
                    self.lost = True
                    _log.warning("%s: another writer took over the lease of %s", self.name, self.owner)
                    return

    def check(self) -> None:
        if self.lost:
            raise LeaseLost(f"{self.name}: another writer took over the lease of {self.owner}")

    def release(self) -> None:
        with self.lock:
            if self.released:
                return
            self.released = True
            self._stop.set()
            if self._lock_file is not None:
                self._lock_file.release()
        if self._on_release is not None:
            self._on_release()

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def acquire(try_once: Callable[[], tuple[Lease | None, str]], done: Callable[[], bool], name: str,
            log: logging.Logger | None = None, timeout: float | None = None, poll: float | None = None) -> Lease | None:
    """Take a lease, waiting while a live writer holds it. None when `done()` (the work is
    complete, e.g. the writer we waited for finished it). LeaseBusy after `timeout` seconds."""
    log = log or _log
    start, waited_for = time.monotonic(), None
    while True:
        if done():
            return None
        lease, holder = try_once()
        if lease is not None:
            if done():  # finished between our look and our lock
                lease.release()
                return None
            return lease.start()
        if timeout is not None and time.monotonic() - start >= timeout:
            raise LeaseBusy(f"{name} is being written by {holder}; gave up waiting after {timeout:g} s")
        if holder != waited_for:
            log.info("%s is being written by %s: waiting for it", name, holder)
            waited_for = holder
        time.sleep(POLL_S if poll is None else poll)


__all__ = ["LEASE_TIMEOUT_S", "HEARTBEAT_S", "POLL_S", "CONFIRM_S", "LEASE_FIELDS", "LOCK_DIR", "NO_LOCK", "Lease", "LeaseLost", "LeaseBusy",
           "LockFile", "Owner", "acquire", "age_s", "confirm_pause", "lock_files_supported", "now_iso", "record_lease_live"]
