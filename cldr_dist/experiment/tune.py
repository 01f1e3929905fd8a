"""`cldr tune --config configs/experiments/NAME.yaml`: per base model, Ray Tune searches the
settings of each stage (base = the MSE-only model, pretrain, cldr_finetune = CLDR's finetune of
the chosen pretrained model) with ASHA early stopping, on the validation part of `tune.split`
only; each trial is an ordinary training run (a TorchTrainer) that never runs its test pass.

Both arms get the same search: as many trials, the same epoch cap and the same ASHA rungs, and
base and cldr_finetune search the same space. What it writes:

    STORAGE/NAME-tune-MODEL-STAGE/        Ray Tune's experiment (every trial's results)
    STORAGE/NAME-tune-MODEL-STAGE-ID/     each trial's training run (checkpoints, logs)
    RUN_DIR/tune/MODEL-STAGE.json         every trial: settings, epochs reached, best validation score
    tune.out (configs/experiments/NAME_tuned.yaml)   the chosen settings, which the experiment
                                          cites as experiment.tuned

A rerun skips stages already in RUN_DIR/tune/. Ctrl+C stops the command and records nothing of
the stage it was in; Tune has saved that search, so a rerun with the same settings resumes it
(finished trials stay finished; the others go on from their last epoch's checkpoint), and one with
other settings starts a new search.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import signal
import threading
from pathlib import Path

import yaml

from cldr_dist.config import Config, ConfigError, apply_setting, config_from_dict, validate
from cldr_dist.data import storage
from cldr_dist.eval.metrics import ignores_cell_line
from cldr_dist.experiment.spec import ExperimentSpec, arm_stages, read_tuned, stage_config, tuned_path
from cldr_dist.train.runlog import epoch_table
from cldr_dist.train.schedule import select_metric

EPOCH_KEY = "epochs_done"          # reported at the end of every epoch (train/loop.py)
SPREAD_KEY = "val_within_drug_std"  # evaluate(): 0 when the model ignores the cell line
CHECKPOINT_KEY = "checkpoint_path"  # Tune's reporter adds the Train checkpoint's path under this key
TRIAL_CPU = 0.01                   # what a trial itself reserves (Tune refuses 0): it only waits
TUNE_SIGINT_ENV = "TUNE_DISABLE_SIGINT_HANDLER"
SEARCH_FILE = "cldr_search.json"   # in a search's Tune directory: which search it holds (its digest)


class TuneError(Exception):
    """A tuning stage produced no usable trial; the message names it."""


# ----------------------------------------------------------------------------- pure parts

def logspaced(low: float, high: float, n: int) -> list[float]:
    """n values evenly spaced in log between low and high, each in the middle of its stretch."""
    return [low * (high / low) ** ((i + 0.5) / n) for i in range(n)]


def search_space(space: dict, trials: int) -> dict:
    """Our YAML distributions ({"train.lr": {"loguniform": [a, b]}}) as Tune's sampling objects."""
    from ray import tune
    make = {"loguniform": lambda v: tune.loguniform(*v), "uniform": lambda v: tune.uniform(*v),
            "choice": tune.choice, "logspaced": lambda v: tune.grid_search(logspaced(*v, trials))}
    return {key: make[kind](values) for key, dist in space.items() for kind, values in dist.items()}


def num_samples(space: dict, trials: int) -> int:
    """Tune's num_samples for `trials` trials: a grid (logspaced) already makes one per trial."""
    return 1 if any("logspaced" in dist for dist in space.values()) else trials


def nested(params: dict) -> dict:
    """{"train.lr": 1e-3} -> {"train": {"lr": 1e-3}}: config sections, as the experiment layers."""
    out: dict = {}
    for dotted, value in params.items():
        section, key = dotted.split(".", 1)
        out.setdefault(section, {})[key] = value.item() if hasattr(value, "item") else value
    return out


