"""Worker loss on a 2-node local Ray cluster: FailureConfig restarts the worker group from the
last checkpoint and the run ends with the planned optimizer steps and the unbroken run's loss."""
from pathlib import Path

import pytest

from cldr_dist.train import trainer
from cldr_dist.train.loop import FAULT_ENV

from tests.conftest import train_config

STEPS = ["train.max_steps=6", "train.checkpoint_every=2", "ray.placement_strategy=SPREAD"]


@pytest.fixture(scope="module")
def two_node_cluster():
    import ray
    from ray.cluster_utils import Cluster

    from cldr_dist.train.trainer import worker_env
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, runtime_env={"env_vars": worker_env()}, log_to_driver=False)
    try:
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_killed_worker_is_restarted_from_checkpoint(two_node_cluster, tiny_shards, tmp_path, monkeypatch):
    runs = str(tmp_path / "runs")
    straight = trainer.run(train_config(tiny_shards, runs, "straight", *STEPS))
    assert straight.error is None and straight.metrics["step"] == 6

    monkeypatch.setenv(FAULT_ENV, f"5:{tmp_path / 'killed'}")
    result = trainer.run(train_config(tiny_shards, runs, "faulty", "ray.max_failures=1", *STEPS))
    assert (tmp_path / "killed").exists(), "the fault was never injected"
    assert result.error is None
    assert result.metrics["step"] == 6  # the planned number of optimizer steps
    assert result.metrics["loss"] == pytest.approx(straight.metrics["loss"], abs=1e-4)
    log = (Path(runs) / "faulty" / "logs" / "pretrain_metrics.csv").read_text().splitlines()
    steps = [int(line.split(",")[2]) for line in log[1:] if ",loss," in line]
    assert steps[:4] == [1, 2, 3, 4] and steps[-1] == 6 and steps[4] in (3, 5)  # went on from a checkpoint
