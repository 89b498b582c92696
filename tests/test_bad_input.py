"""The bad-input catalogue (issue 14): every command and stage model, tried as a clumsy user would.

Each case is one `know` command line. It must exit 2 with exactly one line on stderr that
starts with "error:", names the option or file (`needle`) and says how to fix it (`fix`),
print no traceback, and leave the store unchanged with nothing newly marked complete.

The commands run in-process (`know_cli.main`) against the test harness's Prefect server, on
a small real store (`world`: one complete 3-stage digits run with a taskvector prediction)
and on real broken data files written here. docs/reliability.md lists the same table.
"""
from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest

import know_cli

pytestmark = pytest.mark.usefixtures("prefect_harness")


@pytest.fixture(scope="module")
def world(tmp_path_factory, prefect_harness):
    """A store with one complete run (3 stages) and its taskvector prediction, plus bad files."""
    from flows.collect import collect_trajectories
    from flows.predict import predict_weights
    from params.collect import CollectParams
    from params.predict import PredictParams

    root = tmp_path_factory.mktemp("bad-input")
    store = root / "runs.zarr"
    [run_id] = collect_trajectories(CollectParams(store=str(store), dataset="digits", limit=300, runs=1, stages=3,
                                                  models="simple-cnn", device="cpu"))
    predict_weights(PredictParams(store=str(store), run_id=run_id, predictor="taskvector", steps=1))
    (root / "a-file").write_text("not a store\n")
    (root / "a-dir").mkdir()
    # broken user data sets, in the formats users bring
    cifar = root / "cifar"
    cifar.mkdir()
    (cifar / "data_batch_1").write_bytes(b"\x80\x04this is not a pickle")
    idx = root / "fmnist"
    idx.mkdir()
    with gzip.open(idx / "train-images-idx3-ubyte.gz", "wb") as fh:
        fh.write(struct.pack(">HBB", 0, 8, 3) + struct.pack(">III", 10, 28, 28) + b"\x00" * 100)  # truncated
    with gzip.open(idx / "train-labels-idx1-ubyte.gz", "wb") as fh:
        fh.write(struct.pack(">HBB", 0, 8, 1) + struct.pack(">I", 10) + bytes(10))
    folder = root / "images"
    (folder / "train" / "cat").mkdir(parents=True)
    (folder / "train" / "cat" / "x.png").write_bytes(b"not a png")
    empty = root / "empty.zarr"
    return {"root": root, "store": str(store), "run": run_id, "file": str(root / "a-file"),
            "dir": str(root / "a-dir"), "cifar": str(cifar), "idx": str(idx), "folder": str(folder),
            "missing": str(root / "nope"), "empty": str(empty)}


