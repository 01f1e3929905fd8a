"""train_loop_per_worker: one Ray Train worker = one DeepSpeed engine on the process group
Ray created (gloo on CPU; gloo for CPU tensors and nccl for CUDA tensors on GPU).

Checkpoint contents and the resume rules: train/checkpoint.py. Evaluation reads the fp32
weights (full_state_dict) into a plain copy of the model on the worker's device.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from cldr_dist.config import Config, TrainConfig, config_from_dict
from cldr_dist.data import storage
from cldr_dist.data.reader import ShardError, ShardSet, ShardStream, fits_in_memory, make_loader, open_shards
from cldr_dist.eval.metrics import all_metrics, ignores_cell_line, mean_per_drug_pcc, within_drug_spread
from cldr_dist.models.cldr import CLDRModel, model_for_data
from cldr_dist.train.checkpoint import (TrainState, choose_checkpoint, full_state_dict, load_model_weights,
                                        model_weights, report, restore_checkpoint, save_checkpoint)
from cldr_dist.train.device import select_accelerator
from cldr_dist.train.runlog import RunLog
from cldr_dist.train.schedule import lr_at, scaled_lr, select_metric, takes_selection

EPOCH_LINE_KEYS = ("val_pcc", "val_mse", "val_drug_pcc", "val_zero", "number_hits", "best_epoch")
FAULT_ENV = "CLDR_FAULT_AT_STEP"  # "STEP:MARKER_FILE" in the driver's env: the last rank dies once at STEP


# ----------------------------------------------------------------------------- building

def make_model(cfg: Config, shards: ShardSet) -> CLDRModel:
    return model_for_data(cfg, shards.manifest["tokenizer"]["vocab_size"], shards.features.num_cell_features)


def uses_bf16(train: TrainConfig, use_gpu: bool) -> bool:
    """train.precision auto: bf16 on GPU, fp32 on CPU."""
    return train.precision == "bf16" or (train.precision == "auto" and use_gpu)


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


def deepspeed_config(train: TrainConfig, use_gpu: bool) -> dict:
    path = Path(train.deepspeed_config)
    if not path.is_file():
        raise FileNotFoundError(f"DeepSpeed config not found: {path}")
    ds = json.loads(path.read_text())
    ds.update(train_micro_batch_size_per_gpu=train.batch_size,
              gradient_accumulation_steps=train.grad_accum,
              gradient_clipping=train.grad_clip)
    ds["bf16"] = {"enabled": uses_bf16(train, use_gpu)}
    return ds


# ----------------------------------------------------------------------------- evaluation

def plain_copy(cfg: Config, shards: ShardSet, weights: dict, device: torch.device | str = "cpu") -> CLDRModel:
    """The model outside DeepSpeed, in fp32 from full_state_dict weights, on `device`: its
    forward runs no collectives, so ranks with uneven evaluation shares cannot hang."""
    model = make_model(cfg, shards)
    model.load_state_dict(model_weights(weights))
    return model.to(device).eval()


def evaluate(cfg: Config, shards: ShardSet, model: CLDRModel, part: str, rank: int, world: int,
             zero_shot: bool, device: torch.device | str = "cpu", relation: torch.Tensor | None = None
             ) -> dict[str, float]:
    """Metrics of one part on every rank: each rank predicts its share (eval/predict.py's
    stream) with a model that runs no collectives, then predictions are gathered. With the
    TransE relation, also whether it orders the number texts (number_hits10: the fraction
    whose successor is among the 10 texts nearest to text + relation)."""
    from cldr_dist.eval.predict import predict_part
    from cldr_dist.eval.zeroshot import zeroshot_predict
    from cldr_dist.losses.numeric_kg import NumberTexts, successor_hits
    keep = cfg.train.zeroshot_samples // world if zero_shot else 0
    pred = predict_part(cfg, shards, model, part, rank, world, device=device, keep_samples=keep,
                        wordpiece=zero_shot and cfg.model.text_tower == "minilm")
    local = {"y": pred["y"], "p": pred["p"], "drug_ids": pred["drug_ids"]}
    numbers = NumberTexts(shards.features) if pred["batches"] or relation is not None else None
    if pred["batches"]:
        local["zs_y"], local["zs_p"] = zeroshot_predict(model, pred["batches"], numbers)
    gathered = [local]
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, local)
    y = np.concatenate([g["y"] for g in gathered])
    p = np.concatenate([g["p"] for g in gathered])
    out = {f"{part}_{k}": v for k, v in all_metrics(y, p).items()}
    out[f"{part}_samples"] = int(len(y))
    drugs = np.concatenate([g["drug_ids"] for g in gathered])
    drug_pcc = mean_per_drug_pcc(y, p, drugs)
    if drug_pcc is not None:
        out[f"{part}_drug_pcc"] = drug_pcc
    spread = within_drug_spread(p, drugs)
    if spread is not None:
        out[f"{part}_within_drug_std"] = spread
    if any("zs_y" in g for g in gathered):
        zy = np.concatenate([g["zs_y"] for g in gathered if "zs_y" in g])
        zp = np.concatenate([g["zs_p"] for g in gathered if "zs_p" in g])
        out[f"{part}_zeroshot_pcc"] = all_metrics(zy, zp)["pcc"]
    if relation is not None:
        with torch.no_grad():
            feats = model.encode_number_texts(numbers.ids.to(device), numbers.lens.to(device),
                                              numbers.index.to(device))
        out["number_hits10"] = successor_hits(feats, relation, normalise=cfg.loss.kg_form == "sampled")
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


def _mean_over_ranks(values: dict[str, torch.Tensor], world: int, device: torch.device | str = "cpu") -> dict[str, float]:
    """Means over ranks, reduced on the worker's device (an NCCL group moves CUDA tensors only)."""
    keys = sorted(values)
    t = torch.stack([torch.as_tensor(values[k]).detach().float().to(device) for k in keys])
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


