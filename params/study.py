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

from .common import RunnerFields, StageModel, option
from .experiment import PRESETS, ExperimentParams

#: the screen: one hypothesis per variant, each against today's standard (fixed in advance)
SCREEN: dict[str, dict[str, Any]] = {
    "standard": {},
    "fresh-optimizer": {"optimizer": "fresh"},
    "sequential-meta": {"meta_runs": 0, "meta_sequential_runs": 8},
    "target-matched-meta": {"meta_runs": 0, "meta_matched_runs": 4},
    "longer-pretraining": {"pretrain_epochs": 15},
    "raw-scaling": {"known_scaling": "raw"},
    # the real form of longer-pretraining's fixed-length stand-in (see SCREEN_LATE)
    "plateau-pretraining": {"pretrain_epochs": 30, "pretrain_patience": 3},
}
#: screen variants added after others had run: what the study's notes say about each
SCREEN_LATE = {"plateau-pretraining": "added on 2026-12-02, after the first six had run; its settings were fixed "
                                      "before it ran"}

#: what every screen variant runs, sized so that the first six variants took about an hour on 2
#: CPU cores (5 seeds): our KNOW at x8 with its own shrink control (added automatically), naive, and
#: both tuned rows (know-lr tunes its x8 start). x2 and the official rows are left to `full`:
#: with them the screen took about 3 hours here (2026-12-02).
SCREEN_BASE: dict[str, Any] = {
    "methods": "naive,naive-lr,know:8,know-lr",
    "meta_runs": 6,
}

STUDY_PRESETS: dict[str, dict[str, Any]] = {
    "screen": {"base": "standard", "grid": False},
    "full": {"base": "standard", "grid": True, "optimizers": "carry,fresh", "meta_modes": "independent,sequential,matched",
             "pretrain_epochs": "5,15,plateau:30", "known_scalings": "auto,raw,minmax"},
}


@dataclass(frozen=True)
class Variant:
    name: str
    overrides: dict[str, Any] = field(default_factory=dict)


