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
import math
from pathlib import Path

import pandas as pd
from prefect import flow, task
from prefect.futures import wait
from pydantic import BaseModel, Field

from storage.results import save_figure, save_table, save_text
from storage.trajectory import TrajectoryStore
from tasks.common import BadInput
from tasks.evaluate import CellSpec, TargetSpec, finetune_cell, target_diagnostics
from tasks.predict import PredictSpec, predict_run

from .collect import CollectParams, TrajectoryParams, collect_trajectories, forgetting_trajectory, target_specs
from .common import make_runner, resume_hint
from .predict import MetaTrainParams, meta_train_known

REPO = Path(__file__).resolve().parents[1]


class ExperimentParams(BaseModel):
    """Flat parameters of the experiment; presets fill them (see PRESETS)."""

    preset: str = Field("standard", description="Name of the preset these values came from (recorded only)")
    out: str = Field("results/standard", description="Output folder: store, KNOWN models, cells, tables, plots")
    force: bool = Field(False, description="Reuse an output folder that holds a different experiment")
    workers: int = Field(2, description="Parallel fine-tunes / collection runs (one torch thread each)")
    device: str = Field("auto", description="auto | cpu | cuda")
    official_dir: str = Field("", description="Directory of the authors' KNOWN_*.h5; empty = skip the official rows")
    # source task and model
    source_dataset: str = Field("fashion-mnist", description="Source (pre-training) data set")
    source_classes: str = Field("0-4", description="Source classes")
    source_limit: int = Field(0, description="Source training images (0 = all); the half-data variant halves it")
    full_source_limit: int = Field(0, description="half-data variant: images of the full-data naive baseline (0 = off)")
    model: str = Field("resnet", description="Model of the source/target network")
    width: int = Field(24, description="Model width (resnet 24 = ~170k parameters)")
    pretrain_epochs: int = Field(5, description="Source pre-training epochs")
    pretrain_lr: float = Field(1e-3, description="Source pre-training Adam lr")
    pretrain_batch_size: int = Field(128, description="Source pre-training batch size")
    # forgetting trajectory
    r: float = Field(0.5, description="Sampling rate of the nested subsets")
    window: int = Field(5, description="KNOWN window S; the target trajectory gets S + 2 stages")
    traj_lr: float = Field(1e-3, description="Adam lr of the forgetting fine-tunes")
    traj_batch_size: int = Field(128, description="Batch size of the forgetting fine-tunes")
    # meta data
    meta_dataset: str = Field("fashion-mnist", description="Meta-trajectory data set (never the target test split)")
    meta_classes: str = Field("0-4", description="Meta-trajectory classes")
    meta_limit: int = Field(6000, description="Meta-trajectory training images")
    meta_models: str = Field("simple-cnn,mlp", description="Comma-separated models of the meta-trajectories")
    meta_runs: int = Field(8, description="Independent-mode meta runs per model")
    meta_sequential_runs: int = Field(0, description="Sequential-mode meta runs per model")
    meta_stages: int = Field(7, description="Stages per meta run")
    meta_epochs: int = Field(10, description="Max KNOWN meta-training epochs")
    meta_pairs_per_run: int = Field(20000, description="Pairs per meta run and kind")
    # target task and protocol
    target_dataset: str = Field("fashion-mnist", description="Target data set")
    target_classes: str = Field("5-9", description="Target classes")
    target_train_size: int = Field(2000, description="Balanced target training images")
    phase1_epochs: int = Field(2, description="Head + norm epochs (release: 10)")
    phase2_epochs: int = Field(8, description="Full fine-tune epochs (release: 100)")
    lr1: float = Field(1e-3, description="Phase-1 Adam lr")
    lr2: float = Field(4e-4, description="Phase-2 cosine start lr")
    ft_batch_size: int = Field(128, description="Fine-tune batch size")
    naive_lr_grid: str = Field("4e-4,1e-3,2e-3", description="naive-lr candidates, chosen on a validation split")
    seeds: int = Field(5, description="Fine-tune seeds per method (paired across methods)")
    methods: str = Field("naive,naive-lr,know:2,know:8,official:2,official:8,shrink:8,shrink-official:8,taskvector:2,logfit:2,scratch",
                         description="Comma-separated method[:factor] list")

    def identity(self) -> dict:
        """What makes two experiments the same (run-time knobs excluded)."""
        return self.model_dump(exclude={"out", "force", "workers", "device", "preset"})