def trial_summary(params: dict, history: list[dict], metric: str, lower_is_better: bool) -> dict:
    """One trial from its reported rows: epochs reached, its best validation epoch, and every
    epoch's score ([epoch, score] pairs). An epoch whose model ignores the cell line (one
    prediction per drug) is no candidate: on mixed validation a per-drug mean scores close to a
    real model, and chosen, its settings would train drug-only predictors."""
    scored = [r for r in history if isinstance(r.get(metric), (int, float)) and not math.isnan(r[metric])
              and r.get(EPOCH_KEY) is not None]
    epochs = max((int(r[EPOCH_KEY]) for r in scored), default=0)
    ignoring = [int(r[EPOCH_KEY]) for r in scored if ignores_cell_line(r.get(SPREAD_KEY))]
    eligible = [r for r in scored if int(r[EPOCH_KEY]) not in ignoring]
    summary = {"params": params, "epochs": epochs, "best_epoch": 0, "score": None,
               "scores": [[int(r[EPOCH_KEY]), float(r[metric])] for r in scored], "ignores_cell_line": ignoring}
    if eligible:
        best = (min if lower_is_better else max)(eligible, key=lambda r: r[metric])
        summary.update(best_epoch=int(best[EPOCH_KEY]), score=float(best[metric]))
    return summary


def epoch_rows(metrics_csv: str, metric: str) -> list[dict]:
    """A training run's end-of-epoch rows from its metrics CSV, as trial_summary reads them: the
    metric and the validation predictions' within-drug spread. Tune rewrites a resumed trial's
    result rows from the resume on, so they lose the epochs before it; the run's own CSV is
    appended to across resumes and keeps them."""
    table = epoch_table(metrics_csv, [metric, SPREAD_KEY])
    scores, spreads = table[metric], table[SPREAD_KEY]
    return [{EPOCH_KEY: epoch, metric: score, SPREAD_KEY: spreads.get(epoch)} for epoch, score in sorted(scores.items())]


def trial_run_name(run: str, trial_id: str) -> str:
    """A trial's training run, beside its search: STORAGE/NAME-tune-MODEL-STAGE-ID."""
    return f"{run}-{trial_id}"


def choose(trials: list[dict], lower_is_better: bool) -> dict:
    """The trial with the best validation score at any of its epochs."""
    scored = [t for t in trials if t["score"] is not None]
    if not scored:
        ignoring = sum(bool(t.get("ignores_cell_line")) for t in trials)
        raise TuneError("no trial reported a validation score" +
                        (f" from a model that uses the cell line ({ignoring} ignored it)" if ignoring else ""))
    return (min if lower_is_better else max)(scored, key=lambda t: t["score"])


# ----------------------------------------------------------------------------- Ray side

def _epoch_reporter(metric: str):
    from ray.tune.integration.ray_train import TuneReportCallback

    class EpochReports(TuneReportCallback):
        """Forwards rank 0's end-of-epoch reports, the ones carrying the validation metric, to
        Tune: one Tune result per epoch (the step reports in between only log progress)."""
        def after_report(self, run_context, metrics, checkpoint):
            if metric in metrics[0]:
                super().after_report(run_context, metrics, checkpoint)
    return EpochReports()


def run_trial(config: dict) -> None:
    """One Tune trial: the stage's training run with the sampled settings."""
    import ray.tune

    from cldr_dist.train import trainer
    cfg = config_from_dict(config["cfg"])
    for section, values in nested(config["params"]).items():
        for key, value in values.items():
            apply_setting(cfg, section, key, value)
    validate(cfg)   # again, with the sampled settings
    cfg.ray.name = trial_run_name(config["run"], ray.tune.get_context().get_trial_id())
    trainer.run(cfg, callbacks=[_epoch_reporter(select_metric(cfg.train.mode, cfg.train.select_metric)[0])])


def trial_config(spec: ExperimentSpec, model: str, stage: str, init_from: str = "") -> Config:
    """The settings a search starts from: the experiment's layers without tuned settings, on
    the tuning split, for at most max_epochs, validated every epoch and never tested."""
    from cldr_dist.train.trainer import absolute_paths
    mode = "pretrain" if stage == "pretrain" else "finetune"
    cfg = stage_config(spec, mode, model, spec.tune.split, spec.tune.seed, pretrained=stage == "cldr_finetune",
                       tuned=False)
    cfg.train.epochs, cfg.train.patience, cfg.train.select, cfg.train.test_at_end = \
        spec.tune.epochs(stage), 0, "best_val", False
    cfg.train.init_from = init_from
    if spec.tune.cpus_per_worker:
        cfg.ray.cpus_per_worker = spec.tune.cpus_per_worker
    return absolute_paths(cfg)   # trials run in their own working directories


