"""Checkpoints of a training run: what they hold, how they are written, checked and restored.

A checkpoint (every train.checkpoint_every optimizer steps and at each epoch end) holds:
    deepspeed/            DeepSpeed's own files; with ZeRO each rank writes its optimizer shard
                          (and, at ZeRO-3, its parameter shard)
    rng-rank{r}.pt        each rank's CPU (and CUDA) generator states and TransE's generator
    trainer_state.json    epoch, batches consumed in it, optimizer step, world size, the config
    model.pt              the consolidated fp32 model weights of this step
    best_model.pt         the weights of the best validation epoch so far (absent before the
                          first epoch ends); finetune init and `cldr evaluate` read these first
Every rank reports its directory; Ray merges them into one checkpoint directory.

Resuming is exact or refused: the batches already consumed are skipped by arithmetic on the
data plan (batch size, loader workers, data seed, shuffle buffer, accumulation, world size), so
a rerun whose plan differs would read some samples twice and skip others. `plan_changes` names
what changed, and restore refuses.
"""
from __future__ import annotations

import io
import json
import posixpath
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from cldr_dist.data import storage

STATE_FILE = "trainer_state.json"
MODEL_FILE = "model.pt"
BEST_MODEL_FILE = "best_model.pt"
DS_TAG = "deepspeed"

# Settings the skip arithmetic of a resumed epoch depends on (see data/reader.py).
DATA_PLAN_KEYS = ("train.batch_size", "train.grad_accum", "data.loader_workers", "data.seed",
                  "data.shuffle_buffer", "data.split", "data.shards")


class ResumeError(RuntimeError):
    """A checkpoint this run cannot resume exactly from; the message says why, in one line."""


@dataclass
class TrainState:
    epoch: int = 0
    batch: int = 0              # micro-batches of this epoch already consumed by each rank
    step: int = 0               # optimizer steps
    world_size: int = 1
    config_digest: str = ""
    best_score: float | None = None   # the best validation score so far (train.select_metric)
    best_epoch: int = 0               # the epoch (1-based) whose end gave it; 0: none yet
    stale_epochs: int = 0             # epochs since then, for early stopping
    metrics: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)   # the run's settings, to name what a rerun changed


def flat_settings(config: dict) -> dict[str, object]:
    """{"section.key": value} of a Config.to_dict()."""
    return {f"{s}.{k}": v for s, values in config.items() for k, v in values.items()}


def plan_changes(saved: dict, current: dict) -> tuple[list[str], list[str]]:
    """(data-plan keys that differ, other keys that differ) between two Config.to_dict()s."""
    a, b = flat_settings(saved), flat_settings(current)
    changed = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    return [k for k in changed if k in DATA_PLAN_KEYS], [k for k in changed if k not in DATA_PLAN_KEYS]


# ----------------------------------------------------------------------------- model weights

def model_weights(objective_state: dict) -> dict:
    """The CLDR model's part of an objective's state dict (its keys under `model.`); the
    objective also holds the TransE relation, which the model does not have."""
    return {k[len("model."):]: v for k, v in objective_state.items() if k.startswith("model.")}


