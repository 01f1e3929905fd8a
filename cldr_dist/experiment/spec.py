"""An experiment file (configs/experiments/*.yaml): which base models, splits and seeds to run,
and the run settings of each stage, as layers of the ordinary training config.

    experiment:  name, out, models, splits, seeds, arms, variants, tuned   (ExperimentSpec below)
    classical:   the classical baselines                             (eval/classical.py)
    tune:        what `cldr tune` searches, and how long              (TuneSpec below)
    common:      config sections for every run (data, ray, ...)
    pretrain:    config sections layered on common for CLDR pretraining
    finetune:    config sections layered on common for finetuning and for the MSE-only base model
    cldr_finetune: config sections layered on finetune for the CLDR arm's finetune only (CLDR
                 finetunes its pretrained model at lr 1e-5, far below a model trained from scratch)
    by_split:    {split: config sections} layered on every stage of that split's runs

A run's settings, lowest layer first: common, its stage, cldr_finetune (the CLDR arm's
finetune), the tuned settings of its base model and stage (experiment.tuned, written by
`cldr tune`), by_split of its split, its variant. With train.select=last and tuned settings,
train.epochs is the tuned trial's best epoch: a fixed budget chosen on the tuning split.

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
TUNED_STAGES = ("base", "pretrain", "cldr_finetune")   # what `cldr tune` tunes per base model
INTERNAL_FIELDS = ("classical", "tune", "layers", "by_split", "overrides", "tuned_settings", "command")  # not experiment.KEY
# logspaced: [low, high] -> tune.trials values evenly spaced in log, one per trial (a grid): a
# few random draws can all land in one end of a wide range, and do, under a fixed seed
DISTRIBUTIONS = ("loguniform", "uniform", "choice", "logspaced")
FIXED_BY_TUNE = ("data.split", "train.mode", "train.epochs", "train.stop_epoch", "train.patience", "train.select",
                 "train.test_at_end", "train.init_from", "train.seed")


def _default_space() -> dict:
    return {"train.lr": {"loguniform": [1e-5, 3e-3]}, "model.dropout": {"choice": [0.1, 0.3, 0.5]},
            "train.weight_decay": {"choice": [0.0, 1e-5, 1e-4]}, "train.warmup_epochs": {"choice": [0, 1]},
            "train.batch_size": {"choice": [1024, 4096]}}


def _default_pretrain_space() -> dict:
    return {"train.lr": {"loguniform": [1e-5, 1e-3]}, "model.dropout": {"choice": [0.1, 0.3]},
            "train.weight_decay": {"choice": [0.0, 1e-4]}, "train.warmup_epochs": {"choice": [0, 1]},
            "train.batch_size": {"choice": [2048, 8192]}}


@dataclass
class TuneSpec:
    """`cldr tune`: per base model, random search with ASHA early stopping over the settings in
    `space`, on the validation part of `split` only. Every tuned stage (base, pretrain,
    cldr_finetune) gets the same number of trials and epochs, so both arms are tuned alike."""
    split: str = "mixed"            # tune on this split's validation part; never on test
    trials: int = 4                 # per base model and stage
    max_epochs: int = 8             # a trial's epoch cap
    # pretrain trials' cap; 0: max_epochs. A pretrain epoch costs several finetune epochs, and
    # CLDR's finetune search must run where the pretrain search left its checkpoint
    pretrain_max_epochs: int = 0
    grace_epochs: int = 2           # ASHA: epochs before a trial may be stopped
    reduction_factor: int = 2       # ASHA: keep 1 in this many trials at each rung
    concurrent: int = 1             # trials at once (each takes ray.num_workers x cpus_per_worker CPUs)
    # a trial worker's CPUs (and torch threads); 0: the stage's ray.cpus_per_worker. On a small
    # machine, trials at once on a thread each beat one at a time on all threads (and only trials
    # running side by side let ASHA stop the weaker one): docs/benchmarks_throughput.md
    cpus_per_worker: float = 0
    seed: int = 171                 # the search's own random draws
    space: dict = field(default_factory=_default_space)                  # base and cldr_finetune: the same
    pretrain_space: dict = field(default_factory=_default_pretrain_space)
    out: str = ""                   # the chosen settings; default configs/experiments/NAME_tuned.yaml

    def epochs(self, stage: str) -> int:
        """A trial's epoch cap in this stage."""
        return (self.pretrain_max_epochs or self.max_epochs) if stage == "pretrain" else self.max_epochs


