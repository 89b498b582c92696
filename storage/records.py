"""Typed records of what the store holds: a run, a prediction, a checkpoint.

The store keeps these as Zarr attrs; only storage/ knows the attr names. Everything above
reads fields of these records (`run.sampling_rate`, `run.layout`) and never an attr by key.

    RunInfo          what a writer says about a new run (its config and data)
    RunRecord        RunInfo + the state the store keeps (status, stages written, provenance)
    PredictionInfo / PredictionRecord, CheckpointInfo / CheckpointRecord: likewise

Example:
    >>> from storage.records import RunRecord
    >>> r = RunRecord.model_validate({"run_id": "abc", "status": "complete", "sampling_rate": 0.5,
    ...                               "n_stages": 3, "stages_written": 3, "layout": []})
    >>> r.is_complete, r.optimizer
    (True, 'fresh')
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from know_core.layout import TensorSpec, layout_from_json
from know_core.models import ModelSpec


def _parse_layout(v):
    """The stored layout (JSON rows) as TensorSpecs; TensorSpecs pass as they are."""
    return layout_from_json(v) if v and not isinstance(v[0], TensorSpec) else v


class _Record(BaseModel):
    # extra keys written by older versions (or by hand) are kept, never lost on a rewrite
    model_config = ConfigDict(extra="allow", arbitrary_types_allowed=True)

    def attrs(self) -> dict[str, Any]:
        """The JSON-able attrs this record is stored as."""
        return self.model_dump(mode="json")


class RunInfo(_Record):
    """The config of one trajectory run, as its writer records it."""

    mode: str = ""  # sequential | independent
    model: str = ""
    dataset: str = ""
    sampling_rate: float = 0.5  # r: |Dk| = r^k |D0|
    lr: float = 0.0
    batch_size: int = 0
    epochs_per_stage: int = 1
    seed: int = 0
    stage_subset_sizes: list[int] = Field(default_factory=list)
    model_spec: dict[str, Any] = Field(default_factory=dict)  # ModelSpec fields (see model_spec_obj)
    spec: dict[str, Any] = Field(default_factory=dict)  # the full RunSpec, as hashed into the run id
    start: str = ""  # checkpoint id of a pre-trained start, "" = seeded init
    optimizer: str = "fresh"  # carry | fresh: whether Adam's state flows across stages
    checkpoint_sha256: str = ""  # start is a user's state_dict file (tasks/checkpoint.py): its full sha256
    adam_start: str = ""  # carry regime from a checkpoint: 'checkpoint' (its saved moments) | 'empty' (none: a user file)

    def model_spec_obj(self) -> ModelSpec:
        return ModelSpec(**self.model_spec)


class RunRecord(RunInfo):
    """A run as the store holds it."""

    run_id: str
    status: str  # running | complete | failed
    n_stages: int
    stages_written: int = 0
    n_params: int = 0
    layout: list[TensorSpec] = Field(default_factory=list)
    created_at: str = ""
    completed_at: str = ""
    failed_at: str = ""
    error: str = ""
    train_seconds: float | None = None
    lease_owner: str = ""  # host:pid:token of the writer holding the run (storage/lease.py); "" = none
    lease_heartbeat: str = ""  # when that writer last said it is alive (UTC ISO)
    versions: dict[str, str] = Field(default_factory=dict)

    _layout = field_validator("layout", mode="before")(lambda v: _parse_layout(v))

    @property
    def is_complete(self) -> bool:
        return self.status == "complete"

    def summary(self) -> dict[str, Any]:
        """One flat row for tables (`know runs`): everything but the layout and nested dicts."""
        return {k: v for k, v in self.model_dump().items() if k not in ("layout", "model_spec", "spec", "versions")}

    def attrs(self) -> dict[str, Any]:
        from dataclasses import asdict

        out = super().attrs()
        out["layout"] = [asdict(s) for s in self.layout]
        return out


class PredictionInfo(_Record):
    """What a prediction was made from and how."""

    predictor: str
    factors: list[float]  # virtual-data factor of each step, (1/r)^k
    steps: int
    alpha: float = 1.0
    predict_norm: bool = False
    known_source: str = ""  # 'official', a KNOWN directory, or '' for predictors without KNOWN
    known_scaling: str = ""
    input_hash: str = ""  # run, predictor options and KNOWN content: equal hash = up to date


class PredictionRecord(PredictionInfo):
    run_id: str
    name: str
    status: str
    seconds: float | None = None
    created_at: str = ""
    versions: dict[str, str] = Field(default_factory=dict)

    @property
    def is_complete(self) -> bool:
        return self.status == "complete"


class CheckpointInfo(_Record):
    """A pre-trained start point (Θ0 of a target trajectory)."""

    spec: dict[str, Any] = Field(default_factory=dict)
    model_spec: dict[str, Any] = Field(default_factory=dict)
    test_acc: float | None = None
    train_seconds: float | None = None
    device: str = ""
    sha256: str = ""  # imported from a user's state_dict file (tasks/checkpoint.py): the file's full sha256
    source_file: str = ""  # that file's path when it was imported
    epochs_run: int | None = None  # pre-training until plateau: epochs trained, the kept one, val accuracy per epoch
    best_epoch: int | None = None  # 0-based (the log prints it 1-based)
    val_acc: list[float] = Field(default_factory=list)


class CheckpointRecord(CheckpointInfo):
    ckpt_id: str
    status: str
    layout: list[TensorSpec] = Field(default_factory=list)
    created_at: str = ""
    versions: dict[str, str] = Field(default_factory=dict)
    adam_step: float | None = None  # set when the Adam moments were saved with it (the carry regime)
    lease_owner: str = ""  # as RunRecord: the writer pre-training it (remote stores), "" = none
    lease_heartbeat: str = ""

    _layout = field_validator("layout", mode="before")(lambda v: _parse_layout(v))

    @property
    def is_complete(self) -> bool:
        return self.status == "complete"


__all__ = ["RunInfo", "RunRecord", "PredictionInfo", "PredictionRecord", "CheckpointInfo", "CheckpointRecord"]
