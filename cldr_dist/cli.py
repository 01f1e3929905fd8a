"""`cldr` command line: one subcommand per stage of the pipeline.

    cldr shards   --data DIR --out URL          dataset directory -> shards (local or s3://)
    cldr pretrain --config configs/demo.yaml    Ray Train + DeepSpeed contrastive pretraining
    cldr finetune --config ...                  MSE finetuning, optionally from a pretrain checkpoint
    cldr experiment --config configs/experiments/NAME.yaml   base vs CLDR per model, split, seed
    cldr report RUN_DIR [RUN_DIR ...]           an experiment's tables and figures as report.md

Every subcommand takes --config FILE and `section.key=value` overrides. A user's mistake
(bad config, missing file, bad data) ends with one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import sys

from cldr_dist.config import ConfigError, load_config
from cldr_dist.data import storage


def _user_errors() -> tuple[type[Exception], ...]:
    from cldr_dist.data.reader import ShardError
    from cldr_dist.data.tables import DataError
    from cldr_dist.experiment.report import ReportError
    from cldr_dist.train.commands import TrainingFailed
    return ConfigError, DataError, ShardError, storage.StorageError, ReportError, TrainingFailed


def cmd_experiment(args) -> None:
    from cldr_dist.experiment.report import write_report
    from cldr_dist.experiment.runner import ExperimentError, run_experiment
    from cldr_dist.experiment.spec import load_experiment
    if not args.config:
        raise ConfigError("cldr experiment needs --config configs/experiments/NAME.yaml")
    spec = load_experiment(args.config, args.overrides)
    try:
        run_dir = run_experiment(spec)
    except ExperimentError as e:
        print(f"cldr experiment: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    print(f"report: {write_report(run_dir)}")


def cmd_report(args) -> None:
    from cldr_dist.experiment.report import write_report
    print(f"report: {write_report(args.run_dir, args.out)}")


# these read their own files instead of a training config
OWN_CONFIG_COMMANDS = {"experiment": cmd_experiment, "report": cmd_report}


def cmd_shards(args, cfg) -> None:
    from cldr_dist.data.shards import build_shards
    build_shards(cfg, data_dir=args.data, out=args.out, progress=not args.quiet)


COMMANDS = {"shards": cmd_shards}


def add_train_commands() -> None:
    from cldr_dist.train import commands
    COMMANDS.update(commands.COMMANDS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cldr", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="YAML config (sections as in cldr_dist/config.py)")
    common.add_argument("overrides", nargs="*", help="section.key=value overrides")
    common.add_argument("--quiet", action="store_true", help="no progress bars")
    p = sub.add_parser("shards", parents=[common], help="build WebDataset shards from a dataset directory")
    p.add_argument("--data", help="dataset directory (default: data.data_dir)")
    p.add_argument("--out", help="output directory or s3:// URL (default: data.shards)")
    for name, helptext in (("pretrain", "contrastive pretraining on Ray Train + DeepSpeed"),
                           ("finetune", "MSE finetuning on Ray Train + DeepSpeed"),
                           ("evaluate", "test metrics of a checkpoint")):
        q = sub.add_parser(name, parents=[common], help=helptext)
        q.add_argument("--checkpoint", help="checkpoint directory or URL (evaluate)")
    q = sub.add_parser("experiment", help="base model vs CLDR on every model, split and seed, with a report")
    q.add_argument("--config", help="experiment file (configs/experiments/*.yaml)")
    q.add_argument("overrides", nargs="*", help="experiment.key=value, classical.key=value, "
                                                "common|pretrain|finetune.section.key=value")
    q = sub.add_parser("report", help="report.md and figures of one or more experiment run directories")
    q.add_argument("run_dir", nargs="+", help="the experiment's run directory (experiment.out/experiment.name); "
                                               "more directories add their arms to the same tables, tagged")
    q.add_argument("--out", help="write report.md and figures/ here instead (e.g. docs/results/NAME)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command in OWN_CONFIG_COMMANDS:
            OWN_CONFIG_COMMANDS[args.command](args)
            return 0
        cfg = load_config(args.config, args.overrides)
        storage.set_endpoint(cfg.storage.endpoint_url)
        if args.command not in COMMANDS:
            add_train_commands()
        COMMANDS[args.command](args, cfg)
    except _user_errors() as e:
        print(f"cldr {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cldr {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
