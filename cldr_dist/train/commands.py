"""`cldr pretrain | finetune`: run the trainer and print where its results are."""
from __future__ import annotations

import json
import os

from cldr_dist.train import trainer


class TrainingFailed(Exception):
    pass


def _train(args, cfg, mode: str):
    cfg.train.mode = mode
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not cfg.ray.use_gpu else "cuda")
    result = trainer.run(cfg)
    if result.error:
        raise TrainingFailed(f"{mode} run {cfg.ray.name} failed: {result.error}")
    metrics = {k: v for k, v in (result.metrics or {}).items() if not isinstance(v, (dict, list))}
    print(json.dumps({"run": cfg.ray.name, "checkpoint": result.checkpoint.path if result.checkpoint else None,
                      "metrics": metrics}, indent=1, default=float))
    return result


COMMANDS = {
    "pretrain": lambda args, cfg: _train(args, cfg, "pretrain"),
    "finetune": lambda args, cfg: _train(args, cfg, "finetune"),
}