class StudyParams(RunnerFields):
    """A grid of `know run` variants sharing one store, one KNOWN per meta-data config and
    one cell cache, then one table, one picture and a conclusion written from the numbers."""

    preset: Literal["screen", "full", "custom"] = Field("screen", description="screen: 7 variants, one hypothesis "
                                                        "each, KNOW x8 (about 50 min on 2 idle cores) | full: the whole grid of the "
                                                        "axes (GPU workers) | custom: the grid of the axes given")
    out: str = Field("results/study", description="Output folder: the shared store, KNOWN, cells, one folder per "
                     "variant, study.csv/.md, gain_vs_coherence.png")
    base: str = Field("standard", description="The `know run` preset every variant starts from")
    grid: bool = Field(True, description="custom/full: every combination of the axes (else the screen's list)")
    optimizers: str = Field("carry", description="Axis: optimizer regime of the target and meta runs (carry, fresh)")
    meta_modes: str = Field("independent", description="Axis: meta-data mode (independent, sequential, matched = "
                            "target-matched: the target's architecture and recipe on other seeds)")
    pretrain_epochs: str = Field("5", description="Axis: source pre-training epochs N, or plateau:N = until the "
                                 "source validation accuracy plateaus (patience pretrain_patience), N the cap")
    pretrain_patience: int = Field(3, ge=1, description="Patience of the plateau:N values of pretrain_epochs")
    known_scalings: str = Field("auto", description="Axis: KNOWN input scaling (auto, raw, minmax)")
    overrides: str = Field("{}", description="JSON object of `know run` fields applied to every variant (e.g. a "
                           "smaller target for a smoke test)")
    official_dir: str = Field("", description="Directory of the authors' KNOWN_*.h5; empty = no official rows")
    seeds: int = Field(5, ge=1, description="Fine-tune seeds per method (the conclusion needs >= 5)")
    only: str = Field("", description="Comma-separated variant names: run only these of the study's variants "
                      "(empty = all); the table shows them and every other variant already finished in --out")
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
        # a field added later leaves the identity while unused, so that earlier study folders keep matching
        unused = set() if "plateau" in self.pretrain_epochs else {"pretrain_patience"}
        return self.model_dump(exclude={"out", "force", "workers", "device", "runner", "dask_address",
                                        "parallel_variants", "only", *unused})

    def done_identity(self) -> dict:
        """What a finished study folder's done.json must match (its variants have their own)."""
        return self.identity()

    def variants(self, every: bool = False) -> list[Variant]:
        """The variants to run (`only`'s, else all); every=True: all of the study's."""
        every_variant = self._every_variant()
        if every or not self.only:
            return every_variant
        wanted = _items(self.only, "only")
        unknown = [w for w in wanted if w not in {v.name for v in every_variant}]
        if unknown:
            raise ValueError(f"{option('only')}: no variant named {', '.join(unknown)}; this study's variants are "
                             f"{', '.join(v.name for v in every_variant)}")
        return [v for v in every_variant if v.name in wanted]

    def _every_variant(self) -> list[Variant]:
        if self.preset == "screen":
            return [Variant(name, {**SCREEN_BASE, **o}) for name, o in SCREEN.items()]
        axes = {
            "optimizer": _items(self.optimizers, "optimizers"),
            "meta_mode": _items(self.meta_modes, "meta_modes"),
            "pretrain_epochs": [_pretrain_item(x) for x in _items(self.pretrain_epochs, "pretrain_epochs")],
            "known_scaling": _items(self.known_scalings, "known_scalings"),
        }
        out = []
        for combo in itertools.product(*axes.values()):
            values = dict(zip(axes, combo))
            mode = values.pop("meta_mode")
            epochs, patience = values["pretrain_epochs"]
            o = {**values, "pretrain_epochs": epochs}
            if patience:
                o["pretrain_patience"] = self.pretrain_patience
            if mode == "sequential":
                o.update(meta_runs=0, meta_sequential_runs=8)
            elif mode == "matched":
                o.update(meta_runs=0, meta_matched_runs=4)
            elif mode != "independent":
                raise ValueError(f"meta_modes: unknown mode {mode!r}; use independent, sequential or matched")
            name = "-".join([values["optimizer"], mode, f"pre{'plateau' if patience else ''}{epochs}",
                             values["known_scaling"]])
            out.append(Variant(name, o))
        return out

    def experiments(self, every: bool = False) -> dict[str, ExperimentParams]:
        """{variant name: its experiment}, each in <out>/variants/<name>, sharing the store,
        the KNOWN folders (one per meta-data config) and the cell cache (every: see variants)."""
        shared = json.loads(self.overrides)
        out = {}
        for v in self.variants(every):
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
    key = {k: getattr(p, k) for k in META_FIELDS}
    if p.pretrain_patience:  # added later: in the key only when set, so earlier KNOWN folders keep theirs
        key.update(pretrain_patience=p.pretrain_patience, pretrain_val_fraction=p.pretrain_val_fraction)
    text = json.dumps(key, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _pretrain_item(text: str) -> tuple[int, bool]:
    """'15' -> (15, False): fixed epochs; 'plateau:30' -> (30, True): until plateau, capped at 30."""
    head, _, cap = text.partition(":")
    value = cap if head == "plateau" else text
    if (head == "plateau" and not cap) or not value.isdigit() or int(value) < 1:
        raise ValueError(f"{option('pretrain_epochs')}: {text!r} is neither a number of epochs (e.g. 15) nor "
                         "plateau:CAP (e.g. plateau:30)")
    return int(value), head == "plateau"


def _items(text: str, name: str) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        raise ValueError(f"{name} is empty; give at least one value")
    return items


__all__ = ["StudyParams", "Variant", "SCREEN", "SCREEN_BASE", "SCREEN_LATE", "STUDY_PRESETS", "meta_key"]
