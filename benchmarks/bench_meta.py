"""Out-of-core meta-training (issue: scale, goal 1): peak RSS at three store sizes, and
training throughput against the in-memory path and against this machine's matmul peak.

    .venv/bin/python benchmarks/bench_meta.py [--sizes-gb 2,5,20] [--run-params 10000000] [--dir /work]
    .venv/bin/python benchmarks/bench_meta.py --throughput-only    # rows 3 and 4 only, ~1 GB store

1. One synthetic meta-data store of independent runs (8 stages, float32, `--run-params` each,
   smooth drift plus noise) is written until it holds max(sizes) GB. The smaller stores are
   its first runs (a meta-training restricted to them with only_runs), so the three sizes are
   nested selections of one store.
2. RSS: for each size a fresh process runs the product's meta-training task
   (`tasks.meta.train_known_set`, loader=stream, 1 epoch, raw scaling, the default 20,000
   pairs per run and kind) over that selection and reports its peak RSS (VmHWM). With the
   cap the pairs are a sample of each run, but every block spans whole chunks, so the loader
   reads and decodes every chunk of every selected run once per kind: the whole store goes
   through the process.
3. Throughput, side by side in one process, on the same pairs (3 runs, 2 train + 1 val,
   `--throughput-pairs` per run and kind; the epoch time of B includes reading its blocks):
   A = today's path before streaming (gather every pair in memory, then train_known), B = the
   streamed path (train_known_streamed through the default 4M-pair buffer), C = the Adam steps
   alone (know_core.meta._step on 256 ready batches: what the epoch rate is capped by); 1 epoch
   each, 1 torch thread (what the meta-training task uses), interleaved A B C C B A. Pair-steps/s are
   converted to FLOP/s with 3 x 17,664 FLOP per pair (forward + backward of KNOWN's 8,832
   multiply-adds), against the torch.mm peak measured in the same process at 1 thread.
4. The time of one epoch over the paper's 50 GB (every scalar: 8-stage runs give 3 windows per
   scalar) is extrapolated from B's rate.
The store is deleted at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import ROOT, footer, header, median, proc_status_mb, ratio_line

STAGES = 8
FLOP_PER_PAIR_STEP = 3 * 17_664
RSS_GOAL_MB = 1536
PAPER_GB = 50


def write_store(url: Path, target_bytes: int, run_params: int) -> list[tuple[str, int]]:
    """Independent synthetic runs until the store holds target_bytes; [(run id, cumulative bytes)]."""
    from bench_stream import fill_stage, synthetic_layout

    from storage.trajectory import TrajectoryStore

    store = TrajectoryStore(url)
    store.prepare()
    layout = synthetic_layout(run_params)
    row = np.empty(run_params, np.float32)
    runs, total, i = [], 0, 0
    while total < target_bytes:
        rid = f"synthetic-{i:03d}"
        store.begin_run(rid, {"mode": "independent", "model": "synthetic", "sampling_rate": 0.5,
                              "stage_subset_sizes": [60000 // 2 ** k for k in range(STAGES)]}, layout, STAGES)
        for k in range(STAGES):
            fill_stage(row, k, seed=i)
            store.append_stage(rid, k, row)
        store.finish_run(rid)
        total += STAGES * run_params * 4
        runs.append((rid, total))
        i += 1
    return runs


def child_rss(args) -> dict:
    from params.predict import MetaTrainParams
    from tasks.meta import pair_blocks, split_by_model, eligible_runs, train_known_set
    from storage.trajectory import TrajectoryStore

    spec = MetaTrainParams(store=args.store, out=args.out, only_runs=args.runs, loader="stream", epochs=1,
                           compare_modes=False)
    store = TrajectoryStore(spec.store)
    train_ids, val_ids = split_by_model(eligible_runs(store, spec, "all"), spec)
    read_bytes = sum((b.c1 - b.c0) * STAGES * 4 for kind in ("conv", "fc", "bias")
                     for b in pair_blocks(store, train_ids + val_ids, spec, kind))
    t0 = time.perf_counter()
    train_known_set.fn(spec, "all", "raw")
    return {"wall": time.perf_counter() - t0, "peak_rss_mb": proc_status_mb("VmHWM"),
            "read_bytes": read_bytes, "runs": len(train_ids) + len(val_ids)}


def child_throughput(args) -> dict:
    import torch

    from know_core.meta import MetaConfig, train_known, train_known_streamed
    from params.predict import MetaTrainParams
    from storage.trajectory import TrajectoryStore
    from tasks.meta import block_reader, eligible_runs, gather, pair_blocks, split_by_model

    torch.set_num_threads(1)
    spec = MetaTrainParams(store=args.store, only_runs=args.runs, compare_modes=False, pairs_per_run=args.pairs)
    store = TrajectoryStore(spec.store)
    train_ids, val_ids = split_by_model(eligible_runs(store, spec, "all"), spec)
    cfg = MetaConfig(epochs=1, batch_size=spec.batch_size, lr=spec.lr, patience=5, scaling="raw", seed=0)
    kind = "conv"

    def memory() -> tuple[float, int]:
        tp, _ = gather(store, train_ids, spec)
        vp, _ = gather(store, val_ids, spec)
        (X, Y), (Xv, Yv) = tp[kind], vp[kind]
        _, hist = train_known(X, Y, Xv, Yv, cfg)
        return hist[0]["wall_s"], len(Y)

    def streamed() -> tuple[float, int]:
        tb, vb = pair_blocks(store, train_ids, spec, kind), pair_blocks(store, val_ids, spec, kind)
        _, hist = train_known_streamed(tb, vb, block_reader(store), cfg, spec.buffer_pairs)
        return hist[0]["wall_s"], sum(b.n_pairs for b in tb)

    def steps_only() -> tuple[float, int]:
        """The Adam steps of an epoch alone (know_core.meta._step on ready batches of the same
        size): no reads, no shuffling gathers, no validation pass. What the epoch rate is
        capped by."""
        from know_core.meta import _new_model, _step

        model, opt = _new_model(cfg, torch.device("cpu"))
        gen = torch.Generator().manual_seed(0)
        b, n = cfg.batch_size, 256  # ~3 s at 360k pairs/s
        x = 0.05 * torch.randn(n * b, 5, generator=gen).cumsum(1)
        y, s = x[:, -1] + 1e-3 * torch.randn(n * b, generator=gen), torch.ones(b)
        _step(model, opt, x[:b], s, x[:b, -1], y[:b], cfg, n * b, "cpu")  # warm-up
        t0 = time.perf_counter()
        for i in range(n):
            sl = slice(i * b, (i + 1) * b)
            _step(model, opt, x[sl], s, x[sl, -1], y[sl], cfg, n * b, "cpu")
        return time.perf_counter() - t0, n * b

    def mm_peak() -> float:
        a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
        a @ b
        t0, n = time.perf_counter(), 10
        for _ in range(n):
            a @ b
        return n * 2 * 2048 ** 3 / (time.perf_counter() - t0)

    paths = {"memory": memory, "stream": streamed, "steps": steps_only}
    rates: dict[str, list[float]] = {name: [] for name in paths}
    peaks = [mm_peak()]
    for name in ("memory", "stream", "steps", "steps", "stream", "memory"):
        wall, pairs = paths[name]()
        rates[name].append(pairs / wall)
        peaks.append(mm_peak())
    return {"rates": rates, "peaks": peaks, "pairs": pairs, "batch": cfg.batch_size}


def run_child(*argv) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *argv], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "KNOW_TORCH_THREADS": "1"})
    if out.returncode != 0:
        raise RuntimeError(f"child {argv[0]} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes-gb", default="2,5,20", help="store sizes (GB), comma-separated")
    ap.add_argument("--run-params", type=int, default=10_000_000, help="parameters per synthetic run")
    ap.add_argument("--dir", default=tempfile.gettempdir(), help="where the temporary store goes")
    ap.add_argument("--throughput-pairs", type=int, default=1_000_000, help="pairs per run and kind of the "
                    "throughput comparison (both paths hold or stream the same pairs)")
    ap.add_argument("--throughput-only", action="store_true", help="write only the 3 runs the throughput rows "
                    "need and skip the RSS rows (minutes instead of the 20 GB store's ~15)")
    ap.add_argument("--pairs", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--child", choices=("rss", "throughput"), help=argparse.SUPPRESS)
    ap.add_argument("--store", help=argparse.SUPPRESS)
    ap.add_argument("--runs", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child_rss(args) if args.child == "rss" else child_throughput(args)))
        return

    sizes = [] if args.throughput_only else [float(s) for s in args.sizes_gb.split(",")]
    header("Out-of-core meta-training (scale goal 1)")
    store_bytes = int(max(sizes) * 1e9) if sizes else 3 * STAGES * args.run_params * 4  # the throughput runs
    need = store_bytes * 1.1
    free = shutil.disk_usage(args.dir).free
    print(f"# df {args.dir}: {free / 2**30:.1f} GiB free, the store needs ~{need / 2**30:.1f} GiB", flush=True)
    if free < need:
        sys.exit(f"not enough free disk under {args.dir}; pass --dir or smaller --sizes-gb")
    work = Path(tempfile.mkdtemp(prefix="know-bench-meta-", dir=args.dir))
    try:
        t0 = time.perf_counter()
        runs = write_store(work / "meta.zarr", store_bytes, args.run_params)
        print(f"# wrote {len(runs)} runs x {args.run_params:,} params x {STAGES} stages ({runs[-1][1] / 1e9:.1f} GB) "
              f"in {time.perf_counter() - t0:.0f} s", flush=True)
        selections = {}
        for gb in sizes:
            ids = [rid for rid, total in runs if total <= gb * 1e9 * 1.0001] or [runs[0][0], runs[1][0]]
            selections[gb] = ids
        rss = {}
        for gb in sizes:
            r = run_child("rss", "--store", str(work / "meta.zarr"), "--runs", ",".join(selections[gb]),
                          "--out", str(work / f"known-{gb:g}"))
            rss[gb] = r
            print(f"# {gb:g} GB selection ({r['runs']} runs): 1 epoch in {r['wall']:.0f} s, read "
                  f"{r['read_bytes'] / 1e9:.1f} GB, peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
        tp = run_child("throughput", "--store", str(work / "meta.zarr"), "--runs", ",".join(rid for rid, _ in runs[:3]),
                       "--pairs", str(args.throughput_pairs))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    for gb in sizes:  # none with --throughput-only
        ratio_line(f"meta_stream_peak_rss_{gb:g}GB_vs_1.5GB", rss[gb]["peak_rss_mb"] / RSS_GOAL_MB, 1.0,
                   f"peak RSS {rss[gb]['peak_rss_mb']:.0f} MB over {rss[gb]['read_bytes'] / 1e9:.1f} GB read",
                   higher_is_better=False)
    if sizes:
        lo, hi = rss[min(sizes)]["peak_rss_mb"], rss[max(sizes)]["peak_rss_mb"]
        ratio_line(f"meta_stream_peak_rss_{max(sizes):g}GB_vs_{min(sizes):g}GB", hi / lo, 1.10,
                   f"{hi:.0f} vs {lo:.0f} MB: flat means the store size does not enter", higher_is_better=False)
    mem, st, steps = (median(tp["rates"][k]) for k in ("memory", "stream", "steps"))
    peak = median(tp["peaks"])
    ratio_line("meta_stream_vs_memory_pairs_per_s", st / mem, 0.9,
               f"streamed {st / 1e3:.0f}k vs in-memory {mem / 1e3:.0f}k pair-steps/s ({tp['pairs']:,} conv pairs per epoch, "
               "1 thread; streamed epochs include their reads)")
    ratio_line("meta_stream_flops_vs_mm_peak", st * FLOP_PER_PAIR_STEP / peak, 0.40,
               f"{st * FLOP_PER_PAIR_STEP / 1e9:.2f} GFLOP/s vs torch.mm peak {peak / 1e9:.1f} GFLOP/s (1 thread); "
               f"in-memory path {mem * FLOP_PER_PAIR_STEP / peak:.3f}")
    ratio_line("meta_steps_only_flops_vs_mm_peak", steps * FLOP_PER_PAIR_STEP / peak, None,
               f"the Adam steps alone, batch {tp['batch']:,}: {steps / 1e3:.0f}k pair-steps/s, "
               f"{steps * FLOP_PER_PAIR_STEP / 1e9:.1f} GFLOP/s; the streamed epoch reaches {st / steps:.2f} of it")
    pairs_50 = PAPER_GB * 1e9 / 4 * (STAGES - 5) / STAGES
    ratio_line("meta_stream_epoch_hours_at_50GB", pairs_50 / st / 3600, None,
               f"{pairs_50 / 1e9:.1f} G pairs (every scalar of 50 GB of 8-stage runs) at {st / 1e3:.0f}k pairs/s, 1 thread")
    footer()


if __name__ == "__main__":
    main()
