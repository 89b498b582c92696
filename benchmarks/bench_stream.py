"""Goal 2: streaming KNOW prediction (x2/x4/x8) of a large trajectory in bounded memory.

    .venv/bin/python benchmarks/bench_stream.py [--params 100000000] [--small-params 2000000]
                                                [--dir /tmp] [--block-values N] [--threads N] [--no-resnet18]

1. Writes a synthetic --params trajectory (5 stages; conv/fc/bias tensors of a VGG/ResNet-like
   pattern) into a fresh TrajectoryStore under --dir, one stage row at a time, as collection
   does. 100M params = 5 x 400 MB on disk.
2. Predicts it (KNOW with the official weights, 3 steps) in a subprocess that starts as
   `know predict` does (tasks.heap.one_heap) and runs the pipeline's task, `predict_run.fn`:
   wall time, CPU time, peak RSS (VmHWM: ru_maxrss would carry the parent's peak over the
   vfork+exec), peak anonymous memory (RssAnon, sampled: RSS without
   the mapped library files) and both after imports.
3. In-memory baseline: a small model (--small-params, same tensor pattern) predicted with one
   `predict_block` call over the whole vector in a subprocess; run before, between and after
   the streamed runs, medians compared.
4. ResNet-18 (11.2M params, know_core.models build_model('resnet18', 3, 10, 32)): its real
   layout with a synthetic trajectory, streamed through the store the same way; wall time next
   to the paper's 3.0 s.
5. Spot check: a slice of the streamed prediction equals an in-memory predict_block of it.

Params/s counts model parameters per second for the whole 3-step prediction. Both sides run
torch with --threads intra-op threads (default: all cores, as the prediction task does; set
through KNOW_TORCH_THREADS). The stores are deleted at the end.
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

from _common import ROOT, PeakMemory, fmt_rate, footer, header, median, proc_status_mb, ratio_line

import numpy as np

REF = ROOT.parent / "shared" / "know_reference"
SIZES = [32000, 16000, 8000, 4000, 2000]  # stage 0 = full data; r = 0.5
STEPS = 3
PAPER_RESNET18_S = 3.0
RSS_GOAL_MB = 1024
PIECE = 1 << 22  # generation piece: rows are filled piecewise, never whole temporaries

#: (kind, shape) pattern of the synthetic model: 3x3 convs, 1x1 convs, fc matrices, biases
PATTERN = (("conv", (256, 256, 3, 3)), ("bias", (256,)), ("conv", (512, 256, 1, 1)), ("bias", (512,)),
           ("conv", (512, 512, 3, 3)), ("bias", (512,)), ("fc", (1024, 2048)), ("bias", (1024,)))


def synthetic_layout(n: int):
    from know_core.layout import TensorSpec

    layout, offset, i = [], 0, 0
    while offset < n:
        kind, shape = PATTERN[i % len(PATTERN)]
        size = int(np.prod(shape))
        if offset + size > n:
            kind, shape, size = "bias", (n - offset,), n - offset
        layout.append(TensorSpec(f"layer{i}.{kind}", shape, kind, offset))
        offset, i = offset + size, i + 1
    return layout


def fill_stage(row: np.ndarray, k: int, seed: int = 0, theta0: np.ndarray | None = None) -> None:
    """Stage k of a smooth synthetic trajectory: θ0 - k·drift, piece by piece (seeded)."""
    for p in range(0, row.shape[0], PIECE):
        rng = np.random.default_rng([seed, p])
        n = min(PIECE, row.shape[0] - p)
        base = theta0[p:p + n] if theta0 is not None else 0.05 * rng.standard_normal(n, dtype=np.float32)
        drift = 0.002 * rng.standard_normal(n, dtype=np.float32) * (1 + 0.5 * np.abs(base) / 0.05)
        np.subtract(base, k * drift, out=row[p:p + n])


def write_trajectory(store_dir: Path, run_id: str, layout, theta0=None) -> dict:
    from know_core.layout import layout_size
    from storage.trajectory import TrajectoryStore

    n = layout_size(layout)
    store = TrajectoryStore(store_dir)
    store.prepare()
    store.begin_run(run_id, {"stage_subset_sizes": SIZES, "sampling_rate": 0.5, "model": "synthetic"}, layout, 5)
    row = np.empty(n, dtype=np.float32)
    gen = write = 0.0
    for k in range(5):
        t0 = time.perf_counter()
        fill_stage(row, k, theta0=theta0)
        t1 = time.perf_counter()
        store.append_stage(run_id, k, row)
        write += time.perf_counter() - t1
        gen += t1 - t0
    store.finish_run(run_id)
    return {"n": n, "gen_s": gen, "write_s": write, "bytes": 5 * 4 * n}


# ---- subprocess children -------------------------------------------------------------------
def child_predict(args) -> dict:
    from tasks.heap import one_heap

    one_heap()  # first, as `know predict` does (tasks/heap.py)
    from params.predict import PredictParams
    from tasks.predict import predict_run

    spec = PredictParams(store=args.store, run_id=args.run_id, predictor="know", steps=STEPS, known="official",
                       official_dir=str(REF), **({"block_values": args.block_values} if args.block_values else {}))
    base, base_anon = proc_status_mb("VmRSS"), proc_status_mb("RssAnon")
    w0, c0 = time.perf_counter(), time.process_time()
    with PeakMemory() as mem:
        predict_run.fn(spec)
    return {"wall": time.perf_counter() - w0, "cpu": time.process_time() - c0, "base_rss_mb": base,
            "base_anon_mb": base_anon, "peak_rss_mb": mem.peak_mb, "peak_anon_mb": mem.anon_peak_mb,
            "block_values": spec.block_values}


def child_inmem(args) -> dict:
    import torch

    from know_core.known import load_official
    from know_core.predict import PredictorConfig
    from know_core.stream import predict_block

    torch.set_num_threads(int(os.environ["KNOW_TORCH_THREADS"]))
    layout = synthetic_layout(args.params)
    stages = np.empty((5, args.params), dtype=np.float32)
    for k in range(5):
        fill_stage(stages[k], k)
    cfg = PredictorConfig("know", known=load_official(str(REF)))
    predict_block(cfg, stages[:, :4096], layout, 0, SIZES, STEPS)  # warm-up
    w0, c0 = time.perf_counter(), time.process_time()
    predict_block(cfg, stages, layout, 0, SIZES, STEPS)
    return {"wall": time.perf_counter() - w0, "cpu": time.process_time() - c0}


def run_child(*argv) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *argv], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})  # KNOW_TORCH_THREADS: set in main
    if out.returncode != 0:
        raise RuntimeError(f"child {argv[0]} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---- main ----------------------------------------------------------------------------------
def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=int, default=100_000_000, help="parameters of the large synthetic model")
    ap.add_argument("--small-params", type=int, default=2_000_000, help="parameters of the in-memory small model")
    ap.add_argument("--block-values", type=int, default=0, help="columns per streamed block (0: PredictParams default)")
    ap.add_argument("--dir", default=tempfile.gettempdir(), help="where the temporary stores go")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads on both sides")
    ap.add_argument("--no-resnet18", action="store_true")
    ap.add_argument("--reference-params", type=int, default=0, help="also stream a model of this size in the same "
                    "run (e.g. 100000000 beside --params 1000000000) and print the throughput ratio")
    ap.add_argument("--child", choices=("predict", "inmem"), help=argparse.SUPPRESS)
    ap.add_argument("--store", help=argparse.SUPPRESS)
    ap.add_argument("--run-id", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child_predict(args) if args.child == "predict" else child_inmem(args)))
        return

    os.environ["KNOW_TORCH_THREADS"] = str(args.threads)
    header("Streaming prediction at scale (goal 2)")
    print(f"# torch threads on both sides: {args.threads}")
    need = 32 * args.params + 32 * 11_200_000  # 5 stage rows + 3 prediction rows, float32
    free = shutil.disk_usage(args.dir).free
    print(f"# df {args.dir}: {free / 2**30:.1f} GiB free, this run needs ~{need / 2**30:.1f} GiB", flush=True)
    print(subprocess.run(["df", "-h", args.dir], capture_output=True, text=True).stdout.strip())
    if free < 1.2 * need:
        sys.exit(f"not enough free disk under {args.dir}; pass --dir or a smaller --params")
    work = Path(tempfile.mkdtemp(prefix="know-bench-stream-", dir=args.dir))
    inmem = []
    try:
        small = ["--params", str(args.small_params)]
        inmem.append(run_child("inmem", *small))
        layout = synthetic_layout(args.params)
        w = write_trajectory(work / "big.zarr", "big", layout)
        print(f"# wrote {args.params:,} params x 5 stages ({w['bytes'] / 1e9:.2f} GB) in {w['write_s']:.1f} s "
              f"({w['bytes'] / w['write_s'] / 1e6:.0f} MB/s store write; generation {w['gen_s']:.1f} s), "
              f"{len(layout)} tensors", flush=True)
        blk = ["--block-values", str(args.block_values)] if args.block_values else []
        big = run_child("predict", "--store", str(work / "big.zarr"), "--run-id", "big", *blk)
        print(f"# streamed {args.params:,} params: {big['wall']:.1f} s wall, {big['cpu']:.1f} s CPU, peak RSS "
              f"{big['peak_rss_mb']:.0f} MB (after imports {big['base_rss_mb']:.0f} MB), peak anonymous "
              f"{big['peak_anon_mb']:.0f} MB (after imports {big['base_anon_mb']:.0f} MB), block_values "
              f"{big['block_values']:,}", flush=True)
        inmem.append(run_child("inmem", *small))

        ref = None
        if args.reference_params:
            w_ref = write_trajectory(work / "ref.zarr", "ref", synthetic_layout(args.reference_params))
            ref = run_child("predict", "--store", str(work / "ref.zarr"), "--run-id", "ref", *blk)
            print(f"# reference {args.reference_params:,} params ({w_ref['bytes'] / 1e9:.2f} GB): {ref['wall']:.1f} s "
                  f"wall, peak RSS {ref['peak_rss_mb']:.0f} MB, peak anonymous {ref['peak_anon_mb']:.0f} MB", flush=True)
            shutil.rmtree(work / "ref.zarr", ignore_errors=True)

        r18 = None
        if not args.no_resnet18:
            import torch

            from know_core.layout import flatten_state, param_layout
            from know_core.models import build_model

            torch.manual_seed(0)
            model = build_model("resnet18", 3, 10, 32)
            r18_layout = param_layout(model)
            theta0 = flatten_state(model.state_dict(), r18_layout)
            w18 = write_trajectory(work / "r18.zarr", "resnet18", r18_layout, theta0=theta0)
            r18 = run_child("predict", "--store", str(work / "r18.zarr"), "--run-id", "resnet18", *blk)
            r18["n"] = w18["n"]
            print(f"# ResNet-18 ({w18['n']:,} params): 3 steps in {r18['wall']:.2f} s wall ({r18['cpu']:.2f} s CPU), "
                  f"peak RSS {r18['peak_rss_mb']:.0f} MB", flush=True)
            inmem.append(run_child("inmem", *small))

        # spot check: a slice across tensor boundaries, streamed == in memory
        from know_core.known import load_official
        from know_core.predict import PredictorConfig
        from know_core.stream import predict_block
        from storage.trajectory import TrajectoryStore

        store = TrajectoryStore(work / "big.zarr")
        c0 = (args.params // 2) // store.weights("big").chunks[1] * store.weights("big").chunks[1]
        c1 = min(args.params, c0 + 3 * (1 << 20))
        cfg = PredictorConfig("know", known=load_official(str(REF)))
        expected = predict_block(cfg, np.asarray(store.weights("big")[0:5, c0:c1]), layout, c0, SIZES, STEPS)
        pred = store.root["predictions/big/know@official/weights"]
        got = np.asarray(pred[:, c0:c1])
        dev = float(np.abs(got - expected).max())
        print(f"# spot check columns [{c0:,}, {c1:,}): max |streamed - in-memory| = {dev:.2e}")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    im_wall = median([args.small_params / r["wall"] for r in inmem])
    im_cpu = median([args.small_params / r["cpu"] for r in inmem])
    st_wall, st_cpu = args.params / big["wall"], args.params / big["cpu"]
    print(f"# in-memory small model ({args.small_params:,} params), {len(inmem)} runs: "
          + ", ".join(f"{args.small_params / r['wall'] / 1e6:.2f}" for r in inmem) + " M params/s wall")
    ratio_line("stream_vs_inmemory_throughput", st_wall / im_wall, 0.8,
               f"streamed {fmt_rate(st_wall, 'params/s')} vs in-memory {fmt_rate(im_wall, 'params/s')} (wall, 3 steps)")
    ratio_line("stream_vs_inmemory_throughput_cputime", st_cpu / im_cpu, 0.8,
               f"streamed {fmt_rate(st_cpu, 'params/CPU-s')} vs in-memory {fmt_rate(im_cpu, 'params/CPU-s')}")
    ratio_line("stream_peak_rss_vs_1GB", big["peak_rss_mb"] / RSS_GOAL_MB, 1.0,
               f"peak RSS {big['peak_rss_mb']:.0f} MB for {args.params:,} params ({5 * 4 * args.params / 1e9:.1f} GB on disk)",
               higher_is_better=False)
    ratio_line("stream_peak_anon_vs_1GB", big["peak_anon_mb"] / RSS_GOAL_MB, 1.0,
               f"peak anonymous memory {big['peak_anon_mb']:.0f} MB (RSS without mapped library files; "
               f"{big['base_rss_mb'] - big['base_anon_mb']:.0f} MB of those after imports)", higher_is_better=False)
    if ref is not None:
        ref_rate = args.reference_params / ref["wall"]
        ratio_line("stream_vs_reference_size_throughput", st_wall / ref_rate, 0.8,
                   f"{args.params:,} params {fmt_rate(st_wall, 'params/s')} ({big['wall']:.0f} s) vs "
                   f"{args.reference_params:,} params {fmt_rate(ref_rate, 'params/s')} ({ref['wall']:.0f} s), wall")
    if r18 is not None:
        ratio_line("resnet18_wall_vs_paper", r18["wall"] / PAPER_RESNET18_S, None,
                   f"{r18['wall']:.2f} s for 3 steps ({r18['wall'] / 3:.2f} s per step) vs paper {PAPER_RESNET18_S} s; "
                   f"{fmt_rate(r18['n'] / r18['wall'], 'params/s')}", higher_is_better=False)
    footer()


if __name__ == "__main__":
    main()