@dataclass
class ExperimentSpec:
    name: str = "experiment"
    out: str = "runs/experiments"          # the run directory is out/name
    models: list[str] = field(default_factory=lambda: ["graphdrp"])
    splits: list[str] = field(default_factory=lambda: ["drug_blind"])
    seeds: list[int] = field(default_factory=lambda: [171])
    arms: list[str] = field(default_factory=lambda: list(ARMS))
    variants: dict = field(default_factory=dict)      # name -> {pretrain: sections, finetune: sections}
    tuned: str = ""                 # settings chosen by `cldr tune` (a YAML file it wrote)
    classical: ClassicalConfig = field(default_factory=ClassicalConfig)
    tune: TuneSpec = field(default_factory=TuneSpec)
    layers: dict = field(default_factory=lambda: {s: {} for s in STAGES})
    by_split: dict = field(default_factory=dict)      # split -> config sections
    overrides: dict = field(default_factory=dict)     # stage -> sections from the command line (the top layer)
    tuned_settings: dict = field(default_factory=dict)  # the tuned file's content: model -> stage -> entry
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


def tuned_stage(stage: str, pretrained: bool) -> str:
    """The name `cldr tune` gives a training stage: base, pretrain or cldr_finetune."""
    if stage == "pretrain":
        return "pretrain"
    return "cldr_finetune" if pretrained else "base"


def stage_config(spec: ExperimentSpec, stage: str, model: str, split: str, seed: int,
                 variant: str = "", pretrained: bool = False, tuned: bool = True) -> Config:
    """The training config of one stage ("pretrain" or "finetune") of one arm; `pretrained`:
    the finetune of a CLDR arm, with the cldr_finetune layer on top of finetune's; `tuned`:
    with the settings `cldr tune` chose (False: the settings it starts its search from)."""
    scopes = ["common", stage] + (["cldr_finetune"] if stage == "finetune" and pretrained else [])
    sections: dict = {}
    for scope in scopes:
        sections = _merge(sections, spec.layers.get(scope, {}))
    chosen = spec.tuned_settings.get(model, {}).get(tuned_stage(stage, pretrained)) if tuned else None
    if chosen:
        sections = _merge(sections, chosen["settings"])
    sections = _merge(sections, spec.by_split.get(split, {}))
    if variant:
        sections = _merge(sections, spec.variants[variant].get(stage, {}))
    cfg = Config()
    for section, values in sections.items():
        for key, value in values.items():
            apply_setting(cfg, section, key, value)
    if chosen and cfg.train.select == "last":
        # the tuned trial's own schedule (warmup, cosine over its epoch cap), stopped where it
        # validated best: the weights it scored, not a schedule squeezed into fewer epochs
        cfg.train.epochs, cfg.train.stop_epoch = chosen["max_epochs"], chosen["best_epoch"]
    for scope in scopes:   # the command line is the top layer
        for section, values in spec.overrides.get(scope, {}).items():
            for key, value in values.items():
                apply_setting(cfg, section, key, value)
    cfg.model.drp, cfg.data.split, cfg.train.seed, cfg.train.mode = model, split, seed, stage
    cfg.ray.storage_path = storage_path(spec)
    check_shared_storage(cfg, {"ray.storage_path": "common.ray.storage_path"})
    validate(cfg)
    return cfg


def storage_path(spec: ExperimentSpec) -> str:
    """Where Ray Train keeps every training run of the experiment (checkpoints and logs)."""
    path = spec.layers.get("common", {}).get("ray", {}).get("storage_path") or str(spec.run_dir / "ray")
    # absolute: Tune trials and Ray Jobs run in working directories of their own
    return path if path.startswith("s3://") else str(Path(path).resolve())


