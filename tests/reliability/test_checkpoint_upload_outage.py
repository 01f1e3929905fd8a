"""The S3 store goes away in the middle of a checkpoint upload of a training run whose storage
is s3://, and comes back: the run stops with an error, the half-uploaded checkpoint is never
resumed from, and rerunning the same run resumes from the last complete checkpoint and
finishes with the planned optimizer steps and the undisturbed run's final loss."""
import os
import threading
import time

import pytest

from cldr_dist.train import trainer

from tests.conftest import RestartableS3, own_state_api, train_config

STEPS = ["train.max_steps=6", "train.checkpoint_every=2", "train.mode=finetune"]  # checkpoints at 2 and 4
POLL_S = 0.02


@pytest.fixture(scope="module")
def s3_and_ray():
    """A restartable S3 server and a Ray instance whose workers write checkpoints to it."""
    import boto3
    import ray

    from cldr_dist.train.trainer import worker_env
    s3 = RestartableS3()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": s3.endpoint}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    boto3.client("s3", endpoint_url=s3.endpoint).create_bucket(Bucket="ckpt")
    with own_state_api():
        ray.init(address="local", num_cpus=3, include_dashboard=False,
                 runtime_env={"env_vars": worker_env()}, log_to_driver=False)
    try:
        yield s3
    finally:
        ray.shutdown()
        s3.stop()
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def checkpoint_keys(endpoint: str, prefix: str) -> dict[str, set[str]]:
    """checkpoint directory -> the object names under it."""
    import boto3
    s3 = boto3.client("s3", endpoint_url=endpoint)
    out: dict[str, set[str]] = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket="ckpt", Prefix=prefix):
        for o in page.get("Contents", []):
            rest = o["Key"][len(prefix):]
            if rest.startswith("checkpoint_"):
                directory, _, name = rest.partition("/")
                out.setdefault(directory, set()).add(name)
    return out


def stop_during_second_upload(s3: RestartableS3, prefix: str, seen: dict) -> threading.Thread:
    """Stop the server as soon as the second checkpoint's first object lands."""
    def watch():
        deadline = time.time() + 600
        while time.time() < deadline:
            try:
                dirs = checkpoint_keys(s3.endpoint, prefix)
            except Exception:  # noqa: BLE001 - the server may be busy; poll again
                continue
            if len(dirs) >= 2:
                s3.stop()
                seen.update(dirs)
                return
            time.sleep(POLL_S)
    t = threading.Thread(target=watch, daemon=True)
    t.start()
    return t


def loss_steps(endpoint: str, run: str) -> list[int]:
    """The steps whose loss rank 0's CSV holds on the run's storage (synced at each checkpoint;
    a rerun downloads it and appends)."""
    import boto3
    body = boto3.client("s3", endpoint_url=endpoint).get_object(
        Bucket="ckpt", Key=f"runs/{run}/logs/finetune_metrics.csv")["Body"].read().decode()
    return [int(line.split(",")[2]) for line in body.splitlines()[1:] if ",mse," in line]


@pytest.mark.slow  # three training runs on S3 through moto: minutes on 2 cores
def test_outage_mid_checkpoint_upload_then_rerun_finishes(s3_and_ray, tiny_shards, tmp_path, monkeypatch):
    s3 = s3_and_ray
    monkeypatch.chdir(tmp_path)  # anything a run writes to a relative path stays in tmp_path
    straight = trainer.run(train_config(tiny_shards, "s3://ckpt/runs", "straight", *STEPS))
    assert straight.metrics["step"] == 6

    seen: dict = {}
    watcher = stop_during_second_upload(s3, "runs/outage/", seen)
    with pytest.raises(Exception):  # Ray Train raises the worker's upload error from fit()
        trainer.run(train_config(tiny_shards, "s3://ckpt/runs", "outage", *STEPS))
    watcher.join(timeout=30)
    assert seen, "the second checkpoint upload was never seen"
    s3.start()

    dirs = checkpoint_keys(s3.endpoint, "runs/outage/")
    first, second = sorted(dirs)
    assert dirs[second] < dirs[first], f"the second upload was not cut short: {dirs}"
    # the logs reach S3 just before each checkpoint's upload: with step 2's, and with step 4's
    # unless a rank's upload (and so the outage) came first
    cut = loss_steps(s3.endpoint, "outage")
    assert cut in ([1, 2], [1, 2, 3, 4]), cut

    again = trainer.run(train_config(tiny_shards, "s3://ckpt/runs", "outage", *STEPS))
    assert again.metrics["step"] == 6
    assert again.metrics["loss"] == pytest.approx(straight.metrics["loss"], abs=1e-4)
    assert not again.checkpoint.path.endswith(second)
    assert again.metrics.get("restore_s", 0) > 0, again.metrics   # restored, not started afresh
    assert "restore_s" not in straight.metrics
    # the rerun logged steps 3-6: it resumed from the complete step-2 checkpoint - not from
    # scratch (1, 2, ...), not from the cut step-4 one (5, 6)
    steps = loss_steps(s3.endpoint, "outage")
    assert steps[:len(cut)] == cut and steps[len(cut):] == [3, 4, 5, 6], steps
