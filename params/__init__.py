"""The stage models: the one place where each setting, its default, its constraint and its
description are written. The `know` commands, the Prefect UI form, `prefect.yaml` and
`know submit --param` all read them from here.

    stage          model                         flow (flows/)
    collect        params.collect.CollectParams      collect.collect_trajectories
    trajectory     params.collect.TrajectoryParams   trajectory.forgetting_trajectory
    meta-train     params.predict.MetaTrainParams    meta_train.meta_train_known
    predict        params.predict.PredictParams      predict.predict_weights
    export         params.predict.ExportParams       (a store-to-file transform, no flow)
    run            params.experiment.ExperimentParams  experiment.know_run
    pipeline       params.pipeline.PipelineParams    pipeline.collect_and_enhance

This package imports pydantic and know_core only, so `know --help` never imports Prefect.
"""
from .collect import CollectParams, TrajectoryParams
from .common import describe, option
from .experiment import ExperimentParams
from .ops import ResumeParams, SubmitParams
from .pipeline import PipelineParams
from .predict import ExportParams, MetaTrainParams, PredictParams, RunsParams

#: CLI command -> its stage model
COMMANDS = {
    "collect": CollectParams,
    "trajectory": TrajectoryParams,
    "runs": RunsParams,
    "meta-train": MetaTrainParams,
    "predict": PredictParams,
    "export": ExportParams,
    "run": ExperimentParams,
    "submit": SubmitParams,
    "resume": ResumeParams,
}

__all__ = ["CollectParams", "TrajectoryParams", "MetaTrainParams", "PredictParams", "ExportParams", "RunsParams",
           "ExperimentParams", "PipelineParams", "SubmitParams", "ResumeParams", "COMMANDS", "describe", "option"]
