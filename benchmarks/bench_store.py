"""Goal 3: trajectory store write/read throughput per chunk length and codec, and the
compression ratio of each codec on real trained weights and on synthetic ones.

    .venv/bin/python benchmarks/bench_store.py [--params 8388608] [--reps 5] [--dir /tmp] [--no-real]

Write: 5 stage rows of --params float32 through TrajectoryStore.begin_run/append_stage (one
row at a time, as collection writes them) against numpy.tofile of the same 5 rows into plain
files in the same directory. Both land in the page cache (no fsync): the ratio is the store's
own overhead (zarr encode, codec, one file per chunk), which is what a writer waits for.
Read: the prediction's access pattern, TrajectoryStore.iter_column_blocks over the 5 rows with
the default block (PredictParams.block_values), against plain reads (readinto) of the same column
blocks from the raw files. Configurations and raw runs are interleaved rep by rep; medians compared.

Compression ratios (raw bytes / bytes on disk): the synthetic trajectory of bench_stream.py,
and a real one: ResNet width 24 (171k params) trained on digits, 5 stages, collected with the
pipeline's collect_run task.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from _common import fmt_rate, footer, header, interleave, median, ratio_line

import numpy as np
from zarr.codecs import BloscCodec, ZstdCodec

from bench_stream import SIZES, fill_stage, synthetic_layout

GOAL_WRITE = 0.8
BLOCK_VALUES = 1 << 22  # PredictParams.block_values default
#: chunk lengths tried; larger than the prediction block (4M values) would make every block a
#: whole chunk bigger than asked for (TrajectoryStore.block_length), so 4M is the ceiling
CHUNKS = (1 << 18, 1 << 20, 1 << 22)


def codecs() -> dict[str, object]:
    return {
        "none": None,
        "zstd-1": [ZstdCodec(level=1)],
        "zstd-3": [ZstdCodec(level=3)],
        "blosc-lz4-shuffle": [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle", typesize=4)],
        "blosc-lz4-bitshuffle": [BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle", typesize=4)],
        "blosc-zstd3-bitshuffle": [BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle", typesize=4)],
    }


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.name.startswith("zarr.json"))


def store_trial(work: Path, rows: np.ndarray, layout, chunk: int, compressors) -> dict:
    from storage.trajectory import TrajectoryStore

    path = work / f"s-{time.perf_counter_ns()}.zarr"
    store = TrajectoryStore(path, chunk=chunk, compressors=compressors)
    store.prepare()
    store.begin_run("r", {"stage_subset_sizes": SIZES, "sampling_rate": 0.5}, layout, rows.shape[0])
    os.sync()  # each trial starts without another trial's dirty pages in flight
    t0 = time.perf_counter()
    for k in range(rows.shape[0]):
        store.append_stage("r", k, rows[k])
    write = time.perf_counter() - t0
    os.sync()
    durable = time.perf_counter() - t0
    store.finish_run("r")
    t0 = time.perf_counter()
    got = sum(b.nbytes for _, b in store.iter_column_blocks("r", slice(0, 5), BLOCK_VALUES))
    read = time.perf_counter() - t0
    assert got == rows.nbytes
    size = dir_bytes(path / "runs" / "r" / "weights")
    shutil.rmtree(path)
    return {"write": write, "durable": durable, "read": read, "disk": size}


def read_block(paths, c0: int, m: int) -> np.ndarray:
    """Rows [c0, c0+m) of each raw file: the fastest plain read (np.fromfile with an offset is
    several times slower here)."""
    out = np.empty((len(paths), m), dtype=np.float32)
    for i, p in enumerate(paths):
        with open(p, "rb") as fh:
            fh.seek(4 * c0)
            fh.readinto(memoryview(out[i]).cast("B"))
    return out


def raw_trial(work: Path, rows: np.ndarray) -> dict:
    paths = [work / f"raw-{time.perf_counter_ns()}-{k}.bin" for k in range(rows.shape[0])]
    os.sync()
    t0 = time.perf_counter()
    for p, row in zip(paths, rows):
        row.tofile(p)
    write = time.perf_counter() - t0
    os.sync()
    durable = time.perf_counter() - t0
    n = rows.shape[1]
    t0 = time.perf_counter()
    got = 0
    for c0 in range(0, n, BLOCK_VALUES):
        m = min(BLOCK_VALUES, n - c0)
        got += read_block(paths, c0, m).nbytes
    read = time.perf_counter() - t0
    assert got == rows.nbytes
    for p in paths:
        p.unlink()
    return {"write": write, "durable": durable, "read": read, "disk": rows.nbytes}


def real_trajectory(work: Path) -> np.ndarray:
    """A small real trajectory: ResNet width 24 on digits, 5 stages, via the collection task."""
    from storage.trajectory import TrajectoryStore
    from tasks.collect import collect_run
    from tasks.specs import RunSpec

    store = TrajectoryStore(work / "real.zarr")
    store.prepare()
    spec = RunSpec(model="resnet", width=24, dataset="digits", stages=5, r=0.5, lr=1e-3, batch_size=32, seed=0,
                   epochs_per_stage=1, mode="sequential", optimizer="carry")
    t0 = time.perf_counter()
    run_id = collect_run.fn(str(work / "real.zarr"), spec, "cpu")
    rows = store.read_stages(run_id)
    print(f"# real trajectory: {spec.model} width {spec.width} on {spec.dataset}, {rows.shape[0]} stages x "
          f"{rows.shape[1]:,} params, collected in {time.perf_counter() - t0:.1f} s", flush=True)
    return rows


def compression(work: Path, rows: np.ndarray, label: str) -> dict[str, float]:
    from know_core.layout import TensorSpec
    from storage.trajectory import DEFAULT_CHUNK

    layout = [TensorSpec("w", (rows.shape[1],), "fc", 0)]
    out = {}
    for name, comp in codecs().items():
        t = store_trial(work, rows, layout, DEFAULT_CHUNK, comp)
        out[name] = rows.nbytes / t["disk"]
    print(f"# compression ratio on {label} ({rows.shape[0]} x {rows.shape[1]:,} float32): "
          + ", ".join(f"{k} {v:.3f}" for k, v in out.items()), flush=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=int, default=8 << 20)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dir", default=tempfile.gettempdir())
    ap.add_argument("--no-real", action="store_true", help="skip collecting the real trajectory")
    args = ap.parse_args()
    header("Trajectory store throughput and codecs (goal 3)")
    from storage.trajectory import DEFAULT_CHUNK

    print(f"# store dir {args.dir}: {shutil.disk_usage(args.dir).free / 2**30:.1f} GiB free; "
          f"{args.params:,} params x 5 rows = {20 * args.params / 1e6:.0f} MB per trial; DEFAULT_CHUNK {DEFAULT_CHUNK:,}")
    work = Path(tempfile.mkdtemp(prefix="know-bench-store-", dir=args.dir))
    try:
        layout = synthetic_layout(args.params)
        rows = np.empty((5, args.params), dtype=np.float32)
        for k in range(5):
            fill_stage(rows[k], k)
        configs = {"raw": lambda: raw_trial(work, rows)}
        for chunk in CHUNKS:
            configs[f"none/chunk={chunk}"] = lambda c=chunk: store_trial(work, rows, layout, c, None)
        for name, comp in codecs().items():
            if comp is not None:
                configs[f"{name}/chunk={DEFAULT_CHUNK}"] = lambda comp=comp: store_trial(work, rows, layout, DEFAULT_CHUNK, comp)
        res = interleave(configs, args.reps)
        mb = rows.nbytes / 1e6
        raw_w = median([r["write"] for r in res["raw"]])
        raw_d = median([r["durable"] for r in res["raw"]])
        raw_r = median([r["read"] for r in res["raw"]])
        print(f"# raw numpy: write {mb / raw_w:.0f} MB/s (tofile; {mb / raw_d:.0f} MB/s with sync), "
              f"read {mb / raw_r:.0f} MB/s (readinto, same blocks)")
        for name, trials in res.items():
            if name == "raw":
                continue
            w, r = median([t["write"] for t in trials]), median([t["read"] for t in trials])
            d = median([t["durable"] for t in trials])
            ratio = rows.nbytes / trials[0]["disk"]
            print(f"  {name:34s} write {mb / w:5.0f} MB/s ({raw_w / w:.2f} of raw; with sync {raw_d / d:.2f})   "
                  f"read {mb / r:5.0f} MB/s ({raw_r / r:.2f} of raw)   compression {ratio:.3f}")
        default = f"none/chunk={DEFAULT_CHUNK}"
        if default in res:
            w = median([t["write"] for t in res[default]])
            r = median([t["read"] for t in res[default]])
            ratio_line("store_write_vs_tofile", raw_w / w, GOAL_WRITE,
                       f"default (uncompressed, chunk {DEFAULT_CHUNK:,}): {mb / w:.0f} MB/s vs tofile {mb / raw_w:.0f} MB/s")
            d = median([t["durable"] for t in res[default]])
            ratio_line("store_write_vs_tofile_with_sync", raw_d / d, GOAL_WRITE,
                       f"write + os.sync(): {mb / d:.0f} MB/s vs {mb / raw_d:.0f} MB/s")
            ratio_line("store_windowed_read_vs_plain_read", raw_r / r, None,
                       f"iter_column_blocks {mb / r:.0f} MB/s vs plain read {mb / raw_r:.0f} MB/s "
                       f"({fmt_rate(rows.shape[1] / r, 'params/s')} of 5-row windows)")
        for name in codecs():
            if name != "none":
                w = median([t["write"] for t in res[f"{name}/chunk={DEFAULT_CHUNK}"]])
                ratio_line(f"store_write_{name}_vs_tofile", raw_w / w, None, f"{mb / w:.0f} MB/s")

        synth = compression(work, rows[:, : min(args.params, 1 << 22)], "synthetic weights")
        if not args.no_real:
            real = compression(work, real_trajectory(work), "real trained weights")
            best = max(real, key=real.get)
            ratio_line("compression_best_real", real[best], None, f"{best} on real weights; synthetic {synth[best]:.3f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    footer()


if __name__ == "__main__":
    main()
