"""`cldr experiment`: for each split, base model and seed, train (a) the base model with MSE only
and (b) CLDR pretraining then the same finetuning, plus the classical baselines; each arm's test
predictions and metrics land in the run directory.

    RUN_DIR/experiment.json          the spec and the machine it ran on
    RUN_DIR/results/{arm}.json       one finished arm: test metrics, zero-shot PCC, wall time
    RUN_DIR/predictions/{arm}.npz    its test predictions (y, p, drug and cell ids)
    RUN_DIR/stages/{run}.json        one finished training run: checkpoint URL, metrics, wall time
    RUN_DIR/curves/{run}.csv         its training log (step, loss, validation metrics)
    RUN_DIR/number_texts/{arm}.npy   the pretrained number-tower features of the 1000 number texts
    RUN_DIR/ray/                     Ray Train's checkpoints, unless common.ray.storage_path is set

Resuming is rerunning: finished arms and stages are skipped (a stage whose checkpoint is gone
trains again), and an interrupted training run resumes from its latest checkpoint (same ray.name
and storage path).
"""
from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cldr_dist.config import Config, ConfigError
from cldr_dist.data import storage
from cldr_dist.eval.classical import part_table, fit_predict
from cldr_dist.eval.metrics import all_metrics
from cldr_dist.eval.predict import save_predictions
from cldr_dist.experiment.spec import ExperimentSpec, stage_config, storage_path

DETERMINISTIC_BASELINES = ("train_mean", "drug_mean", "ridge")   # one run per split, whatever the seeds
PINNED_KEYS = ("layers", "by_split", "tuned_settings", "classical", "variants")  # a resume keeps these (layers hold the overrides)


class ExperimentError(Exception):
    """A training run of the experiment failed; the message names it."""


@dataclass(frozen=True)
class Arm:
    kind: str       # "deep" or "classical"
    name: str       # base | cldr | cldr-{variant} | a classical baseline
    model: str      # the base model ("" for classical)
    split: str
    seed: int
    variant: str = ""

    @property
    def key(self) -> str:
        return f"{self.split}-{self.model or 'classical'}-{self.name}-s{self.seed}"


def plan(spec: ExperimentSpec) -> list[Arm]:
    arms = []
    for split in spec.splits:
        for baseline in spec.classical.baselines:
            for seed in (spec.seeds[:1] if baseline in DETERMINISTIC_BASELINES else spec.seeds):
                arms.append(Arm("classical", baseline, "", split, seed))
        for model in spec.models:
            for seed in spec.seeds:
                arms += [Arm("deep", a, model, split, seed) for a in spec.arms]
                arms += [Arm("deep", f"cldr-{v}", model, split, seed, variant=v) for v in spec.variants]
    return arms


def machine() -> dict:
    import torch
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else ""
    return {"host": platform.node(), "cpus": os.cpu_count(), "gpu": gpu, "torch": torch.__version__,
            "python": platform.python_version()}


def write_json(path: Path, obj: dict) -> None:
    storage.write_bytes(str(path), json.dumps(obj, indent=1, default=float).encode())


def pin_spec(spec: ExperimentSpec) -> None:
    """The first run records the spec; a rerun may add models, splits or seeds, but not change
    how arms are trained, which would mix two experiments in one table."""
    path = spec.run_dir / "experiment.json"
    current, commands = spec.to_dict(), []
    # only the models this command trains are pinned: another model in the tuned file may still be
    # tuning (its CLDR stages after its base stage) when this experiment starts
    current["tuned_settings"] = {m: s for m, s in current["tuned_settings"].items() if m in spec.models}
    if path.is_file():
        recorded = json.loads(path.read_text())
        before, defaults = recorded["spec"], ExperimentSpec().to_dict()
        changed = [k for k in PINNED_KEYS if k != "tuned_settings"
                   and before.get(k, defaults[k]) != current.get(k, defaults[k])]
        # tuning a model the experiment adds is fine; so is retuning a stage no finished run used
        tuned_before = before.get("tuned_settings", {})
        stale = [f"{m} {stage}: " + ", ".join(str(f.relative_to(spec.run_dir)) for f in files)
                 for m in tuned_before if m in current["tuned_settings"]
                 for stage in retuned_stages(tuned_before[m], current["tuned_settings"][m])
                 if (files := trained_with(spec.run_dir, m, stage))]
        if stale:
            raise ConfigError(f"{spec.run_dir}: tuned settings changed for runs that used the earlier ones "
                              f"({'; '.join(stale)}); remove those files, and the runs under the experiment's "
                              f"ray storage, to retrain them, or use another experiment.name")
        current["tuned_settings"] = {**tuned_before, **current["tuned_settings"]}  # a rerun of fewer models keeps the rest
        if changed:
            raise ConfigError(f"{spec.run_dir} was started with other {', '.join(changed)} settings; "
                              f"use another experiment.name or remove the directory")
        commands = recorded.get("commands") or [before.get("command", "")]
    if spec.command not in commands:  # every distinct command that added arms, for the report
        commands.append(spec.command)
    write_json(path, {"spec": current, "machine": machine(), "commands": commands})


