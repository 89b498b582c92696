"""Settings of meta-training (`know meta-train`), prediction (`know predict`) and export
(`know export`).

    >>> from params.predict import PredictParams
    >>> PredictParams(run_id="abc", predictor="know", known="results/known").output_name
    'know@known'
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from know_core.known import missing_official_files
from know_core.predict import PREDICTORS

from .common import StoreField, check_classes, check_dataset

Predictor = Literal[PREDICTORS]  # type: ignore[valid-type]


def check_official_dir(directory: str) -> None:
    """ValueError unless `directory` holds the authors' three KNOWN_*.h5 files."""
    missing = missing_official_files(directory)
    if missing:
        raise ValueError(f"official_dir {directory} lacks {', '.join(missing)}; it must hold KNOWN_Conv.h5, "
                         "KNOWN_FC.h5 and KNOWN_Bias.h5 (the authors' release)")


class MetaTrainParams(StoreField):
    """Meta-train the three KNOWN models (conv, fc, bias) on complete runs of a store, with
    raw and min-max input scaling; the better becomes OUT/known.pt."""

    out: str = Field("known", description="Output directory for the trained KNOWN models and tables")
    meta_data: Literal["all", "independent", "sequential"] = Field(
        "all", description="Which runs train the default model: all | independent | sequential")
    exclude_runs: str = Field("", description="Comma-separated run ids never used for meta-training (e.g. the target run)")
    only_runs: str = Field("", description="Comma-separated run ids to train on (empty = every complete run of the "
                           "store); an experiment passes its own meta runs, so runs of other experiments in a shared "
                           "store never leak in")
    epochs: int = Field(15, ge=1, description="Max epochs per model (early stopping usually ends sooner)")
    batch_size: int = Field(4096, ge=1, description="Pairs per Adam step")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate")
    patience: int = Field(3, ge=1, description="Epochs without a better validation L1 before stopping")
    pairs_per_run: int = Field(20000, ge=0, description="Max pairs per run and kind (subsampled scalars); 0 = "
                               "every scalar of every run")
    loader: Literal["auto", "memory", "stream"] = Field(
        "auto", description="memory: every training pair in memory at once | stream: pairs read from the store "
        "in chunk-aligned blocks through a shuffle buffer of --buffer-pairs (memory bounded by the buffer, "
        "resumable mid-epoch) | auto: stream when the training pairs outgrow the buffer")
    buffer_pairs: int = Field(4_194_304, ge=1024, description="Shuffle buffer of the streamed loader, in pairs "
                              "(24 bytes each)")
    val_fraction: float = Field(0.25, gt=0, lt=1, description="Fraction of RUNS held out for validation")
    seed: int = Field(0, ge=0, description="Seed of the run split, subsampling and training")
    official_dir: str = Field("", description="Directory of the authors' KNOWN_*.h5, to add them to the comparison")
    scaling: Literal["auto", "raw", "minmax"] = Field(
        "auto", description="KNOWN input scaling of OUT/known.pt: auto = the one with the lower validation L1")
    compare_modes: bool = Field(True, description="When both modes exist, also train on independent-only and "
                                "sequential-only runs")

    @model_validator(mode="after")
    def _official(self):
        if self.official_dir:
            check_official_dir(self.official_dir)
        return self

    def excluded(self) -> set[str]:
        return {r.strip() for r in self.exclude_runs.split(",") if r.strip()}

    def only(self) -> set[str]:
        """The run ids meta-training is restricted to; empty = no restriction."""
        return {r.strip() for r in self.only_runs.split(",") if r.strip()}


class KnownSource(StoreField):
    """Which KNOWN a know* predictor uses; the prediction's name in the store follows from it."""

    predictor: Predictor = Field("know", description="naive | taskvector | logfit | know | know-s2 | know-s3 | know-s4")
    known: str = Field("official", description="'official' (needs official_dir) or a directory written by "
                       "`know meta-train`")
    official_dir: str = Field("", description="Directory holding the authors' three KNOWN_*.h5 files (known=official)")
    alpha: float = Field(1.0, gt=0, description="taskvector step size")
    predict_norm: bool = Field(False, description="Also predict norm affine parameters with the Bias model")

    @property
    def uses_known(self) -> bool:
        return self.predictor.startswith("know")

    @property
    def output_name(self) -> str:
        """Name of the prediction in the store: the predictor, plus the KNOWN source where it matters."""
        if not self.uses_known:
            return f"taskvector-a{self.alpha:g}" if self.predictor == "taskvector" and self.alpha != 1.0 else self.predictor
        source = "official" if self.known == "official" else Path(self.known).name
        return f"{self.predictor}@{source}" + ("+norm" if self.predict_norm else "")


class PredictParams(KnownSource):
    """Predict knowledge-overflowed weights of one run with one predictor, streamed into the store."""

    run_id: str = Field(..., min_length=1, description="Run whose trajectory is extrapolated (see `know runs`)")
    steps: int = Field(3, ge=1, description="Prediction steps: step k acts as (1/r)^k times the data, so 3 gives "
                       "x2/x4/x8 at r = 0.5 and x3/x9/x27 at r = 1/3")
    block_values: int = Field(1 << 22, ge=1, description="Columns per streamed block; bounds memory whatever the model size")

    @model_validator(mode="after")
    def _official(self):
        if self.uses_known and self.known == "official":
            if not self.official_dir:
                raise ValueError("known=official needs official_dir, the directory holding KNOWN_Conv.h5, "
                                 "KNOWN_FC.h5 and KNOWN_Bias.h5 (--official-dir)")
            check_official_dir(self.official_dir)
        return self


class ExportParams(KnownSource):
    """Export Θ0 or a predicted step as a state_dict for the run's model class."""

    run_id: str = Field(..., min_length=1, description="Run id (see `know runs`)")
    prediction: str = Field("", description="Name of a stored prediction (as printed by `know predict`); empty = "
                            "the one that predictor and known name, or Θ0 when predictor is naive")
    step: int = Field(3, ge=1, description="Prediction step to export (1 = the first factor)")
    out: str = Field("model.pt", description="Output file for the state_dict")
    recalibrate_bn: str = Field("", description="Data set whose training images re-estimate BatchNorm statistics")
    recalibrate_classes: str = Field("", description="Class subset for the re-estimation, e.g. '0-4'")
    predictor: Predictor = Field("naive", description="Predictor whose prediction to export (with known); "
                                 "naive = Θ0 itself")

    _recalibrate = field_validator("recalibrate_bn")(lambda v: v and check_dataset(v))
    _recalibrate_classes = field_validator("recalibrate_classes")(lambda v: check_classes(v))

    @field_validator("out")
    @classmethod
    def _out_is_a_file_path(cls, v: str) -> str:
        if not v:
            raise ValueError("must name the output file, e.g. --out model.pt")
        if Path(v).is_dir():
            raise ValueError(f"{v} is a directory; name the file to write, e.g. --out {Path(v) / 'model.pt'}")
        return v

    @property
    def prediction_name(self) -> str:
        """The stored prediction to export; '' for Θ0."""
        if self.prediction:
            return self.prediction
        return "" if self.predictor == "naive" else self.output_name


class RunsParams(StoreField):
    """List the runs of a store with their status and hyper-parameters."""

    verify: bool = Field(False, description="Read every chunk of every complete run, prediction and checkpoint "
                         "(crc32c), mark the damaged ones 'damaged' so that a re-collect rewrites them, and exit 2 "
                         "when any is damaged")


__all__ = ["MetaTrainParams", "PredictParams", "ExportParams", "RunsParams", "KnownSource", "check_official_dir"]
