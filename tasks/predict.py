"""Prediction and export tasks: trajectory (store) -> predicted weights (store) -> state_dict file.

The store is the cache: a prediction whose `input_hash` (run, predictor, its options and
the KNOWN source's content digest) matches and whose status is complete is not recomputed.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
from prefect import task

from know_core.errors import BadInput
from know_core.known import OFFICIAL_FILES, load_official
from know_core.layout import param_layout, unflatten_state
from know_core.models import build_from_spec
from know_core.predict import PredictorConfig, virtual_factors
from know_core.stream import predict_block
from params.predict import ExportParams, KnownSource, PredictParams
from storage.known_files import file_digest, known_path, load_known_payload
from storage.records import PredictionInfo, RunRecord
from storage.trajectory import StoreError, TrajectoryStore, config_hash

from .common import retry_unless_bad_input, run_logger, set_torch_threads


def load_known_source(spec: KnownSource):
    """The KnownSet named by the spec, plus a content digest for cache keys."""
    from know_core.known import known_set_from_dict

    if spec.known == "official":
        if not spec.official_dir:
            raise BadInput("--known official needs --official-dir, the directory holding KNOWN_Conv.h5, KNOWN_FC.h5 and KNOWN_Bias.h5")
        return load_official(spec.official_dir), known_digest(spec)
    ks = known_set_from_dict(load_known_payload(spec.known))
    return ks, known_digest(spec)


def known_digest(spec: KnownSource) -> str:
    """Content digest (sha256 prefix) of the KNOWN source a spec names, without loading it;
    '' for a predictor that uses no KNOWN."""
    if not spec.uses_known:
        return ""
    if spec.known == "official":
        return config_hash({k: file_digest(Path(spec.official_dir) / f) for k, f in OFFICIAL_FILES.items()})
    return file_digest(known_path(spec.known))


def prediction_input_hash(spec: PredictParams, run: RunRecord, digest: str) -> str:
    """What a prediction is made from: the run (id and completion stamp), the predictor and
    its options, and the KNOWN source's content digest. Equal hash = the stored one is current."""
    return config_hash({"run": spec.run_id, "completed_at": run.completed_at or None,
                        **spec.model_dump(exclude={"store", "block_values"}), "known_digest": digest})


def prediction_status(spec: PredictParams, store: TrajectoryStore | None = None) -> tuple[str, bool]:
    """(the input hash a prediction of `spec` would carry now, whether the store holds it
    complete with that hash). Reads records and the KNOWN file's bytes only."""
    store = store or TrajectoryStore(spec.store)
    run = store.require_run(spec.run_id)
    input_hash = prediction_input_hash(spec, run, known_digest(spec))
    old = store.prediction(spec.run_id, spec.output_name)
    return input_hash, old is not None and old.is_complete and old.input_hash == input_hash


def prediction_inputs(spec: PredictParams, store: TrajectoryStore) -> tuple[RunRecord, PredictorConfig, str]:
    """Validate everything before anything is written: (run record, predictor config, KNOWN digest)."""
    run = store.require_run(spec.run_id)
    cfg, digest = predictor_config(spec)
    if run.n_stages < cfg.rows:
        raise BadInput(f"run {spec.run_id} has a trajectory of {run.n_stages} stages; "
                       f"predictor {spec.predictor!r} needs at least {cfg.rows}")
    return run, cfg, digest


def predictor_config(spec: KnownSource) -> tuple[PredictorConfig, str]:
    """The PredictorConfig a spec names (loading KNOWN where needed) and the source digest."""
    known, digest = (None, "")
    if spec.uses_known:
        known, digest = load_known_source(spec)
    return PredictorConfig(spec.predictor, alpha=spec.alpha, known=known, predict_norm=spec.predict_norm), digest


@task(name="predict-weights", retries=1, retry_delay_seconds=1, retry_condition_fn=retry_unless_bad_input,
      task_run_name="predict-{spec.predictor}-{spec.run_id}")
