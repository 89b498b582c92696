"""Run specs: the config of one trajectory run, hashed into its run id.

A RunSpec is what a task receives (ids and configs, never tensors). `spec.run_id` is
sha256 of its canonical JSON, so the same config always maps to the same run in the store,
which is what makes collection idempotent and resumable.
"""
from __future__ import annotations


from pydantic import BaseModel, Field

from know_core.data import ImageData, load_dataset
from know_core.models import ModelSpec, build_seeded
from know_core.train import TrajectoryConfig
from storage.trajectory import config_hash

#: serialises seeded model init across threads (torch's global RNG is shared by all of them)
def parse_classes(text: str) -> list[int]:
    """'0-4' -> [0,1,2,3,4]; '5,7,9' -> [5,7,9]; '' -> [] (all classes)."""
    out: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        if "-" in part:
            lo, hi = part.split("-", 1)
            out += list(range(int(lo), int(hi) + 1))
        else:
            out.append(int(part))
    return out


class DataSpec(BaseModel):
    dataset: str = Field("digits", description="digits | fashion-mnist | mnist5k | cifar10 | cifar100 | image-folder")
    data_dir: str = Field("", description="Directory of the data set files; empty = the default location")
    classes: str = Field("", description="Class subset, e.g. '0-4' or '5,7,9'; empty = all classes")
    limit: int = Field(0, description="Use only the first N images after a seeded shuffle (0 = all)")

    def load(self, split: str = "train") -> ImageData:
        ds = load_dataset(self.dataset, split, self.data_dir or None)
        if self.classes:
            ds = ds.select_classes(parse_classes(self.classes))
        if self.limit and self.limit < len(ds):
            import numpy as np

            ds = ds.take(np.random.default_rng(12345).permutation(len(ds))[: self.limit])
        return ds


class RunSpec(DataSpec):
    """One forgetting trajectory (method §2-3)."""

    model: str = Field("simple-cnn", description="simple-cnn | mlp | resnet | resnet18")
    width: int = Field(0, description="Model width; 0 = the architecture's default")
    r: float = Field(0.5, description="Sampling rate: |Dk| = r^k |D0|")
    stages: int = Field(7, description="Number of snapshots Θ0..Θ(S-1)")
    lr: float = Field(1e-3, description="Adam learning rate")
    batch_size: int = Field(64, description="Mini-batch size")
    epochs_per_stage: int = Field(1, description="Epochs per subset")
    seed: int = Field(0, description="Seed of the subset shuffle, init and data order")
    mode: str = Field("independent", description="sequential | independent (see method §3)")
    augment: bool = Field(False, description="Release augmentation (rotate/shift/zoom)")
    start: str = Field("", description="Checkpoint id to start from; empty = seeded random init")

    @property
    def run_id(self) -> str:
        return config_hash(self.model_dump())

    def trajectory_config(self, device: str = "auto") -> TrajectoryConfig:
        return TrajectoryConfig(
            r=self.r, stages=self.stages, lr=self.lr, batch_size=self.batch_size,
            epochs_per_stage=self.epochs_per_stage, seed=self.seed, mode=self.mode,
            augment=self.augment, device=device,
        )

    def model_spec(self, data: ImageData) -> ModelSpec:
        return ModelSpec(self.model, data.in_channels, data.num_classes, data.image_size, self.width or None)

    def build_model(self, data: ImageData):
        """The seeded initial model (thread-safe: see know_core.models.build_seeded)."""
        return build_seeded(self.model_spec(data), self.seed)

    def store_attrs(self, data: ImageData, sizes: list[int]) -> dict:
        """The run attrs promised by the store layout (plus the full spec)."""
        return {
            "mode": self.mode, "model": self.model, "dataset": data.name, "sampling_rate": self.r,
            "lr": self.lr, "batch_size": self.batch_size, "epochs_per_stage": self.epochs_per_stage,
            "seed": self.seed, "stage_subset_sizes": sizes, "model_spec": self.model_spec(data).__dict__,
            "spec": self.model_dump(), "start": self.start,
        }
