"""Submit a `cldr` stage to a running Ray cluster as a Ray Job.

    python launch/job.py [--address http://HEAD:8265] [--gpu] [--no-wait] -- \
        pretrain --config configs/demo.yaml data.shards=s3://BUCKET/shards \
        ray.storage_path=s3://BUCKET/runs ray.name=demo-pretrain

runs exactly

    ray job submit --address http://HEAD:8265 --working-dir . \
        --runtime-env-json '<launch/runtime_env.yaml, plus --gpu / --forward-aws / --env>' \
        -- python -m cldr_dist.cli pretrain ... ray.address=auto

(`--dry-run` prints it instead). The job's driver joins the cluster with ray.init("auto") and
its TorchTrainer places the workers on the cluster's nodes. Resuming is resubmitting with the
same ray.name and ray.storage_path. Token auth (on by default in Ray 2.60): the `ray` client
reads RAY_AUTH_TOKEN or ~/.ray/auth_token, the same token the head was started with.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
RUNTIME_ENV = REPO / "launch" / "runtime_env.yaml"
AWS_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION",
            "AWS_REGION", "AWS_ENDPOINT_URL")
SECRET_WORDS = ("SECRET", "TOKEN", "KEY_ID")


def default_address() -> str:
    return os.environ.get("RAY_API_SERVER_ADDRESS") or "http://127.0.0.1:8265"


def ray_cli() -> str:
    """The `ray` next to this interpreter (the venv's), else the one on PATH."""
    here = Path(sys.executable).parent / "ray"
    return str(here) if here.exists() else (shutil.which("ray") or "ray")


def runtime_env(gpu: bool = False, forward_aws: bool = False, env: list[str] = ()) -> dict:
    """launch/runtime_env.yaml with the command line's additions."""
    renv = yaml.safe_load(RUNTIME_ENV.read_text()) or {}
    env_vars = {k: str(v) for k, v in (renv.get("env_vars") or {}).items()}
    if forward_aws:
        env_vars.update({k: os.environ[k] for k in AWS_VARS if os.environ.get(k)})
    for item in env:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"job.py: --env wants KEY=VALUE, got {item!r}")
        env_vars[key] = value
    renv["env_vars"] = env_vars
    return renv


def entrypoint(cldr_args: list[str], gpu: bool = False) -> list[str]:
    """`python -m cldr_dist.cli ...`, joined to the running cluster (ray.address=auto)."""
    args = list(cldr_args)
    if not any(a.startswith("ray.address=") for a in args):
        args.append("ray.address=auto")
    if gpu and not any(a.startswith("ray.use_gpu=") for a in args):
        args.append("ray.use_gpu=true")
    return ["python", "-m", "cldr_dist.cli", *args]


def submit_command(address: str, renv: dict, cldr_args: list[str], *, gpu: bool = False,
                   no_wait: bool = False, submission_id: str | None = None,
                   working_dir: str = ".") -> list[str]:
    cmd = [ray_cli(), "job", "submit", "--address", address, "--working-dir", working_dir,
           "--runtime-env-json", json.dumps(renv, separators=(",", ":"))]
    if submission_id:
        cmd += ["--submission-id", submission_id]
    if no_wait:
        cmd.append("--no-wait")
    return cmd + ["--", *entrypoint(cldr_args, gpu=gpu)]


