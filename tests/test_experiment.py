"""`know run`: the quick experiment end to end at reduced size, under the Prefect test harness.

Everything is real: digits meta-trajectories, a resnet source model and its forgetting
trajectory, KNOWN meta-training, predictions, fine-tunes and probes, the report. A second
run with the same params must reuse every stage (store runs, predictions, KNOWN, cells).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from PIL import Image

# imported at collection, not inside a test: importing prefect configures its log handlers on the
# stderr of that moment, which must not be a capture fixture's file (closed after its test)
import flows.experiment  # noqa: F401
import know_cli
from conftest import REFERENCE_DIR

# slow: the tests share the module-scoped `first` (a whole reduced `know run`)
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]

OLD_NS = 1_000_000_000_000_000_000  # 2001-09-09: any rewrite of a file moves its mtime off this
METHODS = "naive,naive-lr,know:2,know:8,know-lr,official:8,official-lr,taskvector:2,logfit:2"
#: rows at the fixed lr2, each predictor's own shrink control added at each of its factors
FIXED = {("naive", 1.0), ("know", 2.0), ("know", 8.0), ("official", 8.0), ("taskvector", 2.0), ("logfit", 2.0),
         ("shrink", 2.0), ("shrink", 8.0), ("shrink-official", 8.0), ("shrink-taskvector", 2.0), ("shrink-logfit", 2.0)}
#: tuned rows: the factor is the start chosen on the validation split
TUNED = {"naive-lr": {1.0}, "know-lr": {2.0, 8.0}, "official-lr": {8.0}}
SEEDS = 2


def _params(out: Path, **kw):
    from flows.experiment import preset_params

    base = dict(out=str(out), seeds=SEEDS, meta_runs=2, pretrain_epochs=1, phase1_epochs=1, phase2_epochs=1,
                official_dir=str(REFERENCE_DIR), workers=2, methods=METHODS, meta_epochs=2, meta_pairs_per_run=2000,
                meta_limit=600, target_train_size=150, naive_lr_grid="1e-3,2e-3", lr_grid_extend=1)
    return preset_params("quick", **{**base, **kw})


@pytest.fixture(scope="module")
def first(tmp_path_factory, prefect_harness, reference_dir):  # official:8 reads REFERENCE_DIR
    from flows.experiment import know_run

    out = tmp_path_factory.mktemp("experiment") / "quick"
    params = _params(out)
    t0 = time.perf_counter()
    assert know_run(params) == str(out)
    return SimpleNamespace(out=out, params=params, seconds=time.perf_counter() - t0)


def _chunks(out: Path) -> list[Path]:
    """Every chunk file of every array in the experiment's store (runs, checkpoints, predictions)."""
    files = sorted(p for p in (out / "store.zarr").rglob("*") if p.is_file() and "c" in p.parts)
    assert files, "no chunk files in the store"
    return files


@pytest.mark.needs_reference
def test_outputs(first):
    out = first.out
    for name in ("results.csv", "probe.csv", "summary.csv", "summary.md", "accuracy_vs_factor.png",
                 "learning_curves.png", "target_diagnostics.csv", "experiment.json", "known/known.pt"):
        assert (out / name).is_file(), name

    results = pd.read_csv(out / "results.csv")
    assert {"method", "factor", "seed", "epoch", "phase", "test_acc"} <= set(results.columns)
    rows = set(map(tuple, results[["method", "factor"]].drop_duplicates().itertuples(index=False)))
    assert {r for r in rows if r[0] not in TUNED} == FIXED
    tuned = {m: f for m, f in rows if m in TUNED}
    assert set(tuned) == set(TUNED) and all(tuned[m] in TUNED[m] for m in TUNED), tuned
    expected = FIXED | set(tuned.items())
    for (method, factor), g in results.groupby(["method", "factor"]):
        assert sorted(g.seed.unique()) == list(range(SEEDS)), (method, factor)
        # phase 1 + phase 2 epochs, one row each, per seed
        assert (g.groupby("seed").size() == 2).all(), (method, factor)
    assert results.test_acc.between(0, 1, inclusive="right").all()
    assert results.test_acc.notna().all()

    probe = pd.read_csv(out / "probe.csv")
    assert len(probe) == len(expected) * SEEDS
    assert probe.acc.between(0, 1, inclusive="right").all()

    summary = pd.read_csv(out / "summary.csv")
    assert set(map(tuple, summary[["method", "factor"]].itertuples(index=False))) == expected
    assert (summary.n_seeds == SEEDS).all()
    assert summary.ft_mean.between(0, 1, inclusive="right").all()
    md = (out / "summary.md").read_text()
    assert "KNOW experiment (quick)" in md and "know" in md and "taskvector" in md

    for png in ("accuracy_vs_factor.png", "learning_curves.png"):
        with Image.open(out / png) as im:
            im.load()
            assert im.format == "PNG" and min(im.size) > 100

    diag = pd.read_csv(out / "target_diagnostics.csv")
    assert set(diag.predictor) == {"identity", "taskvector", "logfit", "know (ours)", "know (official)"}
    assert set(diag.kind) == {"conv", "fc", "bias", "all"}
    assert diag.held_out_stage.unique().tolist() == [0, 1]  # 7 stages, window 5
    assert (diag.l1 > 0).all() and diag.coherence.notna().all()

    cells = [json.loads(c.read_text()) for c in (out / "cells").glob("*.json")]
    test_cells = [c for c in cells if c["split"] == "test"]
    # a tuned row whose chosen lr is the fixed lr2 shares the cells of the untuned row it starts from
    shared = sum(1 for m in tuned if _chosen_lr(out, m) == first.params.lr2)
    assert len(test_cells) == (len(expected) - shared) * SEEDS
    assert {c["seed"] for c in cells if c["split"] == "val"} == {0}
    assert json.loads((out / "experiment.json").read_text()) == first.params.identity()


