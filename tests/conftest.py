"""Shared fixtures: tiny real GDSC data, a local S3 server (moto, over HTTP on 127.0.0.1),
tiny shards, and one Ray session per test module."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "data" / "gdsc_v17" / "tiny"
HELD_OUT = REPO / "data" / "gdsc_v17" / "drug_blind_test_drugs.txt"

os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.fixture(scope="session")
def tiny_tables():
    from cldr_dist.data.tables import load_tables
    return load_tables(TINY)


@pytest.fixture
def data_dir(tmp_path):
    """A writable copy of the tiny dataset directory, for tests that corrupt it."""
    import shutil
    d = tmp_path / "data"
    shutil.copytree(TINY, d)
    for f in d.iterdir():
        f.chmod(0o644)
    return d


@pytest.fixture(scope="session")
def tiny_prepared(tiny_tables):
    """(tokenizer, FeatureTables, caption ids per row, drug rows, cell rows) of the tiny data."""
    from cldr_dist.data.shards import prepare
    return prepare(tiny_tables, vocab_size=2000)


def make_samples(tables, prepared, rows) -> list[dict]:
    """Decoded samples, exactly as the shard reader yields them, without writing shards."""
    from cldr_dist.data.shards import decoded_samples
    _, _, caption_ids, drows, crows = prepared
    return [s for _, s in decoded_samples(tables, rows, caption_ids, drows, crows)]


@pytest.fixture
def tiny_batch(tiny_tables, tiny_prepared):
    """A DRPBatch of 32 real tiny-GDSC samples (several distinct drugs and cells)."""
    from cldr_dist.data.batch import collate
    rows = np.random.default_rng(0).choice(len(tiny_tables.responses), 32, replace=False)
    return collate(make_samples(tiny_tables, tiny_prepared, rows), tiny_prepared[1])


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def own_state_api():
    """Keeps a dashboard-less test Ray session's State API calls inside the session, as
    ensure_ray does for a local run (trainer.STATE_API_ENV says why); restored afterwards."""
    from cldr_dist.train.trainer import STATE_API_ENV, unreachable_state_api
    saved = os.environ.get(STATE_API_ENV)
    os.environ[STATE_API_ENV] = unreachable_state_api()
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(STATE_API_ENV, None)
        else:
            os.environ[STATE_API_ENV] = saved


class RestartableS3:
    """A moto S3 server on a fixed 127.0.0.1 port that can go away and come back. Its buckets
    live in this process, so a restart brings the store back with what it held: an endpoint
    outage, not data loss."""

    def __init__(self):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.server = None
        self.start()

    def start(self):
        from moto.server import ThreadedMotoServer
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def stop(self):
        if self.server:
            self.server.stop()
            self.server = None


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 server (moto in server mode) over HTTP on 127.0.0.1, stopped at session end.
    Yields its endpoint URL; AWS_* variables point clients (s3fs, boto3, Ray workers) at it."""
    from moto.server import ThreadedMotoServer
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                            "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=endpoint)
    try:
        yield endpoint
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh bucket on the local S3 server; yields s3://NAME."""
    import uuid

    import boto3
    name = f"cldr-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory):
    """Shards of the tiny data on local disk (small shards, so that splitting is exercised)."""
    from cldr_dist.config import load_config
    from cldr_dist.data.shards import build_shards
    out = tmp_path_factory.mktemp("shards") / "tiny"
    cfg = load_config(None, [f"data.data_dir={TINY}", f"data.held_out_drugs={HELD_OUT}",
                             "data.samples_per_shard=100"])
    build_shards(cfg, out=str(out), progress=False, log=lambda *_: None)
    return str(out)


@contextlib.contextmanager
def local_ray_session(log_to_driver: bool = False):
    """A local Ray instance of 3 CPUs whose workers get the trainer's env (the S3 endpoint and
    credentials set at this point), shut down on exit."""
    import ray

    from cldr_dist.train.trainer import worker_env
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    with own_state_api():
        ray.init(address="local", num_cpus=3, include_dashboard=False, runtime_env={"env_vars": worker_env()},
                 log_to_driver=log_to_driver)
        try:
            yield
        finally:
            ray.shutdown()


@pytest.fixture(scope="module")
def ray_local(s3_server):
    """One local Ray instance per test module (ray.init costs seconds); shut down after it.
    Started after the S3 server, so workers inherit its endpoint and credentials."""
    with local_ray_session():
        yield


def train_config(shards: str, storage_path: str, name: str, *overrides: str):
    """A small, fast training config on the tiny shards: 2 workers, ZeRO-2, gloo."""
    from cldr_dist.config import load_config
    return load_config(REPO / "configs" / "demo.yaml", [
        f"data.shards={shards}", f"ray.storage_path={storage_path}", f"ray.name={name}",
        f"train.deepspeed_config={REPO / 'configs' / 'deepspeed' / 'zero2.json'}",
        "train.batch_size=16", "train.epochs=1", "train.log_every=1", "train.zeroshot_samples=64",
        *overrides])


def write_checkpoint(shards: str, out: Path, mode: str, seed: int, *overrides: str,
                     metrics: dict | None = None) -> str:
    """A model-only checkpoint (checkpoint.save_model_checkpoint) of demo.yaml's model for
    `shards`, built from `seed` with its weights moved off their initial values so that no
    prediction is trivially constant: for tests of what reads checkpoints (export, evaluate)
    without the minute a Ray training run costs."""
    import torch

    from cldr_dist.config import load_config
    from cldr_dist.data.reader import open_shards
    from cldr_dist.train.checkpoint import save_model_checkpoint
    from cldr_dist.train.loop import make_model
    cfg = load_config(REPO / "configs" / "demo.yaml", [f"data.shards={shards}", f"train.mode={mode}",
                                                       f"train.seed={seed}", *overrides])
    torch.manual_seed(seed)
    model = make_model(cfg, open_shards(shards))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return save_model_checkpoint(out, cfg.to_dict(), model, metrics)