def masked(cmd: list[str]) -> str:
    """The command for printing: secret env values replaced by ***."""
    out = []
    for part in cmd:
        if part.startswith("{") and '"env_vars"' in part:
            renv = json.loads(part)
            renv["env_vars"] = {k: ("***" if any(w in k for w in SECRET_WORDS) else v)
                                for k, v in renv["env_vars"].items()}
            part = json.dumps(renv, separators=(",", ":"))
        out.append(part)
    return shlex.join(out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalHead:
    """A one-node Ray cluster for tests and benchmarks: `ray start --head` on 127.0.0.1 with the
    dashboard (the Jobs API) on a free port, token auth on with a fresh token, its own short
    --temp-dir (Unix socket paths are limited to 107 bytes) and its own process group, so stop()
    ends exactly the processes it started, by pid.

    The environment of `ray start` (env=..., e.g. AWS_* of a test S3 server) is what every job
    and worker on it inherits. Ray's gRPC servers (GCS, raylet, workers) bind all interfaces
    whatever --node-ip-address says; the dashboard binds 127.0.0.1 and every RPC needs the token.
    """

    def __init__(self, num_cpus: int = 2, env: dict[str, str] | None = None):
        self.num_cpus = num_cpus
        self.temp_dir = tempfile.mkdtemp(prefix="rayj", dir="/tmp")
        self.dashboard_port = free_port()
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        token = secrets.token_hex(32)
        # RAY_AUTH_TOKEN in both environments: ~/.ray/auth_token is left alone.
        self.client_env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
        self.client_env.pop("RAY_AUTH_TOKEN_PATH", None)
        venv_bin = str(Path(sys.executable).parent)
        self.env = {**self.client_env, **(env or {}),
                    # keep 127.0.0.1 as the node address (Ray otherwise swaps it for the LAN IP)
                    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                    "RAY_USAGE_STATS_ENABLED": "0",
                    # the job's `python` is this interpreter, whose env has the dependencies
                    "PATH": venv_bin + os.pathsep + os.environ.get("PATH", "")}
        self.proc: subprocess.Popen | None = None
        self.pgid: int | None = None

    def command(self) -> list[str]:
        return [ray_cli(), "start", "--head", f"--num-cpus={self.num_cpus}", "--node-ip-address=127.0.0.1",
                f"--port={free_port()}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}", f"--dashboard-agent-listen-port={free_port()}",
                f"--dashboard-agent-grpc-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
                f"--metrics-export-port={free_port()}", f"--ray-client-server-port={free_port()}",
                f"--temp-dir={self.temp_dir}", "--disable-usage-stats"]

    def start(self) -> "LocalHead":
        """Starts `ray start` and returns at once; wait() for it."""
        self.proc = subprocess.Popen(self.command(), env=self.env, start_new_session=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.pgid = self.proc.pid  # start_new_session: the group every head process inherits
        return self

    def wait(self, timeout: float = 120) -> "LocalHead":
        out, _ = self.proc.communicate(timeout=timeout)
        if self.proc.returncode != 0:
            raise RuntimeError(f"ray start failed ({self.proc.returncode}):\n{out[-4000:]}")
        return self

    def pids(self) -> list[int]:
        """Processes of this head: its process group, or a command line naming its temp dir."""
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                state, _ppid, pgrp = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:3]
                if state != "Z" and (int(pgrp) == self.pgid or
                                     self.temp_dir.encode() in (entry / "cmdline").read_bytes()):
                    found.append(int(entry.name))
            except OSError:
                continue
        return found

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM to each of its processes, SIGKILL to what is left after `grace` seconds."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 2.0)):
            for pid in self.pids():
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.time() + wait
            while self.pids() and time.time() < deadline:
                time.sleep(0.2)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        self.proc = None

    def __enter__(self) -> "LocalHead":
        return self.start().wait()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                usage="%(prog)s [options] -- {pretrain,finetune,evaluate} [cldr args]")
    p.add_argument("--address", default=default_address(),
                   help="dashboard URL of the head (default: $RAY_API_SERVER_ADDRESS or %(default)s)")
    p.add_argument("--gpu", action="store_true", help="ray.use_gpu=true (workers then run DeepSpeed on cuda)")
    p.add_argument("--forward-aws", action="store_true",
                   help="send this shell's AWS_* variables in the runtime_env (they are stored in the "
                        "job's info on the head; prefer the nodes' environment or an IAM role)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="extra env var")
    p.add_argument("--submission-id", help="job id (default: Ray makes one)")
    p.add_argument("--no-wait", action="store_true", help="return after submitting; follow with "
                   "`ray job logs -f ID` / `ray job status ID`")
    p.add_argument("--dry-run", action="store_true", help="print the command, run nothing")
    p.add_argument("cldr_args", nargs=argparse.REMAINDER, help="cldr subcommand and its arguments")
    args = p.parse_args(argv)
    cldr_args = args.cldr_args[1:] if args.cldr_args[:1] == ["--"] else args.cldr_args
    if not cldr_args:
        p.error("no cldr command given (e.g. -- pretrain --config configs/demo.yaml ...)")
    cmd = submit_command(args.address, runtime_env(args.gpu, args.forward_aws, args.env), cldr_args,
                         gpu=args.gpu, no_wait=args.no_wait, submission_id=args.submission_id)
    print(masked(cmd), file=sys.stderr if not args.dry_run else sys.stdout, flush=True)
    if args.dry_run:
        return 0
    return subprocess.call(cmd, cwd=REPO)


if __name__ == "__main__":
    sys.exit(main())
