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


def prediction_markdown(params: PredictParams, name: str) -> str:
    """What a prediction holds (its factors), where its weights are, and how to export a step."""
    from pathlib import Path

    store = params.store if "://" in params.store else str(Path(params.store).resolve())
    st = TrajectoryStore(params.store)
    rec = st.prediction(params.run_id, name)
    rows = "\n".join(f"| {k} | x{f:.4g} |" for k, f in enumerate(rec.factors, start=1))
    return (f"## Prediction `{name}` of run `{params.run_id}`\n\n"
            f"Predictor {rec.predictor}" + (f", KNOWN from {rec.known_source} ({rec.known_scaling} scaling)"
                                            if rec.known_source else "") + f"; {rec.seconds or 0:.2f} s.\n\n"
            f"| step | virtual-data factor |\n|---|---|\n{rows}\n\n"
            f"Weights: store `{store}`, array `{st.prediction_path(params.run_id, name)}` "
            f"(one row of flattened parameters per step).\n\n"
            "Export a step as a state_dict of the run's model class:\n\n"
            f"```bash\nknow export --store {store} --run-id {params.run_id} --prediction '{name}' "
            f"--step {rec.steps} --out model.pt\n```\n")


def publish_prediction(params: PredictParams, name: str) -> None:
    """A markdown artifact (key `prediction-<run id>`) of the prediction. Never raises."""
    try:
        import re

        from prefect.artifacts import create_markdown_artifact

        key = re.sub(r"[^a-z0-9-]+", "-", f"prediction-{params.run_id}".lower())
        create_markdown_artifact(prediction_markdown(params, name), key=key,
                                 description=f"Prediction {name} of run {params.run_id}: factors, weights, export")
    except Exception:  # noqa: BLE001 - the store holds the prediction; the artifact only points at it
        pass


@flow(name="predict-weights", log_prints=True)
def predict_weights(params: PredictParams) -> str:
    """Predict x(1/r)^k weights of one run with one predictor into the store."""
    with resume_hint("predict-weights"):
        name = predict_run(params)
        publish_prediction(params, name)
        return name