def load_model_weights(model: torch.nn.Module, checkpoint_url: str) -> str:
    """Model weights from a checkpoint directory (local or s3://) written by the loop: the best
    validation epoch's where the checkpoint has them, else its step's. Returns the file read."""
    base = checkpoint_url.rstrip("/")
    url = storage.join(base, BEST_MODEL_FILE)
    if not storage.exists(url):
        url = storage.join(base, MODEL_FILE)
    state = torch.load(io.BytesIO(storage.read_bytes(url)), map_location="cpu", weights_only=True)
    missing, unexpected = model.load_state_dict(model_weights(state), strict=False)
    if missing or unexpected:
        raise storage.StorageError(f"{url}: weights do not fit this model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return url


def full_state_dict(engine) -> dict[str, torch.Tensor]:
    """Unpartitioned fp32 weights on every rank: the optimizer's fp32 master copy of each
    parameter (under bf16 the module holds only a rounded bf16 copy), buffers from the module.
    ZeRO gathers the partitions: a collective, call it on every rank in the same order."""
    from deepspeed.utils import safe_get_full_fp32_param
    module = engine.module
    params = dict(module.named_parameters())
    # fp32 parameters that ZeRO did not partition are the master weights already; gathering each
    # from the optimizer would cost one collective per tensor for nothing
    exact = engine.zero_optimization_stage() < 3 and all(p.dtype == torch.float32 for p in params.values())
    out = {}
    for name, value in module.state_dict().items():   # persistent buffers too, in a fixed order
        if name in params and not exact:
            master = safe_get_full_fp32_param(params[name])   # None: no ZeRO/bf16 mapping, fp32 already
            value = params[name] if master is None else master
        value = value.detach().cpu()
        out[name] = (value.float() if value.is_floating_point() else value).clone()
    return out


# ----------------------------------------------------------------------------- RNG

def rng_state(objective) -> dict:
    """Every generator a step draws from: CPU, the current CUDA device's, TransE's."""
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state()
    if hasattr(objective, "generator"):
        rng["generator"] = objective.generator.get_state()
    return rng


def set_rng_state(objective, rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng:
        if not torch.cuda.is_available():
            raise ResumeError("checkpoint holds a CUDA generator state but this worker has no GPU; "
                              "resume with ray.use_gpu=true")
        torch.cuda.set_rng_state(rng["cuda"])
    if "generator" in rng:
        objective.generator.set_state(rng["generator"])


# ----------------------------------------------------------------------------- writing

def report(metrics: dict, checkpoint=None) -> None:
    """ray.train.report of a snapshot of `metrics`. Ray keeps the dict itself until its controller
    polls the worker, and the loop goes on updating the live one: reported as is, an epoch's
    report (and checkpoint) could reach Tune carrying the next epoch's scores, and lose its own."""
    import ray.train
    ray.train.report(dict(metrics), checkpoint=checkpoint)


def save_checkpoint(engine, objective, weights: dict, state: TrainState, rank: int, metrics: dict,
                    log, best_weights: dict | None = None) -> dict:
    """Writes and reports one checkpoint (weights: full_state_dict(engine), which the caller may
    already hold for evaluation; best_weights: the best validation epoch's, carried in every
    checkpoint because Ray keeps only the newest few); returns the seconds it took and the MiB
    this rank wrote."""
    import ray.train
    t0 = time.time()
    with tempfile.TemporaryDirectory() as d:
        engine.save_checkpoint(d, tag=DS_TAG)
        torch.save(rng_state(objective), Path(d) / f"rng-rank{rank}.pt")
        if rank == 0:
            torch.save(weights, Path(d) / MODEL_FILE)
            if best_weights is not None:
                torch.save(best_weights, Path(d) / BEST_MODEL_FILE)
            Path(d, STATE_FILE).write_text(json.dumps(asdict(state), indent=1))
        size_mb = sum(f.stat().st_size for f in Path(d).rglob("*") if f.is_file()) / 2**20
        log.sync()   # rank 0's logs reach the run's storage with every checkpoint, the last one too
        report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
    seconds = time.time() - t0
    log.line(f"checkpoint at step {state.step}: {size_mb:.1f} MiB from this rank, {seconds:.1f}s")
    return {"checkpoint_s": seconds, "checkpoint_mb": size_mb}


def save_model_checkpoint(out: str | Path, config: dict, model: torch.nn.Module, metrics: dict | None = None) -> str:
    """A checkpoint holding only a model (model.pt, trainer_state.json; no DeepSpeed or RNG
    state): what `cldr evaluate` and `cldr export` read, not resumable. For models made outside
    a training run (benchmarks of prediction, tests of export)."""
    out = Path(out)
    out.mkdir(parents=True)
    torch.save({f"model.{k}": v for k, v in model.state_dict().items()}, out / MODEL_FILE)
    state = TrainState(config=config, metrics={"done": True, **(metrics or {})})
    (out / STATE_FILE).write_text(json.dumps(asdict(state), indent=1))
    return str(out)


# ----------------------------------------------------------------------------- checking

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
            saved = json.loads(f.read())
        world, has_best = int(saved["world_size"]), bool(saved.get("best_epoch"))
    except (OSError, ValueError, KeyError) as e:
        return f"unreadable: {type(e).__name__}"
    for name in (MODEL_FILE, *([BEST_MODEL_FILE] if has_best else []), *(f"rng-rank{r}.pt" for r in range(world))):
        if name not in names:
            return f"no {name}"
    ds = [n for n in names if n.startswith(DS_TAG + "/")]
    if zero_stage == 3:  # ZeRO-3 partitions the parameters too: every rank wrote its own
        for r in range(world):
            if not any(n.endswith(f"zero_pp_rank_{r}_mp_rank_00_model_states.pt") for n in ds):
                return f"no {DS_TAG}/ model states of rank {r}"
    elif not any(n.endswith("model_states.pt") for n in ds):
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


def choose_checkpoint(checkpoint, rank: int, world: int, zero_stage: int, log):
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


# ----------------------------------------------------------------------------- restoring

def check_resumable(state: TrainState, where: str, world: int, config: dict) -> list[str]:
    """Raises ResumeError if this run cannot continue `state` exactly; returns the other
    settings that changed (allowed: a longer schedule, another log interval, ...)."""
    if state.world_size != world:
        raise ResumeError(f"checkpoint {where} was written by {state.world_size} workers; "
                          f"resume with ray.num_workers={state.world_size}")
    if not state.config:
        return []
    plan, other = plan_changes(state.config, config)
    if plan:
        saved = flat_settings(state.config)
        now = flat_settings(config)
        diffs = ", ".join(f"{k} {saved.get(k)!r} -> {now.get(k)!r}" for k in plan)
        raise ResumeError(f"checkpoint {where} cannot be resumed exactly: {diffs} changed the data "
                          f"order; rerun with the checkpoint's values or use a new ray.name")
    return other


def restore_checkpoint(engine, objective, checkpoint, rank: int, world: int, config: dict,
                       log) -> tuple[TrainState, dict | None]:
    """(the run's state, the best validation epoch's weights or None)."""
    # Each rank downloads into its own directory: checkpoint.as_directory() shares one temp dir
    # per node, and two ranks restoring from S3 at once race on it (seen with Ray 2.60).
    with tempfile.TemporaryDirectory(prefix=f"cldr-restore-rank{rank}-") as d:
        checkpoint.to_directory(d)
        d = Path(d)
        if not (d / STATE_FILE).is_file():
            raise ResumeError(f"checkpoint {checkpoint.path} is incomplete: no {STATE_FILE}")
        state = TrainState(**json.loads((d / STATE_FILE).read_text()))
        other = check_resumable(state, checkpoint.path, world, config)
        rng_file = d / f"rng-rank{rank}.pt"
        if not rng_file.is_file():
            raise ResumeError(f"checkpoint {checkpoint.path} is incomplete: no {rng_file.name}")
        load_path, _ = engine.load_checkpoint(str(d), tag=DS_TAG)
        if load_path is None:
            raise ResumeError(f"checkpoint {checkpoint.path}: DeepSpeed could not load {DS_TAG}/")
        set_rng_state(objective, torch.load(rng_file, weights_only=True))
        best_file = d / BEST_MODEL_FILE
        best_weights = torch.load(best_file, weights_only=True) if best_file.is_file() else None
    if state.best_epoch and best_weights is None:
        raise ResumeError(f"checkpoint {checkpoint.path} is incomplete: no {BEST_MODEL_FILE} "
                          f"(the best validation epoch {state.best_epoch}'s weights)")
    state.config = config
    if rank == 0:
        if other:
            log.line(f"resuming with changed settings: {', '.join(other)}")
        log.line(f"resumed from {checkpoint.path}: epoch {state.epoch}, batch {state.batch}, step {state.step}")
    return state, best_weights
