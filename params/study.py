"""Settings of the regime study (`know study`): a grid of `know run` variants.

A variant is one experiment: the base preset with a few fields changed. The axes are fields
(comma-separated alternatives), so users can add values; the `screen` preset instead names a
fixed list of variants, each testing one hypothesis against the standard run. That list is
written here, before any result is seen.

    >>> from params.study import StudyParams
    >>> [v.name for v in StudyParams(preset="screen").variants()][:3]
    ['standard', 'fresh-optimizer', 'sequential-meta']
"""
from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from .common import RunnerFields, StageModel
from .experiment import PRESETS, ExperimentParams

#: the screen: one hypothesis per variant, each against today's standard (fixed in advance)
SCREEN: dict[str, dict[str, Any]] = {
    "standard": {},
    "fresh-optimizer": {"optimizer": "fresh"},
    "sequential-meta": {"meta_runs": 0, "meta_sequential_runs": 8},
    "target-matched-meta": {"meta_runs": 0, "meta_matched_runs": 4},
    "longer-pretraining": {"pretrain_epochs": 15},
    "raw-scaling": {"known_scaling": "raw"},
}

#: what every screen variant runs, sized so that the six variants take about an hour on 2 CPU
#: cores (5 seeds): our KNOW at x8 with its own shrink control (added automatically), naive, and
#: both tuned rows (know-lr tunes its x8 start). x2 and the official rows are left to `full`:
#: with them the screen took about 3 hours here (2026-12-02).
SCREEN_BASE: dict[str, Any] = {
    "methods": "naive,naive-lr,know:8,know-lr",
    "meta_runs": 6,
}

STUDY_PRESETS: dict[str, dict[str, Any]] = {
    "screen": {"base": "standard", "grid": False},
    "full": {"base": "standard", "grid": True, "optimizers": "carry,fresh", "meta_modes": "independent,sequential,matched",
             "pretrain_epochs": "5,15", "known_scalings": "auto,raw,minmax"},
}


@dataclass(frozen=True)
class Variant:
    name: str
    overrides: dict[str, Any] = field(default_factory=dict)