def _progress_callback(model: str, stage: str, metric: str):
    from ray.tune import Callback

    def log(line: str) -> None:   # Tune pickles its callbacks: no reference to the caller's logger
        print(line, flush=True)

    class TrialLog(Callback):
        """One line per validated epoch and per finished trial, on stdout."""
        def __init__(self):
            self.seen: set = set()   # Ray Train hands an epoch's report to Tune again with its checkpoint

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if metric in result and (trial.trial_id, result.get(EPOCH_KEY)) not in self.seen:
                self.seen.add((trial.trial_id, result.get(EPOCH_KEY)))
                log(f"    {model} {stage} trial {trial.trial_id}: epoch {result.get(EPOCH_KEY)} "
                    f"{metric} {result[metric]:.5g}")

        def on_trial_complete(self, iteration, trials, trial, **info):
            log(f"    {model} {stage} trial {trial.trial_id} ended: {_short(trial.config['params'])}")

        def on_trial_error(self, iteration, trials, trial, **info):
            log(f"    {model} {stage} trial {trial.trial_id} failed; logs under {trial.path}")
    return TrialLog()


def _short(params: dict) -> str:
    return " ".join(f"{k.split('.')[-1]} {v:.3g}" if isinstance(v, float) else f"{k.split('.')[-1]} {v}"
                    for k, v in params.items())


def fit(tuner):
    """tuner.fit(), raising KeyboardInterrupt where Ctrl+C (or SIGUSR1) interrupted it. Tune
    handles that signal itself: it ends the search early and returns it as if it had finished
    (its running trials then read TERMINATED), so a stage would be recorded half-searched. Its
    handler, once it fires, puts back the SIGINT handler it replaced; only then is ours in place
    after fit()."""
    if threading.current_thread() is not threading.main_thread():
        return tuner.fit()    # Tune installs no handler off the main thread: a signal is not its to catch

    def interrupt_now(signum, frame):   # a second Ctrl+C, once Tune has handled the first
        raise KeyboardInterrupt
    saved_env = os.environ.pop(TUNE_SIGINT_ENV, None)   # Tune's handler must be there to tell
    saved_handler = signal.signal(signal.SIGINT, interrupt_now)
    try:
        grid = tuner.fit()
        interrupted = signal.getsignal(signal.SIGINT) is interrupt_now
    finally:
        signal.signal(signal.SIGINT, saved_handler)
        if saved_env is not None:
            os.environ[TUNE_SIGINT_ENV] = saved_env
    if interrupted:
        raise KeyboardInterrupt
    return grid


