"""Meta-training tasks: complete runs in the store -> trained KNOWN models in a directory.

    <out>/<meta_data>/<scaling>/known.pt     one trained KnownSet (conv, fc, bias models)
    <out>/<meta_data>/<scaling>/ckpt-<kind>.pt  per-epoch resumable state while training
    <out>/known.pt                           the default: best scaling on the main meta-data
    <out>/val_l1.csv, <out>/runs.csv         the comparison table and per-run coherence

A finished model directory (known.pt with a matching input hash) is not retrained; an
interrupted one resumes from its last checkpoint: per epoch, and per buffer group when the
pairs stream from the store (`--loader stream`, or `auto` when they outgrow `--buffer-pairs`),
so memory stays bounded by the shuffle buffer whatever the size of the store.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
from prefect import task

from know_core.errors import BadInput
from know_core.known import WINDOW, KnownSet, known_set_from_dict, load_official, save_known_set
from know_core.layout import PREDICTED_KINDS
from know_core.baselines import l1_table
from know_core.meta import MetaConfig, train_known, train_known_streamed
from know_core.pair_stream import Block, fill_pairs, plan_blocks, select_columns, selected_values
from know_core.pairs import coherence_of, coherence_sums, pair_log_sizes, split_runs_grouped
from storage.known_files import file_digest, known_path, load_known_payload, load_state, save_known, save_state
from params.predict import MetaTrainParams
from storage.records import RunRecord
from storage.trajectory import TrajectoryStore, config_hash

from .common import retry_unless_bad_input, run_logger, set_torch_threads


#: pairs per run and kind that the validation-L1 table reads when training streams (memory stays
#: bounded; the trained models saw every selected pair)
REPORT_PAIRS = 20_000


def eligible_runs(store: TrajectoryStore, spec: MetaTrainParams, meta_data: str) -> list[RunRecord]:
    """The complete runs (>= WINDOW + 1 stages, not excluded, of the mode `meta_data`) that train KNOWN."""
    runs = store.runs()
    if not runs:
        raise BadInput(f"store {spec.store} holds no runs; collect some with `know collect --store {spec.store} --stages 7`")
    excluded, only = spec.excluded(), spec.only()
    runs = [r for r in runs if r.is_complete and r.n_stages >= WINDOW + 1 and r.run_id not in excluded
            and meta_data in ("all", r.mode) and (not only or r.run_id in only)]
    if len(runs) < 2:
        raise BadInput(f"meta-training on {meta_data!r} runs needs at least 2 complete runs with >= {WINDOW + 1} stages "
                       f"in {spec.store}, found {len(runs)}; run `know collect --stages 7 --runs 12`")
    return runs


def meta_provenance(store: TrajectoryStore, spec: MetaTrainParams, meta_data: str) -> dict:
    """What KNOWN was trained on: counts of the eligible runs by mode, model, data set and
    optimizer regime, and why every other run of the store was left out."""
    from collections import Counter

    used = eligible_runs(store, spec, meta_data)
    ids = {r.run_id for r in used}
    excluded = spec.excluded()
    why: Counter = Counter()
    for r in store.runs():
        if r.run_id in ids:
            continue
        if r.run_id in excluded:
            why["excluded by name (the target run)"] += 1
        elif spec.only() and r.run_id not in spec.only():
            why["not this experiment's meta run"] += 1
        elif not r.is_complete:
            why[f"status {r.status}"] += 1
        elif r.n_stages < WINDOW + 1:
            why[f"fewer than {WINDOW + 1} stages"] += 1
        else:
            why[f"{r.mode} mode (meta-data {meta_data!r})"] += 1
    count = lambda attr: dict(sorted(Counter(getattr(r, attr) for r in used).items()))
    return {"meta_data": meta_data, "runs": len(used), "modes": count("mode"), "models": count("model"),
            "datasets": count("dataset"), "optimizers": count("optimizer"), "left_out": dict(why)}


def split_by_model(runs: list[RunRecord], spec: MetaTrainParams) -> tuple[list[str], list[str]]:
    """Train/validation split by run, stratified by model so every kind is validated."""
    return split_runs_grouped([r.run_id for r in runs], [r.model for r in runs], spec.val_fraction, spec.seed)


def run_pairs(store: TrajectoryStore, run_id: str, cap: int, seed: int, coherence: bool = True):
    """(pairs, log sizes per kind, trajectory coherence, per-kind coherence) of one run, the
    pairs as build_pairs(traj, layout, max_per_kind=cap or None, rng=seed) gives them. Read in
    chunk-aligned column blocks: memory holds the selected pairs, never the whole run."""
    run = store.require_run(run_id)
    S, layout = run.n_stages, run.layout
    selected = select_columns(layout, S, cap or None, seed, WINDOW)
    read = block_reader(store)
    chunk = store.weights(run_id).chunks[-1]
    pairs = {}
    for kind in PREDICTED_KINDS:
        n = sum(b.n_scalars for b in plan_blocks(run_id, kind, selected[kind], S, chunk, 1 << 22, WINDOW))
        X, Y = np.empty((n * (S - WINDOW), WINDOW), np.float32), np.empty(n * (S - WINDOW), np.float32)
        at = 0
        for block in plan_blocks(run_id, kind, selected[kind], S, chunk, 1 << 22, WINDOW):
            fill_pairs(read(block), block, X, Y, at, WINDOW, stride=n)
            at += block.n_scalars
        pairs[kind] = (X, Y)
    sizes = {k: pair_log_sizes(run.stage_subset_sizes, len(Y)) for k, (X, Y) in pairs.items()}
    coh, coh_kind = streamed_coherence(store, run_id, layout) if coherence else (float("nan"), {})
    return pairs, sizes, coh, coh_kind


def streamed_coherence(store: TrajectoryStore, run_id: str, layout, max_values: int = 1 << 22):
    """(step_coherence, per_kind_coherence) of a run, summed over column blocks of the store."""
    sums: dict[str, list] = {}
    for c0, values in store.iter_column_blocks(run_id, slice(None), max_values):
        c1 = c0 + values.shape[1]
        for kind in PREDICTED_KINDS:
            slices = [slice(max(s.offset, c0) - c0, min(s.stop, c1) - c0) for s in layout
                      if s.kind == kind and s.offset < c1 and s.stop > c0]
            if slices:
                if not np.isfinite(np.concatenate([values[:, sl] for sl in slices], axis=1)).all():
                    raise BadInput(f"run {run_id} holds NaN/Inf weights; delete it and collect again")
                dot, sq = coherence_sums(values, slices)
                have = sums.setdefault(kind, [0.0, 0.0])
                have[0], have[1] = have[0] + dot, have[1] + sq
    total_dot = sum(v[0] for v in sums.values())
    total_sq = sum(v[1] for v in sums.values())
    return coherence_of(total_dot, total_sq), {k: coherence_of(*v) for k, v in sums.items()}


def gather(store, run_ids, spec: MetaTrainParams):
    """Concatenate the pairs of several runs, per kind."""
    parts = [run_pairs(store, rid, spec.pairs_per_run, spec.seed + i, coherence=False) for i, rid in enumerate(run_ids)]
    pairs, sizes = {}, {}
    for kind in PREDICTED_KINDS:
        pairs[kind] = (np.concatenate([p[0][kind][0] for p in parts]), np.concatenate([p[0][kind][1] for p in parts]))
        sizes[kind] = np.concatenate([p[1][kind] for p in parts])
    return pairs, sizes


def pair_blocks(store: TrajectoryStore, run_ids: list[str], spec: MetaTrainParams, kind: str) -> list[Block]:
    """The training pairs of `kind` of these runs as chunk-aligned blocks: the same scalars
    as gather() selects (cap and seeds), read on demand by block_reader()."""
    blocks = []
    for i, rid in enumerate(run_ids):
        run = store.require_run(rid)
        cols = select_columns(run.layout, run.n_stages, spec.pairs_per_run or None, spec.seed + i, WINDOW)
        chunk = store.weights(rid).chunks[-1]
        blocks += plan_blocks(rid, kind, cols[kind], run.n_stages, chunk, max(1, spec.buffer_pairs // 4), WINDOW)
    return blocks


def block_reader(store: TrajectoryStore):
    """read(block) -> the block's values (n_stages, c1 - c0), one chunk listing per run."""
    readers: dict[str, object] = {}

    def read(block: Block) -> np.ndarray:
        if block.source not in readers:
            readers[block.source] = store.column_reader(block.source)[1]
        values = readers[block.source](block.c0, block.c1)
        if not np.isfinite(selected_values(values, block)).all():
            raise BadInput(f"run {block.source} holds NaN/Inf weights; delete it and collect again")
        return values

    return read


