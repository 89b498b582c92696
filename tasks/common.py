"""Shared task plumbing: thread settings, retry policy, logging outside a run."""
from __future__ import annotations

import errno
import logging
import os

import torch

from pydantic import ValidationError

from know_core.errors import BadInput, KnowError  # noqa: F401 - BadInput re-exported for flows

#: errors that a retry cannot fix: domain errors (bad input, missing data, store state) and
#: bugs (a KeyError or ValueError fails the same way again); retries are for crashes and I/O
NOT_RETRYABLE = (KnowError, ValidationError, ValueError, KeyError, TypeError, AttributeError)


def retry_unless_bad_input(task, task_run, state) -> bool:
    """retry_condition_fn: retry crashes and flaky I/O, not bad configs."""
    try:
        state.result()
    except NOT_RETRYABLE:
        return False
    except OSError as e:  # a full, read-only or forbidden disk stays so: retry other I/O errors only
        return e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES)
    except Exception:  # noqa: BLE001
        return True
    return True


def set_torch_threads(threads: int = 1) -> int:
    """Torch intra-op threads for a task; KNOW_TORCH_THREADS overrides.

    Fanned-out tasks use 1: on small models two threads per run were ~10x slower than one
    on the 2-core CI machine, and parallelism comes from running tasks side by side.
    A task that runs alone (pre-training, the target trajectory, prediction) passes 0 for
    every core: a ~170k-parameter ResNet fine-tune took 18 s with 2 threads vs 28 s with 1.
    """
    n = int(os.environ.get("KNOW_TORCH_THREADS", "0")) or (threads if threads > 0 else (os.cpu_count() or 1))
    torch.set_num_threads(n)
    return n


def run_logger() -> logging.Logger:
    """Prefect's run logger inside a run; a plain logger when called as `task.fn()`."""
    try:
        from prefect import get_run_logger

        return get_run_logger()
    except Exception:  # noqa: BLE001 - MissingContextError outside a run
        return logging.getLogger("know")