def tune_stage(spec: ExperimentSpec, model: str, stage: str, init_from: str, log=print) -> dict:
    """Runs one search, or resumes it where an interrupted run of the same settings left it, and
    returns its record: every trial, the chosen one, its checkpoint, the search's digest."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator

    from cldr_dist.train.trainer import preflight, storage_target
    cfg = trial_config(spec, model, stage, init_from)
    preflight(cfg)   # a missing shard set or checkpoint is one line here, not an error per trial
    metric, lower_is_better = select_metric(cfg.train.mode, cfg.train.select_metric)
    space = spec.tune.pretrain_space if stage == "pretrain" else spec.tune.space
    run = f"{spec.name}-tune-{model}-{stage}"
    path, fs = storage_target(cfg.ray.storage_path)
    # the trial only waits on its TorchTrainer, whose workers hold the CPUs
    trainable = tune.with_resources(run_trial, {"cpu": TRIAL_CPU})
    experiment = storage.join(cfg.ray.storage_path, run)
    digest = search_digest(spec, model, stage, init_from)
    if interrupted_search(experiment, digest):
        log(f"{model} {stage}: resuming the interrupted search in {experiment}")
        # a trial resumes under its own id, so its TorchTrainer (named after it) resumes from its
        # last checkpoint; Tune restores the scheduler's rungs and the searcher's remaining draws
        grid = fit(tune.Tuner.restore(f"{path}/{run}", trainable, resume_unfinished=True, resume_errored=True,
                                      storage_filesystem=fs))
        return {**_record(grid, cfg, spec, run, model, stage), "digest": digest}
    tuner = tune.Tuner(
        trainable,
        param_space={"cfg": cfg.to_dict(), "run": run, "params": search_space(space, spec.tune.trials)},
        tune_config=tune.TuneConfig(
            metric=metric, mode="min" if lower_is_better else "max", num_samples=num_samples(space, spec.tune.trials),
            search_alg=BasicVariantGenerator(random_state=spec.tune.seed, max_concurrent=spec.tune.concurrent),
            scheduler=ASHAScheduler(time_attr=EPOCH_KEY, max_t=spec.tune.epochs(stage),
                                    grace_period=spec.tune.grace_epochs,
                                    reduction_factor=spec.tune.reduction_factor)),
        run_config=tune.RunConfig(name=run, storage_path=path, storage_filesystem=fs, verbose=0,
                                  callbacks=[_progress_callback(model, stage, metric)]))
    storage.write_bytes(storage.join(experiment, SEARCH_FILE), json.dumps({"digest": digest}).encode())
    return {**_record(fit(tuner), cfg, spec, run, model, stage), "digest": digest}


def interrupted_search(experiment: str, digest: str) -> bool:
    """Whether `experiment` holds a saved search of these very settings (a finished search is
    recorded, so one found here was interrupted)."""
    from ray import tune

    from cldr_dist.train.trainer import storage_target
    marker = storage.join(experiment, SEARCH_FILE)
    if not storage.exists(marker) or json.loads(storage.read_bytes(marker)).get("digest") != digest:
        return False
    path, fs = storage_target(experiment)
    return tune.Tuner.can_restore(path, storage_filesystem=fs)


def run_history(cfg: Config, run: str, trial_metrics: dict, metric: str) -> list[dict]:
    """A trial's every epoch from its training run's metrics CSV (see epoch_rows); [] for a
    trial that reported nothing or logged no epoch."""
    from cldr_dist.train.trainer import log_dir
    if not trial_metrics.get("trial_id"):
        return []
    run_cfg = config_from_dict(cfg.to_dict())
    run_cfg.ray.name = trial_run_name(run, trial_metrics["trial_id"])
    path = storage.join(log_dir(run_cfg), f"{cfg.train.mode}_metrics.csv")
    return epoch_rows(storage.read_bytes(path).decode(), metric) if storage.exists(path) else []


def _record(grid, cfg: Config, spec: ExperimentSpec, run: str, model: str, stage: str) -> dict:
    """The stage's record from Tune's results: every trial, the chosen one, its checkpoint."""
    from cldr_dist.experiment.runner import checkpoint_url
    from cldr_dist.train.trainer import root_cause
    metric, lower_is_better = select_metric(cfg.train.mode, cfg.train.select_metric)
    trials = []
    for result in grid:
        reported = result.metrics_dataframe.to_dict("records") if result.metrics_dataframe is not None else []
        history = run_history(cfg, run, result.metrics or {}, metric) or reported
        summary = trial_summary(result.config["params"], history, metric, lower_is_better)
        checkpoints = [r[CHECKPOINT_KEY] for r in reported if isinstance(r.get(CHECKPOINT_KEY), str)]
        summary.update(checkpoint=checkpoint_url(checkpoints[-1], cfg) if checkpoints else "",
                       error=root_cause(result.error) if result.error else "")
        trials.append(summary)
    try:
        best = choose(trials, lower_is_better)
    except TuneError as e:
        errors = [t["error"] for t in trials if t["error"]]
        raise TuneError(f"{run}: {e}" + (f" (first error: {errors[0]})" if errors else "")) from None
    return {"model": model, "stage": stage, "split": spec.tune.split, "metric": metric,
            "lower_is_better": lower_is_better, "trials": trials, "chosen": best,
            "settings": nested(best["params"]), "best_epoch": best["best_epoch"],
            "checkpoint": best["checkpoint"], "max_epochs": spec.tune.epochs(stage)}


def tuned_entry(record: dict) -> dict:
    """What the experiment reads back from the tuned-settings file for one stage."""
    return {"settings": record["settings"], "best_epoch": record["best_epoch"], "max_epochs": record["max_epochs"],
            "metric": record["metric"], "score": record["chosen"]["score"], "trials": len(record["trials"]),
            "split": record["split"]}


def write_tuned(path: Path, records: list[dict], command: str) -> None:
    """The chosen settings of these records, merged into what the file already holds (other
    models tuned by an earlier command)."""
    tuned: dict = read_tuned(path) if path.is_file() else {}
    for r in records:
        tuned.setdefault(r["model"], {})[r["stage"]] = tuned_entry(r)
    header = (f"# Written by `{command}` on {datetime.date.today()}: the settings Ray Tune chose per base\n"
              f"# model and stage on validation data only (never test). The experiment cites this file as\n"
              f"# experiment.tuned; best_epoch is the chosen trial's best validation epoch.\n")
    storage.write_bytes(str(path), (header + yaml.safe_dump(tuned, sort_keys=False)).encode())


def tune_record_path(spec: ExperimentSpec, model: str, stage: str) -> Path:
    """Where a stage's search is recorded (every trial, and the chosen one)."""
    return spec.run_dir / "tune" / f"{model}-{stage}.json"