def streams(spec: MetaTrainParams, store: TrajectoryStore, run_ids: list[str]) -> bool:
    """Whether meta-training streams its pairs: loader 'stream', or 'auto' and the training
    pairs of the largest kind outgrow the shuffle buffer."""
    if spec.loader != "auto":
        return spec.loader == "stream"
    biggest = max(sum(b.n_pairs for b in pair_blocks(store, run_ids, spec, kind)) for kind in PREDICTED_KINDS)
    return biggest > spec.buffer_pairs


def known_input_hash(spec: MetaTrainParams, runs: list[RunRecord], train_ids: list[str], val_ids: list[str],
                     scaling: str, streamed: bool | None = None) -> str:
    """What one KNOWN model is trained from: the settings, the run split and each run's
    completion stamp (a re-collected run is new data). Equal hash = the saved model is current.
    `streamed`: `streams(...)` when the caller has it (it lists every run's chunks)."""
    if streamed is None:
        streamed = streams(spec, TrajectoryStore(spec.store), train_ids)
    return config_hash({**spec.model_dump(exclude={"out", "official_dir", "compare_modes", "meta_data", "scaling",
                                                   "only_runs", "exclude_runs", "loader", "buffer_pairs"}),
                        **({"loader": "stream", "buffer_pairs": spec.buffer_pairs} if streamed else {}),
                        "train": train_ids, "val": val_ids, "scaling": scaling,
                        "completed_at": {r.run_id: r.completed_at for r in runs}})


