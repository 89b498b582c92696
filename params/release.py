"""Settings of `know import-release`: the authors' meta-data files into a store (method §3).

    >>> from params.release import ImportParams
    >>> p = ImportParams(files=["simplenet_cifar10_r0.5_lr0.001_bs64.mat"], lr=2e-3)
    >>> p.overrides()
    {'model': '', 'dataset': '', 'sampling_rate': 0.0, 'lr': 0.002, 'batch_size': 0}
"""
from __future__ import annotations

from typing import Any

from pydantic import Field

from know_core.known import WINDOW
from know_core.release import NAME_PATTERN, RELEASE_STAGES

from .common import StageModel, StoreField

_STORE = StoreField.model_fields["store"]


class _Files(StageModel):
    files: list[str] = Field(..., min_length=1, description=f"The release's .mat meta-data files, named `{NAME_PATTERN}` "
                             "(`_` or `-` between the parts, any case)")


class ImportParams(StoreField, _Files):
    """Import the authors' released meta-data files (MATLAB v7.3 .mat) as complete
    independent-mode runs, one per file; a file already imported is skipped."""

    # files come first (the bases' order): they are the command's positional arguments, and
    # the store, as StoreField defines it, is keyword-only here, as is every option after it
    store: str = Field(_STORE.default, description=_STORE.description, kw_only=True)
    n_data: int = Field(50000, ge=1, description="Nominal |D0| of every imported run: stage k holds int(n_data * r^k) "
                        "examples (meta-training's log-sizes); the release's data sets have 50,000-60,000 "
                        "training images")
    stages: int = Field(RELEASE_STAGES, ge=WINDOW + 1, description="Length of the files' stage axis (the release "
                        "has 7; index stages-1 is the full data)")
    model: str = Field("", description="Model name for every file; empty = from the file name")
    dataset: str = Field("", description="Data set name for every file; empty = from the file name")
    sampling_rate: float = Field(0.0, ge=0, lt=1, description="r of every file (|Dk| = r^k |D0|); 0 = from the "
                                 "file name")
    lr: float = Field(0.0, ge=0, description="Learning rate of every file; 0 = from the file name")
    batch_size: int = Field(0, ge=0, description="Batch size of every file; 0 = from the file name")
    block_values: int = Field(1 << 22, ge=1, description="Values read from a file per block; bounds memory "
                              "whatever the file size")

    def overrides(self) -> dict[str, Any]:
        """The hyper-parameters given as options (empty/0 = take the file name's)."""
        return {k: getattr(self, k) for k in ("model", "dataset", "sampling_rate", "lr", "batch_size")}


__all__ = ["ImportParams"]