def _chosen_lr(out: Path, row: str) -> float:
    lrs = set(pd.read_csv(out / "results.csv").query("method == @row").lr2)
    assert len(lrs) == 1, (row, lrs)
    return lrs.pop()


@pytest.mark.needs_reference
def test_report_compares_each_row_with_its_own_shrink_and_states_the_tuning(first):
    """Acceptance (issue 11): official rows against shrink-official at the same factor, the
    verdict names them, tuned rows are present and the lr grid and its bracketing are stated."""
    out = first.out
    res = pd.read_csv(out / "results.csv")
    last = res.sort_values("epoch").groupby(["method", "factor", "seed"]).test_acc.last()
    summary = pd.read_csv(out / "summary.csv").set_index(["method", "factor"])
    off = summary.loc[("official", 8.0)]
    assert off.shrink_control == "shrink-official"
    want = (last.loc[("official", 8.0)] - last.loc[("shrink-official", 8.0)]).mean()
    assert abs(off.ft_vs_shrink_mean - want) < 1e-9
    assert summary.loc[("taskvector", 2.0)].shrink_control == "shrink-taskvector"
    assert summary.loc[("know", 2.0)].ft_vs_shrink_n == SEEDS  # a shrink row at ×2 exists now
    md = (out / "summary.md").read_text()
    verdict = md.split("**Verdict.**")[1]
    assert "Best KNOW row (official)" in verdict and "shrink-official ×8" in verdict
    assert "Best KNOW row (ours)" in verdict and "know-lr" in verdict and "naive-lr" in verdict
    assert "grid 0.001, 0.002" in md and ("(interior)" in md or "edge after the cap of 1 extensions" in md)
    assert "optimizer regime carry" in md and "KNOWN (ours) meta-data: 4 runs" in md


@pytest.mark.needs_reference
def test_rerun_reuses_every_stage(first):
    from flows.experiment import know_run

    out = first.out
    cells = sorted((out / "cells").iterdir())
    chunks = _chunks(out)
    models = sorted((out / "known").rglob("known.pt"))
    for f in chunks + cells + models:
        os.utime(f, ns=(OLD_NS, OLD_NS))
    summary = (out / "summary.csv").read_bytes()
    results = (out / "results.csv").read_bytes()

    t0 = time.perf_counter()
    assert know_run(first.params) == str(out)
    seconds = time.perf_counter() - t0

    assert sorted((out / "cells").iterdir()) == cells, "new cells were computed"
    assert _chunks(out) == chunks, "the store gained arrays"
    stale = [f for f in chunks + cells + models if os.stat(f).st_mtime_ns != OLD_NS]
    assert not stale, f"rewritten on re-run: {stale[:3]}"
    assert (out / "summary.csv").read_bytes() == summary
    assert (out / "results.csv").read_bytes() == results
    # no timing: at this size most of a re-run is Prefect's per-flow overhead, as much as the
    # first run's work (15.16 vs 15.14 s once on a loaded machine); the checks above are what
    # prove that nothing was recomputed, and benchmarks/bench_orchestration.py times re-runs
    print(f"re-run {seconds:.1f} s, first run {first.seconds:.1f} s")


def _toml(values: dict) -> str:
    return "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items() if v is not None)


