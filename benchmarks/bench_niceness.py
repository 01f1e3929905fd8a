"""Training throughput at Ray's default worker niceness (15) against ray.worker_niceness=0, through
the real trainer (Ray Train + DeepSpeed ZeRO-2 on gloo, 1 worker x 2 threads), full-GDSC mixed
shards, GraphDRP finetuning at the tuned batch of 4,096, side by side and interleaved in one run:

    idle    nothing else runs on the machine but Ray's own daemons and this driver
    busy    beside one nice-0 process spinning on a CPU: a stand-in for whatever else a node runs
            (a data job, a second driver, Ray's daemons at a peak)

and, as the ceiling, the same step in plain PyTorch in this process (no Ray, no DeepSpeed, the
same model, batch and threads). samples/s is the harmonic mean of the window's steps after
WARMUP steps (rank 0's CSV log), as in bench_throughput.py. Each run starts a fresh Ray instance,
because a worker's niceness is fixed when Ray starts it.

    .venv/bin/python benchmarks/bench_niceness.py --shards shards/gdsc_v17 --out docs/results/bench_niceness.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench_distributed import loadavg  # noqa: E402  (benchmarks/ is on sys.path)
from bench_throughput import WARMUP, measure  # noqa: E402

MODEL, BATCH = "graphdrp", 4096
NICENESS = (15, 0)        # Ray's default, ours
SPINNER = [sys.executable, "-c", "while True: pass"]


def plain_rate(shards: str, steps: int) -> float:
    """samples/s of the same finetune step in plain PyTorch, in this process at its niceness."""
    import torch

    from cldr_dist.config import load_config
    from cldr_dist.data.reader import ShardStream, make_loader, open_shards
    from cldr_dist.train.loop import make_model
    from cldr_dist.train.objectives import FinetuneObjective
    torch.set_num_threads(2)
    torch.manual_seed(0)
    cfg = load_config(None, [f"model.drp={MODEL}", "data.split=mixed", f"data.shards={shards}"])
    set_ = open_shards(shards)
    stream = ShardStream(set_, "mixed", "train", batch_size=BATCH, seed=0, shuffle=True, drop_last=True)
    stream.load_in_memory()
    loader = iter(make_loader(stream, 0))
    batches = [next(loader) for _ in range(WARMUP + steps)]
    objective = FinetuneObjective(make_model(cfg, set_))
    optimizer = torch.optim.AdamW(objective.parameters(), lr=1e-3)
    seconds = []
    for batch in batches:
        t0 = time.perf_counter()
        loss, _ = objective(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        seconds.append(time.perf_counter() - t0)
    return steps * BATCH / sum(seconds[WARMUP:])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", required=True, help="full-GDSC shards with the mixed split (`make shards`)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds of every condition")
    p.add_argument("--steps", type=int, default=4, help="measured optimizer steps after the warm-up")
    p.add_argument("--out", default="bench_niceness.json")
    args = p.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    import torch

    t_start = time.perf_counter()
    runs = str(Path(tempfile.mkdtemp(prefix="bench_niceness-")) / "runs")
    report = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "command": "benchmarks/bench_niceness.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                          "ray": ray.__version__, "driver_niceness": os.nice(0)},
              "setup": {"model": MODEL, "global_batch": BATCH, "workers": 1, "threads": 2,
                        "window_steps": args.steps}, "runs": []}
    for r in range(args.rounds):
        for load in ("idle", "busy"):
            for niceness in NICENESS:
                spinner = subprocess.Popen(SPINNER) if load == "busy" else None
                try:
                    row = measure(args.shards, runs, "finetune", MODEL, "entity", BATCH, args.steps,
                                  extra=(f"ray.worker_niceness={niceness}",))
                    # what the run's workers really ran at, asked of the same Ray instance
                    row["worker_niceness_seen"] = ray.get(ray.remote(lambda: os.nice(0)).remote())
                finally:
                    if spinner:
                        spinner.kill()
                        spinner.wait()
                    ray.shutdown()
                row.update(round=r, load=load, niceness=niceness)
                report["runs"].append(row)
                print(f"[bench] round {r} {load:4s} niceness {niceness:2d}: {row['samples_per_s']:,.0f} samples/s",
                      flush=True)
        rate = plain_rate(args.shards, args.steps)
        report["runs"].append({"round": r, "load": "idle", "niceness": "plain PyTorch", "samples_per_s": rate,
                               "loadavg": loadavg()})
        print(f"[bench] round {r} idle plain PyTorch: {rate:,.0f} samples/s", flush=True)

    def median(load, niceness):
        return statistics.median(x["samples_per_s"] for x in report["runs"]
                                 if x["load"] == load and x["niceness"] == niceness)
    report["summary"] = {
        "idle_ratio_0_over_15": median("idle", 0) / median("idle", 15),
        "busy_ratio_0_over_15": median("busy", 0) / median("busy", 15),
        "idle_trainer_0_over_plain": median("idle", 0) / median("idle", "plain PyTorch"),
        "medians": {f"{load} {n}": median(load, n) for load in ("idle", "busy") for n in NICENESS}
        | {"idle plain PyTorch": median("idle", "plain PyTorch")},
    }
    report["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["summary"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
