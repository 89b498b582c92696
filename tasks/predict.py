"""Prediction and export tasks: trajectory (store) -> predicted weights (store) -> state_dict file.

The store is the cache: a prediction whose `input_hash` (run, predictor, its options and
the KNOWN source's content digest) matches and whose status is complete is not recomputed.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
from prefect import task
from pydantic import BaseModel, Field

from know_core.known import load_official
from know_core.layout import param_layout, unflatten_state
from know_core.models import ModelSpec, build_from_spec
from know_core.predict import PREDICTORS, PredictorConfig
from know_core.stream import predict_block
from storage.known_files import file_digest, known_path, load_known_payload
from storage.trajectory import StoreError, TrajectoryStore, config_hash

from .common import BadInput, retry_unless_bad_input, run_logger, set_torch_threads


class PredictSpec(BaseModel):
    store: str = Field("runs.zarr", description="Trajectory store (path or fsspec URL)")
    run_id: str = Field(..., description="Run whose trajectory is extrapolated")
    predictor: str = Field("know", description="naive | taskvector | logfit | know | know-s2 | know-s3 | know-s4")
    steps: int = Field(3, description="Recurrent steps: 3 gives x2/x4/x8 at r=0.5")
    known: str = Field("official", description="'official' or a directory written by `know meta-train`")
    official_dir: str = Field("", description="Directory holding the authors' three KNOWN_*.h5 files (known=official)")
    alpha: float = Field(1.0, description="taskvector step size")
    predict_norm: bool = Field(False, description="Also predict norm affine parameters with the Bias model")
    block_values: int = Field(1 << 22, description="Columns per streamed block (bounds memory)")

    @property
    def output_name(self) -> str:
        """Name of the prediction in the store: predictor plus the KNOWN source where it matters."""
        if not self.predictor.startswith("know"):
            return self.predictor if self.alpha == 1.0 or self.predictor != "taskvector" else f"taskvector-a{self.alpha:g}"
        source = "official" if self.known == "official" else Path(self.known).name
        return f"{self.predictor}@{source}" + ("+norm" if self.predict_norm else "")


def window_rows(predictor: str) -> int:
    """Store rows a predictor reads: KNOWN's window of 5, or k for know-s<k>."""
    if predictor == "know":
        return 5
    if predictor.startswith("know-s"):
        return int(predictor[6:])
    return 5 if predictor == "logfit" else 2


def load_known_source(spec: PredictSpec):
    """The KnownSet named by the spec, plus a content digest for cache keys."""
    from know_core.known import known_set_from_dict

    if spec.known == "official":
        if not spec.official_dir:
            raise BadInput("--known official needs --official-dir, the directory holding KNOWN_Conv.h5, KNOWN_FC.h5 and KNOWN_Bias.h5")
        ks = load_official(spec.official_dir)
        digest = config_hash({k: file_digest(Path(spec.official_dir) / f)
                              for k, f in (("conv", "KNOWN_Conv.h5"), ("fc", "KNOWN_FC.h5"), ("bias", "KNOWN_Bias.h5"))})
        return ks, digest
    ks = known_set_from_dict(load_known_payload(spec.known))
    return ks, file_digest(known_path(spec.known))


def prediction_inputs(spec: PredictSpec, store: TrajectoryStore) -> tuple[dict, PredictorConfig]:
    """Validate everything before anything is written; returns (run attrs, predictor config)."""
    if spec.predictor not in PREDICTORS:
        raise BadInput(f"unknown predictor {spec.predictor!r}; choose one of: {', '.join(PREDICTORS)}")
    if spec.steps < 1:
        raise BadInput(f"steps={spec.steps}: need at least 1 prediction step")
    attrs = store.require_run(spec.run_id)
    need = window_rows(spec.predictor)
    if attrs["n_stages"] < need:
        raise BadInput(f"run {spec.run_id} has a trajectory of {attrs['n_stages']} stages; "
                       f"predictor {spec.predictor!r} needs at least {need}")
    cfg, digest = predictor_config(spec)
    return {**attrs, "_known_digest": digest}, cfg


