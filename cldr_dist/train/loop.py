"""train_loop_per_worker: one Ray Train worker = one DeepSpeed engine on the process group
Ray created (gloo on CPU, nccl on GPU).

A checkpoint (every train.checkpoint_every optimizer steps and at each epoch end) holds:
    deepspeed/            DeepSpeed's own files; with ZeRO each rank writes its optimizer shard
    rng-rank{r}.pt        each rank's torch and TransE generator states
    trainer_state.json    epoch, batches consumed in it, optimizer step, world size, config hash
    model.pt              the consolidated model weights (for finetune init and evaluation)
Every rank reports its directory; Ray merges them into one checkpoint directory.
"""
from __future__ import annotations

import csv
import json
import logging
import math
import os
import posixpath
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from cldr_dist.config import Config, TrainConfig, config_from_dict
from cldr_dist.data import storage
from cldr_dist.data.reader import ShardSet, ShardStream, make_loader, open_shards
from cldr_dist.eval.metrics import all_metrics
from cldr_dist.models.cldr import CLDRModel, build_model

STATE_FILE = "trainer_state.json"
MODEL_FILE = "model.pt"
DS_TAG = "deepspeed"
FAULT_ENV = "CLDR_FAULT_AT_STEP"  # "STEP:MARKER_FILE" in the driver's env: the last rank dies once at STEP


@dataclass
class TrainState:
    epoch: int = 0
    batch: int = 0              # micro-batches of this epoch already consumed by each rank
    step: int = 0               # optimizer steps
    world_size: int = 1
    config_digest: str = ""
    best_val_mse: float = math.inf
    metrics: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- building

def make_model(cfg: Config, shards: ShardSet) -> CLDRModel:
    return build_model(cfg.model, cfg.loss, vocab_size=shards.manifest["tokenizer"]["vocab_size"],
                       num_cell_features=shards.features.num_cell_features,
                       text_buckets=cfg.model.text_buckets, dedup_numbers=cfg.model.dedup_numbers)


def uses_captions(cfg: Config) -> bool:
    """Whether training batches need the captions' MiniLM ids: pretraining with the MiniLM
    tower (finetuning reads only the base model's inputs)."""
    return cfg.model.text_tower == "minilm" and cfg.train.mode == "pretrain"


def build_objective(cfg: Config, shards: ShardSet, rank: int) -> torch.nn.Module:
    from cldr_dist.losses.numeric_kg import NumberTexts
    from cldr_dist.train.objectives import FinetuneObjective, PretrainObjective
    model = make_model(cfg, shards)
    if cfg.train.mode == "finetune":
        if cfg.train.init_from:
            load_model_weights(model, cfg.train.init_from)
        return FinetuneObjective(model)
    numbers = NumberTexts(shards.features, pad_to=cfg.model.number_pad_to or None)
    return PretrainObjective(model, numbers, cfg.loss, seed=cfg.train.seed * 1000 + rank)


def model_weights(objective_state: dict) -> dict:
    """The CLDR model's part of an objective's state dict (its keys under `model.`); the
    objective also holds the TransE relation, which the model does not have."""
    return {k[len("model."):]: v for k, v in objective_state.items() if k.startswith("model.")}


def load_model_weights(model: CLDRModel, checkpoint_url: str) -> None:
    """Model weights from a checkpoint directory (local or s3://) written by this loop."""
    url = storage.join(checkpoint_url.rstrip("/"), MODEL_FILE)
    import io
    state = torch.load(io.BytesIO(storage.read_bytes(url)), map_location="cpu", weights_only=True)
    missing, unexpected = model.load_state_dict(model_weights(state), strict=False)
    if missing or unexpected:
        raise storage.StorageError(f"{url}: weights do not fit this model (missing {missing[:3]}, unexpected {unexpected[:3]})")


def deepspeed_config(train: TrainConfig, use_gpu: bool) -> dict:
    path = Path(train.deepspeed_config)
    if not path.is_file():
        raise FileNotFoundError(f"DeepSpeed config not found: {path}")
    ds = json.loads(path.read_text())
    ds.update(train_micro_batch_size_per_gpu=train.batch_size,
              gradient_accumulation_steps=train.grad_accum,
              gradient_clipping=train.grad_clip)
    ds["bf16"] = {"enabled": bool(use_gpu)}
    return ds


