"""The whole KNOW experiment (method §2-7) as one Prefect flow: `know run --preset ...`.

Stages, each reused on re-run (the store and the output folder are the cache):
    1 meta-collect    trajectories of small models on meta data (never the target task)
    2 target          pre-train the source model Θ0, record its forgetting trajectory (S + 2 stages)
    3 meta-train      KNOWN on the meta trajectories (the target run is excluded)
    4 predict         KNOW (ours / official), taskvector, logfit, S ablation, x2/x4/x8
    5 diagnostics     each predictor's L1 on the target's own held-out windows
    6 naive-lr        choose naive's phase-2 lr on a validation split of the target training set
    7 evaluate        fine-tune + linear-probe every (method, factor, seed) cell
    8 report          results.csv, summary.csv/.md, plots, a Prefect markdown artifact

Example:
    from flows.experiment import preset_params, know_run
    know_run(preset_params("quick", out="results/quick"))
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from prefect import flow, task
from prefect.futures import wait

from storage.results import save_figure, save_table, save_text
from storage.trajectory import TrajectoryStore
from know_core.errors import BadInput
from params.collect import CollectParams, TrajectoryParams
from params.experiment import PRESETS, ExperimentParams, preset_params  # noqa: F401 - re-exported
from params.predict import MetaTrainParams, PredictParams
from tasks.evaluate import CellSpec, TargetSpec, finetune_cell, target_diagnostics
from tasks.predict import predict_run

from .collect import collect_trajectories
from .common import make_runner, resume_hint
from .meta_train import meta_train_known
from .trajectory import forgetting_trajectory, target_specs

REPO = Path(__file__).resolve().parents[1]


def preflight(p: ExperimentParams) -> ExperimentPlan:
    """Checks before any flow starts: the output folder, then the plan."""
    refuse_other_experiment(p)
    return plan(p)


def refuse_other_experiment(p: ExperimentParams) -> None:
    """BadInput when the output folder is a file, or holds a different experiment and p.force is off."""
    out = Path(p.out)
    if out.exists() and not out.is_dir():
        raise BadInput(f"output path {out} is a file; pass a folder with --out")
    record = out / "experiment.json"
    if record.exists() and not p.force:
        old = json.loads(record.read_text())
        if old != p.identity():
            diff = sorted(k for k in set(old) | set(p.identity()) if old.get(k) != p.identity().get(k))
            raise BadInput(f"{out} holds a different experiment (differs in: {', '.join(diff[:5])}); "
                           "use another --out or pass --force")


def check_out_dir(p: ExperimentParams) -> Path:
    """Refuse a folder that holds a different experiment unless forced; record this one."""
    refuse_other_experiment(p)
    out = Path(p.out)
    record = out / "experiment.json"
    out.mkdir(parents=True, exist_ok=True)
    save_text(json.dumps(p.identity(), indent=1, sort_keys=True), record)
    return out


@dataclass(frozen=True)
class ExperimentPlan:
    """Every sub-stage's settings, derived purely from the experiment's."""

    store: str
    collects: list[CollectParams]
    target: TrajectoryParams
    full: TrajectoryParams | None  # half-data variant: the full-data pre-training
    known: str
    methods: list[tuple[str, float]]
    naive_lr_grid: list[float]
    seeds: int

    def totals(self) -> dict[str, int]:
        """Units of work per stage, for progress displays."""
        tuned = len(self.naive_lr_grid) if any(m == "naive-lr" for m, _ in self.methods) else 0
        return {"meta-collect": sum(c.runs * len(c.model_list()) for c in self.collects),
                "target trajectory": self.target.stages,
                "evaluate cells": len(self.methods) * self.seeds + tuned}


def plan(p: ExperimentParams) -> ExperimentPlan:
    """Every sub-stage's params, derived purely from the experiment params."""
    out = Path(p.out)
    store = str(out / "store.zarr")
    collects = []
    for mode, runs in (("independent", p.meta_runs), ("sequential", p.meta_sequential_runs)):
        if runs:
            collects.append(CollectParams(
                store=store, dataset=p.meta_dataset, classes=p.meta_classes, limit=p.meta_limit, models=p.meta_models,
                runs=runs, stages=p.meta_stages, mode=mode, seed=1 if mode == "independent" else 2, workers=p.workers,
                device=p.device))
    target = TrajectoryParams(
        store=store, dataset=p.source_dataset, classes=p.source_classes, limit=p.source_limit, model=p.model,
        width=p.width, pretrain_epochs=p.pretrain_epochs, pretrain_lr=p.pretrain_lr,
        pretrain_batch_size=p.pretrain_batch_size, r=p.r, stages=p.window + 2, lr=p.traj_lr,
        batch_size=p.traj_batch_size, seed=0, device=p.device)
    full = target.model_copy(update={"limit": p.full_source_limit}) if p.full_source_limit else None
    return ExperimentPlan(store=store, collects=collects, target=target, full=full, known=str(out / "known"),
                          methods=p.method_factors(), naive_lr_grid=p.naive_lr_values(), seeds=p.seeds)


