"""`cldr pretrain | finetune`: run the trainer and print where its results are.
`cldr evaluate --checkpoint URL`: the test metrics of a checkpoint's model, on one process."""
from __future__ import annotations

import json

from cldr_dist.train import trainer


class TrainingFailed(Exception):
    """A training run ended in a worker's error; the message is that error's one line."""


def _train(args, cfg, mode: str):
    import ray.train
    cfg.train.mode = mode
    try:
        result = trainer.run(cfg)   # Ray Train raises a failed run's error from fit()
    except ray.train.TrainingFailedError as e:   # the driver's own checks raise the CLI's user errors
        raise TrainingFailed(f"{mode} run {cfg.ray.name} failed: {trainer.root_cause(e)}; "
                             f"logs under {trainer.log_dir(cfg)}") from None
    if result.error:
        raise TrainingFailed(f"{mode} run {cfg.ray.name} failed: {trainer.root_cause(result.error)}")
    metrics = {k: v for k, v in (result.metrics or {}).items() if not isinstance(v, (dict, list))}
    print(json.dumps({"run": cfg.ray.name, "checkpoint": result.checkpoint.path if result.checkpoint else None,
                      "metrics": metrics}, indent=1, default=float))
    return result


def _evaluate(args, cfg):
    from cldr_dist.config import ConfigError
    from cldr_dist.data.reader import open_shards
    from cldr_dist.eval.metrics import all_metrics
    from cldr_dist.eval.predict import predict_part
    from cldr_dist.train.checkpoint import load_model_weights
    from cldr_dist.train.loop import make_model
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
