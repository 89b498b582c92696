"""Run the pipeline's Prefect flows and tasks as plain function calls (the baseline of
bench_orchestration.py): `install()` before the flows are imported.

    flow(...)            -> flow.fn(...)
    task(...)            -> task.fn(...)
    task.map(...)        -> task.fn over the mapped arguments in a thread pool as large as the
                            calling flow's ThreadPoolTaskRunner (same parallelism as Prefect's)
    task.submit(...)     -> task.fn in that pool
    prefect.futures.wait -> waits on those futures
    create_*_artifact    -> nothing (outside a run Prefect would start a temporary API server
                            just to store the artifact, ~10 s charged to the baseline)

So the baseline runs exactly the code and parameters of the Prefect run, minus the API
calls, state tracking, result persistence and task-runner machinery.
"""
from __future__ import annotations

import concurrent.futures as cf
import contextvars
from typing import Any

_POOL_SIZE: contextvars.ContextVar[int] = contextvars.ContextVar("direct_pool_size", default=1)


class _State:
    def __init__(self, fut: cf.Future):
        self._fut = fut

    def is_completed(self) -> bool:
        return self._fut.exception() is None

    def result(self, raise_on_failure: bool = True) -> Any:
        return self._fut.result()

    @property
    def name(self) -> str:
        return "Completed" if self.is_completed() else "Failed"


class DirectFuture:
    """Enough of PrefectFuture for the flows: wait, result, state, _final_state."""

    def __init__(self, fut: cf.Future):
        self._fut = fut

    @property
    def _final_state(self):
        return _State(self._fut) if self._fut.done() else None

    def wait(self, timeout: float | None = None) -> None:
        cf.wait([self._fut], timeout)

    def result(self, timeout: float | None = None, raise_on_failure: bool = True) -> Any:
        return self._fut.result(timeout)

    @property
    def state(self) -> _State:
        self.wait()
        return _State(self._fut)


def _pool_size(runner) -> int:
    size = getattr(runner, "_max_workers", None)
    if size is None:  # DaskTaskRunner and others: the cluster's worker count, else 1
        size = (getattr(runner, "cluster_kwargs", None) or {}).get("n_workers", 1)
    return max(1, min(int(size), 64))


def install() -> None:
    import prefect.artifacts
    import prefect.futures
    from prefect.flows import Flow
    from prefect.tasks import Task
    from prefect.utilities.annotations import BaseAnnotation

    def task_call(self, *args, **kwargs):
        kwargs.pop("return_state", None)
        kwargs.pop("wait_for", None)
        return self.fn(*args, **kwargs)

    def task_submit(self, *args, **kwargs):
        kwargs.pop("return_state", None)
        kwargs.pop("wait_for", None)
        pool = cf.ThreadPoolExecutor(1)
        fut = DirectFuture(pool.submit(contextvars.copy_context().run, self.fn, *args, **kwargs))
        pool.shutdown(wait=False)
        return fut

    def task_map(self, *args, **kwargs):
        kwargs.pop("return_state", None)
        kwargs.pop("wait_for", None)
        kwargs.pop("deferred", None)
        def is_mapped(v):  # annotations (unmapped, quote) are namedtuples: test them first
            return not isinstance(v, BaseAnnotation) and isinstance(v, (list, tuple))

        mapped = [is_mapped(a) for a in args]
        kmapped = {k: is_mapped(v) for k, v in kwargs.items()}
        lengths = {len(a) for a, m in zip(args, mapped) if m} | {len(v) for k, v in kwargs.items() if kmapped[k]}
        if len(lengths) != 1:
            raise ValueError(f"map needs iterables of one length, got {sorted(lengths)}")
        n = lengths.pop()

        def plain(v):
            return v.value if isinstance(v, BaseAnnotation) else v

        calls = [([a[i] if m else plain(a) for a, m in zip(args, mapped)],
                  {k: v[i] if kmapped[k] else plain(v) for k, v in kwargs.items()}) for i in range(n)]
        pool = cf.ThreadPoolExecutor(_POOL_SIZE.get())
        futures = [DirectFuture(pool.submit(contextvars.copy_context().run, self.fn, *a, **kw)) for a, kw in calls]
        pool.shutdown(wait=False)
        return futures

    def flow_call(self, *args, **kwargs):
        kwargs.pop("return_state", None)
        token = _POOL_SIZE.set(_pool_size(self.task_runner))
        try:
            return self.fn(*args, **kwargs)
        finally:
            _POOL_SIZE.reset(token)

    def wait(futures, timeout=None):
        cf.wait([f._fut for f in futures], timeout)
        return prefect.futures.DoneAndNotDoneFutures(set(futures), set())

    Task.__call__ = task_call
    Task.submit = task_submit
    Task.map = task_map
    Flow.__call__ = flow_call
    prefect.futures.wait = wait
    for name in dir(prefect.artifacts):
        if name.startswith("create_") and name.endswith("_artifact"):
            setattr(prefect.artifacts, name, lambda *a, **k: None)
