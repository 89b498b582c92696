"""Shared task plumbing: thread settings, retry policy, logging outside a run."""
from __future__ import annotations

import logging
import os

import torch

from storage.trajectory import StoreError


class BadInput(ValueError):
    """Invalid user input: never retried, reported as one line."""


#: errors that a retry cannot fix (bad input, missing data, a wrong store)
NOT_RETRYABLE = (ValueError, KeyError, FileNotFoundError, StoreError)


def retry_unless_bad_input(task, task_run, state) -> bool:
    """retry_condition_fn: retry crashes and flaky I/O, not bad configs."""
    try:
        state.result()
    except NOT_RETRYABLE:
        return False
    except Exception:  # noqa: BLE001
        return True
    return True


def set_torch_threads() -> int:
    """Tasks run torch single-threaded by default: on small models two threads per run are
    ~10x slower than one (measured on the 2-core CI machine), and parallelism comes from
    running several tasks at once. Override with KNOW_TORCH_THREADS."""
    n = int(os.environ.get("KNOW_TORCH_THREADS", "1"))
    torch.set_num_threads(n)
    return n


def run_logger() -> logging.Logger:
    """Prefect's run logger inside a run; a plain logger when called as `task.fn()`."""
    try:
        from prefect import get_run_logger

        return get_run_logger()
    except Exception:  # noqa: BLE001 - MissingContextError outside a run
        return logging.getLogger("know")
