"""Corruption is detected, never read as data (issue 14, item 2).

Chunks of runs, predictions and checkpoints carry a crc32c checksum; a chunk that is
truncated, has a flipped byte or is missing makes every reader fail with one DamagedRun line
that names the run, the stage (row) and the chunk file, and marks the item 'damaged';
`know runs --verify` finds and marks them, and the same `know collect` rewrites them.
Real stores, real files and the real CLI throughout.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

import know_cli
from know_core.layout import layout_size, param_layout
from know_core.models import build_model
from know_core.train import AdamState
from storage.trajectory import DamagedRun, StoreError, TrajectoryStore

ROOT = Path(know_cli.__file__).resolve().parent
ATTRS = {"mode": "independent", "model": "simple-cnn", "dataset": "digits", "sampling_rate": 0.5,
         "stage_subset_sizes": [100, 50, 25]}
CHUNK = 1000  # simple-cnn has 17,898 parameters: 18 chunks per row


@pytest.fixture(scope="module")
def layout():
    return param_layout(build_model("simple-cnn", 1, 10, 8))


def _rows(layout, n=3, seed=0):
    return np.random.default_rng(seed).standard_normal((n, layout_size(layout))).astype(np.float32)


def _write_run(store, run_id, layout, rows):
    store.begin_run(run_id, ATTRS, layout, len(rows))
    for k, row in enumerate(rows):
        store.append_stage(run_id, k, row)
    store.finish_run(run_id, train_seconds=1.0)


def _write_prediction(store, run_id, name, preds):
    arr = store.begin_prediction(run_id, name, len(preds), preds.shape[1],
                                 {"predictor": "taskvector", "factors": [2.0, 4.0][: len(preds)], "steps": len(preds)})
    arr[:, :] = preds
    store.finish_prediction(run_id, name, seconds=0.1)


# -- the three kinds of damage, on real chunk files ------------------------------------
def _truncate(f: Path) -> None:
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])


def _flip(f: Path) -> None:
    data = bytearray(f.read_bytes())
    data[len(data) // 3] ^= 0x10  # a data byte, not the checksum
    f.write_bytes(bytes(data))


def _delete(f: Path) -> None:
    f.unlink()


DAMAGE = {"truncated": (_truncate, "is truncated"), "flipped": (_flip, "fails its checksum"),
          "deleted": (_delete, "is missing")}


def _assert_one_line(err: DamagedRun, *, run_id: str, stage: int, key: str, reason: str, store: Path) -> None:
    msg = str(err)
    assert "\n" not in msg
    assert err.run_id == run_id and err.stage == stage and err.path == key and err.reason.startswith(reason)
    assert run_id in msg and f"{store}/{key}" in msg and reason in msg
    assert isinstance(err, StoreError)


# -- checksum codec --------------------------------------------------------------------
def test_every_array_carries_crc32c_as_its_last_codec(tmp_path, layout):
    path = tmp_path / "s.zarr"
    store = TrajectoryStore(path, chunk=CHUNK)
    rows = _rows(layout)
    _write_run(store, "r", layout, rows)
    _write_prediction(store, "r", "taskvector", rows[:2])
    store.save_checkpoint("ck", rows[0], layout, {"test_acc": 0.5},
                          optimizer=AdamState(rows[1].copy(), np.abs(rows[2]), 7.0))
    root = zarr.open_group(str(path), mode="r")  # plain zarr from here on
    for name in ("runs/r/weights", "predictions/r/taskvector/weights", "checkpoints/ck/weights", "checkpoints/ck/adam"):
        codecs = root[name].metadata.codecs
        assert isinstance(codecs[-1], Crc32cCodec), (name, codecs)
        assert sum(isinstance(c, Crc32cCodec) for c in codecs) == 1
    np.testing.assert_array_equal(root["runs/r/weights"][:], rows)

    zstd = TrajectoryStore(tmp_path / "z.zarr", chunk=CHUNK, compressors=[ZstdCodec(level=1)])
    _write_run(zstd, "r", layout, rows)
    codecs = zstd.weights("r").metadata.codecs
    assert [type(c).__name__ for c in codecs] == ["BytesCodec", "ZstdCodec", "Crc32cCodec"]
    _flip(tmp_path / "z.zarr" / "runs" / "r" / "weights" / "c" / "1" / "4")  # compressed bytes: crc catches it
    with pytest.raises(DamagedRun) as e:
        zstd.read_stages("r")
    assert e.value.stage == 1 and e.value.path == "runs/r/weights/c/1/4"


# -- every reader, every kind of damage --------------------------------------------------
@pytest.mark.parametrize("kind", DAMAGE)
def test_read_stages_damaged_chunk(tmp_path, layout, kind):
    damage, reason = DAMAGE[kind]
    path = tmp_path / "s.zarr"
    store = TrajectoryStore(path, chunk=CHUNK)
    rows = _rows(layout)
    _write_run(store, "r", layout, rows)
    np.testing.assert_array_equal(store.read_stages("r"), rows)
    damage(path / "runs" / "r" / "weights" / "c" / "2" / "5")
    with pytest.raises(DamagedRun) as e:
        store.read_stages("r")
    _assert_one_line(e.value, run_id="r", stage=2, key="runs/r/weights/c/2/5", reason=reason, store=path)
    assert "stage 2 is damaged" in str(e.value) and "know collect" in str(e.value)
    with pytest.raises(DamagedRun, match="stage 2"):
        store.read_stages("r", 2)
    np.testing.assert_array_equal(store.read_stages("r", [0, 1]), rows[:2])  # intact rows still read
    # the run is marked: a re-collect rewrites it, preflights name the damage
    rec = store.run("r")
    assert rec.status == "damaged" and rec.error == str(e.value) and not rec.is_complete
    with pytest.raises(DamagedRun, match="stage 2 is damaged"):
        store.require_run("r")


@pytest.mark.parametrize("kind", DAMAGE)
def test_read_prediction_damaged_chunk(tmp_path, layout, kind):
    damage, reason = DAMAGE[kind]
    path = tmp_path / "s.zarr"
    store = TrajectoryStore(path, chunk=CHUNK)
    rows = _rows(layout)
    _write_run(store, "r", layout, rows)
    preds = _rows(layout, 2, seed=5)
    _write_prediction(store, "r", "taskvector", preds)
    np.testing.assert_array_equal(store.read_prediction("r", "taskvector", 2)[0], preds[1])
    damage(path / "predictions" / "r" / "taskvector" / "weights" / "c" / "1" / "3")
    with pytest.raises(DamagedRun) as e:
        store.read_prediction("r", "taskvector", 2)
    _assert_one_line(e.value, run_id="r", stage=2, key="predictions/r/taskvector/weights/c/1/3", reason=reason,
                     store=path)
    assert "prediction 'taskvector' step 2 is damaged" in str(e.value) and "know predict" in str(e.value)
    assert store.prediction("r", "taskvector").status == "damaged"
    with pytest.raises(DamagedRun, match="step 2 is damaged"):  # from the record, step 1 included
        store.read_prediction("r", "taskvector", 1)
    assert store.run_status("r") == "complete"  # the run itself is fine


@pytest.mark.parametrize("kind", DAMAGE)
def test_load_checkpoint_and_adam_damaged_chunk(tmp_path, layout, kind):
    damage, reason = DAMAGE[kind]
    path = tmp_path / "s.zarr"
    store = TrajectoryStore(path, chunk=CHUNK)
    rows = _rows(layout)
    for ck in ("w", "a"):
        store.save_checkpoint(ck, rows[0], layout, {"test_acc": 0.5},
                              optimizer=AdamState(rows[1].copy(), np.abs(rows[2]), 7.0))
    np.testing.assert_array_equal(store.load_checkpoint("w")[0], rows[0])
    damage(path / "checkpoints" / "w" / "weights" / "c" / "0" / "7")
    with pytest.raises(DamagedRun) as e:
        store.load_checkpoint("w")
    _assert_one_line(e.value, run_id="w", stage=0, key="checkpoints/w/weights/c/0/7", reason=reason, store=path)
    assert str(e.value).startswith("checkpoint w: weights row 0 is damaged")
    assert store.checkpoint("w").status == "damaged"

    np.testing.assert_array_equal(store.load_optimizer_state("a").exp_avg_sq, np.abs(rows[2]))
    damage(path / "checkpoints" / "a" / "adam" / "c" / "1" / "2")
    with pytest.raises(DamagedRun) as e:
        store.load_optimizer_state("a")
    _assert_one_line(e.value, run_id="a", stage=1, key="checkpoints/a/adam/c/1/2", reason=reason, store=path)
    with pytest.raises(DamagedRun, match="adam row 1"):  # marked: the weights are refused as well
        store.load_checkpoint("a")


@pytest.mark.parametrize("kind", DAMAGE)
def test_iter_column_blocks_damaged_chunk(tmp_path, layout, kind):
    damage, reason = DAMAGE[kind]
    path = tmp_path / "s.zarr"
    store = TrajectoryStore(path, chunk=CHUNK)
    rows = _rows(layout)
    _write_run(store, "r", layout, rows)
    damage(path / "runs" / "r" / "weights" / "c" / "1" / "12")
    blocks = store.iter_column_blocks("r", slice(0, 3), 4 * CHUNK)
    assert [c0 for c0, _ in zip(range(3), blocks)] == [0, 1, 2]  # blocks 0-2 (chunks 0-11) are intact
    with pytest.raises(DamagedRun) as e:
        next(blocks)
    _assert_one_line(e.value, run_id="r", stage=1, key="runs/r/weights/c/1/12", reason=reason, store=path)


def test_whole_weights_array_gone_is_damage_not_keyerror(tmp_path, layout):
    path = tmp_path / "s.zarr"
    store = TrajectoryStore(path, chunk=CHUNK)
    _write_run(store, "r", layout, _rows(layout))
    shutil.rmtree(path / "runs" / "r" / "weights")
    with pytest.raises(DamagedRun) as e:
        store.read_stages("r", 0)
    assert e.value.stage is None and e.value.path == "runs/r/weights/zarr.json" and "is missing" in str(e.value)


def test_legit_nan_in_a_complete_run_is_not_damage(make_store, layout):
    store = make_store(chunk=CHUNK)
    rows = _rows(layout)
    rows[1, :CHUNK] = np.nan  # a whole NaN chunk, written: not a missing one
    _write_run(store, "r", layout, rows)
    np.testing.assert_array_equal(store.read_stages("r"), rows)
    assert store.verify().ok and store.run_status("r") == "complete"


def test_unwritten_rows_of_a_running_run_are_not_damage(make_store, layout):
    store = make_store(chunk=CHUNK)
    store.begin_run("r", ATTRS, layout, 3)
    store.append_stage("r", 0, _rows(layout, 1)[0])
    assert np.isnan(store.read_stages("r", [1, 2])).all()
    assert store.run_status("r") == "running"


def test_read_tensor_of_a_damaged_run_reads_its_own_intact_chunks(tmp_path, layout):
    path = tmp_path / "s.zarr"
    store = TrajectoryStore(path, chunk=CHUNK)
    rows = _rows(layout)
    _write_run(store, "r", layout, rows)
    spec = next(s for s in layout if s.name == "fc.weight")
    first, last = spec.offset // CHUNK, (spec.stop - 1) // CHUNK
    other = next(j for j in range(18) if not first <= j <= last)
    _flip(path / "runs" / "r" / "weights" / "c" / "0" / str(other))
    with pytest.raises(DamagedRun):
        store.read_stages("r")
    assert store.run_status("r") == "damaged"
    np.testing.assert_array_equal(store.read_tensor("r", spec), rows[:, spec.offset : spec.stop])
    _delete(path / "runs" / "r" / "weights" / "c" / "2" / str(first))
    with pytest.raises(DamagedRun, match=f"c/2/{first} is missing"):
        store.read_tensor("r", spec)


# -- arrays written before the checksum --------------------------------------------------
def _old_run(store: TrajectoryStore, run_id: str, layout, rows) -> None:
    """A run as the store wrote it before crc32c: the same array without the checksum codec."""
    store.begin_run(run_id, ATTRS, layout, len(rows))
    store.root.create_array(f"runs/{run_id}/weights", shape=rows.shape, chunks=(1, CHUNK), dtype="float32",
                            fill_value=np.nan, compressors=None, overwrite=True)
    for k, row in enumerate(rows):
        store.append_stage(run_id, k, row)
    store.finish_run(run_id)


def test_old_arrays_without_crc_still_read_and_damage_is_still_found(tmp_path, layout):
    path = tmp_path / "s.zarr"
    store = TrajectoryStore(path, chunk=CHUNK)
    rows = _rows(layout)
    for rid in ("old1", "old2"):
        _old_run(store, rid, layout, rows)
    assert not any(isinstance(c, Crc32cCodec) for c in store.weights("old1").metadata.codecs)
    np.testing.assert_array_equal(store.read_stages("old1"), rows)
    np.testing.assert_array_equal(TrajectoryStore(path).read_stages("old2", 1), rows[1])
    assert store.verify().ok

    _truncate(path / "runs" / "old1" / "weights" / "c" / "1" / "0")  # without crc: zarr's reshape error
    with pytest.raises(DamagedRun) as e:
        store.read_stages("old1")
    _assert_one_line(e.value, run_id="old1", stage=1, key="runs/old1/weights/c/1/0", reason="is truncated", store=path)
    assert "(2000 of 4000 bytes)" in str(e.value)
    _delete(path / "runs" / "old2" / "weights" / "c" / "2" / "17")
    with pytest.raises(DamagedRun) as e:
        store.read_stages("old2")
    _assert_one_line(e.value, run_id="old2", stage=2, key="runs/old2/weights/c/2/17", reason="is missing", store=path)


# -- verify ------------------------------------------------------------------------------
def test_verify_reads_everything_and_marks_what_is_damaged(tmp_path, layout):
    path = tmp_path / "s.zarr"
    store = TrajectoryStore(path, chunk=CHUNK)
    rows = _rows(layout)
    for rid in ("a", "b", "c"):
        _write_run(store, rid, layout, rows)
    _write_prediction(store, "a", "taskvector", rows[:2])
    store.save_checkpoint("ck", rows[0], layout, {}, optimizer=AdamState(rows[1].copy(), np.abs(rows[2]), 3.0))
    report = store.verify()
    assert report.ok and (report.runs, report.predictions, report.checkpoints) == (3, 1, 1)

    _flip(path / "runs" / "b" / "weights" / "c" / "2" / "17")  # the very last chunk of the run
    _delete(path / "predictions" / "a" / "taskvector" / "weights" / "c" / "0" / "0")
    _truncate(path / "checkpoints" / "ck" / "adam" / "c" / "0" / "9")
    report = store.verify()
    got = {(d.kind, d.run_id, d.stage, d.path) for d in report.damaged}
    assert got == {("run", "b", 2, "runs/b/weights/c/2/17"),
                   ("prediction", "a", 1, "predictions/a/taskvector/weights/c/0/0"),
                   ("checkpoint", "ck", 0, "checkpoints/ck/adam/c/0/9")}
    assert {r.run_id: r.status for r in store.runs()} == {"a": "complete", "b": "damaged", "c": "complete"}
    assert store.prediction("a", "taskvector").status == "damaged" and store.checkpoint("ck").status == "damaged"
    again = store.verify()  # marked items are reported from their records
    assert [str(d) for d in again.damaged] == [str(d) for d in report.damaged]
    assert (again.runs, again.predictions, again.checkpoints) == (2, 0, 0)


# -- the CLI, end to end -----------------------------------------------------------------
STAGES = 6  # the fewest meta-training takes (a window of 5 and its target)
COLLECT = ["--dataset", "digits", "--limit", "300", "--models", "simple-cnn", "--runs", "3", "--stages", str(STAGES)]


def _cli(argv: list[str], capfd) -> tuple[int, str, str]:
    capfd.readouterr()
    with pytest.raises(SystemExit) as exc:
        know_cli.main(argv)
    out, err = capfd.readouterr()
    return exc.value.code, out, err


def _errors(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


def _chunk_bytes(store: Path) -> dict[str, bytes]:
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted((store / "runs").rglob("*"))
            if p.is_file() and "/c/" in str(p.relative_to(store)).replace(os.sep, "/")}


@pytest.fixture(scope="module")
def collected(tmp_path_factory, prefect_harness):
    """A store collected once with the CLI (3 simple-cnn runs of STAGES stages); tests work on copies."""
    store = tmp_path_factory.mktemp("collected") / "runs.zarr"
    with pytest.raises(SystemExit) as exc:  # a module fixture has no capfd: the exit code is what matters
        know_cli.main(["collect", "--store", str(store), *COLLECT])
    assert exc.value.code == 0
    run_ids = TrajectoryStore(store).run_ids()
    assert len(run_ids) == 3
    return store, run_ids


@pytest.fixture
def store_copy(collected, tmp_path):
    src, run_ids = collected
    dst = tmp_path / "runs.zarr"
    shutil.copytree(src, dst)
    return dst, run_ids


def test_cli_verify_marks_damage_and_recollect_repairs_bit_identical(store_copy, capfd):
    store, (r0, r1, r2) = store_copy
    original = _chunk_bytes(store)
    assert len(original) == 3 * STAGES  # one chunk per stage
    code, _, err = _cli(["runs", "--store", str(store), "--verify"], capfd)
    assert code == 0 and not _errors(err) and "3 complete runs" in err

    chunk = lambda rid, k: store / "runs" / rid / "weights" / "c" / str(k) / "0"  # noqa: E731
    _truncate(chunk(r0, 1))
    _flip(chunk(r1, 2))
    _delete(chunk(r2, 3))
    code, out, err = _cli(["runs", "--store", str(store), "--verify"], capfd)
    assert code == 2, err
    lines = _errors(err)
    assert len(lines) == 3, err
    for rid, k, reason in ((r0, 1, "is truncated"), (r1, 2, "fails its checksum"), (r2, 3, "is missing")):
        line = next(line for line in lines if f"run {rid}:" in line)
        assert f"stage {k} is damaged" in line and f"{store}/runs/{rid}/weights/c/{k}/0 {reason}" in line
        assert "re-collect" in line
    assert "Traceback" not in err
    assert {r.status for r in TrajectoryStore(store).runs()} == {"damaged"}

    code, out, err = _cli(["runs", "--store", str(store)], capfd)  # no --verify: the status as it is
    assert code == 0 and out.count("damaged") == 3 and not _errors(err)

    code, _, err = _cli(["collect", "--store", str(store), *COLLECT], capfd)
    assert code == 0, err
    assert {r.status for r in TrajectoryStore(store).runs()} == {"complete"}
    assert _chunk_bytes(store) == original  # rewritten bit for bit
    code, _, err = _cli(["runs", "--store", str(store), "--verify"], capfd)
    assert code == 0 and not _errors(err)


def test_cli_export_of_a_damaged_run_is_one_line_and_writes_nothing(store_copy, capfd, tmp_path):
    store, (r0, _, _) = store_copy
    out_file = tmp_path / "theta0.pt"
    _flip(store / "runs" / r0 / "weights" / "c" / "0" / "0")
    code, _, err = _cli(["export", "--store", str(store), "--run-id", r0, "--out", str(out_file)], capfd)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1, err
    line = _errors(err)[0]
    assert f"run {r0}: stage 0 is damaged" in line and f"runs/{r0}/weights/c/0/0 fails its checksum" in line
    assert not out_file.exists()
    # marked now: the next reader's preflight names the same damage
    code, _, err = _cli(["export", "--store", str(store), "--run-id", r0, "--out", str(out_file)], capfd)
    assert code == 2 and _errors(err) == [line] and not out_file.exists()


def test_cli_predict_of_a_damaged_run_is_one_line(store_copy, capfd):
    store, (r0, _, _) = store_copy
    _truncate(store / "runs" / r0 / "weights" / "c" / "1" / "0")
    code, _, err = _cli(["predict", "--store", str(store), "--run-id", r0, "--predictor", "taskvector",
                         "--steps", "1"], capfd)
    assert code == 2, err
    lines = _errors(err)
    assert len(lines) == 1 and f"run {r0}: stage 1 is damaged" in lines[0], err
    assert f"runs/{r0}/weights/c/1/0 is truncated" in lines[0] and "Traceback" not in err
    assert TrajectoryStore(store).prediction(r0, "taskvector") is None  # nothing half-written is kept


def test_cli_export_of_a_damaged_prediction_is_one_line(store_copy, capfd, tmp_path):
    store, (r0, _, _) = store_copy
    code, _, err = _cli(["predict", "--store", str(store), "--run-id", r0, "--predictor", "taskvector",
                         "--steps", "2"], capfd)
    assert code == 0, err
    out_file = tmp_path / "pred.pt"
    _delete(store / "predictions" / r0 / "taskvector" / "weights" / "c" / "1" / "0")
    code, _, err = _cli(["export", "--store", str(store), "--run-id", r0, "--predictor", "taskvector", "--step", "2",
                         "--out", str(out_file)], capfd)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1, err
    assert f"run {r0}: prediction 'taskvector' step 2 is damaged" in err
    assert f"predictions/{r0}/taskvector/weights/c/1/0 is missing" in err and not out_file.exists()
    # the same `know predict` rewrites the damaged prediction
    code, _, err = _cli(["predict", "--store", str(store), "--run-id", r0, "--predictor", "taskvector",
                         "--steps", "2"], capfd)
    assert code == 0, err
    assert TrajectoryStore(store).prediction(r0, "taskvector").status == "complete"
    code, _, err = _cli(["export", "--store", str(store), "--run-id", r0, "--predictor", "taskvector", "--step", "2",
                         "--out", str(out_file)], capfd)
    assert code == 0 and out_file.exists(), err


def test_cli_meta_train_on_a_damaged_run_is_one_line(store_copy, capfd, tmp_path):
    store, (r0, r1, r2) = store_copy
    for rid in (r0, r1, r2):
        _flip(store / "runs" / rid / "weights" / "c" / "3" / "0")
    code, _, err = _cli(["meta-train", "--store", str(store), "--out", str(tmp_path / "known"), "--epochs", "1",
                         "--pairs-per-run", "200", "--no-compare-modes"], capfd)
    assert code == 2, err
    lines = _errors(err)
    assert len(lines) == 1 and "stage 3 is damaged" in lines[0] and "fails its checksum" in lines[0], err
    assert "Traceback" not in err


def test_know_runs_verify_in_a_real_process(store_copy, tmp_path):
    store, (r0, _, _) = store_copy
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_HOME": str(tmp_path / "home")}
    cmd = [sys.executable, str(ROOT / "know_cli.py"), "runs", "--store", str(store), "--verify"]
    ok = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    _truncate(store / "runs" / r0 / "weights" / "c" / "2" / "0")
    bad = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2, bad.stderr
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), bad.stderr
    assert f"run {r0}: stage 2 is damaged" in lines[0] and f"runs/{r0}/weights/c/2/0 is truncated" in lines[0]
    assert "damaged" in bad.stdout  # the table shows the mark
