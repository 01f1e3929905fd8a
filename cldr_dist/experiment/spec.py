"""An experiment file (configs/experiments/*.yaml): which base models, splits and seeds to run,
and the run settings of each stage, as layers of the ordinary training config.

    experiment:  name, out, models, splits, seeds, arms, variants   (ExperimentSpec below)
    classical:   the classical baselines                             (eval/classical.py)
    common:      config sections for every run (data, ray, ...)
    pretrain:    config sections layered on common for CLDR pretraining
    finetune:    config sections layered on common for finetuning and for the MSE-only base model
    cldr_finetune: config sections layered on finetune for the CLDR arm's finetune only (CLDR
                 finetunes its pretrained model at lr 1e-5, far below a model trained from scratch)

A variant is an extra CLDR arm with its own layers on top of pretrain and/or finetune, e.g.
    variants: {gb1024: {pretrain: {train: {batch_size: 1024}}}}
Overrides on the command line: experiment.seeds=[1,2], classical.gbm_iters=50,
pretrain.train.epochs=3, common.ray.num_workers=4.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from cldr_dist.config import (Config, ConfigError, apply_setting, check_shared_storage, coerce, read_sections,
                              validate)
from cldr_dist.eval.classical import BASELINES, ClassicalConfig

ARMS = ("base", "cldr")
STAGES = ("common", "pretrain", "finetune", "cldr_finetune")
SPLITS = ("mixed", "cell_blind", "drug_blind")
INTERNAL_FIELDS = ("classical", "layers", "command")   # not settable as experiment.KEY


@dataclass
class ExperimentSpec:
    name: str = "experiment"
    out: str = "runs/experiments"          # the run directory is out/name
    models: list[str] = field(default_factory=lambda: ["graphdrp"])
    splits: list[str] = field(default_factory=lambda: ["drug_blind"])
    seeds: list[int] = field(default_factory=lambda: [171])
    arms: list[str] = field(default_factory=lambda: list(ARMS))
    variants: dict = field(default_factory=dict)      # name -> {pretrain: sections, finetune: sections}
    classical: ClassicalConfig = field(default_factory=ClassicalConfig)
    layers: dict = field(default_factory=lambda: {s: {} for s in STAGES})
    command: str = ""               # how it was started, for the report (set by load_experiment)

    @property
    def run_dir(self) -> Path:
        return Path(self.out) / self.name

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _set_fields(obj, values: dict, where: str) -> None:
    hints = typing.get_type_hints(type(obj))
    for key, value in values.items():
        if key not in hints or key in INTERNAL_FIELDS:
            known = [k for k in hints if k not in INTERNAL_FIELDS]
            raise ConfigError(f"unknown key {where}.{key}; known: {', '.join(known)}")
        if key == "variants":
            if not isinstance(value, dict):
                raise ConfigError(f"{where}.variants: expected a mapping of name -> stage layers")
            setattr(obj, key, value)
        else:
            setattr(obj, key, coerce(value, hints[key], f"{where}.{key}"))


def _merge(base: dict, layer: dict) -> dict:
    out = copy.deepcopy(base)
    for section, values in (layer or {}).items():
        if not isinstance(values, dict):
            raise ConfigError(f"config section {section!r} must be a mapping")
        out.setdefault(section, {}).update(values)
    return out


def stage_config(spec: ExperimentSpec, stage: str, model: str, split: str, seed: int,
                 variant: str = "", pretrained: bool = False) -> Config:
    """The training config of one stage ("pretrain" or "finetune") of one arm; `pretrained`:
    the finetune of a CLDR arm, with the cldr_finetune layer on top of finetune's."""
    sections = _merge(spec.layers.get("common", {}), spec.layers.get(stage, {}))
    if stage == "finetune" and pretrained:
        sections = _merge(sections, spec.layers.get("cldr_finetune", {}))
    if variant:
        sections = _merge(sections, spec.variants[variant].get(stage, {}))
    cfg = Config()
    for section, values in sections.items():
        for key, value in values.items():
            apply_setting(cfg, section, key, value)
    cfg.model.drp, cfg.data.split, cfg.train.seed, cfg.train.mode = model, split, seed, stage
    cfg.ray.storage_path = storage_path(spec)
    check_shared_storage(cfg, {"ray.storage_path": "common.ray.storage_path"})
    validate(cfg)
    return cfg


