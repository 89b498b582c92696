"""Goal 4: fan-out scaling of trajectory collection on a Dask cluster, 1 vs 2 workers.

    .venv/bin/python benchmarks/bench_fanout.py [--runs 8] [--limit 3000] [--reps 1]

Each measurement: a distributed.LocalCluster of N single-thread worker processes, warmed up
(the workers import the collection code before the clock starts), then the pipeline's
`collect_trajectories` flow with CollectParams(runner='dask', dask_address=<the cluster>) for
a sweep of --runs simple-cnn runs on fashion-mnist (--limit images) into a fresh store. The
flow runs under Prefect against a `prefect server start` on 127.0.0.1 (temporary PREFECT_HOME),
whose PREFECT_API_URL the workers inherit: without it every worker process would start its
own temporary API server on its first task. Clusters alternate 1 2 2 1 ...; medians compared.
The CPU time (psutil) of the workers and of this process (the flow engine) over the sweep shows
how much of a core each worker actually got: on a shared machine the ratio cannot exceed what
the other load leaves.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from _common import ROOT, footer, header, median, ratio_line
from bench_orchestration import start_server, stop_server

GOAL = 1.7


def worker_cpu() -> float:
    import psutil

    t = psutil.Process().cpu_times()
    return t.user + t.system


def warm_worker() -> int:
    import torch  # noqa: F401

    import tasks.collect  # noqa: F401
    from know_core.data import load_dataset

    load_dataset("fashion-mnist", "train")
    return os.getpid()


def sweep(work: Path, n_workers: int, args, tag: str) -> dict:
    from distributed import Client, LocalCluster

    from flows.collect import CollectParams, collect_trajectories

    with LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=None,
                      env={"PYTHONPATH": str(ROOT)}) as cluster, Client(cluster) as client:
        client.run(warm_worker)
        cpu0, main0 = sum(client.run(worker_cpu).values()), worker_cpu()
        params = CollectParams(store=str(work / f"store-{tag}.zarr"), dataset="fashion-mnist", limit=args.limit,
                               models="simple-cnn", runs=args.runs, stages=args.stages, runner="dask",
                               dask_address=cluster.scheduler_address, workers=n_workers, device="cpu", seed=0)
        t0 = time.perf_counter()
        run_ids = collect_trajectories(params)
        wall = time.perf_counter() - t0
        cpu, main = sum(client.run(worker_cpu).values()) - cpu0, worker_cpu() - main0
    assert len(run_ids) == args.runs
    print(f"  {n_workers} worker(s): {wall:6.1f} s wall, workers' CPU {cpu:6.1f} s "
          f"({cpu / (wall * n_workers):.0%} of {n_workers} core(s)), flow process CPU {main:5.1f} s", flush=True)
    return {"wall": wall, "cpu": cpu, "main": main}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=8)
    ap.add_argument("--limit", type=int, default=3000)
    ap.add_argument("--stages", type=int, default=7)
    ap.add_argument("--reps", type=int, default=1, help="pairs of (1-worker, 2-worker) sweeps, alternated")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="know-bench-fanout-"))
    os.environ["PREFECT_HOME"] = str(work / "prefect-home")
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    os.environ.pop("PREFECT_API_URL", None)
    header("Fan-out scaling: collection on a Dask cluster, 2 workers vs 1 (goal 4)")
    print(f"# sweep: {args.runs} runs of simple-cnn on fashion-mnist, limit {args.limit}, {args.stages} stages", flush=True)
    res = {1: [], 2: []}
    proc = None
    try:
        proc, url = start_server(work / "server-home", work / "server.log")
        os.environ["PREFECT_API_URL"] = url  # before prefect is imported, here and in the workers
        order = []
        for r in range(args.reps):
            order += [1, 2] if r % 2 == 0 else [2, 1]
        for i, n in enumerate(order):
            res[n].append(sweep(work, n, args, f"{n}w-{i}"))
    finally:
        if proc is not None:
            stop_server(proc)
        shutil.rmtree(work, ignore_errors=True)
    w1, w2 = median([r["wall"] for r in res[1]]), median([r["wall"] for r in res[2]])
    c1, c2 = median([r["cpu"] for r in res[1]]), median([r["cpu"] for r in res[2]])
    m2 = median([r["main"] for r in res[2]])
    ratio_line("dask_2_workers_vs_1", w1 / w2, GOAL,
               f"1 worker {w1:.1f} s, 2 workers {w2:.1f} s (wall); workers' CPU {c1:.1f} s vs {c2:.1f} s; "
               f"2 workers got {c2 / (2 * w2):.0%} of 2 cores, the flow process {m2 / w2:.0%} of one")
    footer()


if __name__ == "__main__":
    main()
