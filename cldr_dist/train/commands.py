"""`cldr pretrain | finetune`: run the trainer and print where its results are.
`cldr evaluate --checkpoint URL`: the test metrics of a checkpoint's model, on one process."""
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


def _evaluate(args, cfg):
    from cldr_dist.config import ConfigError
    from cldr_dist.data.reader import open_shards
    from cldr_dist.eval.metrics import all_metrics
    from cldr_dist.eval.predict import predict_part
    from cldr_dist.train.loop import load_model_weights, make_model
    if not args.checkpoint:
        raise ConfigError("cldr evaluate needs --checkpoint (a checkpoint directory or URL)")
    shards = open_shards(cfg.data.shards)
    model = make_model(cfg, shards)
    load_model_weights(model, args.checkpoint)
    pred = predict_part(cfg, shards, model, "test")
    print(json.dumps({"checkpoint": args.checkpoint, "split": cfg.data.split, "test_samples": len(pred["y"]),
                      **{f"test_{k}": v for k, v in all_metrics(pred["y"], pred["p"]).items()}}, indent=1))


COMMANDS = {
    "pretrain": lambda args, cfg: _train(args, cfg, "pretrain"),
    "finetune": lambda args, cfg: _train(args, cfg, "finetune"),
    "evaluate": _evaluate,
}
