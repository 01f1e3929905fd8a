"""Checkpoint rules without a training run: which directories count as complete, and which
setting changes make a checkpoint impossible to resume exactly."""
import json

import pytest

from cldr_dist.config import load_config
from cldr_dist.train.checkpoint import ResumeError, TrainState, check_resumable, checkpoint_problem


def zero3_checkpoint(root, world: int = 2):
    """The file names a ZeRO-3 run of `world` ranks writes (contents do not matter to the rule):
    at stage 3 every rank writes its own parameter partition as well as its optimizer shard."""
    d = root / "checkpoint_2026-01-01_00-00-00.000000"
    (d / "deepspeed").mkdir(parents=True)
    (d / "trainer_state.json").write_text(json.dumps({"step": 2, "world_size": world}))
    names = ["model.pt", *(f"rng-rank{r}.pt" for r in range(world))]
    for r in range(world):
        names += [f"deepspeed/zero_pp_rank_{r}_mp_rank_00_model_states.pt",
                  f"deepspeed/zero_pp_rank_{r}_mp_rank_00_optim_states.pt"]
    for name in names:
        (d / name).write_bytes(b"x")
    return d


def test_zero3_checkpoint_missing_one_ranks_parameter_partition_is_incomplete(tmp_path):
    import pyarrow.fs
    fs = pyarrow.fs.LocalFileSystem()
    d = zero3_checkpoint(tmp_path)
    assert checkpoint_problem(fs, str(d), zero_stage=3) is None
    (d / "deepspeed" / "zero_pp_rank_1_mp_rank_00_model_states.pt").unlink()
    # rank 0's model states are still there: "any model_states.pt" is not enough at stage 3
    assert checkpoint_problem(fs, str(d), zero_stage=3) == "no deepspeed/ model states of rank 1"


def test_zero3_checkpoint_missing_rank_zero_partition_is_incomplete(tmp_path):
    import pyarrow.fs
    d = zero3_checkpoint(tmp_path, world=3)
    (d / "deepspeed" / "zero_pp_rank_0_mp_rank_00_model_states.pt").unlink()
    assert checkpoint_problem(pyarrow.fs.LocalFileSystem(), str(d), zero_stage=3) == "no deepspeed/ model states of rank 0"


def config_dict(*overrides: str) -> dict:
    return load_config(None, list(overrides)).to_dict()


def saved_state(*overrides: str) -> TrainState:
    return TrainState(epoch=0, batch=3, step=3, world_size=2, config=config_dict(*overrides))


# Each changes where a resumed epoch's remaining samples are: batches consumed are skipped by
# arithmetic on exactly these settings (data/reader.py).
DATA_PLAN_CHANGES = [
    ("train.batch_size", "32", "16", "train.batch_size 32 -> 16"),
    ("train.grad_accum", "1", "2", "train.grad_accum 1 -> 2"),
    ("data.loader_workers", "1", "2", "data.loader_workers 1 -> 2"),
    ("data.seed", "3", "4", "data.seed 3 -> 4"),
    ("data.shuffle_buffer", "2000", "100", "data.shuffle_buffer 2000 -> 100"),
    ("data.split", "mixed", "drug_blind", "data.split 'mixed' -> 'drug_blind'"),
    ("data.shards", "shards/a", "shards/b", "data.shards 'shards/a' -> 'shards/b'"),
]


@pytest.mark.parametrize("key,before,after,named", DATA_PLAN_CHANGES)
def test_resume_refuses_a_changed_data_plan(key, before, after, named):
    state = saved_state(f"{key}={before}", "train.max_steps=10")
    with pytest.raises(ResumeError) as e:
        check_resumable(state, "ckpt-7", world=2, config=config_dict(f"{key}={after}", "train.max_steps=10"))
    message = str(e.value)
    assert named in message and "checkpoint ckpt-7 cannot be resumed exactly" in message


def test_resume_names_every_changed_plan_key_and_not_the_others():
    state = saved_state("train.batch_size=32", "data.seed=3", "train.max_steps=10")
    with pytest.raises(ResumeError) as e:
        check_resumable(state, "ckpt", world=2,
                        config=config_dict("train.batch_size=16", "data.seed=4", "train.max_steps=20"))
    message = str(e.value)
    assert "train.batch_size 32 -> 16" in message and "data.seed 3 -> 4" in message
    assert "max_steps" not in message


def test_resume_allows_and_reports_other_changes():
    state = saved_state("train.max_steps=10", "train.log_every=5")
    other = check_resumable(state, "ckpt", world=2,
                            config=config_dict("train.max_steps=20", "train.log_every=1"))
    assert other == ["train.log_every", "train.max_steps"]
    assert check_resumable(state, "ckpt", world=2, config=config_dict("train.max_steps=10", "train.log_every=5")) == []


def test_resume_refuses_another_world_size():
    with pytest.raises(ResumeError, match="written by 2 workers; resume with ray.num_workers=2"):
        check_resumable(saved_state(), "ckpt", world=3, config=config_dict())


def test_state_without_a_config_resumes_with_nothing_to_report():
    """Checkpoints written before the config was recorded: nothing to compare, nothing refused."""
    state = TrainState(world_size=2)
    assert check_resumable(state, "ckpt", world=2, config=config_dict("train.batch_size=8")) == []


def test_a_report_carries_the_metrics_as_they_were_when_reported(monkeypatch):
    """Ray holds a reported dict until its controller polls the worker, while the loop updates the
    live one at the next epoch: an epoch's report once reached Tune with the next epoch's scores."""
    import ray.train

    from cldr_dist.train.checkpoint import report
    held = []
    monkeypatch.setattr(ray.train, "report", lambda metrics, checkpoint=None: held.append((metrics, checkpoint)))
    live = {"epochs_done": 1, "val_mse": 0.0036}
    report(live, checkpoint="epoch-1")
    live.update(epochs_done=2, val_mse=0.0037)   # the next epoch, before Ray reads the report
    assert held == [({"epochs_done": 1, "val_mse": 0.0036}, "epoch-1")]
