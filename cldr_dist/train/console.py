"""The console of a training run: one line per event, rank 0's progress lines, and what goes
wrong - not Ray's and third-party libraries' chatter. Ray forwards every line its worker and
actor processes print to the driver (ray.init(log_to_driver=True)); everything it forwards
also stays in the session's log files (/tmp/ray/session_latest/logs/).

Where the noise came from, and what is done about it:
- every progress line twice: Ray Train (V2) patches print() in its workers to also log each
  line through a logger whose handler writes to the console, and Ray forwards both.
  RAY_TRAIN_ENABLE_PRINT_PATCH=0 in the workers' environment: print() is print().
- Ray Train's INFO lines (resources requested, worker group started, process group set up):
  RunConfig(logging_config=LoggingConfig("WARNING")), in trainer.run; its warnings stay.
- the driver's own Ray INFO lines and the notice that Ray picked token auth for a new local
  instance (its default): ray.init(logging_level=WARNING) and a filter on that one message.
- raw ANSI codes around the "(RayTrainWorker pid=...)" prefix in a log file or a pipe:
  RAY_COLOR_PREFIX=0 unless the console is a terminal (NO_COLOR turns it off there too).
- a known third-party deprecation warning, once per worker: PYTHONWARNINGS in the workers.
- Ray Train's PlacementGroupCleaner, a detached helper that polls the State API every second:
  the API needs the dashboard, which a local instance runs without (it costs ~0.9 GiB), so every
  poll printed a warning, or a traceback where two Ray instances share the machine; DeepSpeed's
  "built successfully" print on every CPU worker; a core_worker log about an actor's
  constructor arguments; the controller's warning when the cleaner died (where another Ray
  instance runs on the machine, the cleaner's State API calls reach that one, which has no
  such controller, and it exits): dropped on the driver (NOISE_*), since Ray offers no setting.
A worker's exception is not filtered: the run fails, and the driver prints its one line
(trainer.root_cause).
"""
from __future__ import annotations

import logging
import os
import re
import sys

# Third-party deprecations we cannot act on (never warnings of this package: DeepSpeed's ZeRO
# calls torch's deprecated all_gather_into_tensor, our gathered loss does not). PYTHONWARNINGS
# separates filters with commas, so no message here may hold one.
QUIET_WARNINGS = ("ignore:`torch.distributed.all_gather_into_tensor` is deprecated:FutureWarning",)
CONSOLE_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}

NOISE_ACTORS = ("PlacementGroupCleaner",)
NOISE_LINES = (
    re.compile(r"^DeepSpeed [\w.]+ built successfully$"),
    re.compile(r"core_worker\.cc:\d+: Actor with class name: '\w+' and ID: '\w+' has constructor arguments "
               r"in the object store and max_restarts > 0"),
)


def worker_console_env() -> dict[str, str]:
    """Environment for the workers (their runtime_env); the user's own PYTHONWARNINGS stay."""
    own = [w for w in os.environ.get("PYTHONWARNINGS", "").split(",") if w]
    return {**CONSOLE_ENV, "PYTHONWARNINGS": ",".join([*own, *QUIET_WARNINGS])}


def before_init() -> None:
    """Driver settings that must precede ray.init."""
    if os.environ.get("NO_COLOR") or not sys.stdout.isatty():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(
        lambda record: "Token authentication is enabled" not in record.getMessage())


# Multi-line records, dropped from their first line to their last: the controller's warning
# that the cleaner had died (where another Ray instance on the machine answers its State API
# calls, it finds no controller there and exits).
NOISE_BLOCKS = ((re.compile(r"^Failed to register placement group with cleaner: "),
                 re.compile(r"may not be cleaned up if controller dies ungracefully\.$")),)


def drop_noise(data: dict) -> list[str]:
    """The lines of one batch Ray forwards, without NOISE_*."""
    if data.get("actor_name") in NOISE_ACTORS:
        return []
    kept, end = [], None
    for line in data.get("lines", ()):
        if end is None:
            end = next((stop for start, stop in NOISE_BLOCKS if start.search(line)), None)
            if end is None and not any(p.search(line) for p in NOISE_LINES):
                kept.append(line)
        if end is not None and end.search(line):
            end = None
    return kept


def filter_worker_output() -> bool:
    """Drops the NOISE_* lines from what Ray prints on this driver. Ray has no public hook for
    it: this wraps the printer that ray.init(log_to_driver=True) registers with its dispatcher.
    On a Ray without one (another version), nothing is filtered and False is returned."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return False
    printer = dict(getattr(dispatcher, "handlers", ())).get("ray_print_logs")
    if printer is None or getattr(printer, "cldr_filtered", False):
        return printer is not None

    def filtered(data: dict) -> None:
        lines = drop_noise(data)
        if lines:
            printer({**data, "lines": lines})

    filtered.cldr_filtered = True
    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", filtered)
    return True
