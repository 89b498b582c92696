"""Settings of the chained pipeline (collect -> meta-train -> predict, each stage a run of
its own deployment). Every collection setting is the collection stage's own field.

    >>> from params.pipeline import PipelineParams
    >>> PipelineParams(runs=3).collect_params().runs
    3
"""
from __future__ import annotations

from pydantic import Field

from .collect import CollectParams
from .predict import Predictor


class PipelineParams(CollectParams):
    """Collect meta-trajectories, meta-train KNOWN on them, predict enhanced weights of a target run."""

    # meta-training (params.predict.MetaTrainParams)
    known_out: str = Field("known", description="Output directory of the meta-trained KNOWN models")
    meta_epochs: int = Field(15, ge=1, description="Max epochs per KNOWN model (early stopping usually ends sooner)")
    meta_batch_size: int = Field(4096, ge=1, description="Pairs per Adam step of meta-training")
    pairs_per_run: int = Field(20000, ge=1, description="Max meta-training pairs per run and kind")
    # prediction (params.predict.PredictParams)
    target_run: str = Field("", description="Run to enhance; empty = a run the pipeline records itself at the fixed "
                            "rate target_r, with the model and lr of the sweep's last run. It is always left out of "
                            "meta-training")
    target_r: float = Field(0.5, gt=0, lt=1, description="Sampling rate of the target run the pipeline records "
                            "(never drawn from the sweep's r range): its prediction's step k acts as (1/r)^k times "
                            "its data, x2/x4/x8 at 0.5. Its batch is capped at the smallest subset")
    predictor: Predictor = Field("know", description="know (uses the KNOWN just trained) | know-s2 | know-s3 | "
                                 "know-s4 | taskvector | logfit | naive")
    steps: int = Field(3, ge=1, description="Prediction steps: step k acts as (1/r)^k times the data of the target "
                       "run, r being its sampling rate (target_r), so 3 gives x2/x4/x8 only at r = 0.5")
    # orchestration
    collect_deployment: str = Field("collect-trajectories/know-collect", description="Deployment of the collection "
                                    "stage (collect-trajectories/know-collect-gpu on a GPU box)")
    meta_train_deployment: str = Field("meta-train-known/know-meta-train", description="Deployment of the "
                                       "meta-training stage")
    predict_deployment: str = Field("predict-weights/know-predict", description="Deployment of the prediction stage")
    stage_timeout_hours: float = Field(24.0, gt=0, description="Give up waiting for one stage after this long")
    rerun_token: str = Field("", description="Any new value starts fresh stage runs instead of reusing completed "
                             "ones with the same parameters and inputs")

    def collect_params(self) -> CollectParams:
        return CollectParams(**self.model_dump(include=set(CollectParams.model_fields)))


__all__ = ["PipelineParams"]