@task(name="write-report")
def write_report(out: str, cells: list[dict], diagnostics: list[dict], notes: list[str], title: str) -> str:
    from know_core.plots import plot_accuracy_vs_factor, plot_learning_curves
    from know_core.stats import summarize
    from know_core.verdict import summary_markdown

    out = Path(out)
    results = pd.DataFrame([{"method": c["method"], "factor": c["factor"], "seed": c["seed"], **row}
                            for c in cells for row in c["rows"]])
    probe = pd.DataFrame([{"method": c["method"], "factor": c["factor"], "seed": c["seed"], **c["probe"]}
                          for c in cells if c["probe"]])
    summary = summarize(results, probe if len(probe) else None)
    save_table(results, out / "results.csv")
    save_table(probe, out / "probe.csv")
    save_table(summary, out / "summary.csv")
    if diagnostics:
        save_table(pd.DataFrame(diagnostics), out / "target_diagnostics.csv")
    md = summary_markdown(summary, title, notes)
    save_text(md, out / "summary.md")
    save_figure(plot_accuracy_vs_factor(results), out / "accuracy_vs_factor.png")
    save_figure(plot_learning_curves(results), out / "learning_curves.png")
    try:
        from prefect.artifacts import create_markdown_artifact

        create_markdown_artifact(md + f"\n\nOutput folder: [{out.resolve()}](file://{out.resolve()})",
                                 key="know-summary", description=title)
    except Exception:  # noqa: BLE001 - artifacts need a run context; the files are the product
        pass
    return md


def diagnostics_notes(diag: list[dict]) -> list[str]:
    if not diag:
        return []
    df = pd.DataFrame(diag)
    allk = df[df.kind == "all"].groupby("predictor").l1.mean().sort_values()
    row = df.iloc[0]
    others = ", ".join(f"{k} {row[f'coherence_{k}']:.3f}" for k in ("fc", "bias") if f"coherence_{k}" in row)
    parts = ", ".join(f"{k} {v:.3e}" for k, v in allk.items())
    return [f"Target trajectory step coherence (mean cosine of consecutive steps, predicted weights only; BN "
            f"statistics and counters excluded): conv {row.get('coherence_conv', float('nan')):.3f} (the kind "
            f"with most predicted scalars); {others}; all predicted {row.coherence:.3f}",
            f"Predictor L1 on the target's held-out windows (predict stage k from k+1..k+5; lower is better): {parts}"]


