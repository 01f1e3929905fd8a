"""The local Ray session the trainer starts, and how a run ends (train/trainer.py)."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading

from cldr_dist.train import trainer

from tests.conftest import REPO, own_state_api, train_config

STEP_LINE = re.compile(r"\[pretrain\] epoch \d+/\d+ step \d+")


def test_workers_run_at_the_configured_niceness():
    """Ray starts worker processes at niceness 15 unless told otherwise; ray.worker_niceness
    reaches every worker of the session (what the training workers and Tune's trials run at)."""
    import ray

    from cldr_dist.train.trainer import start_ray
    with own_state_api():
        assert start_ray("", 1, worker_niceness=7)
        try:
            assert ray.get(ray.remote(lambda: os.nice(0)).remote()) == 7
            assert not start_ray("", 1, worker_niceness=0)   # an open session is kept as it is
        finally:
            ray.shutdown()


def test_a_finished_run_leaves_the_sigint_handler_it_found(ray_local, tiny_shards, tmp_path):
    """Ray Train installs its own SIGINT handler for fit() and leaves it behind; a Ctrl+C after
    the run (the next stage's data loading) would then abort a run long gone and exit 0."""
    before = signal.getsignal(signal.SIGINT)
    result = trainer.run(train_config(tiny_shards, str(tmp_path / "runs"), "handler", "train.max_steps=2"))
    assert result.error is None and result.metrics["step"] == 2
    assert signal.getsignal(signal.SIGINT) is before


def test_ctrl_c_ends_a_training_run_as_interrupted(tiny_shards, tmp_path):
    """Ctrl+C in the middle of `cldr pretrain`: the command says it was interrupted and exits
    130. Ray Train's own handler would end it silently with status 0 or 1 (1 where the signal
    caught the driver waiting on the run, as here before the fix): read as a finished run or an
    unexplained failure."""
    command = [sys.executable, "-m", "cldr_dist.cli", "pretrain", "--config", str(REPO / "configs" / "demo.yaml"),
               f"data.shards={tiny_shards}", f"ray.storage_path={tmp_path / 'runs'}", "ray.name=ctrl-c",
               f"train.deepspeed_config={REPO / 'configs' / 'deepspeed' / 'zero2.json'}",
               "train.batch_size=16", "train.epochs=1000", "train.log_every=1"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0"}
    # a shell's Ctrl+C: SIGINT to the command, whose default handler a background pytest may not pass on
    run = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    watchdog = threading.Timer(300, run.kill)   # a command that never ends fails instead of hanging
    watchdog.start()
    lines, interrupted = [], False
    for line in run.stdout:
        lines.append(line)
        if not interrupted and STEP_LINE.search(line):   # the workers are training
            run.send_signal(signal.SIGINT)
            interrupted = True
    watchdog.cancel()
    assert interrupted, "".join(lines)
    assert run.wait(timeout=60) == 130, "".join(lines)
    assert "cldr pretrain: interrupted" in "".join(lines)
