"""`cldr` command line: one subcommand per stage of the pipeline.

    cldr shards   --data DIR --out URL          dataset directory -> shards (local or s3://)
    cldr pretrain --config configs/demo.yaml    Ray Train + DeepSpeed contrastive pretraining
    cldr finetune --config ...                  MSE finetuning, optionally from a pretrain checkpoint
    cldr experiment --config configs/experiments/NAME.yaml   base vs CLDR per model, split, seed
    cldr tune --config configs/experiments/NAME.yaml   Ray Tune per model and stage -> NAME_tuned.yaml
    cldr report RUN_DIR [RUN_DIR ...]           an experiment's tables and figures as report.md
    cldr export --checkpoint URL --out DIR      a checkpoint -> a self-contained model directory
    cldr predict --model DIR --smiles S --cells all --out FILE   predictions for new compounds / cell lines

Every subcommand takes --config FILE and `section.key=value` overrides. A user's mistake
(bad config, missing file, bad data) ends with one line on stderr and exit code 2; `cldr
predict` exits 3 when it rejected some inputs (and predicted all the others).
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys

from cldr_dist.config import ConfigError, load_config
from cldr_dist.data import storage


def _user_errors() -> tuple[type[Exception], ...]:
    from cldr_dist.data.reader import ShardError
    from cldr_dist.data.tables import DataError
    from cldr_dist.experiment.report import ReportError
    from cldr_dist.inference.bundle import BundleError
    from cldr_dist.train.commands import TrainingFailed
    from cldr_dist.train.runlog import MetricsCSVError
    return (ConfigError, DataError, ShardError, storage.StorageError, ReportError, TrainingFailed, BundleError,
            MetricsCSVError)


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


def cmd_tune(args) -> None:
    from cldr_dist.experiment.spec import load_experiment
    from cldr_dist.experiment.tune import TuneError, run_tune
    if not args.config:
        raise ConfigError("cldr tune needs --config configs/experiments/NAME.yaml")
    spec = load_experiment(args.config, args.overrides, tuned=False)
    try:
        out = run_tune(spec, args.config)
    except TuneError as e:
        print(f"cldr tune: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    print(f"tuned settings: {out} (cite it as experiment.tuned in {args.config})")


def cmd_report(args) -> None:
    from cldr_dist.experiment.report import write_report
    print(f"report: {write_report(args.run_dir, args.out)}")


def cmd_export(args) -> None:
    from cldr_dist.inference.bundle import export_model
    storage.set_endpoint(args.endpoint_url)
    meta = export_model(args.checkpoint, args.out, args.shards)
    print(json.dumps({"model": args.out, "base_model": meta["base_model"], "pretrained": meta["pretrained"],
                      "weights_from": meta["weights_from"], "test_metrics": meta["test_metrics"]}, indent=1))


PREDICT_REJECTED_EXIT = 3


def cmd_predict(args) -> int:
    from cldr_dist.inference import inputs
    from cldr_dist.inference.predict import (ScreenSpec, cell_query, default_rejected_url, predict_local,
                                             predict_ray)
    storage.set_endpoint(args.endpoint_url)
    inline = inputs.command_line_compounds(args.smiles, args.drug)
    if not inline and not args.compounds:
        raise ConfigError("cldr predict needs compounds: --smiles S, --drug ID or --compounds FILE")
    cells, cell_rejects = cell_query(args.model[0], args.cells, args.cell_table)
    spec = ScreenSpec(args.model, cells, args.missing_features, args.zeroshot, args.device, args.pairs_per_step)
    rejected_url = args.rejected or default_rejected_url(args.out, args.ray)
    if args.ray:
        summary = predict_ray(spec, args.compounds, inline, args.out, rejected_url, cell_rejects,
                              args.workers, args.compounds_per_task, args.address)
    else:
        chunks = [inline] if inline else []
        if args.compounds:
            chunks = itertools.chain(chunks, inputs.iter_compound_file(args.compounds, args.compounds_per_task))
        summary = predict_local(spec, chunks, args.out, rejected_url, cell_rejects, progress=not args.quiet)
    print(summary.line())
    if summary.rejected:
        print(f"cldr predict: {summary.rejected} input(s) rejected, reasons in {summary.rejected_file}",
              file=sys.stderr)
        return PREDICT_REJECTED_EXIT
    return 0


# these read their own files instead of a training config
OWN_CONFIG_COMMANDS = {"experiment": cmd_experiment, "tune": cmd_tune, "report": cmd_report, "export": cmd_export,
                       "predict": cmd_predict}


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
    q = sub.add_parser("tune", help="Ray Tune + ASHA per base model and stage on validation data; "
                                    "writes the chosen settings for experiment.tuned")
    q.add_argument("--config", help="experiment file (configs/experiments/*.yaml), its tune: section")
    q.add_argument("overrides", nargs="*", help="tune.key=value and the experiment's overrides")
    q = sub.add_parser("report", help="report.md and figures of one or more experiment run directories")
    q.add_argument("run_dir", nargs="+", help="the experiment's run directory (experiment.out/experiment.name); "
                                               "more directories add their arms to the same tables, tagged")
    q.add_argument("--out", help="write report.md and figures/ here instead (e.g. docs/results/NAME)")
    q = sub.add_parser("export", help="a training checkpoint -> a self-contained model directory")
    q.add_argument("--checkpoint", required=True, help="checkpoint directory or s3:// URL")
    q.add_argument("--out", required=True, help="the model directory to create (local or s3://)")
    q.add_argument("--shards", help="the run's shard set, if it moved since training")
    q.add_argument("--endpoint-url", default="", help="S3 endpoint (default: AWS_ENDPOINT_URL)")
    q = sub.add_parser("predict", help="predicted ln IC50 of compounds x cell lines from exported models")
    q.add_argument("--model", action="append", required=True,
                   help="exported model directory (cldr export); repeat for an ensemble (mean and std)")
    q.add_argument("--smiles", action="append", default=[], help="a compound's SMILES (repeatable)")
    q.add_argument("--drug", action="append", default=[], help="a training drug by its id (repeatable)")
    q.add_argument("--compounds", help="CSV with columns id, smiles (empty smiles: a training drug id), "
                                       "local or s3://")
    q.add_argument("--cells", help="all (default: the model's training cell lines) or ID,ID,...")
    q.add_argument("--cell-table", help="new cell lines: a CSV in the cell_lines.csv format, features matched by name")
    q.add_argument("--missing-features", default="error", choices=["error", "zero"],
                   help="model feature columns the cell table lacks: an error (default) or filled with 0")
    q.add_argument("--out", required=True, help=".csv or .parquet file (local or s3://); with --ray a directory")
    q.add_argument("--rejected", help="CSV of rejected inputs (default: beside --out)")
    q.add_argument("--zeroshot", default="auto", choices=["auto", "on", "off"],
                   help="zero-shot predictions (CLDR-pretrained models; costly): auto = on for those, off under --ray")
    q.add_argument("--device", default="cpu", help="cpu or cuda")
    q.add_argument("--pairs-per-step", type=int, default=16_384, help="pairs through the fusion layers at once")
    q.add_argument("--compounds-per-task", type=int, default=256, help="compounds read (and with --ray, per task) at once")
    q.add_argument("--ray", action="store_true", help="run as a Ray Data pipeline writing parquet parts under --out")
    q.add_argument("--workers", type=int, default=2, help="--ray: prediction actors (each loads the models once)")
    q.add_argument("--address", help="--ray: the cluster to join (default: a local Ray instance)")
    q.add_argument("--endpoint-url", default="", help="S3 endpoint (default: AWS_ENDPOINT_URL)")
    q.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command in OWN_CONFIG_COMMANDS:
            return OWN_CONFIG_COMMANDS[args.command](args) or 0
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
