"""How `cldr tune` should use a small machine: one trial at a time on all its cores, or several
trials at once on a core each (`tune.concurrent=2 common.ray.cpus_per_worker=1`)? ASHA can stop
a trial only against trials that reached the same rung before it, so trials run one at a time
never stop the first; what running them side by side costs in throughput decides it.

Side by side in one run, through the real trainer (Ray Train + DeepSpeed ZeRO-2 on gloo), GraphDRP
finetuning (or, with `--stage pretrain`, CLDR pretraining) on the full mixed split:
    alone    one run, 1 worker x 2 threads (what trials one at a time get)
    paired   two runs at once, each 1 worker x 1 thread (two trials at once)
samples/s: each run's harmonic mean over its logged steps after `--warmup` steps; for `paired`,
the sum of the two runs' rates while both ran.

    .venv/bin/python benchmarks/bench_tune_concurrency.py --shards shards/gdsc_v17 \
        --out docs/results/bench_tune_concurrency.json
    .venv/bin/python benchmarks/bench_tune_concurrency.py --stage pretrain --batch 8192 \
        --out docs/results/bench_tune_concurrency_pretrain.json
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def stage_command(stage: str, shards: str, storage: str, name: str, cpus: int, steps: int, batch: int) -> list[str]:
    return [sys.executable, "-m", "cldr_dist.cli", stage, "--quiet", f"data.shards={shards}",
            "data.split=mixed", "model.drp=graphdrp", f"train.batch_size={batch}", f"train.max_steps={steps}",
            "train.epochs=1", "train.log_every=1", "train.test_at_end=false", "train.keep_checkpoints=1",
            "ray.num_workers=1", f"ray.cpus_per_worker={cpus}", f"ray.storage_path={storage}", f"ray.name={name}"]


def step_rates(stage: str, storage: str, name: str, warmup: int) -> list[float]:
    """samples/s of each logged step after the warm-up (rank 0's metrics CSV)."""
    with open(Path(storage, name, "logs", f"{stage}_metrics.csv")) as f:
        rows = [r for r in csv.DictReader(f) if r["name"] == "samples_per_s"]
    return [float(r["value"]) for r in rows if int(r["step"]) > warmup]


def run_side_by_side(commands: list[list[str]], logs: Path) -> float:
    """Runs the commands at once; each one's stderr goes to a file, never a pipe read one run
    after another (a full pipe would stall the run not being read, in the middle of its steps)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.time()
    files = [open(logs / f"run{i}.err", "w+") for i in range(len(commands))]
    procs = [subprocess.Popen(c, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=f, text=True)
             for c, f in zip(commands, files)]
    for p, f in zip(procs, files):
        p.wait()
        f.seek(0)
        err = f.read().strip()
        f.close()
        if p.returncode != 0:
            sys.exit(f"bench_tune_concurrency: a run failed: {err.splitlines()[-1] if err else p.returncode}")
    return time.time() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", default="shards/gdsc_v17", help="full-GDSC shards (`make shards`)")
    ap.add_argument("--steps", type=int, default=10, help="optimizer steps per run")
    ap.add_argument("--warmup", type=int, default=2, help="steps left out of the rate")
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--stage", choices=["finetune", "pretrain"], default="finetune")
    ap.add_argument("--out", default="", help="JSON file for the results")
    args = ap.parse_args()
    shards = str(Path(args.shards).resolve())
    if not Path(shards, "manifest.json").is_file():
        sys.exit(f"bench_tune_concurrency: no shard set at {shards}; run `make shards` first")
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_tune_concurrency-") as storage:
        for label, runs in (("alone", [("alone", 2)]), ("paired", [("paired_a", 1), ("paired_b", 1)])):
            print(f"{label}: {len(runs)} run(s) of {args.steps} steps ...", flush=True)
            wall = run_side_by_side([stage_command(args.stage, shards, storage, name, cpus, args.steps, args.batch)
                                     for name, cpus in runs], Path(storage))
            rates = [statistics.harmonic_mean(step_rates(args.stage, storage, name, args.warmup)) for name, _ in runs]
            results[label] = {"runs": len(runs), "threads_per_run": runs[0][1], "samples_per_s_each": rates,
                              "samples_per_s_total": sum(rates), "wall_s": wall}
            print(f"  {label}: {' + '.join(f'{r:.0f}' for r in rates)} samples/s, {wall:.0f} s wall", flush=True)
    ratio = results["paired"]["samples_per_s_total"] / results["alone"]["samples_per_s_total"]
    print(f"two trials at once, 1 thread each / one trial on 2 threads: {ratio:.2f}x the samples/s")
    if args.out:
        report = {"date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv), "machine": platform.node(),
                  "cpus": os.cpu_count(), "stage": args.stage, "steps": args.steps, "warmup": args.warmup, "batch": args.batch,
                  "results": results, "paired_over_alone": ratio}
        tmp = Path(args.out).with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=1))
        tmp.replace(args.out)


if __name__ == "__main__":
    main()