# which arm and training run each tuned stage sets: (arm name, train.mode)
STAGE_RUNS = {"base": ("base", "finetune"), "pretrain": ("cldr", "pretrain"), "cldr_finetune": ("cldr", "finetune")}


def retuned_stages(before: dict, now: dict) -> list[str]:
    return [stage for stage in sorted(set(before) | set(now)) if before.get(stage) != now.get(stage)]


def trained_with(run_dir: Path, model: str, stage: str) -> list[Path]:
    """The finished runs and arms of `model` that a tuned stage's settings trained: its stage
    records, and the results of the arms built on them (variants included)."""
    arm, mode = STAGE_RUNS[stage]
    found = [f for pattern in (f"*-{model}-{arm}-s*-{mode}.json", f"*-{model}-{arm}-*-s*-{mode}.json")
             for f in (run_dir / "stages").glob(pattern)]
    found += [f for pattern in (f"*-{model}-{arm}-s*.json", f"*-{model}-{arm}-*-s*.json")
              for f in (run_dir / "results").glob(pattern)]
    return sorted(set(found))


def checkpoint_url(path: str, cfg: Config) -> str:
    """A checkpoint path as Ray reports it, as a URL this project reads."""
    if storage.is_s3(cfg.ray.storage_path) and not path.startswith("s3://"):
        return "s3://" + path.lstrip("/")  # Ray reports S3 paths without their scheme
    return path


def finished_record(record_path: Path, log) -> dict | None:
    """A stage's record if its checkpoint is still there. The records travel with the committed
    results, local checkpoints do not: on a fresh clone an unfinished arm's pretrain record points
    at nothing, and its finetune could not start from it, so the stage trains again."""
    if not record_path.is_file():
        return None
    record = json.loads(record_path.read_text())
    if storage.exists(record["checkpoint"]):
        return record
    log(f"    {record['mode']}: checkpoint {record['checkpoint']} is gone; training this stage again")
    return None


def run_stage(spec: ExperimentSpec, cfg: Config, run: str, log) -> dict:
    """One training run (pretrain or finetune), or its record if it finished earlier."""
    from cldr_dist.train import trainer
    record_path = spec.run_dir / "stages" / f"{run}.json"
    if (record := finished_record(record_path, log)) is not None:
        return record
    cfg.ray.name = f"{spec.name}-{run}"
    cfg.ray.storage_path = storage_path(spec)
    log(f"    {cfg.train.mode}: ray run {cfg.ray.name}")
    t0 = time.time()
    try:
        result = trainer.run(cfg)  # Ray Train raises a failed run's error from fit()
    except Exception as e:  # noqa: BLE001 - reported as one line naming the run and its logs
        raise ExperimentError(f"{cfg.train.mode} run {cfg.ray.name} failed ({trainer.root_cause(e)}); "
                              f"logs under {trainer.log_dir(cfg)}; rerun the same command to resume") from e
    curve = storage.join(trainer.log_dir(cfg), f"{cfg.train.mode}_metrics.csv")  # on the run's storage
    if storage.exists(curve):
        storage.write_bytes(str(spec.run_dir / "curves" / f"{run}.csv"), storage.read_bytes(curve))
    record = {"run": cfg.ray.name, "mode": cfg.train.mode, "checkpoint": checkpoint_url(result.checkpoint.path, cfg),
              "wall_s": time.time() - t0,
              "metrics": {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))},
              "config": cfg.to_dict()}
    write_json(record_path, record)
    return record


def stage_summary(record: dict) -> dict:
    """What the report needs of a training run: its length, and whether early stopping or the
    epoch cap (train.epochs) ended it."""
    m = record["metrics"]
    return {"run": record["run"], "wall_s": record["wall_s"], "step": m.get("step"), "epoch": m.get("epoch"),
            "epochs_run": m.get("epochs_run"), "epochs_cap": record["config"]["train"]["epochs"],
            "selected_epoch": m.get("selected_epoch"), "stopped_early": bool(m.get("stopped_early"))}


