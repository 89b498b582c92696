"""The regime study (issue 13): `know study --preset screen` runs a grid of `know run`
variants as sub-flows and writes one table, one picture and a conclusion.

Variants share their products: one store (a run is computed once whatever variant asks for
it: the same target trajectory, the same meta runs), one KNOWN folder per meta-data config,
and one cell cache (the same start point and protocol is fine-tuned once). So a re-run, or a
study killed halfway and started again, recomputes nothing that finished.

    from flows.study import know_study
    from params.study import StudyParams
    know_study(StudyParams(preset="screen", official_dir="../shared/know_reference"))
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
from prefect import flow, task
from prefect.futures import wait
from prefect.task_runners import ThreadPoolTaskRunner

from params.experiment import ExperimentParams
from params.study import SCREEN_LATE, StudyParams
from storage.done import clear_done, is_done, write_done
from storage.results import load_table, save_figure, save_table, save_text

from .common import refuse_other_record, resume_hint
from .experiment import know_run, preflight as experiment_preflight


def preflight(p: StudyParams) -> dict:
    """Every variant's own checks (data, folders) before the first one starts."""
    refuse_other_record(p.out, "study.json", p.identity(), p.force, "study")
    experiments = p.experiments()
    for exp in experiments.values():
        experiment_preflight(exp)
    return experiments


def variant(name: str, exp: ExperimentParams) -> str:
    """One variant: nothing when its folder's done.json says it is finished and unchanged (as
    `know run` on it would print at once), else its `know run` sub-flow."""
    if is_done(exp.out, exp.done_identity()):
        print(f"variant {name}: finished and unchanged in {exp.out}: reused")
        return exp.out
    return know_run.with_options(flow_run_name=f"variant-{name}")(exp)


@task(name="study-variant", task_run_name="variant-{name}")
def run_variant(name: str, exp: ExperimentParams) -> str:
    """One variant on the study's task runner (the task only lets variants run side by side)."""
    return variant(name, exp)


@flow(name="study-variants")
def run_variants(params: StudyParams) -> None:
    """Fan the variants out over this flow's task runner; fail after all ended if any failed.
    Products two variants share (a run, a checkpoint, a KNOWN folder, a prediction, a cell)
    are made once: the store's leases and storage.locks make the second writer wait for it."""
    futures = [run_variant.submit(name, exp) for name, exp in params.experiments().items()]
    wait(futures)
    failed = [f for f in futures if not f.state.is_completed()]
    if failed:
        failed[0].result()  # raises the first error


@flow(name="know-study", log_prints=True)
def know_study(params: StudyParams = StudyParams()) -> str:
    """Run every variant (each a `know run` sub-flow), then the study table, picture and conclusion."""
    from know_core.study import plot_gain_vs_coherence, study_markdown, study_table

    with resume_hint("know-study"):
        experiments = preflight(params)
        out = Path(params.out)
        out.mkdir(parents=True, exist_ok=True)
        clear_done(out)
        save_text(json.dumps(params.identity(), indent=1, sort_keys=True), out / "study.json")
        if params.parallel_variants > 1:
            print(f"{len(experiments)} variants, {params.parallel_variants} at a time")
            runner = ThreadPoolTaskRunner(max_workers=params.parallel_variants)
            run_variants.with_options(task_runner=runner)(params)
        else:
            for i, (name, exp) in enumerate(experiments.items(), 1):
                print(f"variant {i}/{len(experiments)}: {name}")
                variant(name, exp)
        every = params.variants(every=True)
        shown = {name: exp for name, exp in params.experiments(every=True).items()
                 if name in experiments or is_done(exp.out, exp.done_identity())}  # --only: and the finished others
        tables = {name: (load_table(Path(exp.out) / "summary.csv"), load_table(Path(exp.out) / "target_diagnostics.csv"))
                  for name, exp in shown.items()}
        table = study_table(tables)
        notes = [f"{len(shown)} variant{'s' if len(shown) != 1 else ''} of the `{params.base}` preset "
                 f"({params.preset} study), {params.seeds} paired seeds each; the variant list was fixed before any "
                 "result was seen"
                 + "".join(f", except {n}: {why}" for n, why in SCREEN_LATE.items()
                           if n in shown and params.preset == "screen") + ".",
                 "Variants: " + "; ".join(f"{v.name}: {json.dumps(v.overrides) if v.overrides else 'the base'}"
                                          for v in every if v.name in shown)]
        left = [v.name for v in every if v.name not in shown]
        if left:
            notes.append(f"Not run yet (left out by --only): {', '.join(left)}.")
        md = study_markdown(table, f"KNOW regime study ({params.preset})", notes)
        save_table(table, out / "study.csv")
        save_text(md, out / "study.md")
        save_figure(plot_gain_vs_coherence(table), out / "gain_vs_coherence.png")
        variant_files = [os.path.relpath(Path(exp.out) / "summary.md", out) for exp in shown.values()]
        if not left:  # a study with variants still to run is not done
            write_done(out, params.done_identity(), files=["study.md", "study.csv", "gain_vs_coherence.png",
                                                           *variant_files])
        try:
            from prefect.artifacts import create_markdown_artifact

            create_markdown_artifact(md, key="know-study", description="KNOW regime study")
        except Exception:  # noqa: BLE001 - artifacts need a run context; the files are the product
            pass
        print(md)
        return str(out)


__all__ = ["know_study", "preflight", "run_variants"]