def clamp_logit_scale(engine, objective, max_scale: float) -> None:
    """Keeps the CLIP temperature parameter at most ln(max_scale), as open_clip does after each
    step. The clamp acts on the parameter, not on the forward's output: a clamped output has no
    gradient, and a parameter Adam carried past the cap could never come back. Under ZeRO the
    optimizer's fp32 master copy is the one that persists, so it is clamped too."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param
    model = getattr(objective, "model", None)
    if model is None or not getattr(objective, "clamps_logit_scale", False):
        return
    param, cap = model.logit_scale, math.log(max_scale)
    master = safe_get_full_fp32_param(param)   # a collective under ZeRO: every rank calls it
    if master is not None and float(master.max()) > cap:
        safe_set_full_fp32_param(param, master.clamp(max=cap))
    if engine.zero_optimization_stage() < 3:   # ZeRO-3's module holds only a partition
        model.clamp_logit_scale_()


def train_loop_per_worker(config: dict) -> None:
    cfg = config_from_dict(config["cfg"])
    select_accelerator(cfg.ray.use_gpu)   # before DeepSpeed loads: it picks its accelerator once
    import deepspeed
    import ray.train
    import ray.train.torch

    _quiet_ray_train_reports()
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
    # DeepSpeed's bf16 casts the parameters, not the inputs: features follow the parameters
    feature_dtype = torch.bfloat16 if uses_bf16(cfg.train, cfg.ray.use_gpu) else torch.float32
    state = TrainState(world_size=world, config_digest=cfg.digest(), config=cfg.to_dict())
    timings: dict[str, float] = {}  # last checkpoint save / restore, carried into the metrics
    best_weights: dict | None = None  # the best validation epoch's fp32 weights (every rank holds them)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        checkpoint = choose_checkpoint(checkpoint, rank, world, engine.zero_optimization_stage(), log)
    if checkpoint:
        t0 = time.time()
        state, best_weights = restore_checkpoint(engine, objective, checkpoint, rank, world, cfg.to_dict(), log)
        timings["restore_s"] = time.time() - t0

    stream = ShardStream(shards, cfg.data.split, "train", batch_size=cfg.train.batch_size, rank=rank,
                         world_size=world, seed=cfg.data.seed, shuffle=True, drop_last=True,
                         shuffle_buffer=cfg.data.shuffle_buffer,
                         caption_pad_to=cfg.model.caption_pad_to or None,
                         number_pad_to=cfg.model.number_pad_to or None,
                         wordpiece=uses_captions(cfg))
    if fits_in_memory(sum(stream.sizes), cfg.model.caption_context, cfg.data.memory_budget_mb):
        t0 = time.time()
        decoded = stream.load_in_memory()
        if rank == 0:
            log.line(f"{cfg.data.split}/train in memory: {len(decoded.y)} samples, "
                     f"{decoded.nbytes / 2**20:.1f} MiB, decoded in {time.time() - t0:.1f}s")
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
    samples_per_step = global_batch * accum
    peak_lr = scaled_lr(cfg.train.lr, samples_per_step, cfg.train.lr_scaling, cfg.train.lr_base_batch)
    warmup_steps = round(cfg.train.warmup_epochs * steps_per_epoch)

    def lr_of(step: int) -> float:
        return lr_at(step, total_steps, warmup_steps, peak_lr, cfg.train.lr_schedule, cfg.train.min_lr_ratio)

    if rank == 0 and not checkpoint:
        scaling = "" if cfg.train.lr_scaling == "none" else \
            f" ({cfg.train.lr_scaling} scaling of {cfg.train.lr:g} from {cfg.train.lr_base_batch} to {samples_per_step} samples/step)"
        log.line(f"{world} workers, ZeRO-{engine.zero_optimization_stage()}, global batch {global_batch} "
                 f"x accum {accum}, {steps_per_epoch} steps/epoch, {total_steps} steps, device {device}, niceness {os.nice(0)}; "
                 f"lr {peak_lr:.3g}{scaling}, {warmup_steps} warmup steps then {cfg.train.lr_schedule}")
    zero_shot = cfg.train.mode == "pretrain"
    select_key, lower_is_better = select_metric(cfg.train.mode, cfg.train.select_metric)

    def select(weights: dict, metrics: dict) -> None:
        """Keeps the weights of the best validation epoch and counts the epochs since."""
        nonlocal best_weights
        score = metrics.get(select_key)
        if cfg.train.select == "last" or takes_selection(score, state.best_score, lower_is_better):
            state.best_score = None if score is None or math.isnan(score) else score
            state.best_epoch, state.stale_epochs, best_weights = state.epoch, 0, weights
        else:
            state.stale_epochs += 1
        metrics.update(best_epoch=state.best_epoch, stale_epochs=state.stale_epochs)

    def stopped_early() -> bool:
        return bool(cfg.train.patience) and state.stale_epochs >= cfg.train.patience

    def budget_spent() -> bool:   # train.stop_epoch: a fixed budget within the full schedule
        return bool(cfg.train.stop_epoch) and state.epoch >= cfg.train.stop_epoch

    window_t, window_samples = time.time(), 0
    step_sums: dict[str, torch.Tensor] = {}   # losses summed over this step's micro-batches
    while state.step < total_steps and not stopped_early() and not budget_spent():
        stream.epoch, stream.start_batch = state.epoch, state.batch
        for batch in make_loader(stream, cfg.data.loader_workers):
            if cfg.train.encoding != "entity":
                batch = batch.per_pair(keep_drugs=cfg.train.encoding == "drugs_only")
            loss, parts = engine(batch.to(device, feature_dtype))
            engine.backward(loss)
            for group in optimizer.param_groups:   # DeepSpeed's optimizers step these same groups
                group["lr"] = lr_of(state.step)
            engine.step()
            for k, v in {"loss": loss, **parts}.items():
                step_sums[k] = step_sums.get(k, 0) + v.detach().float()
            state.batch += 1
            window_samples += len(batch) * world
            if state.batch % accum:
                continue
            state.step += 1
            clamp_logit_scale(engine, objective, cfg.loss.max_logit_scale)
            step_means, step_sums = {k: v / accum for k, v in step_sums.items()}, {}
            _fault_injection(config.get("fault"), state.step, rank, world)
            if state.step % cfg.train.log_every == 0 or state.step == total_steps:
                values = _mean_over_ranks(step_means, world, device)
                values["lr"] = optimizer.param_groups[0]["lr"]
                values["samples_per_s"] = window_samples / max(time.time() - window_t, 1e-9)
                window_t, window_samples = time.time(), 0
                log.scalars(state.epoch, state.step, values)
                log.line(f"epoch {state.epoch + 1}/{cfg.train.epochs} step {state.step}/{total_steps} "
                         + " ".join(f"{k} {v:.4g}" for k, v in values.items()))
                state.metrics = {"step": state.step, "epoch": state.epoch, **values, **timings}
                report(state.metrics)
            if state.step >= total_steps or state.batch >= epoch_batches:
                break
            if cfg.train.checkpoint_every and state.step % cfg.train.checkpoint_every == 0:
                timings.update(save_checkpoint(engine, objective, full_state_dict(engine), state, rank,
                                               state.metrics, log, best_weights))
                window_t, window_samples = time.time(), 0  # samples/s measures training only
        if state.batch < epoch_batches and state.step < total_steps:
            # the reader checks shard lengths; this guards the loop itself against replaying
            # an epoch forever while the other ranks wait in a collective
            raise ShardError(f"rank {rank} got {state.batch} of the {epoch_batches} batches of epoch "
                             f"{state.epoch + 1}: the shards hold fewer samples than the manifest says")
        if state.batch >= epoch_batches:  # the epoch ran to its end
            state.epoch, state.batch = state.epoch + 1, 0
            weights = full_state_dict(engine)
            epoch_metrics = evaluate(cfg, shards, plain_copy(cfg, shards, weights, device), "val", rank, world,
                                     zero_shot, device, weights.get("kg.relation"))
            select(weights, epoch_metrics)
            epoch_metrics["epochs_done"] = state.epoch   # what `cldr tune`'s early stopping counts
            state.metrics.update(epoch_metrics)
            log.scalars(state.epoch, state.step, epoch_metrics)
            log.line(f"end of epoch {state.epoch}: " + " ".join(f"{k} {v:.4g}" for k, v in epoch_metrics.items()
                                                               if k.startswith(EPOCH_LINE_KEYS)))
            if ignores_cell_line(epoch_metrics.get("val_within_drug_std")):
                log.line("warning: every drug gets one prediction for all its validation cell lines: the model "
                         "ignores the cell line (its cell branch's ReLUs likely died; a lower train.lr may keep them)")
            if stopped_early():
                log.line(f"early stop: no better {select_key} for {state.stale_epochs} epochs; "
                         f"keeping epoch {state.best_epoch}")
            elif state.step < total_steps and not budget_spent():
                timings.update(save_checkpoint(engine, objective, weights, state, rank, state.metrics, log,
                                               best_weights))
            window_t, window_samples = time.time(), 0

    # Test metrics come from the selected epoch's weights: the best validation epoch's, as the
    # papers report, or with train.select=last the last epoch's; a run cut by max_steps
    # mid-epoch before any epoch ended has only its last weights.
    weights = full_state_dict(engine)
    selected = best_weights if best_weights is not None and cfg.train.select == "best_val" else weights
    final = {}
    if cfg.train.test_at_end:
        final = evaluate(cfg, shards, plain_copy(cfg, shards, selected, device), "test", rank, world, zero_shot,
                         device, selected.get("kg.relation"))
    final.update(selected_epoch=state.best_epoch if best_weights is not None else state.epoch,
                 stopped_early=int(stopped_early()), epochs_run=state.epoch)
    state.metrics.update(final)
    state.metrics["done"] = True
    log.scalars(state.epoch, state.step, final)
    log.line(("test: " if cfg.train.test_at_end else "end, no test pass: ") + " ".join(f"{k} {v:.4g}" for k, v in final.items()))
    save_checkpoint(engine, objective, weights, state, rank, state.metrics, log, best_weights)
