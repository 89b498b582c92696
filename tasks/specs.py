"""Run specs: the config of one trajectory run, hashed into its run id.

A RunSpec is what a task receives (ids and configs, never tensors). Flows derive it from
their stage model (params/); it has no defaults of its own, so no setting is decided here.
`spec.run_id` is sha256 of its canonical JSON, so the same config always maps to the same
run in the store, which is what makes collection idempotent and resumable.

Fields added after ids were first issued (model_kwargs, head, checkpoint_sha256, and a
pre-training's patience and val_fraction) enter the
hash only when set, so every run and checkpoint recorded before them keeps its id.
"""
from __future__ import annotations

import json

import numpy as np

from know_core.data import ImageData, load_dataset, parse_classes
from know_core.models import ModelSpec, build_seeded, spec_for_data
from know_core.train import TrajectoryConfig
from params.common import DataFields
from storage.records import RunInfo
from storage.trajectory import config_hash

#: hashed only when set (not empty): ids issued before these fields existed stay valid
_HASHED_WHEN_SET = ("model_kwargs", "head", "checkpoint_sha256", "patience", "val_fraction")


class DataSpec(DataFields):
    """A data set as a stage model names it (the fields of params.common.DataFields)."""

    def load(self, split: str = "train") -> ImageData:
        ds = load_dataset(self.dataset, split, self.data_dir or None)
        if self.classes:
            ds = ds.select_classes(parse_classes(self.classes))
        if self.limit and self.limit < len(ds):
            ds = ds.take(np.random.default_rng(12345).permutation(len(ds))[: self.limit])
        return ds


class ModelChoice(DataSpec):
    """A model (know_core.models: a built-in name, torchvision:/timm:<name> or
    package.module:callable) on a data set; `model_kwargs` is the canonical JSON object of
    params.common.check_model_kwargs ('' = none)."""

    model: str
    width: int
    model_kwargs: str = ""
    head: str = ""

    def hashed(self) -> dict:
        """The fields an id is the hash of."""
        dump = self.model_dump()
        return {k: v for k, v in dump.items() if not (k in _HASHED_WHEN_SET and not v)}

    def model_spec(self, data: ImageData) -> ModelSpec:
        """The checked ModelSpec for `data` (know_core.models.spec_for_data: head replaced to the
        data's classes, grey images repeated for a 3-channel model); BadInput when it cannot fit."""
        kwargs = json.loads(self.model_kwargs) if self.model_kwargs else {}
        return spec_for_data(self.model, data.in_channels, data.num_classes, data.image_size, self.width or None,
                             kwargs=kwargs, head=self.head)

    def build_model(self, data: ImageData, seed: int | None = None):
        """The seeded initial model (thread-safe: see know_core.models.build_seeded)."""
        return build_seeded(self.model_spec(data), self.seed if seed is None else seed)


class RunSpec(ModelChoice):
    """One forgetting trajectory (method §2-3)."""

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
    checkpoint_sha256: str = ""  # a user checkpoint file as the start (start = file-<sha[:16]>): its full sha256

    @property
    def run_id(self) -> str:
        return config_hash(self.hashed())

    def trajectory_config(self, device: str = "auto") -> TrajectoryConfig:
        return TrajectoryConfig(
            r=self.r, stages=self.stages, lr=self.lr, batch_size=self.batch_size,
            epochs_per_stage=self.epochs_per_stage, seed=self.seed, mode=self.mode,
            augment=self.augment, device=device, optimizer=self.optimizer,
        )

    def adam_start(self) -> str:
        """Where a `carry` sequential run's Adam moments start: 'checkpoint' (saved with the
        project's pre-training), 'empty' (a user checkpoint file holds none), or '' (no carried
        start: fresh regime, independent mode or a random init)."""
        if not self.start or self.optimizer != "carry" or self.mode != "sequential":
            return ""
        return "empty" if self.start.startswith("file-") else "checkpoint"

    def run_info(self, data: ImageData, sizes: list[int]) -> RunInfo:
        """What the store records about this run (plus the full spec)."""
        return RunInfo(
            mode=self.mode, model=self.model, dataset=data.name, sampling_rate=self.r, lr=self.lr,
            batch_size=self.batch_size, epochs_per_stage=self.epochs_per_stage, seed=self.seed,
            stage_subset_sizes=sizes, model_spec=self.model_spec(data).to_dict(), spec=self.model_dump(),
            start=self.start, optimizer=self.optimizer, checkpoint_sha256=self.checkpoint_sha256,
            adam_start=self.adam_start(),
        )