def load_experiment(path: str | Path, overrides: list[str] = (), tuned: bool = True) -> ExperimentSpec:
    """tuned=False: without experiment.tuned's settings (what `cldr tune` starts from, also
    before the file exists)."""
    path = Path(path)
    raw = read_sections(path, "experiment")
    spec = ExperimentSpec(name=path.stem)
    for top, values in raw.items():
        if top == "experiment":
            _set_fields(spec, values, "experiment")
        elif top == "classical":
            _set_fields(spec.classical, values, "classical")
        elif top == "tune":
            _set_fields(spec.tune, values, "tune")
        elif top in STAGES:
            spec.layers[top] = values
        elif top == "by_split":
            spec.by_split = values
        else:
            raise ConfigError(f"{path}: unknown section {top!r}; known: experiment, classical, tune, "
                              f"{', '.join(STAGES)}, by_split")
    for item in overrides:
        dotted, sep, value = item.partition("=")
        keys = dotted.split(".")
        if not sep or len(keys) < 2:
            raise ConfigError(f"override {item!r} must look like experiment.key=value or pretrain.section.key=value")
        value = yaml.safe_load(value) if value else ""
        if keys[0] == "experiment" and len(keys) == 2:
            _set_fields(spec, {keys[1]: value}, "experiment")
        elif keys[0] in ("classical", "tune") and len(keys) == 2:
            _set_fields(getattr(spec, keys[0]), {keys[1]: value}, keys[0])
        elif keys[0] in STAGES and len(keys) == 3:
            spec.layers[keys[0]].setdefault(keys[1], {})[keys[2]] = value
            spec.overrides.setdefault(keys[0], {}).setdefault(keys[1], {})[keys[2]] = value
        else:
            raise ConfigError(f"override {item!r}: use experiment.KEY, classical.KEY, tune.KEY or "
                              f"{'|'.join(STAGES)}.SECTION.KEY")
    if spec.tuned and tuned:
        spec.tuned_settings = read_tuned(spec.tuned)
        missing = [f"{m}.{st}" for m in spec.models for st in arm_stages(spec.arms, spec.variants)
                   if st not in spec.tuned_settings.get(m, {})]
        if missing:   # one arm tuned and the other not would not be a fair comparison
            raise ConfigError(f"experiment.tuned: {spec.tuned} has no tuned settings for {', '.join(missing)}; "
                              f"run `cldr tune --config {path}` for them")
    check(spec)
    spec.command = " ".join(["cldr experiment --config", str(path), *overrides])
    return spec


def arm_stages(arms: list[str], variants: dict | None = None) -> list[str]:
    """The tuned stages the experiment's arms train: base for the MSE-only arm, pretrain and
    cldr_finetune for CLDR and for its variants (they reuse CLDR's tuned settings)."""
    trained = {*arms, *(["cldr"] if variants else [])}
    return [s for s in TUNED_STAGES if ("base" if s == "base" else "cldr") in trained]


def tuned_path(spec: ExperimentSpec, config_path: str | Path) -> Path:
    """Where `cldr tune` writes the chosen settings: tune.out, else the file the experiment
    cites (experiment.tuned), else NAME_tuned.yaml beside the experiment file."""
    path = Path(config_path)
    return Path(spec.tune.out or spec.tuned or path.with_name(f"{path.stem}_tuned.yaml"))


