"""On a cluster (ray.address set) every path a worker reads or writes must be shared storage,
and rank 0's logs land on the run's storage (S3 included), not on the node it ran on."""
from __future__ import annotations

import csv
import io
import re
import shlex
from pathlib import Path

import pytest

from cldr_dist.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "configs" / "demo.yaml"
GPU_EXPERIMENT = REPO / "configs" / "experiments" / "gdsc_gpu.yaml"
S3_OK = ["data.shards=s3://bkt/shards/tiny", "ray.storage_path=s3://bkt/runs"]


@pytest.mark.parametrize("override, key", [
    ("data.shards=shards/x", "data.shards"),
    ("ray.storage_path=runs", "ray.storage_path"),
    ("ray.storage_path=/abs/runs", "ray.storage_path"),
    ("train.init_from=runs/pre/checkpoint_1", "train.init_from"),
])
def test_cluster_refuses_local_worker_paths(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(DEMO, ["ray.address=auto", *S3_OK, override])
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{key}: ")
    assert "must be shared storage (s3://...) when ray.address is set" in msg


def test_local_paths_are_fine_locally_on_s3_or_with_a_shared_filesystem():
    load_config(DEMO, ["data.shards=shards/x"])                                   # local Ray
    load_config(DEMO, ["ray.address=auto", *S3_OK, "train.init_from=s3://bkt/runs/pre/checkpoint_1"])
    load_config(DEMO, ["ray.address=10.0.0.1:6379", "ray.shared_fs=true", "data.shards=/nfs/shards"])


def test_cli_says_one_line_naming_the_key(capsys):
    from cldr_dist.cli import main
    assert main(["pretrain", "--config", str(DEMO), "ray.address=auto", "data.shards=shards/x"]) == 2
    err = capsys.readouterr().err.strip()
    assert re.fullmatch(r"cldr pretrain: error: data\.shards: .* must be shared storage \(s3://\.\.\.\) "
                        r"when ray\.address is set.*", err), err
    assert "Traceback" not in err


def test_trainer_preflight_checks_paths_set_after_loading():
    """The demo and `cldr experiment` set paths on a loaded config: preflight checks again."""
    from cldr_dist.train import trainer
    cfg = load_config(DEMO, S3_OK)
    cfg.ray.address, cfg.train.init_from = "auto", "/tmp/pre/checkpoint_1"
    with pytest.raises(ConfigError, match=r"^train\.init_from: "):
        trainer.preflight(cfg)


def test_log_dir_is_on_the_run_storage(tmp_path):
    from cldr_dist.train.trainer import log_dir
    cfg = load_config(DEMO, ["ray.storage_path=s3://bkt/runs", "ray.name=r1"])
    assert log_dir(cfg) == "s3://bkt/runs/r1/logs"
    cfg = load_config(DEMO, [f"ray.storage_path={tmp_path}/runs", "ray.name=r1"])
    assert log_dir(cfg) == str(tmp_path / "runs" / "r1" / "logs")


def documented_overrides() -> list[str]:
    """The overrides of the `ray job submit` command in gdsc_gpu.yaml's header."""
    lines = [line.lstrip("# ").rstrip() for line in GPU_EXPERIMENT.read_text().splitlines() if line.startswith("#")]
    command = next(i for i, line in enumerate(lines) if line.startswith("ray job submit"))
    end = next(i for i in range(command, len(lines)) if not lines[i].endswith("\\"))
    args = shlex.split(" ".join(line.rstrip("\\") for line in lines[command:end + 1]))
    return [a for a in args[args.index("--config") + 2:] if "=" in a and not a.startswith("-")]


def test_experiment_on_a_cluster(monkeypatch, tmp_path):
    from cldr_dist.experiment.spec import load_experiment
    with pytest.raises(ConfigError, match=r"data\.shards: 'shards/gdsc_v17' is a local path"):
        load_experiment(GPU_EXPERIMENT, ["common.ray.address=auto", "common.data.shards=shards/gdsc_v17"])
    # the runner's default storage, RUN_DIR/ray, is local
    with pytest.raises(ConfigError, match=r"common\.ray\.storage_path: .* must be shared storage"):
        load_experiment(GPU_EXPERIMENT, ["common.ray.address=auto", "common.ray.storage_path=",
                                         f"experiment.out={tmp_path}"])
    # inside a Ray Job the driver's cwd is the job's temporary working dir
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    overrides = documented_overrides()
    assert any(o.startswith("common.ray.address=") for o in overrides), overrides
    spec = load_experiment(GPU_EXPERIMENT, overrides)        # the documented command loads
    assert spec.run_dir.is_absolute()
    with pytest.raises(ConfigError, match=r"^experiment\.out: 'runs/experiments' is relative"):
        load_experiment(GPU_EXPERIMENT, [o for o in overrides if not o.startswith("experiment.out=")])


def read_rows(data: bytes) -> list[list[str]]:
    return list(csv.reader(io.StringIO(data.decode())))


def test_runlog_uploads_csv_and_tensorboard_to_s3(s3_bucket):
    from cldr_dist.data import storage
    from cldr_dist.train.runlog import RunLog
    dest = f"{s3_bucket}/runs/r1/logs"
    log = RunLog(dest, "pretrain", 0)
    log.scalars(0, 1, {"loss": 2.5, "lr": 1e-3})
    assert not storage.exists(f"{dest}/pretrain_metrics.csv")   # written on the worker until a sync
    log.sync()
    rows = read_rows(storage.read_bytes(f"{dest}/pretrain_metrics.csv"))
    assert rows[0] == ["time", "epoch", "step", "name", "value"]
    assert [r[2:] for r in rows[1:]] == [["1", "loss", "2.5"], ["1", "lr", "0.001"]]
    events = storage.filesystem(dest).glob(f"{dest}/tensorboard/pretrain/events.out.tfevents.*")
    assert events
    log.scalars(0, 2, {"loss": 2.0})
    log.sync()
    assert len(read_rows(storage.read_bytes(f"{dest}/pretrain_metrics.csv"))) == 4
    # a resumed run (a new worker, a new temporary directory) appends to what was uploaded
    again = RunLog(dest, "pretrain", 0)
    assert again.local != log.local
    again.scalars(0, 3, {"loss": 1.5})
    again.sync()
    rows = read_rows(storage.read_bytes(f"{dest}/pretrain_metrics.csv"))
    assert [r[2] for r in rows[1:]] == ["1", "1", "2", "3"] and rows.count(rows[0]) == 1
    assert len(storage.filesystem(dest).glob(f"{dest}/tensorboard/pretrain/events.out.tfevents.*")) == 2


def test_runlog_on_local_storage_writes_in_place(tmp_path):
    from cldr_dist.train.runlog import RunLog
    log = RunLog(str(tmp_path / "logs"), "finetune", 0)
    log.scalars(1, 5, {"val_mse": 0.5})
    log.sync()
    assert (tmp_path / "logs" / "finetune_metrics.csv").read_text().splitlines()[1].endswith(",1,5,val_mse,0.5")
    RunLog(None, "finetune", 1).sync()   # other ranks: nothing to write