def full_state_dict(engine) -> dict[str, torch.Tensor]:
    """Unpartitioned weights on every rank (ZeRO-3 gathers them: a collective, call on all)."""
    import deepspeed
    module = engine.module
    if engine.zero_optimization_stage() == 3:
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}
    return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}


# ----------------------------------------------------------------------------- logging

class RunLog:
    """Rank 0's record of the run: a CSV and TensorBoard under log_dir, a line every N steps."""

    def __init__(self, log_dir: str | None, mode: str, rank: int):
        self.mode, self.t0, self.rank = mode, time.time(), rank
        self.csv = self.tb = None
        if log_dir:
            Path(log_dir).mkdir(parents=True, exist_ok=True)
            path = Path(log_dir) / f"{mode}_metrics.csv"
            new = not path.exists()
            self.csv_file = open(path, "a", newline="")
            self.csv = csv.writer(self.csv_file)
            if new:
                self.csv.writerow(["time", "epoch", "step", "name", "value"])
            from tensorboardX import SummaryWriter
            self.tb = SummaryWriter(str(Path(log_dir) / "tensorboard" / mode))

    def scalars(self, epoch: int, step: int, values: dict[str, float]) -> None:
        if self.csv:
            now = round(time.time() - self.t0, 3)
            for k, v in values.items():
                self.csv.writerow([now, epoch, step, k, v])
                self.tb.add_scalar(f"{self.mode}/{k}", v, step)
            self.csv_file.flush()

    def line(self, text: str) -> None:
        if self.rank == 0:
            print(f"[{self.mode}] {text}", flush=True)


# ----------------------------------------------------------------------------- checkpoints

def save_checkpoint(engine, objective, weights: dict, state: TrainState, rank: int, metrics: dict,
                    log: RunLog) -> dict:
    """Writes and reports one checkpoint (weights: full_state_dict(engine), which the caller may
    already hold for evaluation); returns the seconds it took and the MiB this rank wrote."""
    import ray.train
    t0 = time.time()
    with tempfile.TemporaryDirectory() as d:
        engine.save_checkpoint(d, tag=DS_TAG)
        rng = {"torch": torch.get_rng_state()}
        if hasattr(objective, "generator"):
            rng["generator"] = objective.generator.get_state()
        torch.save(rng, Path(d) / f"rng-rank{rank}.pt")
        if rank == 0:
            torch.save(weights, Path(d) / MODEL_FILE)
            Path(d, STATE_FILE).write_text(json.dumps(asdict(state), indent=1))
        size_mb = sum(f.stat().st_size for f in Path(d).rglob("*") if f.is_file()) / 2**20
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
    seconds = time.time() - t0
    log.line(f"checkpoint at step {state.step}: {size_mb:.1f} MiB from this rank, {seconds:.1f}s")
    return {"checkpoint_s": seconds, "checkpoint_mb": size_mb}