@flow(name="know-experiment", log_prints=True)
def know_run(params: ExperimentParams = ExperimentParams()) -> str:
    """The whole experiment: meta data, KNOWN, target trajectory, predictions, fine-tunes, report."""
    with resume_hint("know-experiment"):
        p = params
        pl = plan(p)
        methods = pl.methods
        out = check_out_dir(p)
        store = pl.store
        TrajectoryStore(store).prepare()

        print("stage 1/8: meta-trajectory collection")
        for cp in pl.collects:
            collect_trajectories(cp)
        print("stage 2/8: source pre-training and target forgetting trajectory")
        target_run = forgetting_trajectory(pl.target)
        full_ckpt = ""
        if pl.full is not None:
            pre_full, _ = target_specs(pl.full)
            from tasks.collect import pretrain

            full_ckpt = pretrain(store, pre_full, p.device)
        print("stage 3/8: meta-training KNOWN")
        meta = meta_train_known(MetaTrainParams(store=store, out=pl.known, exclude_runs=target_run,
                                                epochs=p.meta_epochs, pairs_per_run=p.meta_pairs_per_run,
                                                official_dir=p.official_dir, compare_modes=p.meta_sequential_runs > 0))

        print("stage 4/8: predictions")
        max_step = {}
        for name, factor in methods:
            if factor > 1:
                pred = {"official": "know", "shrink": "know", "shrink-official": "know"}.get(name, name)
                key = (pred, "official" if name in ("official", "shrink-official") else pl.known)
                max_step[key] = max(max_step.get(key, 0), p.step_of(factor))
        specs = {key: PredictParams(store=store, run_id=target_run, predictor=key[0], steps=steps, known=key[1],
                                    official_dir=p.official_dir) for key, steps in max_step.items()}
        names = {key: predict_run(spec) for key, spec in specs.items()}

        print("stage 5/8: predictor diagnostics on the target's held-out windows")
        diag_preds = {"identity": PredictParams(store=store, run_id=target_run, predictor="naive"),
                      "taskvector": PredictParams(store=store, run_id=target_run, predictor="taskvector"),
                      "logfit": PredictParams(store=store, run_id=target_run, predictor="logfit"),
                      "know (ours)": PredictParams(store=store, run_id=target_run, predictor="know", known=pl.known)}
        if p.official_dir:
            diag_preds["know (official)"] = PredictParams(store=store, run_id=target_run, predictor="know",
                                                          known="official", official_dir=p.official_dir)
        diag = target_diagnostics(store, target_run, diag_preds, p.window)

        target = TargetSpec(dataset=p.target_dataset, classes=p.target_classes, train_size=p.target_train_size)
        base = dict(out=str(out), store=store, run_id=target_run, target=target, phase1_epochs=p.phase1_epochs,
                    phase2_epochs=p.phase2_epochs, lr1=p.lr1, lr2=p.lr2, batch_size=p.ft_batch_size, device=p.device)
        runner = make_runner("thread", p.workers)

        lr_choice = p.lr2
        if any(m == "naive-lr" for m, _ in methods):
            print("stage 6/8: choosing naive-lr on a validation split (never the test split)")
            val = [CellSpec(**dict(base, method="naive-lr", source="theta0", lr2=lr, seed=0, split="val", probe=False))
                   for lr in pl.naive_lr_grid]
            val_res = run_cells.with_options(task_runner=runner)(val)
            scores = {c["lr2"]: c["rows"][-1]["test_acc"] for c in val_res}
            lr_choice = max(scores, key=scores.get)
            print(f"naive-lr: validation accuracy {scores} -> lr2 = {lr_choice:g}")

        print("stage 7/8: fine-tuning and probing every start point")
        cells = []
        for name, factor in methods:
            step = p.step_of(factor)
            for seed in range(p.seeds):
                kw = dict(base, method=name, factor=factor, seed=seed, step=step)
                if name in ("naive", "naive-lr"):
                    kw.update(source="theta0", lr2=lr_choice if name == "naive-lr" else p.lr2)
                elif name == "naive-full":
                    kw.update(source=f"ckpt:{full_ckpt}")
                elif name == "scratch":
                    kw.update(source="scratch")
                elif name == "shrink":
                    kw.update(source=names[("know", pl.known)], shrink=True)
                elif name == "shrink-official":
                    kw.update(source=names[("know", "official")], shrink=True)
                elif name == "official":
                    kw.update(source=names[("know", "official")])
                else:
                    kw.update(source=names[(name, pl.known)])
                cells.append(CellSpec(**kw))
        results = run_cells.with_options(task_runner=runner)(cells)

        print("stage 8/8: report")
        notes = [f"Preset {p.preset}; {p.seeds} seeds per method, paired (same seeds, data order and head init).",
                 f"Source {p.source_dataset}[{p.source_classes}] -> target {p.target_dataset}[{p.target_classes or 'all'}], "
                 f"{p.target_train_size} balanced training images; meta-trajectories: {p.meta_dataset}[{p.meta_classes}] "
                 f"training split ({p.meta_models}).",
                 f"naive-lr chose lr2 = {lr_choice:g} from {{{p.naive_lr_grid}}} on a validation split of the target training set.",
                 f"KNOWN (ours): {meta['scaling']} input scaling.",
                 "Every start point's BatchNorm statistics are re-estimated on the target training images before fine-tuning.",
                 *diagnostics_notes(diag)]
        md = write_report(str(out), results, diag, notes, f"KNOW experiment ({p.preset})")
        print(md)
        return str(out)


@flow(name="evaluate-cells")
def run_cells(cells: list[CellSpec]) -> list[dict]:
    """Fan out fine-tune cells; fail after all ended if any failed."""
    futures = finetune_cell.map(cells)
    wait(futures)
    failed = [c for c, f in zip(cells, futures) if not f.state.is_completed()]
    if failed:
        futures[cells.index(failed[0])].result()  # raises the first error
    return [f.result() for f in futures]
