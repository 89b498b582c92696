"""Out-of-core meta-training: pairs streamed from a real Zarr store in chunk-aligned blocks.

How "the streamed run matches a non-streamed one, as far as shuffling allows" is tested:
  * the blocks give exactly build_pairs' pairs (same scalars under a cap, same row order for a
    run), and the blockwise coherence equals the whole-trajectory one;
  * with one full batch per epoch the order of the pairs cannot matter, so the streamed and
    the in-memory KNOWN must end with the same weights (float rounding apart);
  * with minibatches the orders differ by design; the resume test then checks the streamed
    path against itself: killed with SIGKILL mid-epoch and resumed, it ends with bit-identical
    weights to an uninterrupted run.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from know_core.layout import TensorSpec
from know_core.pairs import build_pairs, per_kind_coherence, step_coherence
from params.predict import MetaTrainParams
from storage.known_files import load_known_payload, load_state
from storage.trajectory import TrajectoryStore
from tasks.meta import run_pairs, streams, train_known_set

ROOT = Path(__file__).resolve().parents[1]
STAGES = 8
CHUNK = 2048


def layout_of(n_conv: int) -> list[TensorSpec]:
    """conv, bias, fc, bias, conv: kinds interleaved and straddling chunk boundaries."""
    parts = [("conv", (n_conv // 9, 1, 3, 3)), ("bias", (37,)), ("fc", (40, 50)), ("bias", (40,)), ("conv", (30, 4, 1, 1))]
    out, offset = [], 0
    for i, (kind, shape) in enumerate(parts):
        out.append(TensorSpec(f"t{i}", shape, kind, offset))
        offset += int(np.prod(shape))
    return out


def write_runs(url: Path, n_runs: int = 4, n_conv: int = 9000) -> tuple[TrajectoryStore, list[str]]:
    store = TrajectoryStore(url, chunk=CHUNK)
    store.prepare()
    layout = layout_of(n_conv)
    n = layout[-1].stop
    ids = []
    for r in range(n_runs):
        rng = np.random.default_rng(r)
        theta = (0.05 * rng.standard_normal(n)).astype(np.float32)
        drift = (0.002 * rng.standard_normal(n)).astype(np.float32)
        rid = f"synthetic-{r}"
        store.begin_run(rid, {"mode": "independent", "model": "synthetic", "stage_subset_sizes":
                              [4000 // 2 ** k for k in range(STAGES)], "sampling_rate": 0.5}, layout, STAGES)
        for k in range(STAGES):
            noise = (0.0005 * rng.standard_normal(n)).astype(np.float32)
            store.append_stage(rid, k, theta - k * drift + noise)
        store.finish_run(rid)
        ids.append(rid)
    return store, ids


def weights(out: Path) -> dict[str, torch.Tensor]:
    payload = load_known_payload(out)
    return {f"{kind}.{k}": v for kind, sd in payload["models"].items() for k, v in sd.items()}


@pytest.mark.parametrize("cap", [0, 3000])
def test_blocks_give_build_pairs_rows_and_coherence(tmp_path, cap):
    store, ids = write_runs(tmp_path / "s.zarr", n_runs=1)
    run = store.require_run(ids[0])
    pairs, sizes, coh, coh_kind = run_pairs(store, ids[0], cap, seed=7)
    traj = store.read_stages(ids[0])
    want = build_pairs(traj, run.layout, max_per_kind=cap or None, rng=7)
    for kind, (X, Y) in want.items():
        np.testing.assert_array_equal(pairs[kind][0], X)
        np.testing.assert_array_equal(pairs[kind][1], Y)
        assert len(sizes[kind]) == len(Y)
    assert coh == pytest.approx(step_coherence(traj, run.layout), abs=1e-12)
    assert coh_kind == pytest.approx(per_kind_coherence(traj, run.layout), abs=1e-12)


def test_auto_loader_streams_only_when_the_pairs_outgrow_the_buffer(tmp_path):
    store, ids = write_runs(tmp_path / "s.zarr", n_runs=2)
    small = MetaTrainParams(store=str(store.url), pairs_per_run=0, buffer_pairs=4096)
    big = small.model_copy(update={"buffer_pairs": 1 << 22})
    assert streams(small, store, ids) and not streams(big, store, ids)
    assert streams(big.model_copy(update={"loader": "stream"}), store, ids)
    assert not streams(small.model_copy(update={"loader": "memory"}), store, ids)


def test_streamed_full_batch_training_ends_where_in_memory_training_ends(tmp_path):
    store, _ = write_runs(tmp_path / "s.zarr")
    base = dict(store=str(store.url), pairs_per_run=0, epochs=2, batch_size=1 << 20, patience=5, compare_modes=False)
    mem = MetaTrainParams(**base, out=str(tmp_path / "mem"), loader="memory")
    # one buffer group holds every pair (read block by block from the store), so one step per epoch
    stream = MetaTrainParams(**base, out=str(tmp_path / "stream"), loader="stream", buffer_pairs=1 << 20)
    a, b = (Path(train_known_set.fn(p, "all", "raw")) for p in (mem, stream))
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-6)
    history = json.loads(load_known_payload(b)["provenance"]["history"])
    assert len(history["conv"]) == 2


CHILD = """
import json, sys
sys.path.insert(0, {root!r})
import torch
torch.set_num_threads(1)
from params.predict import MetaTrainParams
from tasks.meta import train_known_set
train_known_set.fn(MetaTrainParams(**json.loads(sys.argv[1])), "all", "raw")
"""


@pytest.mark.slow
def test_streamed_training_killed_mid_epoch_resumes_to_the_same_weights(tmp_path):
    store, _ = write_runs(tmp_path / "s.zarr", n_conv=36000)
    base = dict(store=str(store.url), pairs_per_run=0, epochs=2, batch_size=512, patience=5, compare_modes=False,
                loader="stream", buffer_pairs=4096)
    env = {**os.environ, "KNOW_TORCH_THREADS": "1"}
    ref = MetaTrainParams(**base, out=str(tmp_path / "ref"))
    subprocess.run([sys.executable, "-c", CHILD.format(root=str(ROOT)), ref.model_dump_json()], env=env, check=True,
                   timeout=600)

    spec = MetaTrainParams(**base, out=str(tmp_path / "killed"))
    ckpt = Path(spec.out) / "all" / "raw" / "ckpt-conv.pt"
    child = subprocess.Popen([sys.executable, "-c", CHILD.format(root=str(ROOT)), spec.model_dump_json()], env=env)
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and child.poll() is None:
            try:
                state = load_state(ckpt)
            except Exception:  # noqa: BLE001 - caught between write and rename: look again
                state = None
            if state and state["epoch"] == 0 and state["group"] >= 5:
                break
            time.sleep(0.02)
        assert child.poll() is None, "the child finished before it could be killed mid-epoch"
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    finally:
        if child.poll() is None:
            child.kill()
    state = load_state(ckpt)
    assert state["epoch"] == 0 and 5 <= state["group"], "the last checkpoint is mid-way through the first epoch"
    assert not (Path(spec.out) / "all" / "raw" / "known.pt").exists()

    subprocess.run([sys.executable, "-c", CHILD.format(root=str(ROOT)), spec.model_dump_json()], env=env, check=True,
                   timeout=600)
    got, want = weights(Path(spec.out) / "all" / "raw"), weights(Path(ref.out) / "all" / "raw")
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert not ckpt.exists()