def checkpoint_problem(fs, path: str, zero_stage: int) -> str | None:
    """What a checkpoint directory lacks (None: complete). A rank that died mid-upload, or a
    file lost afterwards, leaves such a hole. Ranks are counted from the checkpoint's own
    world size, so resuming with another ray.num_workers still gets restore's clear error."""
    from pyarrow.fs import FileSelector, FileType
    try:
        infos = fs.get_file_info(FileSelector(path, recursive=True))
        names = {posixpath.relpath(i.path, path) for i in infos if i.type == FileType.File}
        if STATE_FILE not in names:
            return f"no {STATE_FILE}"
        with fs.open_input_stream(posixpath.join(path, STATE_FILE)) as f:
            world = int(json.loads(f.read())["world_size"])
    except (OSError, ValueError, KeyError) as e:
        return f"unreadable: {type(e).__name__}"
    for name in (MODEL_FILE, *(f"rng-rank{r}.pt" for r in range(world))):
        if name not in names:
            return f"no {name}"
    ds = [n for n in names if n.startswith(DS_TAG + "/")]
    if not any(n.endswith("model_states.pt") for n in ds):
        return f"no {DS_TAG}/ model states"
    if zero_stage > 0:  # ZeRO partitions the optimizer: every rank wrote its own shard
        for r in range(world):
            if not any(n.endswith(f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt") for n in ds):
                return f"no {DS_TAG}/ optimizer shard of rank {r}"
    return None


def usable_checkpoint(checkpoint, zero_stage: int):
    """(rank 0) The checkpoint to resume from: the one Ray handed over if it is complete, else
    the newest older complete one in the same run directory (Ray names them
    checkpoint_<timestamp>, so name order is age order), else None. Returns (path, warning)."""
    from pyarrow.fs import FileSelector, FileType
    fs, path = checkpoint.filesystem, checkpoint.path.rstrip("/")
    problem = checkpoint_problem(fs, path, zero_stage)
    if problem is None:
        return path, None
    run_dir, handed = posixpath.split(path)
    siblings = sorted((i.base_name for i in fs.get_file_info(FileSelector(run_dir))
                       if i.type == FileType.Directory and i.base_name.startswith("checkpoint_")
                       and i.base_name < handed), reverse=True)
    for name in siblings:
        older = posixpath.join(run_dir, name)
        if checkpoint_problem(fs, older, zero_stage) is None:
            return older, f"warning: checkpoint {path} is incomplete ({problem}); resuming from {older}"
    return None, (f"warning: checkpoint {path} is incomplete ({problem}) and no older complete "
                  f"checkpoint is left in {run_dir}; starting from scratch")


def choose_checkpoint(checkpoint, rank: int, world: int, zero_stage: int, log: RunLog):
    """The checkpoint every rank restores (or None): rank 0 decides and broadcasts, so that
    ranks never resume from different steps even if storage changes while they look."""
    import ray.train
    choice = [None]
    if rank == 0:
        path, warning = usable_checkpoint(checkpoint, zero_stage)
        if warning:
            log.line(warning)
        choice = [path]
    if world > 1:
        dist.broadcast_object_list(choice, src=0)
    if choice[0] is None:
        return None
    if choice[0] == checkpoint.path.rstrip("/"):
        return checkpoint
    return ray.train.Checkpoint(choice[0], filesystem=checkpoint.filesystem)


def restore_checkpoint(engine, objective, checkpoint, rank: int, world: int, digest: str, log: RunLog) -> TrainState:
    # Each rank downloads into its own directory: checkpoint.as_directory() shares one temp dir
    # per node, and two ranks restoring from S3 at once race on it (seen with Ray 2.60).
    with tempfile.TemporaryDirectory(prefix=f"cldr-restore-rank{rank}-") as d:
        checkpoint.to_directory(d)
        d = Path(d)
        if not (d / STATE_FILE).is_file():
            raise RuntimeError(f"checkpoint {checkpoint.path} is incomplete: no {STATE_FILE}")
        state = TrainState(**json.loads((d / STATE_FILE).read_text()))
        if state.world_size != world:
            raise RuntimeError(f"checkpoint {checkpoint.path} was written by {state.world_size} workers; "
                               f"resume with ray.num_workers={state.world_size}")
        rng_file = d / f"rng-rank{rank}.pt"
        if not rng_file.is_file():
            raise RuntimeError(f"checkpoint {checkpoint.path} is incomplete: no {rng_file.name}")
        load_path, _ = engine.load_checkpoint(str(d), tag=DS_TAG)
        if load_path is None:
            raise RuntimeError(f"checkpoint {checkpoint.path}: DeepSpeed could not load {DS_TAG}/")
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["torch"])
        if "generator" in rng:
            objective.generator.set_state(rng["generator"])
    if state.config_digest != digest and rank == 0:
        log.line(f"warning: checkpoint config hash {state.config_digest} differs from this run's {digest}")
    if rank == 0:
        log.line(f"resumed from {checkpoint.path}: epoch {state.epoch}, batch {state.batch}, step {state.step}")
    return state


# ----------------------------------------------------------------------------- evaluation

def plain_copy(cfg: Config, shards: ShardSet, weights: dict) -> CLDRModel:
    """The model outside DeepSpeed, from full_state_dict weights: its forward runs no
    collectives, so ranks with uneven evaluation shares cannot hang (ZeRO-3 included)."""
    model = make_model(cfg, shards)
    model.load_state_dict(model_weights(weights))
    return model.eval()


def evaluate(cfg: Config, shards: ShardSet, model: CLDRModel, part: str, rank: int, world: int,
             zero_shot: bool) -> dict[str, float]:
    """Metrics of one part on every rank: each rank predicts its share with a model that runs no
    collectives (plain_copy, or the reference path's own), then predictions are gathered."""
    from cldr_dist.eval.zeroshot import zeroshot_predict
    from cldr_dist.losses.numeric_kg import NumberTexts
    model.eval()
    stream = ShardStream(shards, cfg.data.split, part, batch_size=cfg.train.batch_size, rank=rank,
                         world_size=world, seed=cfg.data.seed, shuffle=False, drop_last=False,
                         caption_pad_to=cfg.model.caption_pad_to or None,
                         number_pad_to=cfg.model.number_pad_to or None,
                         wordpiece=zero_shot and cfg.model.text_tower == "minilm")
    ys, preds, drugs, batches = [], [], [], []
    with torch.no_grad():
        for batch in make_loader(stream, 0):
            preds.append(model.drp(batch)[0].numpy())
            ys.append(batch.y.numpy())
            drugs.extend(batch.drug_ids)
            if zero_shot and sum(len(b) for b in batches) < cfg.train.zeroshot_samples // world:
                batches.append(batch)
    local = {"y": np.concatenate(ys) if ys else np.zeros(0), "p": np.concatenate(preds) if preds else np.zeros(0),
             "drugs": drugs}
    if zero_shot and batches:
        local["zs_y"], local["zs_p"] = zeroshot_predict(model, batches, NumberTexts(shards.features))
    gathered = [local]
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, local)
    y = np.concatenate([g["y"] for g in gathered])
    p = np.concatenate([g["p"] for g in gathered])
    out = {f"{part}_{k}": v for k, v in all_metrics(y, p).items()}
    out[f"{part}_samples"] = int(len(y))
    if zero_shot and "zs_y" in gathered[0]:
        zy = np.concatenate([g["zs_y"] for g in gathered if "zs_y" in g])
        zp = np.concatenate([g["zs_p"] for g in gathered if "zs_p" in g])
        out[f"{part}_zeroshot_pcc"] = all_metrics(zy, zp)["pcc"]
    return out


