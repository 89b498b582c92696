"""Settings of the whole experiment (`know run`), and its presets.

A preset fills every field it names; fields given explicitly (CLI options, `know submit
--param`, a deployment's parameters) win over the preset:

    >>> from params.experiment import ExperimentParams
    >>> p = ExperimentParams(preset="quick", seeds=3)
    >>> p.source_dataset, p.seeds, p.out
    ('digits', 3, 'results/quick')
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from know_core.errors import BadInput
from know_core.predict import step_for_factor
from know_core.methods import own_shrink

from .common import ModelFields, OptimizerField, PretrainFields, RunnerFields, check_classes, check_dataset, check_floats, check_learning_rates, check_models, check_one_model

#: predictors: rows that start from a prediction at a factor > 1
PREDICTORS = ("know", "official", "taskvector", "logfit", "know-s2", "know-s3", "know-s4")
#: controls that start from Θ0, the full-data checkpoint or a random init (factor 1)
BASELINES = ("naive", "naive-full", "scratch")
#: tuned rows: the lr of phase 2 chosen on a validation split; each tunes the starts of one source
TUNED = {"naive-lr": "naive", "know-lr": "know", "official-lr": "official"}


def shrink_of(predictor: str) -> str:
    """The name of a predictor's own shrink control (the report's rule, know_core.methods.own_shrink)."""
    name = own_shrink(predictor)
    assert name is not None, predictor  # every predictor has one
    return name


#: every method name of the `methods` list; official rows need official_dir
METHODS = (*BASELINES, *PREDICTORS, *(shrink_of(p) for p in PREDICTORS), *TUNED)
#: the predictor a shrink control scales towards
SHRINK_OF = {shrink_of(p): p for p in PREDICTORS}
#: methods that read the official KNOWN
OFFICIAL_METHODS = ("official", "shrink-official", "official-lr")

PRESETS: dict[str, dict[str, Any]] = {
    "standard": {},
    "full": {"methods": "naive,naive-lr,know:2,know:4,know:8,know-lr,official:2,official:4,official:8,official-lr,"
                        "taskvector:2,taskvector:4,taskvector:8,logfit:2,logfit:4,logfit:8,know-s2:8,know-s3:8,scratch",
             "meta_sequential_runs": 4},
    "mnist": {"target_dataset": "mnist5k", "target_classes": ""},
    "half-data": {"source_limit": 15000, "full_source_limit": 30000,
                  "methods": "naive,naive-full,naive-lr,know:2,know:8,know-lr,official:8,official-lr,taskvector:2"},
    # the paper's headline setting (method.md §7): ResNet-18 (CIFAR variant), CIFAR-100 -> CIFAR-10, release
    # augmentation, r = 0.5, S = 5 (+2 held-out stages), 1 epoch per stage, 10 + 100 downstream epochs, 5 seeds.
    # Meant for a GPU worker; the CIFAR python batches come from --data-dir.
    "paper": {"source_dataset": "cifar100", "source_classes": "", "meta_dataset": "cifar100", "meta_classes": "",
              "meta_limit": 10000, "target_dataset": "cifar10", "target_classes": "", "target_train_size": 50000,
              "model": "resnet18", "width": 64, "augment": True, "pretrain_epochs": 30, "r": 0.5, "window": 5,
              "phase1_epochs": 10, "phase2_epochs": 100, "lr1": 1e-3, "lr2": 4e-4, "seeds": 5,
              "methods": "naive,naive-lr,know:2,know:4,know:8,know-lr,official:2,official:4,official:8,official-lr,"
                         "taskvector:2,logfit:2,scratch"},
    "quick": {"source_dataset": "digits", "source_classes": "0-4", "meta_dataset": "digits", "meta_classes": "0-4",
              "meta_limit": 0, "meta_runs": 4, "meta_epochs": 4, "meta_pairs_per_run": 5000,
              "target_dataset": "digits", "target_classes": "5-9", "target_train_size": 300, "width": 8,
              "pretrain_batch_size": 32, "traj_batch_size": 8, "pretrain_epochs": 5, "phase1_epochs": 1,
              "phase2_epochs": 3, "ft_batch_size": 32, "lr2": 1e-3, "naive_lr_grid": "1e-3,2e-3", "seeds": 2,
              "methods": "naive,naive-lr,know:2,know:4,know:8,know-lr,official:8,official-lr,taskvector:2,logfit:2,"
                         "scratch"},
}

#: run-time knobs: they change where and how fast, never what is computed
RUNTIME_FIELDS = {"out", "force", "force_cpu", "workers", "runner", "dask_address", "device", "preset", "store",
                  "known_dir", "cache_dir"}
#: presets sized for a GPU: a CPU run estimated above an hour is refused unless force_cpu
GPU_PRESETS = {"paper"}


class ExperimentParams(ModelFields, PretrainFields, OptimizerField, RunnerFields):
    """The whole KNOW experiment: meta-data, KNOWN, the target trajectory, predictions,
    fine-tunes over paired seeds, and the report."""

    preset: str = Field("standard", description="Preset that fills every field not given: " + " | ".join(PRESETS))
    out: str = Field("results/standard", description="Output folder (default results/<preset>): store, KNOWN "
                     "models, cells, tables, plots")
    force: bool = Field(False, description="Reuse an output folder that holds a different experiment")
    workers: int = Field(2, ge=1, description="Parallel fine-tunes / collection runs (one torch thread each; "
                         "threads, or Dask worker processes with --runner dask)")
    official_dir: str = Field("", description="Directory of the authors' KNOWN_*.h5; empty = skip the official rows")
    store: str = Field("", description="Trajectory store (default <out>/store.zarr); experiments that share one "
                       "share its runs, each meta-training only on its own meta runs")
    known_dir: str = Field("", description="Folder of the meta-trained KNOWN (default <out>/known); reused when its "
                           "inputs are unchanged")
    cache_dir: str = Field("", description="Folder whose cells/ caches the fine-tunes (default <out>); shared "
                           "caches reuse identical cells")
    force_cpu: bool = Field(False, description="Run a GPU-sized preset (paper) on a CPU anyway; without it, a CPU "
                            "run estimated above an hour is refused with the estimate")
    data_dir: str = Field("", description="Directory of the data sets' files for every *_data_dir left empty (e.g. "
                          "one folder holding cifar-10-batches-py and cifar-100-python)")
    augment: bool = Field(False, description="Release augmentation (rotate/shift/zoom) in pre-training and the "
                          "forgetting stages")
    # source task and model
    source_dataset: str = Field("fashion-mnist", description="Source (pre-training) data set")
    source_data_dir: str = Field("", description="Directory of the source data set's files (image-folder: root with "
                                 "train/ and test/); empty = data_dir or its default location")
    source_classes: str = Field("0-4", description="Source classes")
    source_limit: int = Field(0, ge=0, description="Source training images (0 = all); the half-data variant halves it")
    full_source_limit: int = Field(0, ge=0, description="half-data variant: images of the full-data naive "
                                   "baseline (0 = off)")
    model: str = Field("resnet", description="Model of the source/target network: a built-in name, "
                       "torchvision:NAME, timm:NAME or package.module:callable")
    width: int = Field(24, ge=0, description="Model width (resnet 24 = ~170k parameters)")
    checkpoint: str = Field("", description="State_dict file (.pt or .safetensors) used as Θ0 instead of pre-training "
                            "on the source data (see `know trajectory --checkpoint`)")
    # forgetting trajectory
    r: float = Field(0.5, gt=0, lt=1, description="Sampling rate of the nested subsets; method factors must be "
                     "powers of 1/r")
    window: int = Field(5, ge=2, le=5, description="KNOWN window S; the target trajectory gets S + 2 stages")
    traj_lr: float = Field(1e-3, gt=0, description="Adam lr of the forgetting fine-tunes")
    traj_batch_size: int = Field(128, ge=1, description="Batch size of the forgetting fine-tunes")
    # meta data
    meta_dataset: str = Field("fashion-mnist", description="Meta-trajectory data set (never the target test split)")
    meta_classes: str = Field("0-4", description="Meta-trajectory classes")
    meta_data_dir: str = Field("", description="Directory of the meta data set's files; empty = data_dir or its "
                               "default location")
    meta_limit: int = Field(6000, ge=0, description="Meta-trajectory training images (0 = all)")
    meta_models: str = Field("simple-cnn,mlp", description="Comma-separated models of the meta-trajectories")
    meta_runs: int = Field(8, ge=0, description="Independent-mode meta runs per model")
    meta_sequential_runs: int = Field(0, ge=0, description="Sequential-mode meta runs per model")
    meta_matched_runs: int = Field(0, ge=0, description="Target-matched meta runs: the target's own architecture, "
                                   "pre-trained and recorded like the target (sequential), on other seeds, so other "
                                   "nested subsets of the source training split; never the target task")
    meta_stages: int = Field(7, ge=6, description="Stages per meta run (KNOWN pairs need >= 6)")
    known_scaling: Literal["auto", "raw", "minmax"] = Field(
        "auto", description="KNOWN (ours) input scaling: auto = the lower validation L1 on held-out meta runs")
    meta_epochs: int = Field(10, ge=1, description="Max KNOWN meta-training epochs")
    meta_pairs_per_run: int = Field(20000, ge=1, description="Pairs per meta run and kind")
    # target task and protocol
    target_dataset: str = Field("fashion-mnist", description="Target data set")
    target_classes: str = Field("5-9", description="Target classes")
    target_data_dir: str = Field("", description="Directory of the target data set's files; empty = data_dir or its "
                                 "default location")
    target_train_size: int = Field(2000, ge=2, description="Balanced target training images")
    phase1_epochs: int = Field(2, ge=0, description="Head + norm epochs (release: 10)")
    phase2_epochs: int = Field(8, ge=1, description="Full fine-tune epochs (release: 100)")
    lr1: float = Field(1e-3, gt=0, description="Phase-1 Adam lr")
    lr2: float = Field(4e-4, gt=0, description="Phase-2 cosine start lr")
    ft_batch_size: int = Field(128, ge=1, description="Fine-tune batch size")
    naive_lr_grid: str = Field("4e-4,1e-3,2e-3", description="Phase-2 lr candidates of every tuned row (naive-lr, "
                               "know-lr, official-lr), chosen on a validation split; extended past an edge optimum")
    lr_grid_extend: int = Field(3, ge=0, le=8, description="Cap on the ×2 (÷2) extensions of the lr grid on each side "
                                "when its optimum is at an edge (0 = the grid as given)")
    shrink_controls: bool = Field(True, description="Add each predictor's own shrink control at every factor it runs "
                                  "at (shrink-<predictor>: Θ0 scaled per tensor by that prediction)")
    seeds: int = Field(5, ge=1, description="Fine-tune seeds per method (paired across methods)")
    methods: str = Field("naive,naive-lr,know:2,know:8,know-lr,official:2,official:8,official-lr,taskvector:2,"
                         "logfit:2,scratch",
                         description="Comma-separated method[:factor] list; a factor must be a power of 1/r. "
                         "know-lr/official-lr (no factor) tune the best start of that source")

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        name = data.get("preset", "standard")
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
        return {**PRESETS[name], "out": f"results/{name}", **data}

    _dataset = field_validator("source_dataset", "meta_dataset", "target_dataset")(lambda v: check_dataset(v))
    _classes = field_validator("source_classes", "meta_classes", "target_classes")(lambda v: check_classes(v))

    _model = field_validator("model")(lambda v: check_one_model(v))

    @field_validator("meta_models")
    @classmethod
    def _meta_models(cls, v: str) -> str:
        check_models(v)
        return v

    _grid = field_validator("naive_lr_grid")(lambda v: check_learning_rates(v))

    @model_validator(mode="after")
    def _methods(self):
        self.method_factors()
        if not self.meta_runs and not self.meta_sequential_runs and not self.meta_matched_runs:
            raise ValueError("--meta-runs, --meta-sequential-runs and --meta-matched-runs are all 0; set one above 0 "
                             "(KNOWN needs meta runs to train on)")
        return self

    def _parsed(self) -> list[tuple[str, float]]:
        """The `methods` list as (name, factor) pairs, every name and factor checked."""
        out = []
        for item in filter(None, (m.strip() for m in self.methods.split(","))):
            name, _, factor_text = item.partition(":")
            if name not in METHODS:
                raise ValueError(f"unknown method {name!r} in methods; choose from: {', '.join(sorted(METHODS))}")
            try:
                factor = float(factor_text) if factor_text else 1.0
            except ValueError:
                raise ValueError(f"method {item!r}: the factor after ':' must be a number") from None
            if (name in PREDICTORS or name in SHRINK_OF) and factor == 1.0:
                raise ValueError(f"method {item!r} needs a factor above 1, e.g. {name}:2 (×1 is Θ0 itself: naive)")
            if (name in BASELINES or name in TUNED) and factor != 1.0:
                raise ValueError(f"method {item!r} takes no factor" + (
                    f": it tunes the best {TUNED[name]} start among the listed factors" if name in ("know-lr", "official-lr") else ""))
            if factor != 1.0:
                step_for_factor(factor, self.r, option=f"method {item!r}: factor")
            if name == "naive-full" and not self.full_source_limit:
                raise ValueError("method naive-full needs --full-source-limit (the half-data preset sets it)")
            out.append((name, factor))
        for name in ("know-lr", "official-lr"):
            if any(m == name for m, _ in out) and not any(m == TUNED[name] for m, _ in out):
                raise ValueError(f"method {name} tunes the {TUNED[name]} rows, but methods lists none "
                                 f"(add e.g. {TUNED[name]}:2)")
        return out

    def method_factors(self) -> list[tuple[str, float]]:
        """[(method, factor)] of the rows fine-tuned at the fixed lr2: `methods` without the
        tuned rows, plus (with shrink_controls) each predictor's own shrink control at each
        of its factors.  'know:8' -> ('know', 8.0), no factor -> 1.0.

        Official rows are left out without official_dir. A factor that is not a power of
        1/r is refused: the prediction could only be labelled with a factor it is not."""
        out: list[tuple[str, float]] = []
        for name, factor in self._parsed():
            if name in OFFICIAL_METHODS and not self.official_dir:
                continue  # official rows need the h5 files; skipped without them
            if name not in TUNED and (name, factor) not in out:
                out.append((name, factor))
        if self.shrink_controls:
            for name, factor in list(out):
                if name in PREDICTORS and (shrink_of(name), factor) not in out:
                    out.append((shrink_of(name), factor))
        return out

    def tuned_rows(self) -> dict[str, list[tuple[str, float]]]:
        """{tuned row: its candidate starts [(method, factor)]}: naive-lr tunes Θ0, know-lr every
        listed know factor, official-lr every listed official factor (with official_dir)."""
        rows = self.method_factors()
        out = {}
        for name, _ in self._parsed():
            if name in TUNED and name not in out and not (name in OFFICIAL_METHODS and not self.official_dir):
                source = TUNED[name]
                out[name] = [("naive", 1.0)] if source == "naive" else [(m, f) for m, f in rows if m == source]
        return out

    def dir_of(self, role: str) -> str:
        """The data directory of 'source', 'meta' or 'target': its own field, else data_dir."""
        return getattr(self, f"{role}_data_dir") or self.data_dir

    def naive_lr_values(self) -> list[float]:
        """The naive-lr candidates of naive_lr_grid."""
        return check_floats(self.naive_lr_grid, "learning rates")

    def step_of(self, factor: float) -> int:
        """The prediction step of a method factor (0 for factor 1, Θ0 itself)."""
        return 0 if factor == 1.0 else step_for_factor(factor, self.r)

    def identity(self) -> dict:
        """What makes two experiments the same (run-time knobs excluded). Fields added later
        leave it while unused, so that folders made before them keep matching."""
        unused = set() if self.pretrain_patience else {"pretrain_patience", "pretrain_val_fraction"}
        return self.model_dump(exclude=RUNTIME_FIELDS | unused)

    def done_identity(self) -> dict:
        """What a finished folder's done.json must match: the identity and where the products
        live (another store, KNOWN folder or cell cache is other work)."""
        return {**self.identity(), "store": self.store or f"{self.out}/store.zarr", "known_dir": self.known_dir,
                "cache_dir": self.cache_dir}


def preset_params(name: str, **overrides) -> ExperimentParams:
    """The preset `name` with `overrides` on top (what `know run --preset NAME ...` builds)."""
    if name not in PRESETS:
        raise BadInput(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return ExperimentParams(preset=name, **overrides)


__all__ = ["ExperimentParams", "PRESETS", "METHODS", "PREDICTORS", "TUNED", "SHRINK_OF", "shrink_of", "preset_params"]
