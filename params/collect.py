"""Settings of the collection stages: a meta-data sweep (`know collect`) and the target
model's trajectory (`know trajectory`).

    >>> from params.collect import CollectParams
    >>> p = CollectParams(r=0.5, runs=2)
    >>> p.r_bounds(), p.r_grid()
    ((0.5, 0.5), [0.5])
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from .common import (DataFields, DeviceField, ModelFields, OptimizerField, PretrainFields, RunnerFields, StoreField,
                     check_floats, check_learning_rates, check_models, check_one_model, option)

Mode = Literal["independent", "sequential"]


class CollectParams(ModelFields, OptimizerField, RunnerFields, DataFields, StoreField):
    """Meta-data collection: a sweep of forgetting trajectories of small models (method §3)."""

    models: str = Field("simple-cnn", description="Comma-separated model names: simple-cnn, mlp, resnet, resnet18, "
                        "torchvision:NAME, timm:NAME or package.module:callable (--model-kwargs applies to each)")
    runs: int = Field(4, ge=1, description="Runs per model (random sweep) or seeds per grid cell (grid sweep)")
    stages: int = Field(7, ge=2, description="Snapshots per run (the release uses 7; meta-training needs >= 6)")
    sweep: Literal["random", "grid"] = Field(
        "random", description="random: r, lr, batch drawn per run (method §3); grid: products of the *_values lists")
    # r, lr and batch_size fix one hyper-parameter for either sweep; 0 leaves it to the sweep
    r: float = Field(0.0, ge=0, lt=1, description="Fix the sampling rate for every run (sets both ends of the "
                     "random range and the grid); 0 = use r_min..r_max or r_values")
    r_min: float = Field(0.3, gt=0, lt=1, description="random sweep: lower bound of r (raised where the smallest subset needs it)")
    r_max: float = Field(0.9, gt=0, lt=1, description="random sweep: upper bound of r")
    r_values: str = Field("0.5", description="grid sweep: comma-separated r values")
    lr: float = Field(0.0, ge=0, description="Fix the Adam lr for every run; 0 = use lr_min..lr_max or lr_values")
    lr_min: float = Field(1e-5, gt=0, description="random sweep: lower bound of the Adam lr")
    lr_max: float = Field(4e-3, gt=0, description="random sweep: upper bound of the Adam lr")
    lr_values: str = Field("0.001", description="grid sweep: comma-separated learning rates")
    batch_size: int = Field(0, ge=0, description="Fix the batch size for every run; 0 = draw it from "
                            "batch_min..batch_max (random) or use batch_min (grid)")
    batch_min: int = Field(32, ge=1, description="Smallest batch size (r is raised so the smallest subset holds it)")
    batch_max: int = Field(256, ge=1, description="random sweep: largest batch size")
    epochs_per_stage: int = Field(1, ge=1, description="Epochs per subset")
    mode: Mode = Field("independent", description="independent (each stage from the common init, as the release's "
                       "meta-data) | sequential")
    seed: int = Field(0, ge=0, description="Seed of the sweep's RNG; run seeds derive from it")
    width: int = Field(0, ge=0, description="Model width; 0 = the architecture's default")

    @field_validator("models")
    @classmethod
    def _models(cls, v: str) -> str:
        check_models(v)
        return v

    @field_validator("r_values")
    @classmethod
    def _r_values(cls, v: str) -> str:
        for r in check_floats(v, "sampling rates"):
            if not 0 < r < 1:
                raise ValueError(f"sampling rate {r} is out of range; it must satisfy 0 < r < 1")
        return v

    _lr_values = field_validator("lr_values")(lambda v: check_learning_rates(v))

    @model_validator(mode="after")
    def _ranges(self):
        for lo, hi in (("r_min", "r_max"), ("lr_min", "lr_max"), ("batch_min", "batch_max")):
            if getattr(self, lo) > getattr(self, hi):
                raise ValueError(f"{option(lo)} {getattr(self, lo)} is above {option(hi)} {getattr(self, hi)}; swap them")
        return self

    def model_list(self) -> list[str]:
        return check_models(self.models)

    def r_bounds(self) -> tuple[float, float]:
        return (self.r, self.r) if self.r else (self.r_min, self.r_max)

    def r_grid(self) -> list[float]:
        return [self.r] if self.r else check_floats(self.r_values, "sampling rates")

    def lr_bounds(self) -> tuple[float, float]:
        return (self.lr, self.lr) if self.lr else (self.lr_min, self.lr_max)

    def lr_grid(self) -> list[float]:
        return [self.lr] if self.lr else check_floats(self.lr_values, "learning rates")

    def batch_bounds(self) -> tuple[int, int]:
        return (self.batch_size, self.batch_size) if self.batch_size else (self.batch_min, self.batch_max)

    def grid_batch(self) -> int:
        return self.batch_size or self.batch_min


class TrajectoryParams(ModelFields, PretrainFields, OptimizerField, DeviceField, DataFields, StoreField):
    """The target model: pre-train Θ0 on the source data, then record its sequential
    forgetting trajectory (method §2)."""

    model: str = Field("simple-cnn", description="simple-cnn | mlp | resnet | resnet18 | torchvision:NAME | "
                       "timm:NAME | package.module:callable (your own factory, imported by path)")
    checkpoint: str = Field("", description="State_dict file (.pt, or .safetensors) to start from as Θ0 instead of "
                            "pre-training (the pretrain_* settings are then unused); its sha256 is part of the run id")
    width: int = Field(0, ge=0, description="Model width; 0 = the architecture's default")
    r: float = Field(0.5, gt=0, lt=1, description="Sampling rate of the nested subsets: |Dk| = r^k |D0|")
    stages: int = Field(5, ge=2, description="Snapshots Θ0..Θ(S-1); window + 2 = 7 also scores predictors on "
                        "held-out windows")
    lr: float = Field(1e-3, gt=0, description="Adam lr of the forgetting fine-tunes (release: 1e-3)")
    batch_size: int = Field(128, ge=1, description="Batch size of the forgetting fine-tunes (release: 128); must "
                            "fit the smallest subset")
    epochs_per_stage: int = Field(1, ge=1, description="Epochs per subset (release: 1)")
    augment: bool = Field(False, description="Release augmentation (rotate/shift/zoom); off by default on CPU")
    seed: int = Field(0, ge=0, description="Seed of pre-training and of the subset shuffle")

    _model = field_validator("model")(lambda v: check_one_model(v))

    @field_validator("checkpoint")
    @classmethod
    def _checkpoint_is_a_file(cls, v: str) -> str:
        from pathlib import Path

        if v and not Path(v).is_file():
            raise ValueError("no such file; pass a state_dict saved with torch.save (or a .safetensors file)")
        return v


__all__ = ["CollectParams", "TrajectoryParams", "Mode"]
