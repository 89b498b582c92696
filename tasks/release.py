"""The import task: one release .mat file -> one complete run in the store.

The store is the cache, as for collection: a file whose run (content and config hashed) is
complete is skipped; an interrupted import is wiped and written again (storage/release_import.py).
"""
from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from params.release import ImportParams
from storage.release_import import import_release_file
from storage.trajectory import TrajectoryStore

from .common import retry_unless_bad_input, run_logger


# NO_CACHE: a path names no content (a rewritten file must import anew); the store is the cache
@task(name="import-release-file", retries=1, retry_delay_seconds=1, retry_condition_fn=retry_unless_bad_input,
      task_run_name="import-{path}", cache_policy=NO_CACHE)
def import_file(params: ImportParams, path: str) -> dict:
    """Import one file; {'file', 'run_id', 'status': 'imported' | 'skipped'}."""
    run_id, status = import_release_file(TrajectoryStore(params.store), path, stages=params.stages,
                                         n_data=params.n_data, block_values=params.block_values,
                                         overrides=params.overrides(), log=run_logger())
    return {"file": path, "run_id": run_id, "status": status}


__all__ = ["import_file"]