_STANDARD = ExperimentParams()
PRESETS: dict[str, dict] = {
    "standard": {},
    "full": {"methods": "naive,naive-lr,know:2,know:4,know:8,official:2,official:4,official:8,taskvector:2,"
                        "taskvector:4,taskvector:8,logfit:2,logfit:4,logfit:8,know-s2:8,know-s3:8,shrink:2,"
                        "shrink:4,shrink:8,shrink-official:2,shrink-official:4,shrink-official:8,scratch", "meta_sequential_runs": 4},
    "mnist": {"target_dataset": "mnist5k", "target_classes": ""},
    "half-data": {"source_limit": 15000, "full_source_limit": 30000,
                  "methods": "naive,naive-full,naive-lr,know:2,know:8,official:8,shrink:8,taskvector:2"},
    "quick": {"source_dataset": "digits", "source_classes": "0-4", "meta_dataset": "digits", "meta_classes": "0-4",
              "meta_limit": 0, "meta_runs": 4, "meta_epochs": 4, "meta_pairs_per_run": 5000,
              "target_dataset": "digits", "target_classes": "5-9", "target_train_size": 300, "width": 8,
              "pretrain_batch_size": 32, "traj_batch_size": 8, "pretrain_epochs": 5, "phase1_epochs": 1,
              "phase2_epochs": 3, "ft_batch_size": 32, "lr2": 1e-3, "naive_lr_grid": "1e-3,2e-3", "seeds": 2,
              "methods": "naive,naive-lr,know:2,know:4,know:8,official:8,taskvector:2,logfit:2,shrink:8,shrink-official:8,scratch"},
}