def predict_run(spec: PredictParams) -> str:
    """Stream the trajectory block by block through the predictor into predictions/<run>/<name>."""
    log = run_logger()
    set_torch_threads(0)  # prediction runs alone: use every core
    store = TrajectoryStore(spec.store)
    run, cfg, digest = prediction_inputs(spec, store)
    name = spec.output_name
    with store.prediction_lock(spec.run_id, name, log):  # one writer of a prediction at a time
        input_hash = prediction_input_hash(spec, run, digest)
        old = store.prediction(spec.run_id, name)
        if old is not None and old.is_complete and old.input_hash == input_hash:
            log.info("prediction %s of run %s is up to date: skipped", name, spec.run_id)
            return name
        # step k is the prediction for (1/r)^k times the full data (method §5); the rounded subset
        # sizes only approximate r (683 images at r=0.5 give 683/342 = 1.997), so use the run's r
        factors = virtual_factors(run.sampling_rate, spec.steps)
        arr = store.begin_prediction(spec.run_id, name, spec.steps, run.n_params, PredictionInfo(
            factors=factors, predictor=spec.predictor, alpha=spec.alpha, predict_norm=spec.predict_norm,
            known_source=spec.known if spec.uses_known else "",
            known_scaling=cfg.known.scaling if cfg.known is not None else "", input_hash=input_hash, steps=spec.steps,
        ))
        t0 = time.perf_counter()
        try:
            for c0, block in store.iter_column_blocks(spec.run_id, slice(0, cfg.rows), spec.block_values):
                arr[:, c0 : c0 + block.shape[1]] = predict_block(cfg, block, run.layout, c0, run.stage_subset_sizes,
                                                                 spec.steps, run.sampling_rate)
            seconds = time.perf_counter() - t0
            store.finish_prediction(spec.run_id, name, seconds=round(seconds, 4))
        except BaseException as e:
            store.drop_prediction(spec.run_id, name)  # never leave a half-written prediction behind
            raise e
    log.info("predicted %s for run %s: factors %s, %d params in %.2fs", name, spec.run_id, factors, run.n_params, seconds)
    return name


def check_layout_fits(model: torch.nn.Module, layout, run_id: str, model_spec: dict) -> None:
    """One-line StoreError when the stored layout is not the state_dict of the run's model class
    (load_state_dict would fail with a multi-line report after the fact)."""
    want = {s.name: s.shape for s in param_layout(model)}
    have = {s.name: s.shape for s in layout}
    if want == have:
        return
    name = next((n for n in have if want.get(n) != have[n]), None) or next(n for n in want if n not in have)
    raise StoreError(f"run {run_id}: the stored weights do not fit its model_spec {model_spec}: tensor {name!r} "
                     f"has shape {have.get(name, 'missing')} in the store, {want.get(name, 'missing')} in the model")


def state_for(store: TrajectoryStore, run_id: str, source: str, step: int = 0) -> dict[str, torch.Tensor]:
    """A complete state_dict: stage 0 (Θ0) of the run, with the prediction `source` at `step` over it.

    Non-predicted entries (norm statistics, and norm affine unless predicted) keep Θ0's values
    because the predictors return them unchanged.
    """
    layout = store.layout(run_id)
    if source in ("", "theta0", "naive") or step == 0:
        vec = store.read_stages(run_id, 0)
    else:
        vec, _ = store.read_prediction(run_id, source, step)
    return unflatten_state(vec, layout)


def export_state(p: ExportParams) -> dict:
    """Write a state_dict that loads with strict=True into the run's model class."""
    from know_core.probe import recalibrate_bn
    from tasks.specs import DataSpec

    store = TrajectoryStore(p.store)
    run = store.require_run(p.run_id)
    model = build_from_spec(run.model_spec_obj())
    check_layout_fits(model, run.layout, p.run_id, run.model_spec)
    prediction = p.prediction_name
    state = state_for(store, p.run_id, prediction, p.step if prediction else 0)
    model.load_state_dict(state, strict=True)
    recal = "none"
    if p.recalibrate_bn:
        data = DataSpec(dataset=p.recalibrate_bn, classes=p.recalibrate_classes).load("train")
        recalibrate_bn(model, data.x)
        recal = p.recalibrate_bn
    Path(p.out).parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), p.out)
    return {"out": p.out, "run_id": p.run_id, "prediction": prediction, "step": p.step if prediction else 0,
            "bn_recalibrated_on": recal, "model_spec": run.model_spec}