#: (id, argv with {placeholders} from `world`, text the line must contain, text of the fix)
CASES = [
    # ---- collect: the stage model's fields
    ("collect-runs-0", "collect --store {store} --runs 0", "--runs", "at least 1"),
    ("collect-limit-negative", "collect --store {store} --limit -5", "--limit", "at least 0"),
    ("collect-classes-reversed", "collect --store {store} --classes 9-0", "--classes", ""),
    ("collect-classes-out-of-range", "collect --store {store} --classes 8-12", "--classes", ""),
    ("collect-classes-not-numbers", "collect --store {store} --classes a-b", "--classes", ""),
    ("collect-unknown-dataset", "collect --store {store} --dataset imagenet", "--dataset", "choose one of"),
    ("collect-unknown-model", "collect --store {store} --models vgg", "--models", ""),
    ("collect-stages-1", "collect --store {store} --stages 1", "--stages", "at least 2"),
    ("collect-r-above-1", "collect --store {store} --r 1.5", "--r", "less than 1"),
    ("collect-r-range-swapped", "collect --store {store} --r-min 0.9 --r-max 0.3", "--r-min 0.9 is above --r-max 0.3", "swap"),
    ("collect-lr-range-swapped", "collect --store {store} --lr-min 0.1 --lr-max 0.01", "--lr-min", "swap"),
    ("collect-batch-range-swapped", "collect --store {store} --batch-min 300 --batch-max 10", "--batch-min", "swap"),
    ("collect-unknown-sweep", "collect --store {store} --sweep bayes", "--sweep", ""),
    ("collect-unknown-mode", "collect --store {store} --mode parallel", "--mode", ""),
    ("collect-unknown-optimizer", "collect --store {store} --optimizer adamw", "--optimizer", ""),
    ("collect-store-is-a-file", "collect --store {file}", "--store", "pass a directory"),
    ("collect-unknown-option", "collect --store {store} --epochs 3", "--epochs", ""),
    ("collect-runs-not-a-number", "collect --store {store} --runs many", "--runs", ""),
    ("collect-r-values-out-of-range", "collect --store {store} --sweep grid --r-values 0.5,1.5", "--r-values", "0 < r < 1"),
    ("collect-lr-values-negative", "collect --store {store} --sweep grid --lr-values=-1", "--lr-values", ""),
    ("collect-workers-0", "collect --store {store} --workers 0", "--workers", "at least 1"),
    ("collect-batch-larger-than-subset", "collect --store {store} --limit 300 --batch-size 290 --stages 4",
     "batch of 290", "smaller batch size"),
    ("collect-fashion-mnist-missing-dir", "collect --store {store} --dataset fashion-mnist --data-dir {missing}",
     "{missing}", ""),
    ("collect-cifar-corrupt-batch", "collect --store {store} --dataset cifar10 --data-dir {cifar}", "data_batch_1", ""),
    ("collect-idx-truncated", "collect --store {store} --dataset fashion-mnist --data-dir {idx}",
     "train-images-idx3-ubyte", ""),
    ("collect-image-folder-broken-image", "collect --store {store} --dataset image-folder --data-dir {folder}",
     "x.png", "fix or remove it"),
    # ---- trajectory
    ("trajectory-unknown-model", "trajectory --store {store} --model vgg", "--model", ""),
    ("trajectory-pretrain-epochs-0", "trajectory --store {store} --pretrain-epochs 0", "--pretrain-epochs", "at least 1"),
    ("trajectory-pretrain-lr-0", "trajectory --store {store} --pretrain-lr 0", "--pretrain-lr", "greater than 0"),
    ("trajectory-pretrain-val-fraction-0.9", "trajectory --store {store} --pretrain-patience 2 --pretrain-val-fraction 0.9",
     "--pretrain-val-fraction", "less than 0.5"),
    ("trajectory-stages-1", "trajectory --store {store} --stages 1", "--stages", "at least 2"),
    ("trajectory-batch-larger-than-subset", "trajectory --store {store} --limit 200 --batch-size 128 --stages 5",
     "batch size 128", "lower --batch-size"),
    # ---- runs
    ("runs-missing-store", "runs --store {missing}", "{missing}", "know collect --store"),
    ("runs-store-is-a-file", "runs --store {file}", "--store", "pass a directory"),
    # ---- meta-train
    ("meta-train-missing-store", "meta-train --store {missing}", "{missing}", "know collect"),
    ("meta-train-official-dir-missing", "meta-train --store {store} --official-dir {missing}", "{missing}", ""),
    ("meta-train-val-fraction-1", "meta-train --store {store} --val-fraction 1", "--val-fraction", "less than 1"),
    ("meta-train-unknown-meta-data", "meta-train --store {store} --meta-data mixed", "--meta-data", ""),
    ("meta-train-too-few-long-runs", "meta-train --store {store} --out {root}/known", "at least 2 complete runs",
     "know collect --stages 7"),
    ("meta-train-epochs-0", "meta-train --store {store} --epochs 0", "--epochs", "at least 1"),
    # ---- predict
    ("predict-no-run-id", "predict --store {store}", "--run-id", "required"),
    ("predict-unknown-run", "predict --store {store} --run-id deadbeef --predictor taskvector", "deadbeef", "know runs"),
    ("predict-unknown-predictor", "predict --store {store} --run-id {run} --predictor magic", "--predictor", ""),
    ("predict-steps-0", "predict --store {store} --run-id {run} --steps 0", "--steps", "at least 1"),
    ("predict-official-without-dir", "predict --store {store} --run-id {run} --predictor know --known official",
     "--official-dir", ""),
    ("predict-known-dir-missing", "predict --store {store} --run-id {run} --predictor know --known {missing}",
     "{missing}", ""),
    ("predict-alpha-0", "predict --store {store} --run-id {run} --predictor taskvector --alpha 0", "--alpha",
     "greater than 0"),
    ("predict-too-few-stages", "predict --store {store} --run-id {run} --predictor logfit", "stages", ""),
    ("predict-missing-store", "predict --store {missing} --run-id {run} --predictor taskvector", "{missing}",
     "know collect"),
    # ---- export
    ("export-step-0", "export --store {store} --run-id {run} --predictor taskvector --step 0 --out {root}/m.pt",
     "--step", "at least 1"),
    ("export-not-predicted", "export --store {store} --run-id {run} --predictor know --known official --step 1 "
     "--out {root}/m.pt", "know@official", "know predict"),
    ("export-unknown-prediction", "export --store {store} --run-id {run} --prediction nope --step 1 --out {root}/m.pt",
     "nope", "know predict"),
    ("export-step-beyond-prediction", "export --store {store} --run-id {run} --predictor taskvector --step 3 "
     "--out {root}/m.pt", "step 3", ""),
    ("export-out-is-a-directory", "export --store {store} --run-id {run} --predictor taskvector --step 1 --out {dir}",
     "{dir}", "name the file"),
    ("export-recalibrate-unknown-dataset", "export --store {store} --run-id {run} --predictor taskvector --step 1 "
     "--out {root}/m.pt --recalibrate-bn imagenet", "--recalibrate-bn imagenet", "choose one of"),
    ("export-recalibrate-bad-classes", "export --store {store} --run-id {run} --predictor taskvector --step 1 "
     "--out {root}/m.pt --recalibrate-bn digits --recalibrate-classes 4-1", "--recalibrate-classes", "write 1-4"),
    ("run-bad-target-classes", "run --preset quick --out {root}/x --target-classes 7-3", "--target-classes", "write 3-7"),
    ("run-unknown-source-dataset", "run --preset quick --out {root}/x --source-dataset imagenet", "--source-dataset",
     "choose one of"),
    ("export-unknown-run", "export --store {store} --run-id deadbeef --out {root}/m.pt", "deadbeef", "know runs"),
    # ---- run (the experiment)
    ("run-unknown-preset", "run --preset huge --out {root}/x", "huge", "choose one of"),
    ("run-factor-not-a-power", "run --preset quick --out {root}/x --methods naive,know:3", "know:3", "power"),
    ("run-r-third-factor-8", "run --preset quick --out {root}/x --r 0.3333333333333333 --methods naive,know:8",
     "know:8", "power"),
    ("run-unknown-method", "run --preset quick --out {root}/x --methods naive,magic:2", "magic", "choose from"),
    ("run-seeds-0", "run --preset quick --out {root}/x --seeds 0", "--seeds", "at least 1"),
    ("run-out-is-a-file", "run --preset quick --out {file}", "{file}", "--out"),
    ("run-know-lr-without-know", "run --preset quick --out {root}/x --methods naive,know-lr", "know-lr", "know:2"),
    ("run-bad-lr-grid", "run --preset quick --out {root}/x --naive-lr-grid fast", "--naive-lr-grid", ""),
    ("run-lr-grid-extend-negative", "run --preset quick --out {root}/x --lr-grid-extend=-1", "--lr-grid-extend",
     "at least 0"),
    ("run-window-too-large", "run --preset quick --out {root}/x --window 7", "--window", "at most 5"),
    ("run-no-meta-runs", "run --preset quick --out {root}/x --meta-runs 0", "--meta-runs", "set one above 0"),
    ("run-naive-full-without-limit", "run --preset quick --out {root}/x --methods naive,naive-full",
     "--full-source-limit", "half-data"),
    ("run-predictor-without-factor", "run --preset quick --out {root}/x --methods naive,know", "know", "know:2"),
    ("run-unknown-optimizer", "run --preset quick --out {root}/x --optimizer sgd", "--optimizer", ""),
    # ---- study
    ("study-only-unknown-variant", "study --out {root}/x --only nope", "--only", "this study's variants are"),
    ("study-bad-pretrain-epochs", "study --preset custom --out {root}/x --pretrain-epochs plateau", "--pretrain-epochs",
     "plateau:CAP"),
    # ---- submit / resume (checked before the API is contacted)
    ("submit-unknown-stage", "submit warp", "warp", ""),
    ("submit-param-without-equals", "submit collect --param runs", "runs", "key=value"),
    ("submit-param-unknown-field", "submit collect --param epochs=3", "epochs", "valid:"),
    ("submit-param-bad-value", "submit collect --param runs=0", "runs", "at least 1"),
    ("resume-not-a-uuid", "resume not-a-uuid", "not-a-uuid", ""),
]


