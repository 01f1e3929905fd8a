"""The driver side: a Ray Train TorchTrainer around train_loop_per_worker.

Resuming is rerunning: the same ray.name and ray.storage_path make Ray Train (V2) hand the
latest complete checkpoint to ray.train.get_checkpoint() in every worker.
"""
from __future__ import annotations

import copy
import logging
import os
import re
import signal
import threading
from pathlib import Path
from urllib.parse import urlparse

from cldr_dist.config import Config, ConfigError, RayConfig, check_shared_storage
from cldr_dist.data import storage
from cldr_dist.train import console
from cldr_dist.train.device import process_group_backend
from cldr_dist.train.loop import FAULT_ENV, train_loop_per_worker

# Variables the workers need from the driver's environment (S3 endpoint and credentials);
# they travel in the runtime_env, never in logs.
# DS_ACCELERATOR is not among them: each worker sets it from ray.use_gpu (train/device.py).
FORWARDED_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION",
                 "AWS_REGION", "AWS_ENDPOINT_URL")
ERROR_LINE = re.compile(r"\b[A-Z]\w*(Error|Exception): .+$")


# Ray's State API server address. Ray Train's placement-group cleaner asks the State API whether
# the run's controller is alive; given no address, the State API connects to the Ray instance
# started last on this machine, which may be someone else's: its dashboard does not know our
# controller, so the cleaner removes our workers' placement group mid-run ("A worker health
# check failed ... placement group was removed"). A local session has no dashboard, so we point
# the State API at an unreachable port: its calls fail, which Ray Train tolerates (it keeps
# monitoring), as when no other Ray instance runs. Set before ray.init: the raylet and every
# worker inherit it.
STATE_API_ENV = "RAY_API_SERVER_ADDRESS"


def free_local_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unreachable_state_api() -> str:
    return f"http://127.0.0.1:{free_local_port()}"


# Read by each Ray worker process at its start: the niceness it gives itself (Ray's default 15)
NICENESS_ENV = "RAY_worker_niceness"


def worker_env(worker_niceness: int = RayConfig.worker_niceness) -> dict[str, str]:
    return {**{k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}, **console.worker_console_env(),
            NICENESS_ENV: str(worker_niceness)}


def root_cause(e: Exception | str) -> str:
    """The worker's own error, in one line, out of Ray Train's WorkerGroupError, whose message
    only says that workers failed, then a traceback snippet cut in the middle when long: the
    first failed worker's exception (its worker_failures), else the last "SomethingError:
    message" line of the message. A message ending in a colon (load_state_dict's) gets its next line."""
    failures = getattr(e, "worker_failures", None) or {}
    if failures:
        e = failures[min(failures)]
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    for i in reversed(range(len(lines))):
        if m := ERROR_LINE.search(lines[i]):
            return _with_next(m.group(0), lines, i)
    if not isinstance(e, Exception):
        return (lines or [""])[0]
    return _with_next(f"{type(e).__name__}: {(lines or [''])[0]}", lines, 0)


def _with_next(cause: str, lines: list[str], i: int) -> str:
    return f"{cause} {lines[i + 1]}" if cause.endswith(":") and i + 1 < len(lines) else cause


def ensure_ray(cfg: Config) -> None:
    start_ray(cfg.ray.address, max(2, int(cfg.ray.num_workers * cfg.ray.cpus_per_worker) + 1),
              worker_niceness=cfg.ray.worker_niceness)


def start_ray(address: str | None, local_cpus: int, state_api: bool = False,
              worker_niceness: int = RayConfig.worker_niceness) -> bool:
    """Joins the cluster at `address`, or starts a local Ray instance of `local_cpus` CPUs,
    unless this process is already connected; returns whether this call connected it (so the
    caller that started Ray may shut it down). Training and `cldr predict --ray` both start here.
    state_api: a local instance gets its own dashboard and the State API points at it. Ray
    Train's placement-group cleaner then sees a controller that was killed (a Tune trial that
    ASHA stopped) and frees its workers' CPUs; without it they stay reserved until this process
    exits.
    worker_niceness: of every worker process this session starts (config.RayConfig)."""
    import ray
    if ray.is_initialized():
        return False
    # Inside a Ray Job the job's runtime_env already reaches the workers, and Ray refuses to
    # merge a driver env var the job also sets. The niceness never conflicts: Ray's job
    # supervisor removes it from the job's env before it starts the driver.
    in_job = bool(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"))
    env_vars = {NICENESS_ENV: str(worker_niceness)} if in_job else worker_env(worker_niceness)
    runtime_env = {"env_vars": env_vars}
    console.before_init()
    # logging_level: the driver's Ray INFO lines ("Started a local Ray instance") are not events of the run
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True, logging_level=logging.WARNING)
    else:
        port = free_local_port()
        os.environ[STATE_API_ENV] = f"http://127.0.0.1:{port}"   # unreachable unless state_api
        dashboard = {"include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": port} \
            if state_api else {"include_dashboard": False}
        # address="local": without it ray.init joins whatever cluster this machine started last
        ray.init(address="local", num_cpus=local_cpus, runtime_env=runtime_env, log_to_driver=True,
                 logging_level=logging.WARNING, **dashboard)
    console.filter_worker_output()
    return True