def run_tune(spec: ExperimentSpec, config_path: str | Path, log=print) -> Path:
    """Tunes every base model's stages in order (cldr_finetune starts from the chosen
    pretrained model); returns the tuned-settings file."""
    import ray
    out = tuned_path(spec, config_path)
    records, started = [], False
    try:
        for model in spec.models:
            for stage in arm_stages(spec.arms, spec.variants):
                record_path = tune_record_path(spec, model, stage)
                # CLDR's finetune starts from the pretrain stage tuned just before it
                init_from = records[-1]["checkpoint"] if stage == "cldr_finetune" else ""
                if record_path.is_file():
                    record = json.loads(record_path.read_text())
                    check_unchanged(spec, record, init_from, record_path)
                    log(f"{model} {stage}: tuned earlier ({record['metric']} {record['chosen']['score']:.5g})")
                else:
                    if stage == "cldr_finetune":
                        require_pretrained(spec, model, init_from)
                    if not started:
                        started = _start_ray(spec)
                    record = _tune_and_record(spec, model, stage, init_from, record_path, log)
                records.append(record)
                write_tuned(out, records, spec.command.replace("cldr experiment", "cldr tune", 1))
    finally:
        if started:
            ray.shutdown()
    return out


def search_digest(spec: ExperimentSpec, model: str, stage: str, init_from: str) -> str:
    """What a search depends on: its trials' starting config (with the pretrained model CLDR's
    finetune starts from) and the search itself."""
    import dataclasses
    import hashlib
    # the pretrain cap only where it applies: records of the other stages predate it
    ignored = {"out"} if stage == "pretrain" else {"out", "pretrain_max_epochs"}
    search = {k: v for k, v in dataclasses.asdict(spec.tune).items() if k not in ignored}
    body = {"config": trial_config(spec, model, stage, init_from).to_dict(), "search": search}
    body["config"]["ray"].pop("name", None)
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_unchanged(spec: ExperimentSpec, record: dict, init_from: str, path: Path) -> None:
    """A stage tuned earlier counts only if its search would be the same one today."""
    if record.get("digest") != search_digest(spec, record["model"], record["stage"], init_from):
        raise ConfigError(f"{path} was tuned with other settings (the tune section, the stage's layers, or "
                          f"another pretrained model); remove it to tune {record['model']} {record['stage']} again")


def require_pretrained(spec: ExperimentSpec, model: str, init_from: str) -> None:
    """CLDR's finetune search starts from the pretrain search's chosen checkpoint. The pretrain
    record is committed and the checkpoint is not, so on another machine the record can outlive
    it: that search must run again first (its result, and so this search's start, will differ)."""
    record = tune_record_path(spec, model, "pretrain")
    if not init_from:
        raise TuneError(f"{model} pretrain: the chosen trial left no checkpoint for CLDR's finetune to start from")
    if not storage.exists(init_from):
        raise TuneError(f"{model} cldr_finetune: the pretrain search's chosen checkpoint {init_from} is gone "
                        f"(checkpoints stay on the machine that trained them); remove {record} to tune "
                        f"{model} pretrain again, then cldr_finetune starts from its new choice")


def _start_ray(spec: ExperimentSpec) -> bool:
    """A local instance large enough for tune.concurrent trials of the largest stage."""
    from cldr_dist.train.trainer import start_ray
    cfgs = [trial_config(spec, m, st) for m in spec.models for st in arm_stages(spec.arms, spec.variants)]
    cpus = spec.tune.concurrent * max(c.ray.num_workers * c.ray.cpus_per_worker for c in cfgs)
    return start_ray(cfgs[0].ray.address, max(2, int(cpus) + 1), state_api=True,
                     worker_niceness=cfgs[0].ray.worker_niceness)


def _tune_and_record(spec: ExperimentSpec, model: str, stage: str, init_from: str, record_path: Path,
                     log) -> dict:
    log(f"{model} {stage}: {spec.tune.trials} trials, at most {spec.tune.epochs(stage)} epochs each, "
        f"on {spec.tune.split} validation")
    try:
        record = tune_stage(spec, model, stage, init_from, log)
    except KeyboardInterrupt:
        log(f"{model} {stage}: interrupted; nothing recorded (a rerun with the same settings resumes this search)")
        raise
    storage.write_bytes(str(record_path), json.dumps(record, indent=1, default=float).encode())
    log(f"{model} {stage}: chose {_short(record['chosen']['params'])} "
        f"({record['metric']} {record['chosen']['score']:.5g} at epoch {record['best_epoch']})")
    return record
