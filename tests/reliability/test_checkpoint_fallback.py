"""A checkpoint that lost a file (one rank's rng state, say) is not resumed from: the rerun
walks back to the newest older complete checkpoint of the same run, with one warning line,
and still ends at the planned optimizer step."""
import json
import time
from pathlib import Path

import pytest

from cldr_dist.train import trainer
from cldr_dist.train.checkpoint import checkpoint_problem, usable_checkpoint

from tests.conftest import local_ray_session, train_config

STEPS = ["train.max_steps=4", "train.checkpoint_every=2"]  # checkpoints at steps 2 and 4


@pytest.fixture(scope="module")
def ray_with_logs():
    """Own Ray session with worker output forwarded, so the rank-0 warning line is visible."""
    with local_ray_session(log_to_driver=True):
        yield


def checkpoints(run_dir: Path) -> list[Path]:
    return sorted(p for p in run_dir.iterdir() if p.is_dir() and p.name.startswith("checkpoint_"))


def loss_steps(run_dir: Path) -> list[int]:
    log = (run_dir / "logs" / "pretrain_metrics.csv").read_text().splitlines()
    return [int(line.split(",")[2]) for line in log[1:] if ",loss," in line]


@pytest.mark.slow  # two Ray training runs: minutes on a loaded 2-core machine
def test_resume_skips_checkpoint_missing_a_rank_file(ray_with_logs, tiny_shards, tmp_path, capfd):
    import pyarrow.fs
    runs = tmp_path / "runs"
    first = trainer.run(train_config(tiny_shards, str(runs), "holey", *STEPS))
    assert first.error is None and first.metrics["step"] == 4
    older, newest = checkpoints(runs / "holey")  # train.keep_checkpoints = 2
    assert Path(first.checkpoint.path) == newest
    # the completeness rule accepts what a real 2-rank ZeRO-2 run writes
    assert checkpoint_problem(pyarrow.fs.LocalFileSystem(), str(newest), zero_stage=2) is None
    (newest / "rng-rank1.pt").unlink()

    capfd.readouterr()
    again = trainer.run(train_config(tiny_shards, str(runs), "holey", "train.max_steps=6", "train.checkpoint_every=2"))
    assert again.error is None
    assert again.metrics["step"] == 6  # the planned steps, counted from the older checkpoint
    # steps 1-4 of the first run, then 3-6: resumed at step 2, not 4 and not from scratch
    assert loss_steps(runs / "holey") == [1, 2, 3, 4, 3, 4, 5, 6]
    deadline = time.time() + 10  # worker output reaches the driver asynchronously
    out = ""
    while time.time() < deadline and "resuming from" not in out:
        time.sleep(0.5)
        out += capfd.readouterr().out
    warnings = [line for line in out.splitlines() if "is incomplete" in line]
    assert len(warnings) == 1, out[-3000:]  # once, from rank 0
    assert f"checkpoint {newest} is incomplete (no rng-rank1.pt); resuming from {older}" in warnings[0]


def fake_checkpoint(run_dir: Path, stamp: str, step: int) -> Path:
    """A checkpoint directory with the file names a 2-rank ZeRO-2 run writes (the slow test
    above checks the rule against a real one); contents do not matter to the choice."""
    d = run_dir / f"checkpoint_2026-01-01_00-00-{stamp}"
    (d / "deepspeed").mkdir(parents=True)
    (d / "trainer_state.json").write_text(json.dumps({"step": step, "world_size": 2}))
    for name in ("model.pt", "rng-rank0.pt", "rng-rank1.pt", "deepspeed/mp_rank_00_model_states.pt",
                 "deepspeed/zero_pp_rank_0_mp_rank_00_optim_states.pt",
                 "deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt"):
        (d / name).write_bytes(b"x")
    return d


def test_choice_of_checkpoint(tmp_path):
    """Newest complete older checkpoint wins; every candidate broken -> None (from scratch);
    a lost ZeRO optimizer shard counts as broken too."""
    import pyarrow.fs
    import ray.train
    fs = pyarrow.fs.LocalFileSystem()
    run_dir = tmp_path / "run"
    oldest, old, new = (fake_checkpoint(run_dir, s, i) for s, i in (("01.000001", 2), ("02.000002", 4), ("03.000003", 6)))
    handed = ray.train.Checkpoint(str(new), filesystem=fs)
    assert usable_checkpoint(handed, zero_stage=2) == (str(new), None)

    (new / "rng-rank1.pt").unlink()
    (old / "deepspeed" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    assert checkpoint_problem(fs, str(old), zero_stage=2) == "no deepspeed/ optimizer shard of rank 1"
    assert checkpoint_problem(fs, str(old), zero_stage=0) is None  # without ZeRO there are no shards
    assert usable_checkpoint(handed, zero_stage=2) == (
        str(oldest), f"warning: checkpoint {new} is incomplete (no rng-rank1.pt); resuming from {oldest}")

    (oldest / "trainer_state.json").unlink()
    path, warning = usable_checkpoint(handed, zero_stage=2)
    assert path is None
    assert warning == (f"warning: checkpoint {new} is incomplete (no rng-rank1.pt) and no older complete "
                       f"checkpoint is left in {run_dir}; starting from scratch")
