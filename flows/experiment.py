"""The whole KNOW experiment (method §2-7) as one Prefect flow: `know run --preset ...`.

Stages, each reused on re-run (the store and the output folder are the cache):
    1 meta-collect    trajectories of small models on meta data (never the target task)
    2 target          pre-train the source model Θ0, record its forgetting trajectory (S + 2 stages)
    3 meta-train      KNOWN on the meta trajectories (the target run is excluded)
    4 predict         KNOW (ours / official), taskvector, logfit, S ablation, x2/x4/x8
    5 diagnostics     each predictor's L1 on the target's own held-out windows
    6 tuning          naive-lr / know-lr / official-lr: the phase-2 lr (and, for KNOW, the start
                      factor) chosen on a validation split; the grid is extended past an edge optimum
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

from storage.done import clear_done, write_done
from storage.results import save_figure, save_table, save_text
from storage.trajectory import TrajectoryStore
from know_core.errors import BadInput
from params.collect import CollectParams, TrajectoryParams
from know_core.tuning import TuneResult, bracket_search
from know_core.verdict import fmt_factor
from know_core.data import NOMINAL, missing_dataset_files
from params.experiment import GPU_PRESETS, PRESETS, SHRINK_OF, ExperimentParams, preset_params  # noqa: F401
from params.predict import MetaTrainParams, PredictParams
from tasks.evaluate import CellSpec, TargetSpec, finetune_cell, target_diagnostics
from tasks.predict import predict_run

from .collect import collect_trajectories
from .common import make_runner, refuse_other_record, resume_hint
from .meta_train import meta_train_known
from .trajectory import forgetting_trajectory, target_specs
from .trajectory import preflight as trajectory_preflight

REPO = Path(__file__).resolve().parents[1]


def preflight(p: ExperimentParams) -> ExperimentPlan:
    """Checks before any flow starts: the output folder, the data files, the hardware, then the plan."""
    refuse_other_experiment(p)
    for role in ("source", "meta", "target"):
        missing = missing_dataset_files(getattr(p, f"{role}_dataset"), p.dir_of(role))
        if missing:
            raise BadInput(f"{missing}; pass their folder with --{role}-data-dir or --data-dir")
    refuse_cpu_for_gpu_preset(p)
    pl = plan(p)
    try:
        trajectory_preflight(pl.target)  # the target batch must fit its smallest subset: refused before any stage runs
    except BadInput as e:  # name this command's option
        raise BadInput(str(e).replace("--batch-size", "--traj-batch-size")) from None
    return pl


#: seconds per image of one training step (forward + backward) on a CPU, per model parameter at
#: 32x32 pixels: calibrated on this project's 2-core machine (resnet18: ~0.3 s per image)
CPU_SECONDS_PER_IMAGE_PARAM = 2.7e-8


def cpu_hours(p: ExperimentParams) -> float:
    """A coarse estimate of the experiment's training time on a CPU, in hours: pre-training, the
    forgetting stages and every fine-tune (meta-trajectories of the small models left out)."""
    from know_core.models import build_model

    n, channels, size, classes = NOMINAL.get(p.source_dataset, (10000, 3, 32, 10))
    n_source = p.source_limit or n
    params = sum(t.numel() for t in build_model(p.model, channels, classes, size, p.width or None).parameters())
    per_image = CPU_SECONDS_PER_IMAGE_PARAM * params * (size / 32) ** 2
    trajectory = sum(p.r**k for k in range(1, p.window + 2))
    pl = plan(p)
    cells = (len(pl.methods) + len(pl.tuned)) * p.seeds + len(pl.lr_grid) * sum(len(s) for s in pl.tuned.values())
    images = (p.pretrain_epochs + trajectory) * n_source + cells * (p.phase1_epochs + p.phase2_epochs) * p.target_train_size
    return images * per_image / 3600


def refuse_cpu_for_gpu_preset(p: ExperimentParams) -> None:
    """BadInput for a GPU-sized preset on a CPU estimated above an hour, unless p.force_cpu."""
    from know_core.train import pick_device

    if p.preset not in GPU_PRESETS or p.force_cpu or pick_device(p.device).type != "cpu":
        return
    hours = cpu_hours(p)
    if hours > 1:
        raise BadInput(f"preset {p.preset} is sized for a GPU: on this CPU it would take about {hours:,.0f} hours "
                       "(a coarse estimate); run it on a GPU worker (know submit experiment --param preset=paper), "
                       "reduce it with overrides, or pass --force-cpu")


def refuse_other_experiment(p: ExperimentParams) -> None:
    """BadInput when the output folder is a file, or holds a different experiment and p.force is off."""
    refuse_other_record(p.out, "experiment.json", p.identity(), p.force, "experiment")


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
    matched: list[TrajectoryParams]  # target-matched meta runs: the target's recipe on other seeds
    target: TrajectoryParams
    full: TrajectoryParams | None  # half-data variant: the full-data pre-training
    known: str
    methods: list[tuple[str, float]]  # rows fine-tuned at the fixed lr2
    tuned: dict[str, list[tuple[str, float]]]  # tuned row -> its candidate starts
    lr_grid: list[float]
    seeds: int

    def totals(self) -> dict[str, int]:
        """Units of work per stage, for progress displays (tuning counts the grid, before any extension)."""
        val = len(self.lr_grid) * sum(len(starts) for starts in self.tuned.values())
        return {"meta-collect": sum(c.runs * len(c.model_list()) for c in self.collects) + len(self.matched),
                "target trajectory": self.target.stages,
                "evaluate cells": (len(self.methods) + len(self.tuned)) * self.seeds + val}


def plan(p: ExperimentParams) -> ExperimentPlan:
    """Every sub-stage's params, derived purely from the experiment params."""
    out = Path(p.out)
    store = p.store or str(out / "store.zarr")
    collects = []
    for mode, runs in (("independent", p.meta_runs), ("sequential", p.meta_sequential_runs)):
        if runs:
            collects.append(CollectParams(
                store=store, dataset=p.meta_dataset, data_dir=p.dir_of("meta"), classes=p.meta_classes,
                limit=p.meta_limit, models=p.meta_models,
                runs=runs, stages=p.meta_stages, mode=mode, seed=1 if mode == "independent" else 2, workers=p.workers,
                runner=p.runner, dask_address=p.dask_address, device=p.device, optimizer=p.optimizer))
    target = TrajectoryParams(
        store=store, dataset=p.source_dataset, data_dir=p.dir_of("source"), classes=p.source_classes,
        limit=p.source_limit, model=p.model, model_kwargs=p.model_kwargs, head=p.head, augment=p.augment,
        checkpoint=p.checkpoint,
        width=p.width, pretrain_epochs=p.pretrain_epochs, pretrain_lr=p.pretrain_lr,
        pretrain_batch_size=p.pretrain_batch_size, pretrain_patience=p.pretrain_patience,
        pretrain_val_fraction=p.pretrain_val_fraction, r=p.r, stages=p.window + 2, lr=p.traj_lr,
        batch_size=p.traj_batch_size, seed=0, device=p.device, optimizer=p.optimizer)
    full = target.model_copy(update={"limit": p.full_source_limit}) if p.full_source_limit else None
    matched = [target.model_copy(update={"seed": 101 + i}) for i in range(p.meta_matched_runs)]
    return ExperimentPlan(store=store, collects=collects, matched=matched, target=target, full=full,
                          known=p.known_dir or str(out / "known"),
                          methods=p.method_factors(), tuned=p.tuned_rows(), lr_grid=p.naive_lr_values(), seeds=p.seeds)


