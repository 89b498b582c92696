"""The stage models: the one place where each setting, its default, its constraint and its
description are written. The `know` commands, the Prefect UI form, `prefect.yaml` and
`know submit --param` all read them from here.

    stage          model                         flow (flows/)
    collect        params.collect.CollectParams      collect.collect_trajectories
    trajectory     params.collect.TrajectoryParams   trajectory.forgetting_trajectory
    meta-train     params.predict.MetaTrainParams    meta_train.meta_train_known
    predict        params.predict.PredictParams      predict.predict_weights
    export         params.predict.ExportParams       (a store-to-file transform, no flow)
    import-release params.release.ImportParams       release.import_release
    run            params.experiment.ExperimentParams  experiment.know_run
    study          params.study.StudyParams          study.know_study
    pipeline       params.pipeline.PipelineParams    pipeline.collect_and_enhance

This package imports pydantic and know_core only, so `know --help` never imports Prefect.
"""
from .collect import CollectParams, TrajectoryParams
from .common import describe, option
from .experiment import ExperimentParams
from .ops import ResumeParams, ScheduleParams, SubmitParams
from .pipeline import PipelineParams
from .predict import ExportParams, MetaTrainParams, PredictParams, RunsParams
from .release import ImportParams
from .study import StudyParams

#: CLI command -> its stage model
COMMANDS = {
    "collect": CollectParams,
    "trajectory": TrajectoryParams,
    "runs": RunsParams,
    "meta-train": MetaTrainParams,
    "predict": PredictParams,
    "export": ExportParams,
    "import-release": ImportParams,
    "run": ExperimentParams,
    "study": StudyParams,
    "submit": SubmitParams,
    "resume": ResumeParams,
    "schedule": ScheduleParams,
}

__all__ = ["StudyParams", "CollectParams", "TrajectoryParams", "MetaTrainParams", "PredictParams", "ExportParams", "RunsParams",
           "ExperimentParams", "PipelineParams", "SubmitParams", "ResumeParams", "ScheduleParams", "ImportParams", "COMMANDS", "describe", "option"]