def read_tuned(path: str | Path) -> dict:
    """A tuned-settings file: {model: {stage: {settings: sections, best_epoch: int, ...}}}."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"experiment.tuned: {path} not found; `cldr tune --config` on this experiment writes it")
    raw = read_sections(path, "tuned settings")
    for model, stages in raw.items():
        for stage, entry in stages.items():
            settings = entry.get("settings") if isinstance(entry, dict) else None
            epochs = [entry.get(k) for k in ("best_epoch", "max_epochs")] if isinstance(entry, dict) else [None]
            if stage not in TUNED_STAGES or not isinstance(settings, dict) \
                    or not all(isinstance(v, dict) for v in settings.values()) \
                    or not all(isinstance(e, int) and not isinstance(e, bool) and e >= 1 for e in epochs):
                raise ConfigError(f"{path}: {model}.{stage} is not a tuned stage entry ({'|'.join(TUNED_STAGES)} "
                                  f"with settings (config sections), best_epoch and max_epochs (at least 1))")
    return raw


def check_space(space: dict, where: str) -> None:
    """Every searched key is a config key the search may set, with a distribution this
    project knows."""
    if not isinstance(space, dict):
        raise ConfigError(f"{where}: expected a mapping of section.key -> distribution")
    for dotted, dist in space.items():
        section, _, key = str(dotted).partition(".")
        if str(dotted) in FIXED_BY_TUNE or section == "ray":
            raise ConfigError(f"{where}.{dotted}: set by `cldr tune` itself (the split, epochs, selection, "
                              f"no test pass, resources), not searched")
        if not isinstance(dist, dict) or len(dist) != 1 or next(iter(dist)) not in DISTRIBUTIONS:
            raise ConfigError(f"{where}.{dotted}: expected one of {{{': [...], '.join(DISTRIBUTIONS)}: [...]}}")
        (kind, values), = dist.items()
        if not isinstance(values, list) or not values or (kind != "choice" and len(values) != 2):
            raise ConfigError(f"{where}.{dotted}: {kind} needs " + ("a list of values" if kind == "choice" else "[low, high]"))
        for value in values:   # names an unknown section or key, or a value of the wrong type
            try:
                apply_setting(Config(), section, key, value)
            except ConfigError as e:
                raise ConfigError(f"{where}.{dotted}: {e}") from None
        if kind == "choice":
            continue
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise ConfigError(f"{where}.{dotted}: {kind} needs two numbers (YAML reads 3e-3 as text: write 3.0e-3)")
        if typing.get_type_hints(type(getattr(Config(), section)))[key] is int:
            raise ConfigError(f"{where}.{dotted}: an integer setting: use choice: [...]")
        if not (values[0] < values[1] and (kind == "uniform" or values[0] > 0)):
            raise ConfigError(f"{where}.{dotted}: uniform needs low < high" if kind == "uniform"
                              else f"{where}.{dotted}: {kind} needs 0 < low < high")
    if sum(next(iter(d)) == "logspaced" for d in space.values()) > 1:
        raise ConfigError(f"{where}: one logspaced key at most (two grids would multiply the trials)")


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
    for split in spec.by_split:
        need(split in SPLITS and isinstance(spec.by_split[split], dict),
             f"by_split: {split!r} is not a split ({', '.join(SPLITS)}) with config sections")
    need(spec.tune.split in SPLITS, f"tune.split: unknown split {spec.tune.split!r}")
    for key in ("trials", "max_epochs", "grace_epochs", "reduction_factor", "concurrent"):
        need(getattr(spec.tune, key) >= (2 if key == "reduction_factor" else 1),
             f"tune.{key} must be at least {2 if key == 'reduction_factor' else 1}")
    need(spec.tune.pretrain_max_epochs >= 0, "tune.pretrain_max_epochs must be 0 (tune.max_epochs) or more")
    need(spec.tune.grace_epochs <= min(spec.tune.epochs("pretrain"), spec.tune.max_epochs),
         "tune.grace_epochs must not exceed tune.max_epochs or tune.pretrain_max_epochs")
    need(spec.tune.cpus_per_worker >= 0, "tune.cpus_per_worker must be 0 (the stage's ray.cpus_per_worker) or more")
    check_space(spec.tune.space, "tune.space")
    check_space(spec.tune.pretrain_space, "tune.pretrain_space")
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
                for split in dict.fromkeys([*spec.splits, spec.tune.split]):
                    try:
                        stage_config(spec, stage, model, split, spec.seeds[0], variant, pretrained)
                    except ConfigError as e:
                        where = f"variant {variant}, " if variant else ""
                        name = "cldr_finetune" if pretrained else stage
                        raise ConfigError(f"{where}{name} stage of {model} on {split}: {e}") from None