def run_deep(spec: ExperimentSpec, arm: Arm, log) -> dict:
    import torch

    from cldr_dist.data.reader import open_shards
    from cldr_dist.eval.predict import predict_part
    from cldr_dist.losses.numeric_kg import NumberTexts
    from cldr_dist.train.loop import load_model_weights, make_model
    fine = stage_config(spec, "finetune", arm.model, arm.split, arm.seed, arm.variant, pretrained=arm.name != "base")
    stages = {}
    if arm.name != "base":
        pre = stage_config(spec, "pretrain", arm.model, arm.split, arm.seed, arm.variant)
        stages["pretrain"] = run_stage(spec, pre, f"{arm.key}-pretrain", log)
        fine.train.init_from = stages["pretrain"]["checkpoint"]
    stages["finetune"] = run_stage(spec, fine, f"{arm.key}-finetune", log)

    shards = open_shards(fine.data.shards)
    model = make_model(fine, shards)
    load_model_weights(model, stages["finetune"]["checkpoint"])
    predictions = predict_part(fine, shards, model, "test")
    save_predictions(str(spec.run_dir / "predictions" / f"{arm.key}.npz"), predictions)
    out = {"metrics": all_metrics(predictions["y"], predictions["p"]),
           "stages": {k: stage_summary(v) for k, v in stages.items()}}
    if "pretrain" in stages:
        out["zeroshot_pcc"] = stages["pretrain"]["metrics"].get("test_zeroshot_pcc")
        pretrained = make_model(stage_config(spec, "pretrain", arm.model, arm.split, arm.seed, arm.variant), shards)
        load_model_weights(pretrained, stages["pretrain"]["checkpoint"])
        numbers = NumberTexts(shards.features)
        with torch.no_grad():
            feats = pretrained.eval().encode_number_texts(numbers.ids, numbers.lens, numbers.index).numpy()
        (spec.run_dir / "number_texts").mkdir(parents=True, exist_ok=True)
        np.save(spec.run_dir / "number_texts" / f"{arm.key}.npy", feats.astype(np.float32), allow_pickle=False)
    return out


def run_classical(spec: ExperimentSpec, arm: Arm, tables: dict) -> dict:
    from cldr_dist.data.reader import open_shards
    cfg = stage_config(spec, "finetune", spec.models[0], arm.split, arm.seed)
    if arm.split not in tables:
        shards = open_shards(cfg.data.shards)
        tables[arm.split] = (shards, part_table(shards, arm.split, "train"), part_table(shards, arm.split, "test"))
    shards, train, test = tables[arm.split]
    t0 = time.time()
    p = fit_predict(arm.name, train, test, shards, spec.classical, arm.seed)
    predictions = {"y": test.y, "p": p, "drug_ids": test.drug_ids, "cell_ids": test.cell_ids}
    save_predictions(str(spec.run_dir / "predictions" / f"{arm.key}.npz"), predictions)
    return {"metrics": all_metrics(test.y, p), "stages": {"fit": {"wall_s": time.time() - t0}}}


def run_experiment(spec: ExperimentSpec, log=print) -> Path:
    pin_spec(spec)
    arms, tables = plan(spec), {}
    log(f"experiment {spec.name}: {len(arms)} arms -> {spec.run_dir}")
    for i, arm in enumerate(arms, 1):
        path = spec.run_dir / "results" / f"{arm.key}.json"
        if path.is_file():
            log(f"[{i}/{len(arms)}] {arm.key}: finished earlier")
            continue
        log(f"[{i}/{len(arms)}] {arm.key}")
        t0 = time.time()
        out = run_classical(spec, arm, tables) if arm.kind == "classical" else run_deep(spec, arm, log)
        out.update(kind=arm.kind, arm=arm.name, model=arm.model, split=arm.split, seed=arm.seed,
                   variant=arm.variant, wall_s=time.time() - t0)
        write_json(path, out)
        m = out["metrics"]
        log(f"    test pcc {round(m['pcc'], 4) + 0.0:.4f} rmse {m['rmse']:.4f}"
            + (f" zero-shot pcc {out['zeroshot_pcc']:.4f}" if out.get("zeroshot_pcc") is not None else "")
            + f" ({out['wall_s']:.0f}s)")
    return spec.run_dir
