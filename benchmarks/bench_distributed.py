"""Distributed training cost: samples/s of Ray Train + DeepSpeed against the single-process
reference, and checkpoint save / resume to S3 per ZeRO stage, measured side by side in one run.

Setup: tiny GDSC shards (data/gdsc_v17/tiny, 960 train samples in the mixed split, shards of 200
samples) on local disk, a local S3 server (moto, HTTP on 127.0.0.1) for the Ray Train storage,
2 workers x 1 CPU, gloo, per-worker batch B, global batch 2B; the reference runs the same model,
data and objective at batch 2B in this process, with torch at 1 and at 2 threads.

    throughput  every run logs every W (= --steps) optimizer steps; the samples/s reported is the
                window of steps W+1..2W (warm-up, i.e. process start, DeepSpeed init, the first
                shard and first steps, lies in steps 1..W and is excluded). Distributed: the
                loop's own `samples_per_s` at step 2W (rank 0's CSV log); reference: the same
                window from the times of its log lines. overhead = 1 - dist / ref.
    checkpoint  per ZeRO stage 1/2/3, run A: pretrain 3W steps, checkpoint_every=2W, to
                s3://.../runs -> `checkpoint_s` / `checkpoint_mb` (rank 0's save at step 2W: all
                ranks' collectives, DeepSpeed's save, upload of the merged directory) and the
                bytes of each checkpoint directory on S3 (all ranks). Run A also gives that
                stage's pretrain throughput (its window W+1..2W ends before the checkpoint).
    resume      run B: same ray.name and storage, max_steps 3W+1 -> `restore_s` (download and
                DeepSpeed load of run A's final checkpoint on each worker, rank 0's time).

    .venv/bin/python benchmarks/bench_distributed.py --steps 8 --out /tmp/bench_distributed.json

Keep 3W below the steps per epoch (960 / 2B; 30 at B=16): an epoch end would add evaluation and
a checkpoint to the measured windows.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from local_s3 import start_s3  # noqa: E402  (benchmarks/ is on sys.path when run as a script)
TINY = REPO / "data" / "gdsc_v17" / "tiny"
HELD_OUT = REPO / "data" / "gdsc_v17" / "drug_blind_test_drugs.txt"
ZERO = {s: REPO / "configs" / "deepspeed" / f"zero{s}.json" for s in (1, 2, 3)}

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def make_config(shards: str, storage_path: str, name: str, *overrides: str):
    from cldr_dist.config import load_config
    return load_config(REPO / "configs" / "demo.yaml", [
        f"data.shards={shards}", f"data.data_dir={TINY}", f"data.held_out_drugs={HELD_OUT}",
        f"ray.storage_path={storage_path}", f"ray.name={name}", f"train.deepspeed_config={ZERO[2]}",
        "train.epochs=1", "train.zeroshot_samples=64", "ray.num_workers=2", "ray.cpus_per_worker=1",
        *overrides])


# ----------------------------------------------------------------------------- reference

def reference_window(cfg, steps: int, threads: int) -> dict:
    """The reference path for 2*steps steps; samples/s over steps steps+1..2*steps."""
    import torch

    from cldr_dist.train.reference import train_reference
    stamps: dict[int, float] = {}

    def log(line: str) -> None:
        stamps[len(stamps) + 1] = time.perf_counter()

    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    la = loadavg()
    t0 = time.perf_counter()
    try:
        out = train_reference(cfg, log=log)
    finally:
        torch.set_num_threads(saved)
    wall = time.perf_counter() - t0
    window = stamps[2] - stamps[1]
    return {"threads": threads, "global_batch": cfg.train.batch_size, "window_steps": steps,
            "samples_per_s": steps * cfg.train.batch_size / window,
            "samples_per_s_whole_run": out["samples_per_s"], "wall_s": round(wall, 1), "loadavg": la}


# ----------------------------------------------------------------------------- distributed

def csv_metric(cfg, name: str, step: int) -> float | None:
    from cldr_dist.train.trainer import log_dir
    path = Path(log_dir(cfg)) / f"{cfg.train.mode}_metrics.csv"
    if not path.is_file():
        return None
    value = None
    with open(path) as f:
        for row in csv.DictReader(f):
            if row["name"] == name and int(row["step"]) == step:
                value = float(row["value"])  # the last one if the file was appended to
    return value


def fit(cfg) -> tuple[dict, float, list[float]]:
    from cldr_dist.train.trainer import run
    la = loadavg()
    t0 = time.perf_counter()
    result = run(cfg)
    wall = time.perf_counter() - t0
    if result.error:
        raise RuntimeError(f"{cfg.ray.name}: {result.error}")
    return dict(result.metrics or {}), wall, la


def s3_checkpoint_sizes(endpoint: str, bucket: str, prefix: str) -> dict[str, float]:
    """MiB per checkpoint directory under s3://bucket/prefix/ (every rank's files)."""
    import boto3
    s3 = boto3.client("s3", endpoint_url=endpoint)
    sizes: dict[str, int] = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix.rstrip("/") + "/"):
        for obj in page.get("Contents", []):
            rel = obj["Key"][len(prefix.rstrip("/")) + 1:].split("/")
            if len(rel) > 1 and rel[0].startswith("checkpoint"):
                sizes[rel[0]] = sizes.get(rel[0], 0) + obj["Size"]
    return {k: round(v / 2**20, 2) for k, v in sorted(sizes.items())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=8, help="W: log window in optimizer steps (runs are 2W-3W steps)")
    p.add_argument("--batch", type=int, default=16, help="per-worker batch B (global 2B)")
    p.add_argument("--modes", default="pretrain,finetune", help="throughput modes, comma separated")
    p.add_argument("--zero", default="1,2,3", help="ZeRO stages for checkpoint/resume (and pretrain samples/s)")
    p.add_argument("--ref-threads", default="1,2", help="torch threads of the reference runs")
    p.add_argument("--out", default="bench_distributed.json", help="JSON file for the results")
    args = p.parse_args(argv)
    W, B = args.steps, args.batch
    modes = [m for m in args.modes.split(",") if m]
    stages = [int(s) for s in args.zero.split(",") if s]
    out_path = Path(args.out).resolve()
    t_start = time.perf_counter()

    import boto3
    import torch

    from cldr_dist.config import load_config
    from cldr_dist.data.shards import build_shards

    work = Path(tempfile.mkdtemp(prefix="bench_dist-"))
    os.chdir(work)  # the trainer writes logs under ./runs when storage is S3: keep them out of the repo
    shards = str(work / "shards")
    build_shards(load_config(None, [f"data.data_dir={TINY}", f"data.held_out_drugs={HELD_OUT}",
                                    "data.samples_per_shard=200"]), out=shards, progress=False, log=lambda *_: None)
    train_samples = json.loads(Path(shards, "manifest.json").read_text())["splits"]["mixed"]["train"]["num_samples"]
    steps_per_epoch = train_samples // (2 * B)
    if 3 * W + 1 > steps_per_epoch:
        p.error(f"3*steps+1 = {3 * W + 1} reaches the epoch end ({steps_per_epoch} steps at global batch {2 * B}): "
                f"use --steps <= {(steps_per_epoch - 1) // 3} or a smaller --batch")
    server, endpoint = start_s3()
    bucket = f"cldr-bench-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
    tag = uuid.uuid4().hex[:6]

    import deepspeed
    import ray
    report: dict = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "deepspeed": deepspeed.__version__, "ray": ray.__version__,
                    "loadavg_start": loadavg()},
        "setup": {"data": "tiny GDSC (data/gdsc_v17/tiny), mixed split", "train_samples": train_samples,
                  "per_worker_batch": B, "global_batch": 2 * B, "workers": 2, "backend": "gloo",
                  "window_steps": W, "steps_per_epoch": steps_per_epoch},
        "throughput": {}, "checkpoint": {},
    }

    def save() -> None:
        report["elapsed_s"] = round(time.perf_counter() - t_start, 1)
        out_path.write_text(json.dumps(report, indent=1))

    try:
        ref_threads = [int(t) for t in args.ref_threads.split(",") if t]

        def reference(mode: str, when: str) -> None:
            """Reference runs right before and right after the distributed run they are compared
            with (the load of a shared machine drifts): overhead uses their mean."""
            entry = report["throughput"].setdefault(mode, {"reference": [], "distributed": {}})
            ref_cfg = make_config(shards, str(work / "runs"), f"ref-{mode}", f"train.mode={mode}",
                                  f"train.batch_size={2 * B}", f"train.max_steps={2 * W}", f"train.log_every={W}")
            for threads in ref_threads:
                r = {"when": when, **reference_window(ref_cfg, W, threads)}
                entry["reference"].append(r)
                print(f"[bench] reference {mode} ({when}) {threads} thread(s): {r['samples_per_s']:.1f} samples/s "
                      f"(load {r['loadavg'][0]})", flush=True)
                save()

        # Pretrain at ZeRO 1/2/3, each with a mid-run checkpoint to S3, then a resume.
        stages.sort(key=lambda st: st != 2)  # ZeRO-2 first: the pretrain comparison, bracketed by references
        for stage in stages:
            if stage == 2 and "pretrain" in modes:
                reference("pretrain", "before")
            name = f"bench-z{stage}-{tag}"
            storage_path = f"s3://{bucket}/runs"
            cfg_a = make_config(shards, storage_path, name, "train.mode=pretrain", f"train.batch_size={B}",
                                f"train.deepspeed_config={ZERO[stage]}", f"train.max_steps={3 * W}",
                                f"train.log_every={W}", f"train.checkpoint_every={2 * W}")
            metrics_a, wall_a, la_a = fit(cfg_a)
            sps = csv_metric(cfg_a, "samples_per_s", 2 * W)
            sizes = s3_checkpoint_sizes(endpoint, bucket, f"runs/{name}")
            if stage == 2 and "pretrain" in modes:
                reference("pretrain", "after")
            cfg_b = make_config(shards, storage_path, name, "train.mode=pretrain", f"train.batch_size={B}",
                                f"train.deepspeed_config={ZERO[stage]}", f"train.max_steps={3 * W + 1}",
                                f"train.log_every={W}", f"train.checkpoint_every={2 * W}")
            metrics_b, wall_b, la_b = fit(cfg_b)
            report["checkpoint"][f"zero{stage}"] = {
                "checkpoint_s": metrics_a.get("checkpoint_s"), "checkpoint_mb_rank0": metrics_a.get("checkpoint_mb"),
                "s3_checkpoint_mb_all_ranks": sizes, "restore_s": metrics_b.get("restore_s"),
                "resumed_to_step": metrics_b.get("step"), "fit_wall_s": round(wall_a, 1),
                "resume_fit_wall_s": round(wall_b, 1), "loadavg": la_a, "loadavg_resume": la_b}
            if "pretrain" in modes:
                report["throughput"].setdefault("pretrain", {"reference": [], "distributed": {}})["distributed"][f"zero{stage}"] = {
                    "samples_per_s": sps, "fit_wall_s": round(wall_a, 1), "loadavg": la_a}
            print(f"[bench] ZeRO-{stage}: pretrain {sps} samples/s, checkpoint {metrics_a.get('checkpoint_s')} s "
                  f"{metrics_a.get('checkpoint_mb')} MiB (rank 0), S3 {sizes}, restore {metrics_b.get('restore_s')} s",
                  flush=True)
            save()

        for mode in modes:
            if mode == "pretrain":
                continue
            cfg = make_config(shards, str(work / "runs"), f"bench-{mode}-{tag}", f"train.mode={mode}",
                              f"train.batch_size={B}", f"train.max_steps={2 * W}", f"train.log_every={W}")
            reference(mode, "before")
            metrics, wall, la = fit(cfg)
            sps = csv_metric(cfg, "samples_per_s", 2 * W)
            reference(mode, "after")
            report["throughput"][mode]["distributed"]["zero2"] = {
                "samples_per_s": sps, "last_window_metric": metrics.get("samples_per_s"),
                "fit_wall_s": round(wall, 1), "loadavg": la}
            print(f"[bench] distributed {mode} ZeRO-2: {sps} samples/s (load {la[0]})", flush=True)
            save()

        for mode, entry in report["throughput"].items():
            dist_sps = (entry["distributed"].get("zero2") or {}).get("samples_per_s")
            if dist_sps:
                for threads in ref_threads:
                    runs = [r["samples_per_s"] for r in entry["reference"] if r["threads"] == threads]
                    if runs:
                        ref_sps = sum(runs) / len(runs)
                        entry.setdefault("reference_mean", {})[f"{threads}_thread"] = round(ref_sps, 2)
                        entry.setdefault("overhead_vs_reference", {})[f"{threads}_thread"] = round(1 - dist_sps / ref_sps, 3)
    finally:
        report["machine"]["loadavg_end"] = loadavg()
        save()
        ray.shutdown()
        server.stop()
    print(json.dumps(report, indent=1))
    print(f"[bench] wrote {out_path} in {report['elapsed_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