def storage_path(spec: ExperimentSpec) -> str:
    """Where Ray Train keeps every training run of the experiment (checkpoints and logs)."""
    return spec.layers.get("common", {}).get("ray", {}).get("storage_path") or str((spec.run_dir / "ray").resolve())


def load_experiment(path: str | Path, overrides: list[str] = ()) -> ExperimentSpec:
    path = Path(path)
    raw = read_sections(path, "experiment")
    spec = ExperimentSpec(name=path.stem)
    for top, values in raw.items():
        if top == "experiment":
            _set_fields(spec, values, "experiment")
        elif top == "classical":
            _set_fields(spec.classical, values, "classical")
        elif top in STAGES:
            spec.layers[top] = values
        else:
            raise ConfigError(f"{path}: unknown section {top!r}; known: experiment, classical, {', '.join(STAGES)}")
    for item in overrides:
        dotted, sep, value = item.partition("=")
        keys = dotted.split(".")
        if not sep or len(keys) < 2:
            raise ConfigError(f"override {item!r} must look like experiment.key=value or pretrain.section.key=value")
        value = yaml.safe_load(value) if value else ""
        if keys[0] == "experiment" and len(keys) == 2:
            _set_fields(spec, {keys[1]: value}, "experiment")
        elif keys[0] == "classical" and len(keys) == 2:
            _set_fields(spec.classical, {keys[1]: value}, "classical")
        elif keys[0] in STAGES and len(keys) == 3:
            spec.layers[keys[0]].setdefault(keys[1], {})[keys[2]] = value
        else:
            raise ConfigError(f"override {item!r}: use experiment.KEY, classical.KEY or "
                              f"{'|'.join(STAGES)}.SECTION.KEY")
    check(spec)
    spec.command = " ".join(["cldr experiment --config", str(path), *overrides])
    return spec


def check(spec: ExperimentSpec) -> None:
    """Every arm's configs must load: a typo fails here, not hours into the run."""
    def need(ok: bool, msg: str):
        if not ok:
            raise ConfigError(msg)
    need(bool(spec.models) and bool(spec.splits) and bool(spec.seeds), "experiment: models, splits and seeds must not be empty")
    need(all(s in SPLITS for s in spec.splits), f"experiment.splits: unknown split in {spec.splits}; choose from {', '.join(SPLITS)}")
    need(all(a in ARMS for a in spec.arms), f"experiment.arms: unknown arm in {spec.arms}; choose from {', '.join(ARMS)}")
    need(all(b in BASELINES for b in spec.classical.baselines),
         f"classical.baselines: unknown baseline in {spec.classical.baselines}; choose from {', '.join(BASELINES)}")
    for name, layers in spec.variants.items():
        need(isinstance(layers, dict) and set(layers) <= {"pretrain", "finetune"},
             f"experiment.variants.{name}: expected a mapping with pretrain and/or finetune sections")
    # A Ray Job's driver runs in the job's temporary copy of the working dir, which Ray may delete
    need(not os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or Path(spec.out).is_absolute(),
         f"experiment.out: {spec.out!r} is relative; inside a Ray Job it would land in the job's temporary "
         f"working directory: give an absolute path on the head node")
    for model in spec.models:
        for variant in ["", *spec.variants]:
            for stage, pretrained in (("pretrain", False), ("finetune", False), ("finetune", True)):
                try:
                    stage_config(spec, stage, model, spec.splits[0], spec.seeds[0], variant, pretrained)
                except ConfigError as e:
                    where = f"variant {variant}, " if variant else ""
                    name = "cldr_finetune" if pretrained else stage
                    raise ConfigError(f"{where}{name} stage of {model}: {e}") from None