def preset_params(name: str, **overrides) -> ExperimentParams:
    if name not in PRESETS:
        raise BadInput(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return ExperimentParams(**{**PRESETS[name], "preset": name, "out": f"results/{name}", **overrides})


def parse_methods(p: ExperimentParams) -> list[tuple[str, float]]:
    """'know:8' -> ('know', 8.0); methods without a factor get 1."""
    known = {"naive", "naive-lr", "naive-full", "scratch", "know", "official", "taskvector", "logfit", "shrink",
             "know-s2", "know-s3", "know-s4", "shrink-official"}
    out = []
    for item in filter(None, (m.strip() for m in p.methods.split(","))):
        name, _, factor = item.partition(":")
        if name not in known:
            raise BadInput(f"unknown method {name!r} in methods; choose from: {', '.join(sorted(known))}")
        if name in ("official", "shrink-official") and not p.official_dir:
            continue  # official rows need the h5 files; skipped without them
        if name == "naive-full" and not p.full_source_limit:
            raise BadInput("method naive-full needs full_source_limit (the half-data preset sets it)")
        out.append((name, float(factor) if factor else 1.0))
    return out


def step_of(factor: float, r: float) -> int:
    return max(1, round(math.log(factor) / math.log(1.0 / r)))


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


def plan(p: ExperimentParams) -> dict:
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
    return {"store": store, "collects": collects, "target": target, "full": full, "known": str(out / "known")}


@task(name="write-report")
def write_report(out: str, cells: list[dict], diagnostics: list[dict], notes: list[str], title: str) -> str:
    from know_core.report import plot_accuracy_vs_factor, plot_learning_curves, summarize, summary_markdown

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
    coh = df.coherence.iloc[0]
    parts = ", ".join(f"{k} {v:.3e}" for k, v in allk.items())
    return [f"Target trajectory step coherence (mean cosine of consecutive steps): {coh:.3f}",
            f"Predictor L1 on the target's held-out windows (predict stage k from k+1..k+5; lower is better): {parts}"]


@flow(name="know-experiment", log_prints=True)
def know_run(params: ExperimentParams = ExperimentParams()) -> str:
    """The whole experiment: meta data, KNOWN, target trajectory, predictions, fine-tunes, report."""
    with resume_hint("know-experiment"):
        p = params
        methods = parse_methods(p)
        if not 0 < p.r < 1:
            raise BadInput(f"sampling rate r={p.r} is out of range; it must satisfy 0 < r < 1")
        out = check_out_dir(p)
        pl = plan(p)
        store = pl["store"]
        TrajectoryStore(store).prepare()

        print("stage 1/8: meta-trajectory collection")
        for cp in pl["collects"]:
            collect_trajectories(cp)
        print("stage 2/8: source pre-training and target forgetting trajectory")
        target_run = forgetting_trajectory(pl["target"])
        full_ckpt = ""
        if pl["full"] is not None:
            pre_full, _ = target_specs(pl["full"])
            from tasks.collect import pretrain

            full_ckpt = pretrain(store, pre_full, p.device)
        print("stage 3/8: meta-training KNOWN")
        meta = meta_train_known(MetaTrainParams(store=store, out=pl["known"], exclude_runs=target_run,
                                                epochs=p.meta_epochs, pairs_per_run=p.meta_pairs_per_run,
                                                official_dir=p.official_dir, compare_modes=p.meta_sequential_runs > 0))

        print("stage 4/8: predictions")
        max_step = {}
        for name, factor in methods:
            if factor > 1:
                pred = {"official": "know", "shrink": "know", "shrink-official": "know"}.get(name, name)
                key = (pred, "official" if name in ("official", "shrink-official") else pl["known"])
                max_step[key] = max(max_step.get(key, 0), step_of(factor, p.r))
        specs = {key: PredictSpec(store=store, run_id=target_run, predictor=key[0], steps=steps, known=key[1],
                                  official_dir=p.official_dir) for key, steps in max_step.items()}
        names = {key: predict_run(spec) for key, spec in specs.items()}

        print("stage 5/8: predictor diagnostics on the target's held-out windows")
        diag_preds = {"identity": PredictSpec(store=store, run_id=target_run, predictor="naive"),
                      "taskvector": PredictSpec(store=store, run_id=target_run, predictor="taskvector"),
                      "logfit": PredictSpec(store=store, run_id=target_run, predictor="logfit"),
                      "know (ours)": PredictSpec(store=store, run_id=target_run, predictor="know", known=pl["known"])}
        if p.official_dir:
            diag_preds["know (official)"] = PredictSpec(store=store, run_id=target_run, predictor="know",
                                                        known="official", official_dir=p.official_dir)
        diag = target_diagnostics(store, target_run, diag_preds, p.window)

        target = TargetSpec(dataset=p.target_dataset, classes=p.target_classes, train_size=p.target_train_size)
        base = dict(out=str(out), store=store, run_id=target_run, target=target, phase1_epochs=p.phase1_epochs,
                    phase2_epochs=p.phase2_epochs, lr1=p.lr1, lr2=p.lr2, batch_size=p.ft_batch_size, device=p.device)
        runner = make_runner("thread", p.workers)

        lr_choice = p.lr2
        if any(m == "naive-lr" for m, _ in methods):
            print("stage 6/8: choosing naive-lr on a validation split (never the test split)")
            grid = [float(v) for v in p.naive_lr_grid.split(",") if v.strip()]
            val = [CellSpec(**dict(base, method="naive-lr", source="theta0", lr2=lr, seed=0, split="val", probe=False))
                   for lr in grid]
            val_res = run_cells.with_options(task_runner=runner)(val)
            scores = {c["lr2"]: c["rows"][-1]["test_acc"] for c in val_res}
            lr_choice = max(scores, key=scores.get)
            print(f"naive-lr: validation accuracy {scores} -> lr2 = {lr_choice:g}")

        print("stage 7/8: fine-tuning and probing every start point")
        cells = []
        for name, factor in methods:
            step = step_of(factor, p.r) if factor > 1 else 0
            for seed in range(p.seeds):
                kw = dict(base, method=name, factor=factor, seed=seed, step=step)
                if name in ("naive", "naive-lr"):
                    kw.update(source="theta0", lr2=lr_choice if name == "naive-lr" else p.lr2)
                elif name == "naive-full":
                    kw.update(source=f"ckpt:{full_ckpt}")
                elif name == "scratch":
                    kw.update(source="scratch")
                elif name == "shrink":
                    kw.update(source=names[("know", pl["known"])], shrink=True)
                elif name == "shrink-official":
                    kw.update(source=names[("know", "official")], shrink=True)
                elif name == "official":
                    kw.update(source=names[("know", "official")])
                else:
                    kw.update(source=names[(name, pl["known"])])
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
