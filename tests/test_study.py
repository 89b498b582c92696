"""`know study` end to end at tiny size (issue 13): two variants that share the target
trajectory and the meta runs (they differ only in KNOWN's input scaling). The shared stages
are computed once, a re-run recomputes nothing, and the table, picture and conclusion exist."""
from __future__ import annotations

import json
import logging
import os
import re
import sys

import pandas as pd
import pytest

import flows.experiment  # noqa: F401 - imported at collection (see test_experiment.py)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]

TINY = {"meta_runs": 2, "meta_epochs": 1, "meta_pairs_per_run": 1000, "meta_limit": 300, "pretrain_epochs": 1,
        "target_train_size": 60, "phase1_epochs": 1, "phase2_epochs": 1, "methods": "naive,naive-lr,know:2,know-lr",
        "naive_lr_grid": "1e-3", "lr_grid_extend": 1, "workers": 2}


def _params(out):
    from params.study import StudyParams

    return StudyParams(preset="custom", base="quick", grid=True, known_scalings="auto,raw", seeds=2,
                       out=str(out), overrides=json.dumps(TINY))


class _Lines(logging.Handler):
    """The messages of Prefect's task-run logger (a handler on it sees them whatever propagates)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def test_two_variant_study_shares_stages_and_reruns_for_free(tmp_path):
    """The two variants run side by side (--parallel-variants 2) on one store and one cell
    cache: the target, the meta runs and every shared fine-tune cell are made once, the other
    variant waits for them (store leases, storage.locks) and reuses them. The re-run goes one
    variant after the other (the same study: parallel_variants is a run-time knob)."""
    from flows.study import know_study
    from storage.trajectory import TrajectoryStore

    out = tmp_path / "study"
    params = _params(out).model_copy(update={"parallel_variants": 2})
    names = list(params.experiments())
    assert len(names) == 2
    handler = _Lines()
    logger = logging.getLogger("prefect.task_runs")
    logger.addHandler(handler)
    try:
        assert know_study(params) == str(out)
    finally:
        logger.removeHandler(handler)

    # one store: one target run (the only run started from a checkpoint) and one set of meta runs
    store = TrajectoryStore(out / "store.zarr")
    runs = store.runs()
    targets = [r for r in runs if r.start]
    assert len(targets) == 1 and len(runs) == 1 + 2 * 2  # 2 meta runs x 2 models
    assert all(r.is_complete for r in runs)
    # ... each written once, though both variants asked for it at the same time
    for run in runs:
        written = [m for m in handler.lines if m.startswith(f"run {run.run_id}: stage ") and " written" in m]
        assert len(written) == run.n_stages, (run.run_id, written)
    # naive and naive-lr start from the same Θ0 with the same protocol (and the same tuned lr,
    # chosen on shared validation cells) in both variants: each (row, seed) is fine-tuned once
    made = [m for m in handler.lines if re.match(r"cell naive(-lr)? x1 seed \d \(test\): final acc", m)]
    cached = [m for m in handler.lines if re.match(r"cell naive(-lr)? x1 seed \d \(test\): cached", m)]
    assert len(made) == 2 * params.seeds and len(cached) == 2 * params.seeds, (made, cached)
    # the naive cells (same start, same protocol) are shared: one file per seed, not per variant
    cells = [json.loads(p.read_text()) for p in (out / "cells").glob("*.json")]
    naive = [c for c in cells if c["split"] == "test" and c["lr2"] == 1e-3 and c["method"] in ("naive", "naive-lr")]
    assert len({(c["seed"], json.dumps(c["rows"])) for c in naive}) <= 2
    for name in names:
        res = pd.read_csv(out / "variants" / name / "results.csv")
        assert {"naive", "know", "shrink", "naive-lr", "know-lr"} <= set(res.method)

    table = pd.read_csv(out / "study.csv")
    assert list(table.variant) == names
    assert table.coherence_conv.notna().all() and (table.n_seeds == 2).all()
    md = (out / "study.md").read_text()
    assert "**Conclusion.**" in md and "No variant beats" in md  # 2 seeds can never pass the >= 5 seed rule
    assert (out / "gain_vs_coherence.png").stat().st_size > 1000
    # the finished study's record: a `know study` with these settings does nothing (cli/fastpath.py)
    from storage.done import is_done

    assert is_done(out, params.done_identity())
    assert all(is_done(e.out, e.done_identity()) for e in params.experiments().values())
    assert not is_done(out, params.model_copy(update={"seeds": 3}).done_identity())

    # a re-run (as after a kill): every variant reused, no cell or chunk rewritten. It runs only
    # the second variant (--only); the table still shows both, the first being finished
    files = sorted(p for p in out.rglob("*") if p.is_file() and ("cells" in p.parts or "c" in p.parts))
    before = {p: os.stat(p).st_mtime_ns for p in files}
    assert know_study(params.model_copy(update={"parallel_variants": 1, "only": names[1]})) == str(out)
    after = sorted(p for p in out.rglob("*") if p.is_file() and ("cells" in p.parts or "c" in p.parts))
    assert after == files
    assert {p: os.stat(p).st_mtime_ns for p in files} == before
    assert list(pd.read_csv(out / "study.csv").variant) == names and is_done(out, params.done_identity())

    # with the first variant unfinished, --only the second: its row alone, the first named as not
    # run, and the study is not marked done
    from storage.done import clear_done

    clear_done(out / "variants" / names[0])
    know_study(params.model_copy(update={"only": names[1]}))
    assert list(pd.read_csv(out / "study.csv").variant) == [names[1]]
    assert f"Not run yet (left out by --only): {names[0]}." in (out / "study.md").read_text()
    assert not (out / "done.json").exists()


def test_screen_variants_are_fixed_and_valid():
    from params.study import SCREEN, StudyParams

    p = StudyParams(preset="screen")
    exps = p.experiments()
    assert list(exps) == list(SCREEN)
    assert exps["fresh-optimizer"].optimizer == "fresh" and exps["standard"].optimizer == "carry"
    assert exps["target-matched-meta"].meta_matched_runs == 4 and exps["target-matched-meta"].meta_runs == 0
    assert len({e.store for e in exps.values()}) == 1 and len({e.out for e in exps.values()}) == len(exps)
    # variants with the same meta-data config share one KNOWN folder; others do not
    assert exps["standard"].known_dir != exps["raw-scaling"].known_dir
    assert exps["standard"].known_dir != exps["fresh-optimizer"].known_dir


def test_a_study_killed_halfway_finishes_without_recomputing_the_finished_variant(tmp_path):
    """`know study` in a real process, SIGKILLed (its whole process group) once the first
    variant has finished and the second has begun; the same command again finishes the second
    and rewrites nothing of the first (its products, cells and store chunks)."""
    import signal
    import subprocess
    import time

    from test_resume import REPO, _env, _start_know, _tail

    out = tmp_path / "study"
    tiny = json.dumps({**TINY, "workers": 1})
    argv = ["study", "--preset", "custom", "--base", "quick", "--known-scalings", "auto,raw", "--seeds", "2",
            "--out", str(out), "--overrides", tiny]
    names = list(_params(out).experiments())
    first, second = out / "variants" / names[0], out / "variants" / names[1]
    log = tmp_path / "first.log"
    proc = _start_know(argv, tmp_path / "home", log)
    try:
        deadline = time.time() + 600
        # the second variant has begun once its folder holds its record
        while not ((first / "done.json").exists() and (second / "experiment.json").exists()):
            assert proc.poll() is None, f"the study ended before it could be killed ({proc.returncode}):\n{_tail(log)}"
            assert time.time() < deadline, _tail(log)
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert not (second / "done.json").exists() and not (out / "done.json").exists(), "killed too late to test"
    made = sorted(p for p in out.rglob("*") if p.is_file() and (first in p.parents or "cells" in p.parts
                                                                 or "c" in p.parts))
    before = {p: os.stat(p).st_mtime_ns for p in made}

    again = subprocess.run([sys.executable, "-m", "know_cli", *argv], cwd=REPO, env=_env(tmp_path / "home"),
                           capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert {p: os.stat(p).st_mtime_ns for p in made if p.exists()} == before, "finished work was rewritten"
    assert all(p.exists() for p in made)
    assert (second / "done.json").exists() and (out / "done.json").exists()
    assert list(pd.read_csv(out / "study.csv").variant) == names
