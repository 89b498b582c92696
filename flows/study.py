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
from prefect import flow

from params.study import StudyParams
from storage.done import clear_done, write_done
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
        tables = {}
        for i, (name, exp) in enumerate(experiments.items(), 1):
            print(f"variant {i}/{len(experiments)}: {name}")
            know_run.with_options(flow_run_name=f"variant-{name}")(exp)
            folder = Path(exp.out)
            tables[name] = (load_table(folder / "summary.csv"), load_table(folder / "target_diagnostics.csv"))
        table = study_table(tables)
        notes = [f"{len(experiments)} variants of the `{params.base}` preset ({params.preset} study), {params.seeds} "
                 "paired seeds each; the variant list was fixed before any result was seen.",
                 "Variants: " + "; ".join(f"{n}: {json.dumps(o.overrides) if o.overrides else 'the base'}"
                                          for n, o in zip(experiments, params.variants()))]
        md = study_markdown(table, f"KNOW regime study ({params.preset})", notes)
        save_table(table, out / "study.csv")
        save_text(md, out / "study.md")
        save_figure(plot_gain_vs_coherence(table), out / "gain_vs_coherence.png")
        variant_files = [os.path.relpath(Path(exp.out) / "summary.md", out) for exp in experiments.values()]
        write_done(out, params.done_identity(), files=["study.md", "study.csv", "gain_vs_coherence.png", *variant_files])
        try:
            from prefect.artifacts import create_markdown_artifact

            create_markdown_artifact(md, key="know-study", description="KNOW regime study")
        except Exception:  # noqa: BLE001 - artifacts need a run context; the files are the product
            pass
        print(md)
        return str(out)


__all__ = ["know_study", "preflight"]