class StudyParams(RunnerFields):
    """A grid of `know run` variants sharing one store, one KNOWN per meta-data config and
    one cell cache, then one table, one picture and a conclusion written from the numbers."""

    preset: Literal["screen", "full", "custom"] = Field("screen", description="screen: 6 variants, one hypothesis "
                                                        "each, KNOW x8 (about an hour on 2 cores) | full: the whole grid of the "
                                                        "axes (GPU workers) | custom: the grid of the axes given")
    out: str = Field("results/study", description="Output folder: the shared store, KNOWN, cells, one folder per "
                     "variant, study.csv/.md, gain_vs_coherence.png")
    base: str = Field("standard", description="The `know run` preset every variant starts from")
    grid: bool = Field(True, description="custom/full: every combination of the axes (else the screen's list)")
    optimizers: str = Field("carry", description="Axis: optimizer regime of the target and meta runs (carry, fresh)")
    meta_modes: str = Field("independent", description="Axis: meta-data mode (independent, sequential, matched = "
                            "target-matched: the target's architecture and recipe on other seeds)")
    pretrain_epochs: str = Field("5", description="Axis: source pre-training epochs")
    known_scalings: str = Field("auto", description="Axis: KNOWN input scaling (auto, raw, minmax)")
    overrides: str = Field("{}", description="JSON object of `know run` fields applied to every variant (e.g. a "
                           "smaller target for a smoke test)")
    official_dir: str = Field("", description="Directory of the authors' KNOWN_*.h5; empty = no official rows")
    seeds: int = Field(5, ge=1, description="Fine-tune seeds per method (the conclusion needs >= 5)")
    force: bool = Field(False, description="Reuse an output folder that holds a different study")
    parallel_variants: int = Field(1, ge=1, description="Variants run at once (sub-flows on a thread pool; each "
                                   "sends its runs and fine-tunes to --runner with --workers). A product two "
                                   "variants share is made once: the second waits for it")

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        name = data.get("preset", "screen")
        return {**STUDY_PRESETS.get(name, {}), "out": f"results/study-{name}", **data}

    @field_validator("base")
    @classmethod
    def _base(cls, v: str) -> str:
        if v not in PRESETS:
            raise ValueError(f"unknown preset {v!r}; choose one of: {', '.join(PRESETS)}")
        return v

    @field_validator("overrides")
    @classmethod
    def _overrides(cls, v: str) -> str:
        try:
            value = json.loads(v)
        except json.JSONDecodeError as e:
            raise ValueError(f"not a JSON object ({e.msg}); write e.g. '{{\"seeds\": 2}}'") from None
        if not isinstance(value, dict):
            raise ValueError("must be a JSON object such as '{\"seeds\": 2}'")
        return v

    @model_validator(mode="after")
    def _variants_valid(self):
        self.experiments()  # every variant must be a valid experiment
        return self

    def identity(self) -> dict:
        """What makes two studies the same (run-time knobs excluded)."""
        return self.model_dump(exclude={"out", "force", "workers", "device", "runner", "dask_address",
                                        "parallel_variants"})

    def done_identity(self) -> dict:
        """What a finished study folder's done.json must match (its variants have their own)."""
        return self.identity()

    def variants(self) -> list[Variant]:
        if self.preset == "screen":
            return [Variant(name, {**SCREEN_BASE, **o}) for name, o in SCREEN.items()]
        axes = {
            "optimizer": _items(self.optimizers, "optimizers"),
            "meta_mode": _items(self.meta_modes, "meta_modes"),
            "pretrain_epochs": [int(x) for x in _items(self.pretrain_epochs, "pretrain_epochs")],
            "known_scaling": _items(self.known_scalings, "known_scalings"),
        }
        out = []
        for combo in itertools.product(*axes.values()):
            values = dict(zip(axes, combo))
            mode = values.pop("meta_mode")
            o = dict(values)
            if mode == "sequential":
                o.update(meta_runs=0, meta_sequential_runs=8)
            elif mode == "matched":
                o.update(meta_runs=0, meta_matched_runs=4)
            elif mode != "independent":
                raise ValueError(f"meta_modes: unknown mode {mode!r}; use independent, sequential or matched")
            name = "-".join([values["optimizer"], mode, f"pre{values['pretrain_epochs']}", values["known_scaling"]])
            out.append(Variant(name, o))
        return out

    def experiments(self) -> dict[str, ExperimentParams]:
        """{variant name: its experiment}, each in <out>/variants/<name>, sharing the store,
        the KNOWN folders (one per meta-data config) and the cell cache."""
        shared = json.loads(self.overrides)
        out = {}
        for v in self.variants():
            fields = {"official_dir": self.official_dir, "seeds": self.seeds, "workers": self.workers,
                      "runner": self.runner, "dask_address": self.dask_address, "device": self.device,
                      **v.overrides, **shared}
            probe = ExperimentParams(preset=self.base, **fields)
            known = f"{self.out}/known/{meta_key(probe)}"
            out[v.name] = ExperimentParams(preset=self.base, out=f"{self.out}/variants/{v.name}",
                                           store=f"{self.out}/store.zarr", known_dir=known, cache_dir=self.out,
                                           force=self.force, **fields)
        return out


#: the fields that decide what KNOWN (ours) is trained on and how
META_FIELDS = ("meta_dataset", "meta_classes", "meta_limit", "meta_models", "meta_runs", "meta_sequential_runs",
               "meta_matched_runs", "meta_stages", "meta_epochs", "meta_pairs_per_run", "meta_data_dir", "optimizer",
               "known_scaling", "source_dataset", "source_classes", "source_limit", "model", "width",
               "pretrain_epochs", "pretrain_lr", "pretrain_batch_size", "r", "window", "traj_lr", "traj_batch_size",
               "augment")


def meta_key(p: ExperimentParams) -> str:
    """A short hash of the meta-data config: variants with equal keys share one KNOWN folder."""
    text = json.dumps({k: getattr(p, k) for k in META_FIELDS}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _items(text: str, name: str) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        raise ValueError(f"{name} is empty; give at least one value")
    return items


__all__ = ["StudyParams", "Variant", "SCREEN", "SCREEN_BASE", "STUDY_PRESETS", "meta_key"]
