"""The prediction stage: x(1/r)^k weights of one run, streamed into the store.

    from flows.predict import predict_weights
    from params.predict import PredictParams
    predict_weights(PredictParams(store="runs.zarr", run_id="…", known="known"))
"""
from __future__ import annotations

from prefect import flow

from params.predict import PredictParams
from storage.trajectory import TrajectoryStore
from tasks.predict import prediction_inputs, predict_run

from .common import resume_hint


def preflight(params: PredictParams) -> None:
    """BadInput / StoreError before any flow starts: run, stages, KNOWN source."""
    prediction_inputs(params, TrajectoryStore(params.store))


@flow(name="predict-weights", log_prints=True)
def predict_weights(params: PredictParams) -> str:
    """Predict x(1/r)^k weights of one run with one predictor into the store."""
    with resume_hint("predict-weights"):
        return predict_run(params)