@pytest.mark.needs_reference
def test_finished_folder_is_done_before_any_engine_starts(first, tmp_path):
    """A real `know run` process on the finished folder, pointed at a Prefect API that does not
    exist: it can only succeed by deciding from done.json that nothing is left to do."""
    from storage.done import is_done

    out = first.out
    assert is_done(out, first.params.done_identity())
    config = tmp_path / "exp.toml"
    config.write_text(_toml(first.params.identity()))
    root = Path(know_cli.__file__).resolve().parent
    proc = subprocess.run([sys.executable, str(root / "know_cli.py"), "run", "--config", str(config), "--out", str(out)],
                          cwd=root, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PREFECT_API_URL": "http://127.0.0.1:9/api"})
    assert proc.returncode == 0, proc.stderr
    assert "nothing to do" in proc.stdout and "| naive " in proc.stdout, proc.stdout[-2000:]

    # anything that changes what the record vouches for makes it stale: settings, products
    assert not is_done(out, first.params.model_copy(update={"seeds": 1}).done_identity())
    assert not is_done(out, first.params.model_copy(update={"store": str(tmp_path / "other.zarr")}).done_identity())
    summary = (out / "summary.md").read_text()
    (out / "summary.md").write_text(summary + "edited\n")
    try:
        assert not is_done(out, first.params.done_identity())
    finally:
        (out / "summary.md").write_text(summary)
    assert is_done(out, first.params.done_identity())


@pytest.mark.needs_reference
def test_other_experiment_in_same_folder_is_refused_unless_forced(first):
    from flows.experiment import know_run
    from tasks.common import BadInput

    out = first.out
    record = (out / "experiment.json").read_text()
    other = _params(out, seeds=1)
    with pytest.raises(BadInput) as err:
        know_run(other)
    msg = str(err.value)
    assert "\n" not in msg and "holds a different experiment" in msg and "seeds" in msg and "--force" in msg
    assert (out / "experiment.json").read_text() == record
    n_cells = len(list((out / "cells").glob("*.json")))

    # forced: runs (every stage cached: seed 0 of each method was fine-tuned before) and takes over the folder
    assert know_run(other.model_copy(update={"force": True})) == str(out)
    assert len(list((out / "cells").glob("*.json"))) == n_cells
    results = pd.read_csv(out / "results.csv")
    assert results.seed.unique().tolist() == [0]
    assert json.loads((out / "experiment.json").read_text())["seeds"] == 1


@pytest.mark.needs_reference
def test_cli_refuses_other_experiment(first):
    """A real `know run` process: refused before any flow starts, so stderr holds only the error line."""
    from prefect.settings import PREFECT_API_URL

    record = (first.out / "experiment.json").read_text()
    root = Path(know_cli.__file__).resolve().parent
    proc = subprocess.run([sys.executable, str(root / "know_cli.py"), "run", "--preset", "quick", "--out", str(first.out)],
                          cwd=root, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()})
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "holds a different experiment" in lines[0], proc.stderr
    assert (first.out / "experiment.json").read_text() == record


def test_unknown_preset(tmp_path, capfd):
    from flows.experiment import preset_params
    from tasks.common import BadInput

    with pytest.raises(BadInput, match="unknown preset 'nope'; choose one of: standard, full, mnist, half-data, paper, quick"):
        preset_params("nope")
    capfd.readouterr()
    with pytest.raises(SystemExit) as exc:
        know_cli.main(["run", "--preset", "nope", "--out", str(tmp_path / "x")])
    _, err = capfd.readouterr()
    assert exc.value.code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "unknown preset 'nope'" in lines[0]
    assert not (tmp_path / "x").exists()


def test_summary_coherence_is_the_conv_kernels_step_coherence_read_with_plain_zarr(first):
    """The summary's coherence is over conv kernels (not BN statistics or counters), recomputed
    here independently from the store with plain zarr and numpy."""
    import re

    import zarr

    root = zarr.open_group(str(first.out / "store.zarr"), mode="r")
    target = next(rid for rid in root["runs"].group_keys() if root[f"runs/{rid}"].attrs.get("start"))
    attrs = root[f"runs/{target}"].attrs
    w = np.asarray(root[f"runs/{target}/weights"][:], np.float64)
    cols = np.concatenate([np.arange(t["offset"], t["offset"] + int(np.prod(t["shape"])))
                           for t in attrs["layout"] if t["kind"] == "conv"])
    steps = w[:-1, cols] - w[1:, cols]
    cos = [a @ b / np.sqrt((a @ a) * (b @ b)) for a, b in zip(steps[:-1], steps[1:])]
    md = (first.out / "summary.md").read_text()
    shown = float(re.search(r"coherence \(mean cosine[^)]*\): conv (-?[0-9.]+)", md).group(1))
    assert abs(shown - np.mean(cos)) < 1e-3 + 1e-6  # the summary prints 3 decimals
    diag = pd.read_csv(first.out / "target_diagnostics.csv")
    assert abs(diag.coherence_conv.iloc[0] - np.mean(cos)) < 1e-6