# ----------------------------------------------------------------------------- the loop

def _fault_injection(spec: str | None, step: int, rank: int, world: int) -> None:
    """The fault tests' hook: kill this worker process once, abruptly, at a given step."""
    if not spec or rank != world - 1:
        return
    at, marker = spec.split(":", 1)
    if step == int(at) and not Path(marker).exists():
        Path(marker).write_text(f"rank {rank} killed at step {step}\n")
        os._exit(1)  # abrupt, like a lost process: no cleanup, no report


def _mean_over_ranks(values: dict[str, torch.Tensor], world: int) -> dict[str, float]:
    keys = sorted(values)
    t = torch.stack([values[k].detach().float().cpu() for k in keys])
    if world > 1:
        dist.all_reduce(t)
        t /= world
    return {k: float(v) for k, v in zip(keys, t)}


def _quiet_ray_train_reports() -> None:
    """Ray Train logs every report with its full metrics dict at INFO, once per worker: with a
    report every log_every steps that buries the progress lines."""
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    try:
        from ray.train.v2._internal.execution import context as ray_context
        logging.getLogger(ray_context.__file__).setLevel(logging.WARNING)  # that module logs by file name
    except ImportError:
        pass


def train_loop_per_worker(config: dict) -> None:
    import deepspeed
    import ray.train
    import ray.train.torch

    _quiet_ray_train_reports()
    cfg = config_from_dict(config["cfg"])
    log_dir = config.get("log_dir")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    storage.set_endpoint(cfg.storage.endpoint_url)
    torch.manual_seed(cfg.train.seed + rank)  # dropout masks differ per rank, reproducibly
    torch.set_num_threads(max(1, int(cfg.ray.cpus_per_worker)))
    device = ray.train.torch.get_device() if cfg.ray.use_gpu else torch.device("cpu")
    log = RunLog(log_dir if rank == 0 else None, cfg.train.mode, rank)

    shards = open_shards(cfg.data.shards)
    objective = build_objective(cfg, shards, rank)
    optimizer = torch.optim.AdamW(objective.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    engine, *_ = deepspeed.initialize(model=objective, optimizer=optimizer,
                                      config=deepspeed_config(cfg.train, cfg.ray.use_gpu))
    digest = cfg.digest()
    state = TrainState(world_size=world, config_digest=digest)
    timings: dict[str, float] = {}  # last checkpoint save / restore, carried into the metrics
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        checkpoint = choose_checkpoint(checkpoint, rank, world, engine.zero_optimization_stage(), log)
    if checkpoint:
        t0 = time.time()
        state = restore_checkpoint(engine, objective, checkpoint, rank, world, digest, log)
        timings["restore_s"] = time.time() - t0

    stream = ShardStream(shards, cfg.data.split, "train", batch_size=cfg.train.batch_size, rank=rank,
                         world_size=world, seed=cfg.data.seed, shuffle=True, drop_last=True,
                         shuffle_buffer=cfg.data.shuffle_buffer,
                         caption_pad_to=cfg.model.caption_pad_to or None,
                         number_pad_to=cfg.model.number_pad_to or None,
                         wordpiece=uses_captions(cfg))
    accum = cfg.train.grad_accum
    steps_per_epoch = len(stream) // accum
    if steps_per_epoch == 0:
        raise ValueError(f"{cfg.data.split}/train has {sum(stream.sizes)} samples: too few for "
                         f"{world} workers x batch {cfg.train.batch_size} x grad_accum {accum}")
    epoch_batches = steps_per_epoch * accum  # a short accumulation tail would leak into the next epoch
    total_steps = steps_per_epoch * cfg.train.epochs
    if cfg.train.max_steps:
        total_steps = min(total_steps, cfg.train.max_steps)
    global_batch = cfg.train.batch_size * world
    if rank == 0 and not checkpoint:
        log.line(f"{world} workers, ZeRO-{engine.zero_optimization_stage()}, global batch {global_batch} "
                 f"x accum {accum}, {steps_per_epoch} steps/epoch, {total_steps} steps, device {device}")
    zero_shot = cfg.train.mode == "pretrain"

    def end_of_epoch_metrics(weights: dict) -> dict:
        model = plain_copy(cfg, shards, weights)
        out = evaluate(cfg, shards, model, "val", rank, world, zero_shot)
        if cfg.train.mode == "finetune" and out["val_mse"] < state.best_val_mse:
            state.best_val_mse = out["val_mse"]
            out.update({f"best_{k}": v for k, v in evaluate(cfg, shards, model, "test", rank, world, False).items()})
            out["best_epoch"] = state.epoch
        return out

    window_t, window_samples = time.time(), 0
    while state.step < total_steps:
        stream.epoch, stream.start_batch = state.epoch, state.batch
        for batch in make_loader(stream, cfg.data.loader_workers):
            loss, parts = engine(batch.to(device))
            engine.backward(loss)
            engine.step()
            state.batch += 1
            window_samples += len(batch) * world
            if state.batch % accum:
                continue
            state.step += 1
            _fault_injection(config.get("fault"), state.step, rank, world)
            if state.step % cfg.train.log_every == 0 or state.step == total_steps:
                values = _mean_over_ranks({"loss": loss, **parts}, world)
                values["lr"] = optimizer.param_groups[0]["lr"]
                values["samples_per_s"] = window_samples / max(time.time() - window_t, 1e-9)
                window_t, window_samples = time.time(), 0
                log.scalars(state.epoch, state.step, values)
                log.line(f"epoch {state.epoch + 1}/{cfg.train.epochs} step {state.step}/{total_steps} "
                         + " ".join(f"{k} {v:.4g}" for k, v in values.items()))
                state.metrics = {"step": state.step, "epoch": state.epoch, **values, **timings}
                ray.train.report(state.metrics)
            if state.step >= total_steps or state.batch >= epoch_batches:
                break
            if cfg.train.checkpoint_every and state.step % cfg.train.checkpoint_every == 0:
                timings.update(save_checkpoint(engine, objective, full_state_dict(engine), state, rank,
                                               state.metrics, log))
                window_t, window_samples = time.time(), 0  # samples/s measures training only
        if state.batch >= epoch_batches:  # the epoch ran to its end
            state.epoch, state.batch = state.epoch + 1, 0
            weights = full_state_dict(engine)
            epoch_metrics = end_of_epoch_metrics(weights)
            state.metrics.update(epoch_metrics)
            log.scalars(state.epoch, state.step, epoch_metrics)
            log.line(f"end of epoch {state.epoch}: " + " ".join(f"{k} {v:.4g}" for k, v in epoch_metrics.items()
                                                               if k.startswith(("val_pcc", "val_mse", "val_zero", "best_test_pcc"))))
            if state.step < total_steps:
                timings.update(save_checkpoint(engine, objective, weights, state, rank, state.metrics, log))
            window_t, window_samples = time.time(), 0

    weights = full_state_dict(engine)
    final = evaluate(cfg, shards, plain_copy(cfg, shards, weights), "test", rank, world, zero_shot)
    state.metrics.update(final)
    state.metrics["done"] = True
    log.scalars(state.epoch, state.step, final)
    log.line("test: " + " ".join(f"{k} {v:.4g}" for k, v in final.items()))
    save_checkpoint(engine, objective, weights, state, rank, state.metrics, log)
