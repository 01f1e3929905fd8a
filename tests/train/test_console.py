"""The console of a run: one line per event. What reaches the workers' environment, here and
in a Ray Job (launch/runtime_env.yaml), keeps Ray from doubling lines; the driver drops the
known noise of Ray's helpers and keeps everything else."""
import warnings
from pathlib import Path

import yaml

from cldr_dist.train.console import CONSOLE_ENV, QUIET_WARNINGS, filter_worker_output

REPO = Path(__file__).resolve().parents[2]


def test_workers_get_the_console_settings(monkeypatch):
    from cldr_dist.train.trainer import worker_env
    monkeypatch.setenv("PYTHONWARNINGS", "error::ResourceWarning")   # the user's own filters stay
    env = worker_env()
    assert env["RAY_TRAIN_ENABLE_PRINT_PATCH"] == "0"   # Ray Train's print patch doubled every line
    assert env["PYTHONWARNINGS"].split(",") == ["error::ResourceWarning", *QUIET_WARNINGS]
    job_env = yaml.safe_load((REPO / "launch" / "runtime_env.yaml").read_text())["env_vars"]
    assert {k: job_env[k] for k in CONSOLE_ENV} == CONSOLE_ENV
    assert job_env["PYTHONWARNINGS"].split(",") == list(QUIET_WARNINGS)


def test_quiet_warnings_are_third_party_deprecations_only():
    for spec in QUIET_WARNINGS:
        action, message, category = spec.split(":")
        assert action == "ignore" and category in ("FutureWarning", "DeprecationWarning") and message
        assert "cldr" not in message and "," not in message
    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()
        for spec in QUIET_WARNINGS:
            warnings._setoption(spec)
        warnings.warn("`torch.distributed.all_gather_into_tensor` is deprecated. Please use x", FutureWarning)
        warnings.warn("something else is deprecated", FutureWarning)
    assert [str(w.message) for w in caught] == ["something else is deprecated"]


def test_driver_drops_known_noise_and_keeps_the_rest():
    """Against Ray's own dispatcher, so a Ray upgrade that moves it fails here, not silently."""
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    printed = []
    dispatcher.add_handler("ray_print_logs", lambda data: printed.append(data))
    try:
        assert filter_worker_output() and filter_worker_output()   # idempotent: wrapped once
        assert sum(name == "ray_print_logs" for name, _ in dispatcher.handlers) == 1
        worker = {"pid": 11, "actor_name": "RayTrainWorker", "is_err": False}
        dispatcher.emit({**worker, "lines": [
            "DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully",
            "[pretrain] epoch 1/2 step 5/30 loss 4.1",
            "Traceback (most recent call last):", "ValueError: a real error"]})
        dispatcher.emit({"pid": 12, "actor_name": "PlacementGroupCleaner", "is_err": True,
                         "lines": ["Failed to query Ray Train Controller actor state."]})
        dispatcher.emit({"pid": 13, "actor_name": "TrainController", "is_err": True, "lines": [
            "[2026-11-29 19:22:02,067 E 1 2] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' "
            "and ID: 'c92c' has constructor arguments in the object store and max_restarts > 0"]})
        dispatcher.emit({"pid": 13, "actor_name": "TrainController", "is_err": True, "lines": [
            "Failed to register placement group with cleaner: The actor died unexpectedly before finishing this task.",
            "\tclass_name: PlacementGroupCleaner", "\tpid: 531",
            "The actor is dead because its worker process has died. Placement group may not be cleaned up if "
            "controller dies ungracefully.",
            "A worker group failed to start in 60 s"]})
        assert [d["lines"] for d in printed] == [
            ["[pretrain] epoch 1/2 step 5/30 loss 4.1", "Traceback (most recent call last):", "ValueError: a real error"],
            ["A worker group failed to start in 60 s"]]
        assert printed[0]["pid"] == 11 and printed[0]["actor_name"] == "RayTrainWorker"
    finally:
        dispatcher.remove_handler("ray_print_logs")


def test_a_failed_run_is_one_line_of_the_workers_own_error():
    """Ray Train's WorkerGroupError cuts a long worker traceback in the middle, where the
    exception's line was (load_state_dict's size mismatches): the worker's exception itself is
    in worker_failures."""
    from cldr_dist.train.trainer import root_cause

    class WorkerGroupError(Exception):
        def __init__(self, message, failures):
            super().__init__("Training failed due to worker errors:\n" + message)
            self.worker_failures = failures
    message = "Error(s) in loading state_dict for CLDRModel:\n\tsize mismatch for drp.fc.weight: shapes differ.\n"
    truncated = ("[Rank 0,1 Error Snippet]:\nTraceback (most recent call last):\n  File \"loop.py\"...\n"
                 "... (Output truncated. See individual worker logs for full details) ...\n\tshapes differ.\n")
    e = WorkerGroupError(truncated, {1: RuntimeError(message), 0: RuntimeError(message)})
    assert root_cause(e) == ("RuntimeError: Error(s) in loading state_dict for CLDRModel: "
                             "size mismatch for drp.fc.weight: shapes differ.")
    snippet = ("[Rank 0 Error Snippet]:\nTraceback (most recent call last):\n  File \"loop.py\", line 3\n"
               "ValueError: drug_blind/train has 900 samples: too few for 2 workers\n")
    assert root_cause(WorkerGroupError(snippet, {})) == "ValueError: drug_blind/train has 900 samples: too few for 2 workers"
    assert root_cause(RuntimeError("disk full\nmore")) == "RuntimeError: disk full"
