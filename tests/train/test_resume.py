"""Checkpoints and exact resume: a run interrupted mid-epoch and rerun under the same
ray.name / ray.storage_path ends at the same loss as an uninterrupted run."""
import json
from pathlib import Path

import pytest
import ray.train

from cldr_dist.train import trainer
from cldr_dist.train.checkpoint import MODEL_FILE, STATE_FILE
from cldr_dist.train.loop import FAULT_ENV

from tests.conftest import train_config

STEPS = ["train.max_steps=6", "train.checkpoint_every=2"]


def logged_steps(csv_path: Path) -> list[int]:
    """The optimizer steps whose loss rank 0 logged, in order (reruns append)."""
    lines = csv_path.read_text().splitlines()[1:]
    return [int(line.split(",")[2]) for line in lines if ",loss," in line]


@pytest.fixture(scope="module")
def uninterrupted(ray_local, tiny_shards, tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    result = trainer.run(train_config(tiny_shards, str(runs), "straight", *STEPS))
    assert result.error is None
    return result


def test_checkpoint_is_complete_and_kept(uninterrupted):
    ckpt = Path(uninterrupted.checkpoint.path)
    state = json.loads((ckpt / STATE_FILE).read_text())
    assert state["step"] == 6 and state["world_size"] == 2
    assert (ckpt / MODEL_FILE).is_file() and (ckpt / "rng-rank0.pt").is_file() and (ckpt / "rng-rank1.pt").is_file()
    ds_files = {p.name for p in (ckpt / "deepspeed").iterdir()}
    assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= ds_files
    kept = [p for p in ckpt.parent.iterdir() if p.is_dir() and p.name.startswith("checkpoint_")]
    assert len(kept) == 2  # train.keep_checkpoints
    logs = ckpt.parent / "logs" / "pretrain_metrics.csv"
    assert "samples_per_s" in logs.read_text() and "logit_scale" in logs.read_text()


# make test keeps the same guarantees at less cost: test_faults restores a killed run's checkpoint
# and ends at the unbroken run's loss; test_resume_from_s3_storage resumes a rerun from S3
@pytest.mark.slow
def test_interrupted_then_resumed_matches(uninterrupted, tiny_shards, tmp_path, monkeypatch):
    runs = str(tmp_path / "runs")
    marker = tmp_path / "killed"
    monkeypatch.setenv(FAULT_ENV, f"5:{marker}")  # dies after the step-4 checkpoint
    broken = train_config(tiny_shards, runs, "interrupted", *STEPS)
    try:
        result = trainer.run(broken)
    except Exception as e:  # noqa: BLE001 - Ray Train may raise the worker group's failure from fit()
        error = e
    else:
        error = result.error  # ... or return it in the result
        assert result.metrics is None or result.metrics.get("step", 0) < 6
    assert isinstance(error, ray.train.WorkerGroupError), repr(error)
    # the injected death: rank 1 (the last) killed itself at step 5, so Ray saw its process die
    # (rank 0 may be reported too: its next collective loses the peer)
    assert marker.read_text() == "rank 1 killed at step 5\n"
    assert 1 in error.worker_failures, error.worker_failures
    assert "actor died unexpectedly" in str(error.worker_failures[1]).lower(), error.worker_failures[1]
    log = Path(runs) / "interrupted" / "logs" / "pretrain_metrics.csv"
    assert logged_steps(log) == [1, 2, 3, 4]  # step 5 never completed: it needs the dead rank
    monkeypatch.delenv(FAULT_ENV)
    resumed = trainer.run(train_config(tiny_shards, runs, "interrupted", *STEPS))
    assert resumed.error is None
    assert resumed.metrics["step"] == 6
    assert resumed.metrics["loss"] == pytest.approx(uninterrupted.metrics["loss"], abs=1e-4)
    assert resumed.metrics["clip"] == pytest.approx(uninterrupted.metrics["clip"], abs=1e-4)
    steps = logged_steps(log)
    assert steps[:4] == [1, 2, 3, 4]
    # killed at step 5: the rerun goes on from the last checkpoint Ray had registered (step 4, or
    # step 2 if the kill beat the step-4 upload), never from scratch
    resumed_from = steps[4] - 1
    assert resumed_from in (2, 4) and steps[4:] == list(range(resumed_from + 1, 7))


def test_resume_from_s3_storage(ray_local, tiny_shards, s3_bucket):
    """Checkpoints on S3 (moto over HTTP): both ranks download and restore at once."""
    runs = f"{s3_bucket}/runs"
    first = trainer.run(train_config(tiny_shards, runs, "on-s3", "train.max_steps=3", "train.checkpoint_every=2"))
    assert first.error is None and first.metrics["step"] == 3
    assert first.checkpoint.path.startswith(s3_bucket[len("s3://"):])
    again = trainer.run(train_config(tiny_shards, runs, "on-s3", "train.max_steps=5", "train.checkpoint_every=2"))
    assert again.error is None
    assert again.metrics["step"] == 5 and again.metrics["restore_s"] > 0