def storage_target(storage_path: str):
    """(storage_path, storage_filesystem) for RunConfig: s3:// URLs go through pyarrow with the
    configured endpoint, so a MinIO or local server works like AWS."""
    if not storage.is_s3(storage_path):
        return str(Path(storage_path).resolve()), None
    import pyarrow.fs
    endpoint = storage.endpoint()
    kwargs = {}
    if endpoint:
        u = urlparse(endpoint)
        kwargs = {"endpoint_override": u.netloc, "scheme": u.scheme or "https"}
    fs = pyarrow.fs.S3FileSystem(region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"), **kwargs)
    return storage_path[len("s3://"):], fs


def log_dir(cfg: Config) -> str:
    """Where rank 0's CSV and TensorBoard logs land: beside the run's checkpoints, on its
    storage (an s3:// URL or an absolute local path), not on whatever node rank 0 ran."""
    if storage.is_s3(cfg.ray.storage_path):
        return storage.join(cfg.ray.storage_path, cfg.ray.name, "logs")
    return str(Path(cfg.ray.storage_path, cfg.ray.name, "logs").resolve())


def absolute_paths(cfg: Config) -> Config:
    """Ray workers run in their own working directory: local paths must be absolute."""
    cfg = copy.deepcopy(cfg)
    for section, key in (("data", "shards"), ("data", "data_dir"), ("data", "held_out_drugs"),
                         ("train", "deepspeed_config"), ("train", "init_from")):
        obj = getattr(cfg, section)
        value = getattr(obj, key)
        if value and not storage.is_s3(value):
            setattr(obj, key, str(Path(value).resolve()))
    return cfg


def preflight(cfg: Config) -> None:
    """Fail on the driver, in one line, before any worker starts."""
    from cldr_dist.data.reader import open_shards
    check_shared_storage(cfg)  # again: callers (demo, cldr experiment) set paths after loading
    shards = open_shards(cfg.data.shards)
    shards.part(cfg.data.split, "train")
    if not Path(cfg.train.deepspeed_config).is_file():
        raise ConfigError(f"train.deepspeed_config: file not found: {cfg.train.deepspeed_config}")
    if cfg.train.init_from and not storage.exists(storage.join(cfg.train.init_from, "model.pt")):
        raise ConfigError(f"train.init_from: no model.pt in {cfg.train.init_from}")


def run(cfg: Config, callbacks: list | None = None):
    """Runs (or resumes) cfg.ray.name; returns the ray.train Result. callbacks: Ray Train
    callbacks of the driver (`cldr tune` passes Tune's reporter)."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer
    cfg = absolute_paths(cfg)
    preflight(cfg)
    ensure_ray(cfg)
    path, fs = storage_target(cfg.ray.storage_path)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.to_dict(), "log_dir": log_dir(cfg), "fault": os.environ.get(FAULT_ENV)},
        torch_config=TorchConfig(backend=process_group_backend(cfg.ray.use_gpu)),
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu,
                                               resources_per_worker={"CPU": cfg.ray.cpus_per_worker},
                                               placement_strategy=cfg.ray.placement_strategy),
        run_config=ray.train.RunConfig(
            name=cfg.ray.name, storage_path=path, storage_filesystem=fs, callbacks=callbacks,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            # Ray Train's own INFO lines (resources requested, worker group started, process
            # group set up) stay in its log files; its warnings and errors reach the console
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            failure_config=ray.train.FailureConfig(max_failures=cfg.ray.max_failures)),
    )
    return fit(trainer)


def fit(trainer):
    """trainer.fit(), raising KeyboardInterrupt where Ctrl+C aborted the run. Ray Train's own
    SIGINT handler aborts the run, then ends it with SystemExit (status 0 or 1, depending on where
    the signal caught the driver), so an interrupted `cldr pretrain` or `cldr experiment` would
    exit silently. That handler also stays installed after fit(), where a later Ctrl+C (the next
    stage's data loading) would abort a run long gone, so the handler fit() found is put back."""
    if threading.current_thread() is not threading.main_thread():
        return trainer.fit()    # Ray installs no handler off the main thread (Tune's trials)
    saved_handler = signal.getsignal(signal.SIGINT)
    # Python writes each signal it catches to the wakeup fd, whichever handler then runs: the one
    # way to tell afterwards that a SystemExit out of fit() was Ctrl+C and not Ray's own exit
    seen, wakeup = os.pipe()
    os.set_blocking(seen, False)
    os.set_blocking(wakeup, False)
    saved_wakeup = signal.set_wakeup_fd(wakeup, warn_on_full_buffer=False)
    try:
        return trainer.fit()
    except SystemExit:
        if signal.SIGINT not in signals_received(seen):
            raise
        raise KeyboardInterrupt from None
    finally:
        signal.set_wakeup_fd(saved_wakeup)
        signal.signal(signal.SIGINT, saved_handler)
        os.close(seen)
        os.close(wakeup)


def signals_received(wakeup_reader: int) -> set[int]:
    try:
        return set(os.read(wakeup_reader, 4096))
    except BlockingIOError:
        return set()