def predictor_config(spec: PredictSpec) -> tuple[PredictorConfig, str]:
    """The PredictorConfig a spec names (loading KNOWN where needed) and the source digest."""
    known, digest = (None, "")
    if spec.predictor.startswith("know"):
        known, digest = load_known_source(spec)
    return PredictorConfig(spec.predictor, alpha=spec.alpha, known=known, predict_norm=spec.predict_norm), digest


@task(name="predict-weights", retries=1, retry_delay_seconds=1, retry_condition_fn=retry_unless_bad_input,
      task_run_name="predict-{spec.predictor}-{spec.run_id}")
def predict_run(spec: PredictSpec) -> str:
    """Stream the trajectory block by block through the predictor into predictions/<run>/<name>."""
    log = run_logger()
    set_torch_threads(0)  # prediction runs alone: use every core
    store = TrajectoryStore(spec.store)
    attrs, cfg = prediction_inputs(spec, store)
    name = spec.output_name
    input_hash = config_hash({"run": spec.run_id, "completed_at": attrs.get("completed_at"),
                              **spec.model_dump(exclude={"store", "block_values"}), "known_digest": attrs["_known_digest"]})
    old = store.prediction_attrs(spec.run_id, name) or {}
    if old.get("status") == "complete" and old.get("input_hash") == input_hash:
        log.info("prediction %s of run %s is up to date: skipped", name, spec.run_id)
        return name
    layout = store.layout(spec.run_id)
    rows = window_rows(spec.predictor)
    sizes = attrs["stage_subset_sizes"]
    # step k is the prediction for (1/r)^k times the full data (method §5); the rounded subset
    # sizes only approximate r (683 images at r=0.5 give 683/342 = 1.997), so use the run's r
    factors = [(1.0 / attrs["sampling_rate"]) ** k for k in range(1, spec.steps + 1)]
    arr = store.begin_prediction(spec.run_id, name, spec.steps, attrs["n_params"], {
        "factors": factors, "predictor": spec.predictor, "alpha": spec.alpha, "predict_norm": spec.predict_norm,
        "known_source": spec.known if spec.predictor.startswith("know") else "",
        "known_scaling": cfg.known.scaling if cfg.known is not None else "",
        "input_hash": input_hash, "steps": spec.steps,
    })
    t0 = time.perf_counter()
    try:
        for c0, block in store.iter_column_blocks(spec.run_id, slice(0, rows), spec.block_values):
            arr[:, c0 : c0 + block.shape[1]] = predict_block(cfg, block, layout, c0, sizes, spec.steps)
        seconds = time.perf_counter() - t0
        store.finish_prediction(spec.run_id, name, seconds=round(seconds, 4))
    except BaseException as e:
        store.drop_prediction(spec.run_id, name)  # never leave a half-written prediction behind
        raise e
    log.info("predicted %s for run %s: factors %s, %d params in %.2fs", name, spec.run_id, factors, attrs["n_params"], seconds)
    return name


def model_spec_of(attrs: dict) -> ModelSpec:
    return ModelSpec(**attrs["model_spec"])


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


def export_state(store_url: str, run_id: str, prediction: str, step: int, out: str,
                 recalibrate_data: str = "", recalibrate_classes: str = "") -> dict:
    """Write a state_dict that loads with strict=True into the run's model class."""
    from know_core.evaluate import recalibrate_bn
    from tasks.specs import DataSpec

    store = TrajectoryStore(store_url)
    attrs = store.require_run(run_id)
    model = build_from_spec(model_spec_of(attrs))
    check_layout_fits(model, store.layout(run_id), run_id, attrs["model_spec"])
    state = state_for(store, run_id, prediction, step)
    model.load_state_dict(state, strict=True)
    recal = "none"
    if recalibrate_data:
        data = DataSpec(dataset=recalibrate_data, classes=recalibrate_classes).load("train")
        recalibrate_bn(model, data.x)
        recal = recalibrate_data
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out)
    return {"out": out, "run_id": run_id, "prediction": prediction, "step": step, "bn_recalibrated_on": recal,
            "model_spec": attrs["model_spec"]}


