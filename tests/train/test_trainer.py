"""The local Ray session the trainer starts (train/trainer.py)."""
from __future__ import annotations

import os

from tests.conftest import own_state_api


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
