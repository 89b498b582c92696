"""Exclusive file locks for products that several writers may make at once: a KNOWN folder,
a prediction, a fine-tune cell. Two variants of one study (running side by side), or two
`know` processes, that need the same product then make it once: the second waits, then finds
it done. The lock is an flock, so the kernel drops it when its holder dies (kill -9 included),
and it also separates two threads of one process (each opens the file itself).

    with exclusive(Path("results/known/.meta-train.lock"), "KNOWN results/known", log):
        ...  # check whether it is up to date, make it if not
"""
from __future__ import annotations

import fcntl
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

#: how often a waiting writer tries the lock again (s)
POLL_S = 0.2


@contextmanager
def exclusive(path: str | os.PathLike, what: str, log: Any = None) -> Iterator[None]:
    """Hold an exclusive flock on `path` (created with its folders) for the block. While
    another holder has it, wait; `log` (a logger) gets one line when waiting starts."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        waited = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not waited and log is not None:
                    log.info("%s is being made by another writer: waiting for it", what)
                waited = True
                time.sleep(POLL_S)  # a loop, not a blocking flock: Ctrl-C stays prompt
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


__all__ = ["exclusive", "POLL_S"]
