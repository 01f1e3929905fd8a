"""Ray Jobs latency: seconds from `ray job submit` to the first optimizer step of the demo pretrain.

A local head (launch/job.py LocalHead: `ray start --head`, token auth, dashboard on 127.0.0.1),
tiny shards on a local S3 server (moto, HTTP on 127.0.0.1), then, per repeat, a fresh run
submitted with launch/runtime_env.yaml and train.log_every=1. The job's log is streamed by
`ray job submit` (waiting mode); each line is stamped on arrival. Reported per repeat:

    submit->accepted   `ray job submit` printed that the job was submitted (working dir uploaded)
    submit->trainer    the TrainController asked for the workers' resources
    submit->step1      the first "[pretrain] epoch 1/1 step 1/N" line (rank 0, after step 1)
    submit->done       `ray job submit` returned (job finished, checkpoint on S3)

    .venv/bin/python benchmarks/bench_job_submit.py                # 1 run, 3 steps
    .venv/bin/python benchmarks/bench_job_submit.py --repeat 2     # the 2nd reuses the warm head
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "launch"))
from local_s3 import start_s3  # noqa: E402  (benchmarks/ is on sys.path when run as a script)
import job as launch_job  # noqa: E402  (launch/job.py)

MARKS = {"accepted": re.compile(r"submitted successfully"),
         "trainer": re.compile(r"Requesting resources"),
         "step1": re.compile(r"\[pretrain\] epoch \d+/\d+ step 1/")}


def submit_command(head, shards: str, runs: str, name: str, steps: int) -> list[str]:
    return [launch_job.ray_cli(), "job", "submit", "--address", head.address, "--working-dir", ".",
            "--runtime-env", "launch/runtime_env.yaml", "--submission-id", f"{name}-{uuid.uuid4().hex[:6]}",
            "--", "python", "-m", "cldr_dist.cli", "pretrain", "--config", "configs/demo.yaml",
            "ray.address=auto", f"data.shards={shards}", f"ray.storage_path={runs}", f"ray.name={name}",
            "train.epochs=1", f"train.max_steps={steps}", "train.batch_size=16", "train.log_every=1",
            "train.zeroshot_samples=64", "ray.num_workers=2", "ray.cpus_per_worker=1"]


def timed_submit(cmd: list[str], env: dict, timeout: float) -> tuple[dict[str, float], int, list[str]]:
    """Runs `ray job submit`, stamping each log line; returns ({mark: seconds}, rc, lines)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1)
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    marks, lines = {}, []
    try:
        for line in proc.stdout:
            now = time.perf_counter() - t0
            lines.append(f"{now:7.1f} {line.rstrip()}")
            for mark, pattern in MARKS.items():
                if mark not in marks and pattern.search(line):
                    marks[mark] = now
        rc = proc.wait()
    finally:
        timer.cancel()
    marks["done"] = time.perf_counter() - t0
    return marks, rc, lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=1, help="runs on the same head (the first is cold)")
    p.add_argument("--steps", type=int, default=3, help="train.max_steps of each run")
    p.add_argument("--timeout", type=float, default=600, help="seconds per run")
    p.add_argument("--log", help="write each run's stamped job log here (RUN.log appended)")
    args = p.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    import boto3
    server, endpoint = start_s3()
    head = None
    try:
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
        t = time.perf_counter()
        head = launch_job.LocalHead(num_cpus=2).start()  # its environment carries AWS_* to the workers
        shards = f"s3://{bucket}/shards"
        subprocess.run([sys.executable, "-m", "cldr_dist.cli", "shards", "--data", "data/gdsc_v17/tiny",
                        "--out", shards, "--quiet"], cwd=REPO, check=True, capture_output=True)
        head.wait()
        head_s = time.perf_counter() - t
        print(f"head up (and shards built meanwhile) in {head_s:.1f} s; load average {os.getloadavg()[0]:.1f}",
              flush=True)
        rows = []
        for i in range(args.repeat):
            load = os.getloadavg()[0]
            cmd = submit_command(head, shards, f"s3://{bucket}/runs", f"bench{i}", args.steps)
            marks, rc, lines = timed_submit(cmd, head.client_env, args.timeout)
            if args.log:
                Path(f"{args.log}.{i + 1}.log").write_text("\n".join(lines) + "\n")
            if rc != 0 or "step1" not in marks:
                print("\n".join(lines[-60:]), file=sys.stderr)
                raise SystemExit(f"run {i}: ray job submit exited {rc}; marks {marks}")
            rows.append({"run": i + 1, "load_avg_1m": round(load, 1), **{k: round(v, 1) for k, v in marks.items()}})
            print(json.dumps(rows[-1]), flush=True)
    finally:
        if head is not None:
            head.stop()
        server.stop()

    print(f"\n{platform.node()} ({os.cpu_count()} CPUs), Ray Jobs on a local head, demo pretrain, "
          f"2 workers, ZeRO-2, {args.steps} steps, shards and checkpoints on local S3 (moto)")
    print("| run | load avg (1 min) at submit | submit→accepted s | submit→trainer s | submit→first step s "
          "| submit→done s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['load_avg_1m']} | {r.get('accepted', '-')} | {r.get('trainer', '-')} "
              f"| {r['step1']} | {r['done']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