def known_is_current(spec: MetaTrainParams) -> bool:
    """Whether <out>/known.pt is a model trained on the store's runs as they are now, with
    these settings (the main meta-data, either scaling). Reads records and the file only."""
    if not known_path(spec.out).exists():
        return False
    store = TrajectoryStore(spec.store)
    runs = eligible_runs(store, spec, spec.meta_data)
    train_ids, val_ids = split_by_model(runs, spec)
    have = load_known_payload(spec.out).get("provenance", {}).get("input_hash")
    scalings = ("raw", "minmax") if getattr(spec, "scaling", "auto") == "auto" else (spec.scaling,)
    streamed = streams(spec, store, train_ids)
    return have in {known_input_hash(spec, runs, train_ids, val_ids, s, streamed) for s in scalings}


@task(name="meta-train-known", retries=1, retry_delay_seconds=1, retry_condition_fn=retry_unless_bad_input,
      task_run_name="meta-train-{meta_data}-{scaling}")
def train_known_set(spec: MetaTrainParams, meta_data: str, scaling: str) -> str:
    """Train the three KNOWN models on one meta-data set with one input scaling. Returns its dir."""
    log = run_logger()
    set_torch_threads()
    store = TrajectoryStore(spec.store)
    runs = eligible_runs(store, spec, meta_data)
    train_ids, val_ids = split_by_model(runs, spec)
    out = Path(spec.out) / meta_data / scaling
    streamed = streams(spec, store, train_ids)
    input_hash = known_input_hash(spec, runs, train_ids, val_ids, scaling, streamed)
    if known_path(out).exists() and load_known_payload(out).get("provenance", {}).get("input_hash") == input_hash:
        log.info("KNOWN %s/%s is up to date: skipped", meta_data, scaling)
        return str(out)
    if streamed:
        log.info("KNOWN %s/%s: pairs streamed from the store through a %d-pair shuffle buffer", meta_data, scaling,
                 spec.buffer_pairs)
    else:
        train_pairs, _ = gather(store, train_ids, spec)
        val_pairs, _ = gather(store, val_ids, spec)
    cfg = MetaConfig(epochs=spec.epochs, batch_size=spec.batch_size, lr=spec.lr, patience=spec.patience,
                     scaling=scaling, seed=spec.seed)
    models, histories = {}, {}
    for kind in PREDICTED_KINDS:
        if streamed:
            train_blocks, val_blocks = pair_blocks(store, train_ids, spec, kind), pair_blocks(store, val_ids, spec, kind)
            n_train, n_val = (sum(b.n_pairs for b in bl) for bl in (train_blocks, val_blocks))
        else:
            (X, Y), (Xv, Yv) = train_pairs[kind], val_pairs[kind]
            n_train, n_val = len(Y), len(Yv)
        if n_train == 0 or n_val == 0:
            raise BadInput(f"no {kind} weights in the meta-training runs; KNOWN {kind} cannot be trained")
        ckpt = out / f"ckpt-{kind}.pt"
        resume = load_state(ckpt)
        if resume is not None and resume.get("input_hash") != input_hash:
            resume = None
        if resume is not None:
            log.info("resuming %s/%s/%s from epoch %s%s", meta_data, scaling, kind, resume.get("epoch"),
                     f", group {resume['group']}" if resume.get("group") else "")

        def on_epoch(row, state, kind=kind, ckpt=ckpt):
            log.info("meta %s/%s %s epoch %d: train L1 %.3e  val L1 %.3e", meta_data, scaling, kind,
                     row["epoch"], row["train_l1"], row["val_l1"])
            save_state(ckpt, {**state, "input_hash": input_hash})

        t0 = time.perf_counter()
        resume_state = resume and {k: v for k, v in resume.items() if k != "input_hash"}
        if streamed:
            def on_group(state, ckpt=ckpt):
                save_state(ckpt, {**state, "input_hash": input_hash})

            models[kind], histories[kind] = train_known_streamed(
                train_blocks, val_blocks, block_reader(store), cfg, spec.buffer_pairs, resume_state=resume_state,
                on_epoch=on_epoch, on_group=on_group)
        else:
            models[kind], histories[kind] = train_known(X, Y, Xv, Yv, cfg, resume_state=resume_state, on_epoch=on_epoch)
        log.info("KNOWN %s (%s, %s): %d train / %d val pairs, %.1fs", kind, meta_data, scaling, n_train, n_val,
                 time.perf_counter() - t0)
    provenance = {"store": spec.store, "meta_data": meta_data, "train_runs": train_ids, "val_runs": val_ids,
                  "input_hash": input_hash, "config": spec.model_dump(), "history": json.dumps(histories)}
    ks = KnownSet(models=models, scaling=scaling, source=str(out), provenance=provenance)
    save_known(out, save_known_set(ks))
    for kind in PREDICTED_KINDS:
        (out / f"ckpt-{kind}.pt").unlink(missing_ok=True)
    return str(out)


