"""The `know` commands. Each takes its stage model (params/) as a flattened group, so every
option, default, constraint and help text comes from that model and nowhere else:

    know collect --store runs.zarr --dataset digits --models simple-cnn --runs 4 --stages 5
    know runs --store runs.zarr

Each command has the same shape: pre-flight checks (before any flow starts, so a bad input
is one line and not a Prefect traceback), the flow with a progress display, a summary.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import cyclopts
from cyclopts import Parameter

from params import (CollectParams, ExperimentParams, ExportParams, ImportParams, MetaTrainParams, PredictParams,
                    ResumeParams, RunsParams, ScheduleParams, StudyParams, SubmitParams, TrajectoryParams)

from .fastpath import pop_option
from .display import console, print_l1_table, print_runs, watch_experiment, watch_runs, wide_console

app = cyclopts.App(name="know", help="KNOW pipeline: collect forgetting trajectories, meta-train KNOWN, "
                   "predict knowledge-overflowed weights, evaluate them.", result_action="return_value")

Flat = Parameter(name="*")


def apply_config(argv: list[str]) -> list[str]:
    """`know run --config FILE.toml`: every field the file names becomes a default of that
    command (options given on the command line still win); returns argv without --config.
    Any other command line is returned as it is."""
    argv = list(argv)
    app.config = ()
    if argv[:1] == ["run"]:
        argv, config = pop_option(argv, "--config")
        if config is not None:
            import cyclopts.config

            from know_core.errors import MissingData

            if not Path(config).is_file():
                raise MissingData(f"--config {config}: no such file; pass a TOML file of `know run` settings")
            app.config = cyclopts.config.Toml(config, must_exist=True, use_commands_as_keys=False)
    return argv


def _require_store(store: str) -> None:
    from know_core.errors import MissingData

    if "://" not in store and not Path(store).exists():
        raise MissingData(f"store {store} does not exist; create it with `know collect --store {store}`")


@app.command
def collect(*, p: Annotated[CollectParams, Flat] = CollectParams()):
    """Collect a sweep of forgetting trajectories into a Zarr store (method §3)."""
    from flows.collect import collect_trajectories, preflight

    specs = preflight(p)
    with watch_runs(p.store, [s.run_id for s in specs]):
        run_ids = collect_trajectories(p)
    console.print(f"[green]{len(run_ids)} runs complete[/] in {p.store}")
    print_runs(p.store, run_ids)


@app.command
def trajectory(*, p: Annotated[TrajectoryParams, Flat] = TrajectoryParams()):
    """Pre-train a source model and record its sequential forgetting trajectory (method §2)."""
    from flows.trajectory import forgetting_trajectory, preflight

    run = preflight(p)
    with watch_runs(p.store, [run.run_id], label="target"):
        run_id = forgetting_trajectory(p)
    console.print(f"[green]target trajectory complete:[/] {run_id}")
    print_runs(p.store, [run_id])


@app.command
def runs(*, p: Annotated[RunsParams, Flat] = RunsParams()):
    """List the runs in a store with their status and hyper-parameters.

    --verify reads every chunk of every complete run, prediction and checkpoint and checks it
    (crc32c; a missing or truncated chunk is damage too). Each damaged one is marked 'damaged'
    in the store and printed as one `error:` line naming the run, the stage and the chunk file;
    the same `know collect` (or `know trajectory`, `know predict`) then rewrites it. Exit
    status: 0 when everything read back intact, 2 when anything is damaged."""
    _require_store(p.store)
    if not p.verify:
        print_runs(p.store)
        return
    from rich.markup import escape

    from storage.trajectory import TrajectoryStore

    from .errors import EXIT_BAD_INPUT

    report = TrajectoryStore(p.store).verify()
    print_runs(p.store)
    for damage in report.damaged:
        console.print(f"[bold red]error:[/] {escape(str(damage))}", highlight=False, soft_wrap=True)
    if report.damaged:
        raise SystemExit(EXIT_BAD_INPUT)
    console.print(f"[green]verified:[/] {report.runs} complete runs, {report.predictions} predictions and "
                  f"{report.checkpoints} checkpoints read back intact", highlight=False)


@app.command(name="meta-train")
def meta_train(*, p: Annotated[MetaTrainParams, Flat] = MetaTrainParams()):
    """Meta-train the three KNOWN models (conv, fc, bias) on complete runs of a store.

    Trains with raw and with min-max input scaling, keeps the better as OUT/known.pt, and
    prints the validation-L1 table against taskvector, logfit, identity and constant scale."""
    from flows.meta_train import meta_train_known, preflight

    _require_store(p.store)
    preflight(p)
    result = meta_train_known(p)
    print_l1_table(result["table"])
    console.print(f"[green]default KNOWN ({result['scaling']} scaling) saved to[/] {p.out}/known.pt")


@app.command
def predict(*, p: Annotated[PredictParams, Flat]):
    """Predict knowledge-overflowed weights of one run, streamed into the store."""
    from flows.predict import predict_weights, preflight
    from storage.trajectory import TrajectoryStore

    _require_store(p.store)
    preflight(p)
    name = predict_weights(p)
    rec = TrajectoryStore(p.store).prediction(p.run_id, name)
    factors = ", ".join(f"x{f:g}" for f in rec.factors)
    console.print(f"[green]prediction {name!r}[/] of run {p.run_id}: virtual-data factors {factors} "
                  f"({rec.seconds or 0:.2f}s); export with `know export --store {p.store} --run-id {p.run_id} "
                  f"--prediction '{name}' --step {p.steps} --out model.pt`", highlight=False)


@app.command
def export(*, p: Annotated[ExportParams, Flat]):
    """Export Θ0 or a predicted step as a state_dict for the run's model class.

    Load it with `model.load_state_dict(torch.load(path, weights_only=True), strict=True)`.
    KNOW shrinks kernels, so BatchNorm statistics from Θ0 no longer fit: re-estimate them
    with --recalibrate-bn DATASET (recommended for models with BatchNorm)."""
    from tasks.predict import export_state

    _require_store(p.store)
    info = export_state(p)
    console.print(f"[green]wrote[/] {info['out']} ({info['prediction'] or 'theta0'} step {info['step']}, "
                  f"BN statistics: {info['bn_recalibrated_on']})", highlight=False)


@app.command(name="import-release")
def import_release(p: Annotated[ImportParams, Flat]):
    """Import the authors' released meta-data (.mat v7.3 files) as complete independent-mode runs.

    One run per file, with model, data set, r, lr and batch size from its name
    (`<model>_<dataset>_r<rate>_lr<lr>_bs<batch>[_<anything>].mat`) unless given as options; file
    stage index 6 (the full data) becomes stage 0. A file already imported is skipped. Every
    file is checked before any is written. Then `know meta-train` trains on them (method §3)."""
    from flows.release import import_release as import_flow, preflight

    preflight(p)
    results = import_flow(p)
    done = sum(r["status"] == "imported" for r in results)
    console.print(f"[green]imported {done} of {len(results)} files[/] into {p.store} ({len(results) - done} were "
                  "already there)", highlight=False)
    print_runs(p.store, [r["run_id"] for r in results])


@app.command
def study(*, p: Annotated[StudyParams, Flat] = StudyParams()):
    """Run the regime study: a grid of `know run` variants (screen: 7 hypotheses, one each,
    against the standard run), then study.csv/.md, gain_vs_coherence.png and a conclusion
    written from the numbers. Variants share the store, KNOWN and fine-tune cells, so a re-run
    recomputes nothing that finished."""
    from flows.study import know_study, preflight

    preflight(p)
    know_study(p)
    wide_console(200).print((Path(p.out) / "study.md").read_text())


@app.command
def run(*, p: Annotated[ExperimentParams, Flat] = ExperimentParams()):
    """Run the whole KNOW experiment and print its summary table.

    Collects meta-trajectories, meta-trains KNOWN, pre-trains a source model, records its
    forgetting trajectory, predicts x2/x4/x8 weights and fine-tunes every start point on a
    target task over several seeds. --preset fills every option not given; a finished stage
    is reused when run again.

    --config FILE.toml: a custom experiment; the file holds fields of this command (the names
    of the options with '_' for '-', as in the UI form and `know submit --param`), e.g.
    `preset = "quick"`, `model = "torchvision:resnet18"`, `source_dataset = "image-folder"`.
    Options given on the command line win over the file."""
    from flows.experiment import know_run, preflight

    plan = preflight(p)
    with watch_experiment(p.out, plan):
        know_run(p)
    wide_console(160).print((Path(p.out) / "summary.md").read_text())
    console.print(f"[green]done:[/] {p.out}/results.csv, summary.md, accuracy_vs_factor.png, learning_curves.png")


@app.command
def submit(p: Annotated[SubmitParams, Flat]):
    """Submit a stage to its deployment on the Prefect server and print the flow-run URL.

    Needs PREFECT_API_URL (e.g. http://127.0.0.1:4200/api), deployments from
    `prefect deploy --all` and a worker on the stage's pool (docs/operations.md):

        know submit pipeline --param runs=3 --param stages=6 --param limit=300"""
    from flows.ops import parse_overrides, submit as submit_run

    run_id, url = submit_run(p.stage, parse_overrides(p.param), tags=p.tag)
    print(url)
    console.print(f"submitted {p.stage}: flow run {run_id}", highlight=False)
    if p.watch:
        _watch_flow_run(run_id)


def _watch_flow_run(run_id: str) -> None:
    from flows.ops import wait

    with console.status(f"waiting for flow run {run_id}"):
        run = wait(run_id)
    if run.state.is_completed():
        console.print(f"[green]flow run {run_id} {run.state.name}[/]", highlight=False)
        return
    console.print(f"[bold red]flow run {run_id} {run.state.name}[/]: {run.state.message or ''}\n"
                  f"resume it with `know resume {run_id}`", highlight=False, soft_wrap=True)
    raise SystemExit(1)


@app.command
def resume(p: Annotated[ResumeParams, Flat]):
    """Retry a failed or crashed flow run; finished work (complete runs, cached results) is reused.

    A run of a deployment goes back to Scheduled and its pool's worker runs it again (like
    `prefect flow-run retry`); a local run (from `know collect` etc.) re-runs here. A run left
    RUNNING or CANCELLING by a dead worker is marked Crashed first, with its orphaned task runs,
    once it has sent no heartbeat for two heartbeat intervals (--force: at once)."""
    from flows.ops import resume as resume_run

    how, state = resume_run(p.flow_run_id, force=p.force,
                            notify=lambda line: console.print(line, highlight=False, soft_wrap=True))
    if how == "scheduled":
        console.print(f"flow run {p.flow_run_id} scheduled again; a worker of its pool will pick it up", highlight=False)
        if p.watch:
            _watch_flow_run(p.flow_run_id)
        return
    console.print(f"flow run {p.flow_run_id} re-ran locally: {state}", highlight=False)
    if state != "COMPLETED":
        raise SystemExit(1)


@app.command
def schedule(p: Annotated[ScheduleParams, Flat]):
    """Switch a deployment schedule on or off, keeping the schedule's parameters.

    `prefect deployment schedule resume|pause` sends `active` alone, and this Prefect server
    then empties the schedule's parameters (its runs would use the defaults). This re-sends
    them with the change and reads the schedule back:

        know schedule on know-collect nightly-meta-data"""
    from flows.ops import set_schedule

    info = set_schedule(p.deployment, p.schedule, active=p.action == "on")
    state = "on" if info.active else "off"
    done = "switched" if info.changed else "already"
    console.print(f"schedule {info.slug or info.schedule_id} of {info.deployment} {done} {state} ({info.schedule}); "
                  f"parameters: {info.parameters or '{} (none: its runs take the deployment defaults; `prefect deploy --all` restores the ones of prefect.yaml)'}",
                  highlight=False, soft_wrap=True)
