"""Node and worker loss on a local multi-node Ray cluster (ray.cluster_utils.Cluster), in
pretraining and finetuning: with ray.max_failures=1 the worker group restarts and the run ends
with the planned number of optimizer steps and the undisturbed run's final loss.

Where the restart begins depends on what Ray Train registered before the loss: a node that
vanishes within a second of reporting a checkpoint takes that report with it, and the new
group starts from the previous registered checkpoint (or from step 0). Either way nothing
finished is lost and the result equals the undisturbed run's, which is what is asserted.

tests/train/test_faults.py covers a killed worker process in pretraining; here a whole node
goes (its raylet and every process on it), and a worker is killed in finetuning."""
import threading
import time
from pathlib import Path

import pytest

from cldr_dist.train import trainer
from cldr_dist.train.loop import FAULT_ENV

from tests.conftest import train_config

PLANNED = 6
STEPS = [f"train.max_steps={PLANNED}", "train.checkpoint_every=2", "ray.placement_strategy=SPREAD",
         "ray.max_failures=1"]

# the head and one worker node run a 2-worker SPREAD group; one spare node per removal test
# stands in for the replacement a cluster autoscaler would bring (Cluster.add_node must run on
# the main thread, and the main thread is waiting in fit())
SPARE_NODES = 2

pytestmark = pytest.mark.slow  # several training runs on a 3-raylet cluster: minutes on 2 cores


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    from cldr_dist.train.trainer import worker_env
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    for _ in range(SPARE_NODES + 1):
        c.add_node(num_cpus=2)
    c.wait_for_nodes()
    ray.init(address=c.address, runtime_env={"env_vars": worker_env()}, log_to_driver=False)
    try:
        yield c
    finally:
        ray.shutdown()
        c.shutdown()


def loss_steps(csv: Path) -> list[int]:
    if not csv.exists():
        return []
    return [int(line.split(",")[2]) for line in csv.read_text().splitlines()[1:] if ",loss," in line]


def busy_worker_node(cluster):
    """A non-head node that hosts a training worker right now."""
    import ray
    busy = {a["Address"]["NodeID"] for a in ray.state.actors(actor_state_name="ALIVE").values()
            if a["ActorClassName"] == "RayTrainWorker"}
    for node in cluster.worker_nodes:
        if node.node_id in busy:
            return node
    return next(iter(cluster.worker_nodes), None)


def remove_node_at_step(cluster, csv: Path, step: int, record: dict) -> threading.Thread:
    """Once the run has logged `step`, a node hosting a training worker goes away, abruptly,
    like a lost machine; the restarted group finds room on the spare node."""
    def watch():
        deadline = time.time() + 900
        while time.time() < deadline and max(loss_steps(csv), default=0) < step:
            time.sleep(0.2)
        victim = busy_worker_node(cluster)
        if not victim:
            return
        record["removed_at"] = time.time()
        cluster.remove_node(victim, allow_graceful=False)
        record["replaced"] = True
    t = threading.Thread(target=watch, daemon=True)
    t.start()
    return t


@pytest.fixture(scope="module")
def undisturbed(cluster, tiny_shards, tmp_path_factory):
    """Final loss of each mode's run without faults, on the same cluster and settings."""
    runs = tmp_path_factory.mktemp("undisturbed")
    out = {}
    for mode in ("pretrain", "finetune"):
        r = trainer.run(train_config(str(tiny_shards), str(runs), f"straight-{mode}", f"train.mode={mode}", *STEPS))
        assert r.error is None and r.metrics["step"] == PLANNED
        out[mode] = r.metrics["loss"]
    return out


def check_recovered(result, csv: Path, expected_loss: float) -> list[int]:
    assert result.error is None, result.error
    assert result.metrics["step"] == PLANNED
    assert result.metrics["loss"] == pytest.approx(expected_loss, abs=1e-4)
    steps = loss_steps(csv)
    assert steps[:3] == [1, 2, 3] and steps[-1] == PLANNED, steps
    assert len(steps) > len(set(steps)), f"no step was run twice, so no restart happened: {steps}"
    return steps


@pytest.mark.parametrize("mode", ["pretrain", "finetune"])
def test_node_removed_mid_run(cluster, undisturbed, tiny_shards, tmp_path, mode):
    runs = tmp_path / "runs"
    csv = runs / f"lost-node-{mode}" / "logs" / f"{mode}_metrics.csv"
    record = {}
    watcher = remove_node_at_step(cluster, csv, 3, record)
    t0 = time.time()
    result = trainer.run(train_config(str(tiny_shards), str(runs), f"lost-node-{mode}", f"train.mode={mode}", *STEPS))
    watcher.join(timeout=60)
    assert record.get("replaced"), "the node was never removed"
    check_recovered(result, csv, undisturbed[mode])
    print(f"\n{mode}: node removed {record['removed_at'] - t0:.0f}s into the run; "
          f"finished {time.time() - record['removed_at']:.0f}s after the removal")


def test_worker_killed_during_finetune(cluster, undisturbed, tiny_shards, tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    monkeypatch.setenv(FAULT_ENV, f"5:{tmp_path / 'killed'}")  # the last rank dies at step 5
    result = trainer.run(train_config(str(tiny_shards), str(runs), "killed-ft", "train.mode=finetune", *STEPS))
    assert (tmp_path / "killed").exists(), "the fault was never injected"
    steps = check_recovered(result, runs / "killed-ft" / "logs" / "finetune_metrics.csv", undisturbed["finetune"])
    assert result.metrics["restore_s"] > 0  # a killed process leaves its node: Ray has the checkpoint
    assert steps[:4] == [1, 2, 3, 4] and steps[4] in (3, 5)  # went on from the step-2 or step-4 checkpoint