@task(name="meta-report", task_run_name="meta-report-{meta_data}")
def meta_report(spec: MetaTrainParams, meta_data: str, model_dirs: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Validation-L1 table of every trained model and baseline on the held-out runs of `meta_data`,
    and per-run coherence with each run's identity and best-model L1."""
    store = TrajectoryStore(spec.store)
    runs = eligible_runs(store, spec, meta_data)
    train_ids, val_ids = split_by_model(runs, spec)
    if streams(spec, store, train_ids):  # the table is a comparison, not training: a sample of each run is enough
        spec = spec.model_copy(update={"pairs_per_run": min(spec.pairs_per_run or REPORT_PAIRS, REPORT_PAIRS)})
    train_pairs, _ = gather(store, train_ids, spec)
    val_pairs, val_sizes = gather(store, val_ids, spec)
    known_sets: dict[str, KnownSet] = {}
    for d in model_dirs:
        ks = known_set_from_dict(load_known_payload(d))
        known_sets[f"known-{ks.scaling}[{ks.provenance.get('meta_data', '?')}]"] = ks
    if spec.official_dir:
        known_sets["official"] = load_official(spec.official_dir)
    table = l1_table(train_pairs, val_pairs, known_sets, sizes=val_sizes)
    table.insert(0, "val_runs_of", meta_data)
    rows = []
    for rid in val_ids:
        pairs, sizes, coh, coh_kind = run_pairs(store, rid, spec.pairs_per_run, spec.seed)
        t = l1_table(train_pairs, pairs, known_sets, sizes=sizes)
        t = t[t.kind == "all"].set_index("method").val_l1
        rows.append({"run_id": rid, "mode": next(r.mode for r in runs if r.run_id == rid), "coherence": coh,
                     **{f"coherence_{k}": v for k, v in coh_kind.items()}, **{f"l1_{m}": v for m, v in t.items()}})
    return table, pd.DataFrame(rows)


def pick_default(spec: MetaTrainParams, table: pd.DataFrame, model_dirs: list[str]) -> str:
    """Copy the model with the lowest overall val L1 on the main meta-data (or the one of
    spec.scaling, when that is not 'auto') to <out>/known.pt."""
    allrows = table[(table.kind == "all") & (table.val_runs_of == spec.meta_data) & table.method.str.startswith("known-")]
    allrows = allrows[allrows.method.str.endswith(f"[{spec.meta_data}]")]
    best = allrows.sort_values("val_l1").iloc[0].method
    scaling = best.split("-", 1)[1].split("[", 1)[0] if spec.scaling == "auto" else spec.scaling
    src = next(d for d in model_dirs if Path(d).parts[-2:] == (spec.meta_data, scaling))
    # a rerun that picks the same model leaves <out>/known.pt untouched
    if not known_path(spec.out).exists() or file_digest(known_path(spec.out)) != file_digest(known_path(src)):
        shutil.copyfile(known_path(src), known_path(spec.out))
    return scaling


__all__ = ["MetaTrainParams", "train_known_set", "meta_report", "pick_default", "eligible_runs",
           "known_input_hash", "known_is_current"]
