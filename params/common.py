"""Field groups shared by several stage models, and how a validation error reads.

A stage model inherits the groups it needs, so each setting is written once and every model
stays flat (the Prefect 3.8 UI form, `prefect.yaml` and `know submit --param` all see plain
fields). Validators raise ValueError with a message that names the setting; pydantic turns
it into a ValidationError, and `describe` makes that one line naming the option.

    >>> from params.common import DataFields
    >>> DataFields(dataset="digits", classes="0-4").class_list()
    [0, 1, 2, 3, 4]
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from know_core.data import DATASETS, parse_classes
from know_core.models import MODEL_FORMS, MODELS, check_model_name


class StageModel(BaseModel):
    """Base of every stage model: unknown names are refused (a typo is never dropped silently)."""

    model_config = ConfigDict(extra="forbid")


def option(field: str) -> str:
    """The CLI option of a field: batch_size -> --batch-size."""
    return "--" + field.replace("_", "-")


def describe(error: ValidationError, cli: bool = True, skip_missing: bool = False) -> str:
    """One line for the first problem of a ValidationError, naming the option (or field);
    `skip_missing` passes over missing required fields (the caller may fill them later)."""
    errors = error.errors()
    err = next((e for e in errors if e["type"] != "missing"), errors[0]) if skip_missing else errors[0]
    loc = ".".join(str(part) for part in err.get("loc", ()) if part != "__root__")
    msg = err["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
    if err["type"] == "extra_forbidden":
        return f"unknown setting {option(loc) if cli else loc!r}; see --help for the valid ones"
    if err["type"] == "missing":
        return f"{option(loc) if cli else loc} is required"
    if not loc:
        return msg
    name = option(loc) if cli else loc
    bound = {"greater_than_equal": ("at least", "ge"), "greater_than": ("greater than", "gt"),
             "less_than": ("less than", "lt"), "less_than_equal": ("at most", "le")}.get(err["type"])
    if bound:
        msg = f"must be {bound[0]} {err['ctx'][bound[1]]}"
    value = err.get("input")
    shown = f" {value}" if isinstance(value, (str, int, float)) and not isinstance(value, bool) else ""
    return f"{name}{shown}: {msg}"


class StoreField(StageModel):
    store: str = Field("runs.zarr", description="Trajectory store: a local path or an fsspec URL (s3://bucket/prefix)")

    @field_validator("store")
    @classmethod
    def _store_is_not_a_file(cls, v: str) -> str:
        if not v:
            raise ValueError("must name a store directory or URL")
        if "://" not in v and Path(v).exists() and not Path(v).is_dir():
            raise ValueError(f"{v} is a file, not a Zarr store; pass a directory path or URL")
        return v


OptimizerRegime = Literal["carry", "fresh"]


class OptimizerField(StageModel):
    optimizer: OptimizerRegime = Field(
        "carry", description="Adam across a trajectory's stages: carry = one optimizer whose state flows from "
        "pre-training through every sequential stage (the release) | fresh = a new Adam per stage")


class DataFields(StageModel):
    dataset: str = Field("digits", description="Data set: " + " | ".join(DATASETS))
    data_dir: str = Field("", description="Directory of the data set files; empty = its default location")
    classes: str = Field("", description="Class subset, e.g. '0-4' or '5,7,9'; empty = all classes")
    limit: int = Field(0, ge=0, description="Use only N training images after a seeded shuffle (0 = all)")

    _known_dataset = field_validator("dataset")(lambda v: check_dataset(v))

    _classes_parse = field_validator("classes")(lambda v: check_classes(v))

    def class_list(self) -> list[int]:
        return parse_classes(self.classes)


class DeviceField(StageModel):
    device: str = Field("auto", description="auto (CUDA when present) | cpu | cuda | cuda:N")

    @field_validator("device")
    @classmethod
    def _known_device(cls, v: str) -> str:
        return check_device(v)


class ModelFields(StageModel):
    """How the model is built beyond its name (know_core.models): its factory's keyword arguments
    and the module the downstream protocol replaces."""

    model_kwargs: str = Field("", description='Keyword arguments of the model factory, a JSON object, e.g. '
                              '{"num_classes": 5}; empty = none')
    head: str = Field("", description="Module the downstream protocol replaces (its input is the linear probe's "
                      "features), e.g. fc or classifier.1; empty = the model's last nn.Linear")

    _model_kwargs = field_validator("model_kwargs")(lambda v: check_model_kwargs(v))

    @field_validator("head")
    @classmethod
    def _head_is_a_module_path(cls, v: str) -> str:
        if v and not re.fullmatch(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*", v):
            raise ValueError(f"{v!r} is not a module name (dotted, as in named_modules(): e.g. fc, classifier.1)")
        return v

    def model_kwargs_dict(self) -> dict:
        return json.loads(self.model_kwargs) if self.model_kwargs else {}


def check_model_kwargs(text: str) -> str:
    """A JSON object of keyword arguments, returned canonical (sorted keys; '' for none), so
    equal arguments give equal run ids."""
    if not text.strip():
        return ""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON ({e.msg} at character {e.pos}); write a JSON object such as "
                         '\'{"num_classes": 5}\'') from None
    if not isinstance(value, dict):
        raise ValueError(f"must be a JSON object of keyword arguments, not a {type(value).__name__}")
    return json.dumps(value, sort_keys=True) if value else ""


class PretrainFields(StageModel):
    """Source pre-training, which gives Θ0 (tasks/collect.py: pretrain)."""

    pretrain_epochs: int = Field(5, ge=1, description="Source pre-training epochs (with pretrain_patience: the cap)")
    pretrain_lr: float = Field(1e-3, gt=0, description="Source pre-training Adam lr")
    pretrain_batch_size: int = Field(128, ge=1, description="Source pre-training batch size")
    pretrain_patience: int = Field(0, ge=0, description="0 = exactly pretrain_epochs | N = until the source "
                                   "validation accuracy has not risen for N epochs (pretrain_epochs is the cap; the "
                                   "best epoch is kept). The validation images are held out of pre-training")
    pretrain_val_fraction: float = Field(0.1, gt=0, lt=0.5, description="With pretrain_patience: the seeded share of "
                                         "the source training split held out as its validation split")


class RunnerFields(DeviceField):
    runner: Literal["thread", "dask"] = Field("thread", description="Task runner for the fan-out: thread | dask")
    workers: int = Field(1, ge=1, description="Parallel training runs (thread pool size or Dask worker processes)")
    dask_address: str = Field("", description="Existing Dask scheduler, e.g. tcp://127.0.0.1:8786 (runner=dask)")


def check_dataset(v: str) -> str:
    if v not in DATASETS:
        raise ValueError(f"unknown dataset {v!r}; choose one of: {', '.join(DATASETS)}")
    return v


def check_classes(v: str) -> str:
    parse_classes(v)  # BadInput (a ValueError) names the problem
    return v


def check_device(v: str) -> str:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", v):
        raise ValueError(f"unknown device {v!r}; use auto, cpu, cuda or cuda:N")
    return v


def check_models(text: str) -> list[str]:
    names = [m.strip() for m in text.split(",") if m.strip()]
    if not names:
        raise ValueError(f"name at least one model: {MODEL_FORMS}")
    for m in names:
        if m not in MODELS:
            check_model_name(m)  # torchvision:/timm:/package.module:callable; BadInput (a ValueError) names the problem
    return names


def check_one_model(text: str) -> str:
    if len(check_models(text)) != 1:
        raise ValueError("name exactly one model")
    return text


def check_learning_rates(text: str) -> str:
    """A comma-separated list of positive learning rates."""
    if any(lr <= 0 for lr in check_floats(text, "learning rates")):
        raise ValueError("learning rates must be positive")
    return text


def check_floats(text: str, what: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{text!r} is not a comma-separated list of {what}") from None
    if not values:
        raise ValueError(f"give at least one {what[:-1] if what.endswith('s') else what}")
    return values


__all__ = ["StageModel", "StoreField", "DataFields", "DeviceField", "RunnerFields", "ModelFields", "describe", "option",
           "check_models", "check_model_kwargs",
           "check_floats", "check_device", "check_one_model", "check_learning_rates"]
