"""Run specs: the config of one trajectory run, hashed into its run id.

A RunSpec is what a task receives (ids and configs, never tensors). Flows derive it from
their stage model (params/); it has no defaults of its own, so no setting is decided here.
`spec.run_id` is sha256 of its canonical JSON, so the same config always maps to the same
run in the store, which is what makes collection idempotent and resumable.
"""
from __future__ import annotations

import numpy as np

from know_core.data import ImageData, load_dataset, parse_classes
from know_core.models import ModelSpec, build_seeded
from know_core.train import TrajectoryConfig
from params.common import DataFields
from storage.records import RunInfo
from storage.trajectory import config_hash


class DataSpec(DataFields):
    """A data set as a stage model names it (the fields of params.common.DataFields)."""

    def load(self, split: str = "train") -> ImageData:
        ds = load_dataset(self.dataset, split, self.data_dir or None)
        if self.classes:
            ds = ds.select_classes(parse_classes(self.classes))
        if self.limit and self.limit < len(ds):
            ds = ds.take(np.random.default_rng(12345).permutation(len(ds))[: self.limit])
        return ds


class RunSpec(DataSpec):
    """One forgetting trajectory (method §2-3)."""

    model: str
    width: int
    r: float
    stages: int
    lr: float
    batch_size: int
    epochs_per_stage: int
    seed: int
    mode: str
    optimizer: str  # carry | fresh (know_core.train.iter_trajectory)
    augment: bool = False
    start: str = ""  # checkpoint id to start from; empty = seeded random init

    @property
    def run_id(self) -> str:
        return config_hash(self.model_dump())

    def trajectory_config(self, device: str = "auto") -> TrajectoryConfig:
        return TrajectoryConfig(
            r=self.r, stages=self.stages, lr=self.lr, batch_size=self.batch_size,
            epochs_per_stage=self.epochs_per_stage, seed=self.seed, mode=self.mode,
            augment=self.augment, device=device, optimizer=self.optimizer,
        )

    def model_spec(self, data: ImageData) -> ModelSpec:
        return ModelSpec(self.model, data.in_channels, data.num_classes, data.image_size, self.width or None)

    def build_model(self, data: ImageData):
        """The seeded initial model (thread-safe: see know_core.models.build_seeded)."""
        return build_seeded(self.model_spec(data), self.seed)

    def run_info(self, data: ImageData, sizes: list[int]) -> RunInfo:
        """What the store records about this run (plus the full spec)."""
        return RunInfo(
            mode=self.mode, model=self.model, dataset=data.name, sampling_rate=self.r, lr=self.lr,
            batch_size=self.batch_size, epochs_per_stage=self.epochs_per_stage, seed=self.seed,
            stage_subset_sizes=sizes, model_spec=self.model_spec(data).__dict__, spec=self.model_dump(),
            start=self.start, optimizer=self.optimizer,
        )
