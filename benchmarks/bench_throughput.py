"""Training throughput of the entity-level step against the per-pair path, through the real
trainer (Ray Train + DeepSpeed ZeRO-2 on gloo), side by side in one run on full-GDSC shards.

    before     train.encoding=drugs_only data.memory_budget_mb=0: each distinct drug once per
               batch, but every pair encodes its own cell line and full caption, and shards are
               decoded every epoch (training before entity-level steps)
    entity     train.encoding=entity with the training part decoded once into memory (defaults)

Each run is 1 worker x 2 threads (ray.cpus_per_worker=2), mixed split, WARMUP steps then a
window of W, logging every step; samples/s is the window's (W / the sum of its steps' seconds
per sample, from rank 0's CSV log), so process start, DeepSpeed init, the in-memory decode and
the warm-up steps (the allocator's first large blocks) are excluded. Validation and test batches
are train.eval_batch_size pairs, so the end-of-run test pass takes seconds.

--quick (under 5 minutes): today's path at 256 and the best entity batch of each mode, epochs
derived as train samples / the best entity samples/s. The full run adds every batch
size, tCNNs and DeepCDR, the distributed check (the same global batch as 2 workers x 1 thread
against 1 worker x 2 threads) and times one whole epoch per mode (wall time of a run with
epochs=1: it includes start-up and the end-of-epoch validation, so it is an upper bound).

    .venv/bin/python benchmarks/bench_throughput.py --quick --out docs/results/bench_throughput_quick.json

The last line printed is one JSON object with finetune_speedup, pretrain_speedup,
epoch_s_finetune and epoch_s_pretrain.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench_distributed import csv_metric, fit, loadavg  # noqa: E402  (benchmarks/ is on sys.path)

DATA = REPO / "data" / "gdsc_v17"
ZERO2 = REPO / "configs" / "deepspeed" / "zero2.json"
TODAY_BATCH = 256
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

# (mode, base model, encoding, batch): what --quick measures, the four runs its summary needs
# (today's path and the best batch of each mode); the full run adds FULL_EXTRA
QUICK = [("finetune", "graphdrp", "drugs_only", 256), ("finetune", "graphdrp", "entity", 16384),
         ("pretrain", "graphdrp", "drugs_only", 256), ("pretrain", "graphdrp", "entity", 8192)]
FULL_EXTRA = [*[("finetune", "graphdrp", "entity", b) for b in (256, 1024, 4096)],
              *[("pretrain", "graphdrp", "entity", b) for b in (256, 1024, 4096, 16384)],
              *[("finetune", m, enc, b) for m in ("tcnn", "deepcdr")
                for enc, b in (("drugs_only", 256), ("entity", 256), ("entity", 1024), ("entity", 4096),
                               ("entity", 16384))]]
WARMUP = 2          # optimizer steps before the measured window
DIST_BATCH = 4096   # global batch of the 2 x 1 against 1 x 2 comparison


def make_config(shards: str, runs: str, name: str, mode: str, drp: str, encoding: str, batch: int,
                steps: int, workers: int = 1, threads: int = 2, *extra: str):
    from cldr_dist.config import load_config
    overrides = [f"data.shards={shards}", "data.split=mixed", f"ray.storage_path={runs}", f"ray.name={name}",
                 f"train.deepspeed_config={ZERO2}", f"train.mode={mode}", f"model.drp={drp}",
                 f"train.encoding={encoding}", f"train.batch_size={batch // workers}", "train.epochs=1",
                 f"train.max_steps={WARMUP + steps}", "train.log_every=1", "train.zeroshot_samples=0",
                 f"ray.num_workers={workers}", f"ray.cpus_per_worker={threads}", "train.lr=0.001"]
    if encoding != "entity":
        overrides.append("data.memory_budget_mb=0")
    return load_config(REPO / "configs" / "demo.yaml", overrides + list(extra))


def measure(shards, runs, mode, drp, encoding, batch, steps, workers=1, threads=2, extra=()) -> dict:
    """extra: further config overrides."""
    name = f"{mode}-{drp}-{encoding}-{batch}-{workers}x{threads}-{time.time_ns()}"
    cfg = make_config(shards, runs, name, mode, drp, encoding, batch, steps, workers, threads, *extra)
    metrics, wall, la = fit(cfg)
    rates = [csv_metric(cfg, "samples_per_s", WARMUP + i) for i in range(1, steps + 1)]
    rate = steps / sum(1 / r for r in rates)
    # same seed and data plan on both paths: the same batches, so losses differ only by
    # dropout masks (drawn per entity on the entity path) and rounding
    row = {"mode": mode, "drp": drp, "encoding": encoding, "global_batch": batch, "workers": workers,
           "threads": threads, "window_steps": steps, "samples_per_s": rate,
           "loss_at_last_step": csv_metric(cfg, "loss", WARMUP + steps), "wall_s": round(wall, 1), "loadavg": la}
    print(f"[bench] {mode:8s} {drp:8s} {encoding:8s} batch {batch:6d} {workers}x{threads}: "
          f"{rate:,.0f} samples/s (run {wall:.0f}s, load {la[0]})", flush=True)
    return row


def epoch_run(shards, runs, mode, drp, batch) -> float:
    """Wall seconds of a whole one-epoch run (start-up and validation included)."""
    cfg = make_config(shards, runs, f"epoch-{mode}-{time.time_ns()}", mode, drp, "entity", batch, 1,
                      1, 2, "train.max_steps=0", "train.log_every=1000000")
    _, wall, _ = fit(cfg)
    return wall


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="four runs: today's path and the best batch per mode, epochs derived")
    p.add_argument("--shards", default="", help="full-GDSC shards with the mixed split (built into a temp dir if empty)")
    p.add_argument("--steps", type=int, default=0,
                   help="W: measured optimizer steps after the warm-up; default 1 with --quick, else 3")
    p.add_argument("--modes", default="finetune,pretrain",
                   help="the modes to measure (the distributed check runs with finetune)")
    p.add_argument("--out", default="bench_throughput.json", help="JSON file for the results")
    args = p.parse_args(argv)
    args.steps = args.steps or (1 if args.quick else 3)
    out_path = Path(args.out).resolve()
    t_start = time.perf_counter()

    import deepspeed
    import ray
    import torch

    from cldr_dist.config import load_config
    from cldr_dist.data.reader import open_shards
    from cldr_dist.data.shards import build_shards

    work = Path(tempfile.mkdtemp(prefix="bench_throughput-"))
    shards = args.shards
    if not shards:
        shards = str(work / "shards")
        t0 = time.perf_counter()
        build_shards(load_config(None, [f"data.data_dir={DATA}", "data.splits=mixed"]), out=shards,
                     progress=False, log=lambda *_: None)
        print(f"[bench] built full-GDSC mixed shards in {time.perf_counter() - t0:.0f}s", flush=True)
    train_samples = open_shards(shards).part("mixed", "train")["num_samples"]
    runs = str(work / "runs")
    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "benchmarks/bench_throughput.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "deepspeed": deepspeed.__version__, "ray": ray.__version__, "loadavg_start": loadavg()},
        "setup": {"data": "full GDSC v17 shipped in data/gdsc_v17, mixed split", "train_samples": train_samples,
                  "window_steps": args.steps, "zero": 2, "backend": "gloo"},
        "runs": [], "distributed": [],
    }

    def save() -> None:
        report["elapsed_s"] = round(time.perf_counter() - t_start, 1)
        out_path.write_text(json.dumps(report, indent=1))

    modes = args.modes.split(",")
    for mode, drp, encoding, batch in QUICK + ([] if args.quick else FULL_EXTRA):
        if mode in modes:
            report["runs"].append(measure(shards, runs, mode, drp, encoding, batch, args.steps))
            save()
    if "finetune" in modes and not args.quick:
        for workers, threads in ((1, 2), (2, 1)):
            report["distributed"].append(measure(shards, runs, "finetune", "graphdrp", "entity", DIST_BATCH,
                                                 args.steps, workers, threads))
            save()

    def rate(mode, drp, encoding, batch=None) -> list[dict]:
        return [r for r in report["runs"] if r["mode"] == mode and r["drp"] == drp and r["encoding"] == encoding
                and (batch is None or r["global_batch"] == batch)]

    summary = {}
    for mode in modes:
        today = rate(mode, "graphdrp", "drugs_only", TODAY_BATCH)[0]["samples_per_s"]
        best = max(rate(mode, "graphdrp", "entity"), key=lambda r: r["samples_per_s"])
        summary[f"{mode}_speedup"] = round(best["samples_per_s"] / today, 2)
        summary[f"{mode}_best_batch"] = best["global_batch"]
        summary[f"epoch_s_{mode}"] = round(train_samples / best["samples_per_s"], 1)
        if not args.quick:
            summary[f"epoch_wall_s_{mode}"] = round(epoch_run(shards, runs, mode, "graphdrp", best["global_batch"]), 1)
    if report["distributed"]:
        one, two = report["distributed"]
        summary["distributed_overhead"] = round(one["samples_per_s"] / two["samples_per_s"], 3)
    report["summary"] = summary
    save()
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