def _tree(path: Path) -> dict[str, tuple[int, int]]:
    """Every file under `path` with its size and mtime: equal trees = nothing written."""
    if not path.exists():
        return {}
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*") if p.is_file()}


def _complete(store: str) -> set[str]:
    from storage.trajectory import TrajectoryStore

    if not Path(store).is_dir():
        return set()
    return {r.run_id for r in TrajectoryStore(store).runs() if r.is_complete}


def test_the_catalogue_has_at_least_45_cases():
    assert len(CASES) >= 45 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2(case, world, capfd, monkeypatch):
    _, argv, needle, fix = case
    monkeypatch.setenv("PREFECT_API_URL", os.environ.get("PREFECT_API_URL", ""))  # the harness server
    argv = [a.format(**world) for a in argv.split(" ")]
    needle, fix = needle.format(**world), fix.format(**world)
    before, done = _tree(Path(world["store"])), _complete(world["store"])
    out_before = _tree(world["root"] / "x")
    capfd.readouterr()
    with pytest.raises(SystemExit) as exc:
        know_cli.main(argv)
    _, err = capfd.readouterr()
    lines = err.strip().splitlines()
    assert exc.value.code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    assert needle in lines[0], (needle, lines[0])
    assert fix in lines[0], (fix, lines[0])
    assert _tree(Path(world["store"])) == before, "the store changed"
    assert _complete(world["store"]) == done
    assert _tree(world["root"] / "x") == out_before
    assert not (world["root"] / "m.pt").exists()


def test_docs_list_every_case():
    """docs/reliability.md shows the catalogue; a case added here must be added there."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "reliability.md").read_text()
    missing = [c[0] for c in CASES if f"`{c[0]}`" not in doc]
    assert not missing, f"add these cases to docs/reliability.md: {missing}"
