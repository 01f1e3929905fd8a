"""Every setting is a field of a dataclass below. A run's settings come from a YAML file
(configs/*.yaml, sections named as the fields of `Config`) and then `section.key=value`
overrides from the command line; unknown keys and wrong types are errors that name the key.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from cldr_dist.train.schedule import LR_SCALING, SCHEDULES, SELECTABLE


ENCODINGS = ("entity", "per_pair", "drugs_only")   # TrainConfig.encoding
KG_FORMS = ("sampled", "all")                      # LossConfig.kg_form
SELECTIONS = ("best_val", "last")                  # TrainConfig.select


class ConfigError(Exception):
    """A user-facing problem with a config file or override; the message names the key."""


@dataclass
class DataConfig:
    data_dir: str = "data/gdsc_v17/tiny"          # dataset directory in the gdsc_v17 format
    shards: str = "shards/tiny"                   # local directory or s3://bucket/prefix
    held_out_drugs: str = "data/gdsc_v17/drug_blind_test_drugs.txt"
    splits: list[str] = field(default_factory=lambda: ["mixed", "cell_blind", "drug_blind"])
    fractions: list[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])
    seed: int = 171
    samples_per_shard: int = 2000
    vocab_size: int = 2000
    split: str = "drug_blind"                     # the split a training run reads
    loader_workers: int = 1                       # DataLoader worker processes per rank
    shuffle_buffer: int = 2000
    memory_budget_mb: int = 1024                  # decode a training part once and keep it in RAM when its
                                                  # bound (data/reader.py decoded_part_bound) fits; 0 = always stream


@dataclass
class StorageConfig:
    endpoint_url: str = ""          # S3 endpoint; empty means AWS_ENDPOINT_URL or AWS's default


@dataclass
class ModelConfig:
    drp: str = "graphdrp"           # base model: graphdrp | tcnn | deepcdr
    embed_dim: int = 256            # the fused sample embedding (layer before the regression head)
    dropout: float = -1.0           # < 0: the base model's published rate (GraphDRP 0.5, tCNNs 0.0, DeepCDR 0.1)
    text_width: int = 128
    text_layers: int = 3
    text_heads: int = 8
    caption_context: int = 300
    number_context: int = 100
    caption_pad_to: int = 0         # 0 pads to the longest caption in the batch; 300 = the paper
    number_pad_to: int = 0          # 0 pads to the longest number text; 100 = the paper
    text_buckets: int = 4           # length buckets per batch (of captions, or of drugs' shared caption prefixes); 0: as padded (the paper)
    dedup_numbers: bool = True      # encode each distinct number text of a batch once
    text_tower: str = "scratch"     # scratch: the paper's towers on our BPE ids | minilm: pretrained all-MiniLM-L6-v2
    minilm_trainable_layers: int = 0  # minilm: top layers of its 6 that train; 0 = frozen, only projections + MLP train


@dataclass
class LossConfig:
    clip_weight: float = 0.9
    kg_weight: float = 0.1
    kg_margin: float = 1.0
    kg_train_relation: bool = True  # False reproduces the original code's frozen relation vector
    kg_form: str = "sampled"        # sampled: kg_triples a step, normalised, mean | all: CLDR's, all 1000
                                    # number texts and the loss summed over the 999 triples every step
    kg_triples: int = 256           # kg_form=sampled: TransE triples (and as many corrupted ones) per step
    init_logit_scale: float = 2.659260036932778   # log(1 / 0.07)
    max_logit_scale: float = 100.0


@dataclass
class TrainConfig:
    mode: str = "pretrain"          # pretrain | finetune
    epochs: int = 2
    max_steps: int = 0              # 0: no cap beyond epochs
    batch_size: int = 64            # per worker; the contrastive negatives are the global batch
    lr: float = 5e-5                # peak rate after warmup; train/schedule.py
    lr_scaling: str = "none"        # none: lr is the global batch's | linear | sqrt: lr is for lr_base_batch pairs
    lr_base_batch: int = 256
    lr_schedule: str = "cosine"     # constant | cosine | linear decay after the warmup, to min_lr_ratio * lr
    warmup_epochs: float = 0.0      # linear warmup over this many epochs of optimizer steps
    min_lr_ratio: float = 0.0
    patience: int = 0               # stop after this many epochs without a better validation score; 0 = never
    select: str = "best_val"        # the weights a run keeps and tests: best_val = its best validation
                                    # epoch's | last = its last epoch's (a fixed epoch budget)
    select_metric: str = ""         # the validation number best_val and patience follow: val_mse |
                                    # val_pcc | ... (train/schedule.py); empty: val_mse to finetune,
                                    # val_zeroshot_pcc to pretrain
    test_at_end: bool = True        # false: no test pass (tuning trials never look at test)
    stop_epoch: int = 0             # > 0: stop after this many epochs of an `epochs`-long schedule
    weight_decay: float = 0.0
    grad_accum: int = 1
    grad_clip: float = 1.0
    seed: int = 171
    log_every: int = 10
    checkpoint_every: int = 0       # steps; 0 = only at the end of each epoch
    keep_checkpoints: int = 2
    init_from: str = ""             # finetune: a pretrain checkpoint URL (directory)
    deepspeed_config: str = "configs/deepspeed/zero2.json"
    zeroshot_samples: int = 2000    # zero-shot PCC on this many val/test samples (1000 texts each)
    eval_batch_size: int = 4096     # pairs per validation/test batch: inference only, so far larger
                                    # than training's (each batch encodes its distinct drugs and cells once)
    precision: str = "auto"         # auto: bf16 on GPU, fp32 on CPU | bf16 | fp32
    # entity: each distinct drug, cell line and caption prefix of a batch is encoded once, only
    # pair-level layers run per pair | per_pair: every pair encodes its own (the exact reference)
    # | drugs_only: drugs once per batch, cells and captions per pair (training before entity
    # steps; the throughput benchmark's baseline)
    encoding: str = "entity"


@dataclass
class RayConfig:
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1
    storage_path: str = "runs"      # local path or s3://bucket/prefix
    name: str = "demo"
    max_failures: int = 0
    placement_strategy: str = "PACK"  # PACK | SPREAD (one worker per node where possible)
    address: str = ""               # empty: a local Ray instance, "auto": the running cluster
    # With an address, every path a worker reads or writes (data.shards, ray.storage_path,
    # train.init_from) must be s3://: a local path exists only on the node that named it.
    # true: the cluster's nodes share a filesystem (NFS, FSx, ...) mounted at the same path.
    shared_fs: bool = False
    # The niceness of the processes the run starts on Ray (training workers, their loader workers,
    # Tune's trials). 15 is Ray's own default, so that its daemons win the CPU. On a node where
    # other nice-0 work competes for the CPUs, a CPU-bound trainer at 15 yields to all of it; 0
    # gives the trainer a fair share: 1.35x the samples/s beside one busy process (medians), the same when
    # the node is otherwise idle (docs/benchmarks_niceness.md).
    worker_niceness: int = 15


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def coerce(value, tp, key: str):
    origin = typing.get_origin(tp)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise ConfigError(f"config key {key}: expected a list, got {value!r}")
        return [coerce(v, item_tp, key) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"config key {key}: expected true/false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"config key {key}: expected {tp.__name__}, got {value!r}")
        try:
            out = tp(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config key {key}: expected {tp.__name__}, got {value!r}") from None
        if tp is int and isinstance(value, float) and value != out:
            raise ConfigError(f"config key {key}: expected int, got {value!r}")
        return out
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"config key {key}: expected a string, got {value!r}")
        return "" if value is None else str(value)
    return value


def apply_setting(cfg: Config, section: str, key: str, value) -> None:
    sections = {f.name: f for f in dataclasses.fields(Config)}
    if section not in sections:
        raise ConfigError(f"unknown config section {section!r}; known: {', '.join(sections)}")
    obj = getattr(cfg, section)
    hints = typing.get_type_hints(type(obj))
    if key not in hints:
        raise ConfigError(f"unknown config key {section}.{key}; known: {', '.join(hints)}")
    setattr(obj, key, coerce(value, hints[key], f"{section}.{key}"))


def read_sections(path: str | Path, what: str = "config") -> dict[str, dict]:
    """A YAML file of sections (mappings), or a one-line ConfigError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    for section, values in raw.items():
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: section {section!r} must be a mapping")
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    cfg = Config()
    if path:
        for section, values in read_sections(path).items():
            for key, value in values.items():
                apply_setting(cfg, section, key, value)
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        dotted, value = item.split("=", 1)
        section, key = dotted.split(".", 1)
        apply_setting(cfg, section, key, yaml.safe_load(value) if value else "")
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    def need(ok: bool, msg: str):
        if not ok:
            raise ConfigError(msg)
    need(cfg.model.drp in ("graphdrp", "tcnn", "deepcdr"), f"model.drp: unknown base model {cfg.model.drp!r}; choose graphdrp, tcnn or deepcdr")
    need(cfg.train.mode in ("pretrain", "finetune"), f"train.mode: {cfg.train.mode!r} is not pretrain or finetune")
    need(cfg.data.split in ("mixed", "cell_blind", "drug_blind"), f"data.split: unknown split {cfg.data.split!r}")
    need(all(s in ("mixed", "cell_blind", "drug_blind") for s in cfg.data.splits), f"data.splits: unknown split in {cfg.data.splits}")
    need(len(cfg.data.fractions) == 3 and all(f > 0 for f in cfg.data.fractions), "data.fractions: need three positive numbers (train, val, test)")
    for key in ("data.samples_per_shard", "data.vocab_size", "train.batch_size", "train.eval_batch_size", "train.grad_accum", "ray.num_workers", "data.shuffle_buffer"):
        section, name = key.split(".")
        need(getattr(getattr(cfg, section), name) >= 1, f"{key} must be at least 1")
    need(cfg.train.lr > 0, "train.lr must be positive")
    need(cfg.loss.kg_form in KG_FORMS, f"loss.kg_form: {cfg.loss.kg_form!r} is not one of {', '.join(KG_FORMS)}")
    need(cfg.model.dropout < 1, "model.dropout must be below 1 (negative: the base model's published rate)")
    need(cfg.train.lr_schedule in SCHEDULES, f"train.lr_schedule: {cfg.train.lr_schedule!r} is not one of {', '.join(SCHEDULES)}")
    need(cfg.train.lr_scaling in LR_SCALING, f"train.lr_scaling: {cfg.train.lr_scaling!r} is not one of {', '.join(LR_SCALING)}")
    need(cfg.train.lr_base_batch >= 1, "train.lr_base_batch must be at least 1")
    need(cfg.train.warmup_epochs >= 0, "train.warmup_epochs must be 0 or more")
    need(0 <= cfg.train.min_lr_ratio <= 1, "train.min_lr_ratio must be between 0 and 1")
    need(cfg.train.patience >= 0, "train.patience must be 0 (no early stopping) or more")
    need(0 <= cfg.train.stop_epoch <= cfg.train.epochs, "train.stop_epoch must be between 0 (all epochs) and train.epochs")
    need(cfg.train.select in SELECTIONS, f"train.select: {cfg.train.select!r} is not one of {', '.join(SELECTIONS)}")
    need(cfg.train.select == "best_val" or not cfg.train.patience,
         "train.patience: early stopping needs train.select=best_val (select=last trains a fixed number of epochs)")
    need(not cfg.train.select_metric or cfg.train.select_metric in SELECTABLE[cfg.train.mode],
         f"train.select_metric: {cfg.train.select_metric!r} is not one of {', '.join(SELECTABLE.get(cfg.train.mode, ()))} "
         f"(train.mode={cfg.train.mode})")
    need(cfg.train.encoding in ENCODINGS, f"train.encoding: {cfg.train.encoding!r} is not one of {', '.join(ENCODINGS)}")
    need(cfg.train.precision in ("auto", "bf16", "fp32"), f"train.precision: {cfg.train.precision!r} is not auto, bf16 or fp32")
    need(cfg.ray.placement_strategy in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"), f"ray.placement_strategy: unknown strategy {cfg.ray.placement_strategy!r}")
    need(0 <= cfg.ray.worker_niceness <= 19, "ray.worker_niceness must be between 0 and 19 (a negative one needs root)")
    need(cfg.data.loader_workers >= 0, "data.loader_workers must be 0 or more")
    need(cfg.data.memory_budget_mb >= 0, "data.memory_budget_mb must be 0 (always stream) or more")
    need(cfg.model.text_tower in ("scratch", "minilm"), f"model.text_tower: {cfg.model.text_tower!r} is not scratch or minilm")
    # all-MiniLM-L6-v2 has 6 transformer layers (models/minilm.py checks the loaded model too)
    need(0 <= cfg.model.minilm_trainable_layers <= 6, "model.minilm_trainable_layers must be between 0 and 6")
    check_shared_storage(cfg)


# What the workers of a run read or write: on a cluster every node must reach them.
WORKER_PATHS = ("data.shards", "ray.storage_path", "train.init_from")


def check_shared_storage(cfg: Config, names: dict[str, str] | None = None) -> None:
    """On a cluster (ray.address set) the workers land on any node: a local path there is
    another node's disk, or nothing. names: how a key is called in the caller's file (the
    experiment's common.ray.storage_path)."""
    if not cfg.ray.address or cfg.ray.shared_fs:
        return
    for key in WORKER_PATHS:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value and not str(value).startswith("s3://"):
            raise ConfigError(f"{(names or {}).get(key, key)}: {value!r} is a local path; it must be shared storage "
                              f"(s3://...) when ray.address is set (ray.shared_fs=true if every node mounts it)")


def config_from_dict(d: dict) -> Config:
    """Inverse of Config.to_dict (how a config travels to Ray workers), validated again."""
    cfg = Config()
    for section, values in d.items():
        for key, value in values.items():
            apply_setting(cfg, section, key, value)
    validate(cfg)
    return cfg