#: the products a finished experiment's done.json vouches for (a re-run with all of them intact
#: and the same settings and runs does nothing: storage/done.py, cli/fastpath.py)
DONE_FILES = ("results.csv", "summary.csv", "summary.md", "accuracy_vs_factor.png", "learning_curves.png")


@task(name="write-report")
def write_report(out: str, cells: list[dict], diagnostics: list[dict], notes: list[str], title: str) -> str:
    from know_core.plots import plot_accuracy_vs_factor, plot_learning_curves
    from know_core.stats import summarize
    from know_core.verdict import summary_markdown

    out = Path(out)
    results = pd.DataFrame([{"method": c["method"], "factor": c["factor"], "seed": c["seed"], "lr2": c["lr2"], **row}
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


def prediction_key(method: str, known: str) -> tuple[str, str]:
    """(predictor, KNOWN source) of the prediction a row starts from (or scales towards)."""
    pred = SHRINK_OF.get(method, method)
    if pred == "official":
        return "know", "official"
    return pred, known


def provenance_note(prov: dict, scaling: str) -> str:
    """One line: what KNOWN (ours) was meta-trained on, and what was left out."""
    if not prov:
        return f"KNOWN (ours): {scaling} input scaling."
    fmt = lambda d: ", ".join(f"{k} {v}" for k, v in d.items()) or "none"
    left = fmt(prov.get("left_out", {}))
    return (f"KNOWN (ours) meta-data: {prov['runs']} runs of {prov['meta_data']!r} meta-data; modes: {fmt(prov['modes'])}; "
            f"models: {fmt(prov['models'])}; data: {fmt(prov['datasets'])}; optimizer regimes: {fmt(prov['optimizers'])}; "
            f"runs left out: {left}; {scaling} input scaling. It is applied to the target model above, which may be "
            "of another architecture and mode than these runs.")


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
        clear_done(out)
        store = pl.store
        TrajectoryStore(store).prepare()

        print("stage 1/8: meta-trajectory collection")
        meta_runs: list[str] = []
        for cp in pl.collects:
            meta_runs += collect_trajectories(cp)
        for tp in pl.matched:
            meta_runs.append(forgetting_trajectory(tp))
        print("stage 2/8: source pre-training and target forgetting trajectory")
        target_run = forgetting_trajectory(pl.target)
        full_ckpt = ""
        if pl.full is not None:
            pre_full, _ = target_specs(pl.full)
            from tasks.collect import pretrain

            full_ckpt = pretrain(store, pre_full, p.device)
        print("stage 3/8: meta-training KNOWN")
        meta = meta_train_known(MetaTrainParams(store=store, out=pl.known, exclude_runs=target_run,
                                                only_runs=",".join(meta_runs), scaling=p.known_scaling,
                                                epochs=p.meta_epochs, pairs_per_run=p.meta_pairs_per_run,
                                                official_dir=p.official_dir, compare_modes=p.meta_sequential_runs > 0))

        print("stage 4/8: predictions")
        max_step = {}
        for name, factor in [*methods, *(mf for starts in pl.tuned.values() for mf in starts)]:
            if factor > 1:
                key = prediction_key(name, pl.known)
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

        target = TargetSpec(dataset=p.target_dataset, data_dir=p.dir_of("target"), classes=p.target_classes,
                            train_size=p.target_train_size)
        base = dict(out=p.cache_dir or str(out), store=store, run_id=target_run, target=target, phase1_epochs=p.phase1_epochs,
                    phase2_epochs=p.phase2_epochs, lr1=p.lr1, lr2=p.lr2, batch_size=p.ft_batch_size, device=p.device)
        runner = make_runner(p.runner, p.workers, p.dask_address, gpu=p.device.startswith("cuda"))

        def start_of(name: str, factor: float) -> dict:
            """The start point of a row: source, step and shrink flag of its CellSpec."""
            if name in ("naive", "naive-lr"):
                return dict(source="theta0", step=0)
            if name == "naive-full":
                return dict(source=f"ckpt:{full_ckpt}", step=0)
            if name == "scratch":
                return dict(source="scratch", step=0)
            return dict(source=names[prediction_key(name, pl.known)], step=p.step_of(factor),
                        shrink=name in SHRINK_OF)

        if pl.tuned:
            print("stage 6/8: tuning phase-2 lr of the tuned rows on a validation split (never the test split)")
        tuned, tuning_notes = tune_rows(pl.tuned, pl.lr_grid, p.lr_grid_extend, base, start_of, runner)

        print("stage 7/8: fine-tuning and probing every start point")
        cells = []
        rows = [(name, factor, name, p.lr2) for name, factor in methods]
        rows += [(row, factor, name, res.best) for row, (name, factor, res) in tuned.items()]
        for row, factor, start_name, lr2 in rows:
            for seed in range(p.seeds):
                cells.append(CellSpec(**dict(base, **start_of(start_name, factor), method=row, factor=factor,
                                             seed=seed, lr2=lr2)))
        results = run_cells.with_options(task_runner=runner)(cells)

        print("stage 8/8: report")
        notes = [f"Preset {p.preset}; {p.seeds} seeds per method, paired (same seeds, data order and head init).",
                 f"Source {p.source_dataset}[{p.source_classes}] -> target {p.target_dataset}[{p.target_classes or 'all'}], "
                 f"{p.target_train_size} balanced training images.",
                 f"Target trajectory: {p.model} (width {p.width}), sequential, {p.window + 2} stages at r = {p.r:g}, "
                 f"Adam lr {p.traj_lr:g}, batch {p.traj_batch_size}, optimizer regime {p.optimizer}; subsets |Dk| = "
                 "int(N·r^k), the last partial batch of each stage left out (as the release).",
                 provenance_note(meta.get("provenance", {}), meta["scaling"]),
                 f"Tuned rows (naive-lr, know-lr, official-lr) choose phase-2 lr2 on a validation split of the target "
                 f"training set (never the test split), from the grid {{{p.naive_lr_grid}}} extended ×2 / ÷2 past an "
                 f"edge optimum at most {p.lr_grid_extend} times per side; every other row uses lr2 = {p.lr2:g}.",
                 *tuning_notes,
                 "Every start point's BatchNorm statistics are re-estimated on the target training images before fine-tuning.",
                 *diagnostics_notes(diag)]
        md = write_report(str(out), results, diag, notes, f"KNOW experiment ({p.preset})")
        write_done(out, p.done_identity(), store, [*meta_runs, target_run], files=list(DONE_FILES))
        print(md)
        return str(out)


def tune_rows(tuned_rows: dict[str, list[tuple[str, float]]], grid: list[float], max_extend: int, base: dict,
              start_of, runner) -> tuple[dict[str, tuple[str, float, TuneResult]], list[str]]:
    """Choose each tuned row's start and phase-2 lr on the validation split (seed 0).

    Every candidate start (naive-lr: Θ0; know-lr: each listed know factor; official-lr: each
    official factor) gets the same bracketing search over `grid`; the row takes the candidate
    with the best validation accuracy (the first listed on a tie).  Returns {row: (start
    method, factor, its TuneResult)} and one report line per row."""
    tuned, notes = {}, []
    for row, starts in tuned_rows.items():
        results_of = {}
        for name, factor in starts:
            def score(lrs, name=name, factor=factor):
                val = [CellSpec(**dict(base, **start_of(name, factor), method=row, factor=factor, lr2=lr, seed=0,
                                       split="val", probe=False)) for lr in lrs]
                return {c["lr2"]: c["rows"][-1]["test_acc"] for c in run_cells.with_options(task_runner=runner)(val)}

            results_of[(name, factor)] = bracket_search(grid, score, max_extend=max_extend)
        (name, factor), res = max(results_of.items(), key=lambda kv: kv[1].best_score)
        tuned[row] = (name, factor, res)
        if len(starts) == 1:
            notes.append(f"{row}: {res.describe()}; validation accuracy {res.best_score:.4f}.")
        else:
            each = "; ".join(f"{m} {fmt_factor(f)}: {r.best_score:.4f} at lr2 = {r.best:g} ({r.describe()})"
                             for (m, f), r in results_of.items())
            notes.append(f"{row}: best validation accuracy per candidate start: {each} -> {name} "
                         f"{fmt_factor(factor)} at lr2 = {res.best:g}.")
        print(notes[-1])
    return tuned, notes


@flow(name="evaluate-cells")
def run_cells(cells: list[CellSpec]) -> list[dict]:
    """Fan out fine-tune cells; fail after all ended if any failed."""
    futures = finetune_cell.map(cells)
    wait(futures)
    failed = [c for c, f in zip(cells, futures) if not f.state.is_completed()]
    if failed:
        futures[cells.index(failed[0])].result()  # raises the first error
    return [f.result() for f in futures]
