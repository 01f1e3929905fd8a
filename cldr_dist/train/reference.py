"""The single-process reference path: plain PyTorch pretrain/finetune over the same shard
reader, objectives and evaluation as the distributed loop, with no Ray and no DeepSpeed.
Tests use it, and benchmarks compare the distributed path's samples/s against it.

    python -m cldr_dist.train.reference --config configs/demo.yaml train.mode=pretrain
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from cldr_dist.config import Config, ConfigError, load_config
from cldr_dist.data.reader import ShardStream, make_loader, open_shards
from cldr_dist.train.loop import build_objective, evaluate, uses_captions


def train_reference(cfg: Config, objective: torch.nn.Module | None = None, log=print) -> dict:
    """Trains cfg.train.mode for cfg.train.epochs (or max_steps) on one process; returns the
    last step's losses, samples/s and the test metrics. The global batch is train.batch_size."""
    torch.manual_seed(cfg.train.seed)
    shards = open_shards(cfg.data.shards)
    objective = objective or build_objective(cfg, shards, rank=0)
    optimizer = torch.optim.AdamW(objective.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    stream = ShardStream(shards, cfg.data.split, "train", batch_size=cfg.train.batch_size, seed=cfg.data.seed,
                         shuffle_buffer=cfg.data.shuffle_buffer,
                         caption_pad_to=cfg.model.caption_pad_to or None,
                         number_pad_to=cfg.model.number_pad_to or None,
                         wordpiece=uses_captions(cfg))
    step, samples, t0, out = 0, 0, time.time(), {}
    for epoch in range(cfg.train.epochs):
        stream.epoch = epoch
        for batch in make_loader(stream, cfg.data.loader_workers):
            loss, parts = objective(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.train.grad_clip:
                torch.nn.utils.clip_grad_norm_(objective.parameters(), cfg.train.grad_clip)
            optimizer.step()
            if getattr(objective, "clamps_logit_scale", False):
                objective.model.clamp_logit_scale_()
            step, samples = step + 1, samples + len(batch)
            out = {"step": step, "loss": float(loss), **{k: float(v) for k, v in parts.items()}}
            if step % cfg.train.log_every == 0:
                log(f"[reference {cfg.train.mode}] epoch {epoch + 1} step {step} loss {float(loss):.4g}")
            if cfg.train.max_steps and step >= cfg.train.max_steps:
                break
        if cfg.train.max_steps and step >= cfg.train.max_steps:
            break
    out["samples_per_s"] = samples / max(time.time() - t0, 1e-9)
    out.update(evaluate(cfg, shards, objective.model, "test", 0, 1, zero_shot=cfg.train.mode == "pretrain"))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"reference: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(train_reference(cfg), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
