"""Settings of the commands that talk to a Prefect server: `know submit`, `know resume`, `know schedule`."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from .common import StageModel


class SubmitParams(StageModel):
    """Submit a stage to its deployment on the Prefect server and print the flow-run URL."""

    stage: str = Field(..., description="collect | collect-gpu | trajectory | trajectory-gpu | meta-train | predict | "
                       "pipeline | experiment, or any deployment name")
    param: list[str] = Field(default_factory=list, description="key=value overriding one field of the deployment's "
                             "default params (repeatable); the names are the stage model's fields")
    tag: list[str] = Field(default_factory=list, description="Extra flow-run tag (repeatable); know-chain on a collect "
                           "run starts meta-training when it completes")
    watch: bool = Field(False, description="Wait until the run ends (event-driven) and exit 1 if it did not complete")


class ResumeParams(StageModel):
    """Retry a failed or crashed flow run; finished work is reused."""

    flow_run_id: str = Field(..., description="The flow run's id (shown by `know submit`, the UI, or the failed run's "
                             "resume-hint artifact)")
    watch: bool = Field(False, description="For a deployment run, wait until it ends and exit 1 if it did not complete")
    force: bool = Field(False, description="Recover a RUNNING or CANCELLING run now, without waiting until it has sent "
                        "no heartbeat for two heartbeat intervals (use only when its worker is gone)")


class ScheduleParams(StageModel):
    """Switch a deployment schedule on or off over the API, keeping its parameters."""

    action: Literal["on", "off"] = Field(..., description="on | off")
    deployment: str = Field(..., description="The deployment: a stage (collect), a deployment name (know-collect) or "
                            "flow/deployment")
    schedule: str = Field("", description="The schedule's slug (nightly-meta-data) or id; optional when the "
                          "deployment has one schedule")


__all__ = ["SubmitParams", "ResumeParams", "ScheduleParams"]
