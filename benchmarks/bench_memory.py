"""`cldr shards` peak RSS against dataset size, and the shard reader's RSS over 1M samples.

    .venv/bin/python benchmarks/bench_memory.py --data data/gdsc_v17 --scales 1 5 20 \
        [--reader-samples 1000000] [--out docs/bench_memory.json] [--md docs/bench_memory.md]

For each scale k it writes a synthetic dataset of k x the real one to a temp dir: cell line j
of clone i gets id `{cosmic_id}_s{i}` (and the same genomic features), and its response to each
drug it was measured with is resampled (with replacement) from the real responses to that drug;
clone 0 is the real data unchanged, so k=1 is GDSC itself. Every (drug, cell) pair stays
distinct, so load_tables keeps every row. It then runs `cldr shards` on it in a fresh
subprocess and reads that child's peak RSS from os.wait4 (the kernel's ru_maxrss of the child,
not a polling estimate) and its wall time.

The reader check runs in its own fresh subprocess: ShardStream over the k=1 shards' mixed/train
part, cycling epochs until --reader-samples samples have been batched, with the process RSS
sampled every --reader-every samples; growth is RSS at the end minus RSS at the first sample
point (the buffers and caches are warm by then).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
CLONE_SUFFIX = "_s{}"               # clone i of cell line c is `{c}_s{i}` (clone 0 keeps its id)
SEED = 0
READER_SAMPLE_EVERY = 100_000       # RSS sample points of the reader check
READER_BATCH = 256
READER_SPLIT, READER_PART = "mixed", "train"
KIB = 1024
MIB = 1024 * 1024


def synthetic_dataset(src: Path, dst: Path, scale: int, seed: int = SEED) -> int:
    """k x src in dst (responses.csv uncompressed: gzip would be most of the generation time).
    Returns the number of response rows written."""
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "drugs.csv", dst / "drugs.csv")
    cells = pd.read_csv(src / "cell_lines.csv.gz", dtype=str, keep_default_na=False)
    resp = pd.read_csv(src / "responses.csv.gz", dtype=str, keep_default_na=False)
    rng = np.random.default_rng(seed)
    # each drug's rows, contiguous: a clone's response to drug d is a random real response to d
    codes, _ = pd.factorize(resp["drug_id"])
    by_drug = np.argsort(codes, kind="stable")
    sizes = np.bincount(codes)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    ln = resp["ln_ic50"].to_numpy()
    cell_parts, n = [], 0
    with open(dst / "responses.csv", "w", encoding="utf-8") as out:
        resp.to_csv(out, index=False)
        n += len(resp)
        for i in range(1, scale):
            suffix = CLONE_SUFFIX.format(i)
            picks = by_drug[starts[codes] + (rng.random(len(resp)) * sizes[codes]).astype(np.int64)]
            clone = pd.DataFrame({"cosmic_id": resp["cosmic_id"] + suffix, "drug_id": resp["drug_id"],
                                  "ln_ic50": ln[picks]})
            clone.to_csv(out, index=False, header=False)
            n += len(clone)
            c = cells.copy()
            c["cosmic_id"] = c["cosmic_id"] + suffix
            c["name"] = c["name"] + suffix
            cell_parts.append(c)
    pd.concat([cells, *cell_parts]).to_csv(dst / "cell_lines.csv.gz", index=False)
    return n


def run_shards(data: Path, out: Path) -> dict:
    """`cldr shards` in a fresh child: its peak RSS (kernel ru_maxrss) and wall time."""
    cmd = [str(REPO / ".venv" / "bin" / "cldr"), "shards", "--quiet", "--data", str(data), "--out", str(out)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output = proc.stdout.read().decode()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"cldr shards failed ({proc.returncode}):\n{output}")
    manifest = json.loads((out / "manifest.json").read_text())
    return {"command": " ".join(cmd[1:]), "peak_rss_mib": usage.ru_maxrss * KIB / MIB, "wall_s": wall,
            "pairs": manifest["counts"]["pairs"], "cells": manifest["counts"]["cells"],
            "samples_written": sum(p["num_samples"] for s in manifest["splits"].values() for p in s.values()),
            "log": output.strip().splitlines()[-1]}


def reader_child(shards: str, samples: int, every: int) -> dict:
    """Runs in a fresh process: stream `samples` samples, cycling epochs, sampling RSS."""
    import psutil
    sys.path.insert(0, str(REPO))
    from cldr_dist.data.reader import ShardStream, make_loader, open_shards
    proc = psutil.Process()
    stream = ShardStream(open_shards(shards), READER_SPLIT, READER_PART, batch_size=READER_BATCH, seed=SEED)
    points, n, next_point, t0 = [], 0, every, time.perf_counter()
    while n < samples:
        for batch in make_loader(stream, 0):
            n += len(batch)
            if n >= next_point:
                points.append({"samples": n, "rss_mib": proc.memory_info().rss / MIB})
                next_point += every
            if n >= samples:
                break
        stream.epoch += 1
    wall = time.perf_counter() - t0
    return {"samples": n, "every": every, "epochs_started": stream.epoch, "epoch_samples": len(stream) * READER_BATCH,
            "samples_per_s": n / wall, "wall_s": wall, "points": points,
            "growth_mib": points[-1]["rss_mib"] - points[0]["rss_mib"]}


def run_reader(shards: Path, samples: int, every: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--reader-child", str(shards),
           "--reader-samples", str(samples), "--reader-every", str(every)]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def markdown(result: dict) -> str:
    rows = result["shards"]
    base = rows[0]["peak_rss_mib"]
    lines = ["| scale | pairs | samples written | peak RSS (MiB) | RSS / RSS(1x) | wall (s) |",
             "|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['scale']}x | {r['pairs']:,} | {r['samples_written']:,} | {r['peak_rss_mib']:.0f} "
                     f"| {r['peak_rss_mib'] / base:.2f} | {r['wall_s']:.0f} |")
    rd = result.get("reader")
    if rd:
        lines += ["", f"Reader: {rd['samples']:,} samples ({READER_SPLIT}/{READER_PART} of the 1x shards, "
                      f"batch {READER_BATCH}, {rd['samples_per_s']:,.0f} samples/s), RSS "
                      + ", ".join(f"{p['rss_mib']:.0f}" for p in rd["points"])
                      + f" MiB at each sample point"
                        f" (every {rd['every']:,} samples): growth {rd['growth_mib']:+.1f} MiB "
                        f"from {rd['points'][0]['samples']:,} to {rd['points'][-1]['samples']:,} samples."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="data/gdsc_v17", help="the real dataset to resample")
    p.add_argument("--scales", type=int, nargs="+", default=[1, 5, 20])
    p.add_argument("--reader-samples", type=int, default=1_000_000, help="0 skips the reader check")
    p.add_argument("--reader-every", type=int, default=READER_SAMPLE_EVERY, help="RSS sample interval")
    p.add_argument("--out", help="write results as JSON here")
    p.add_argument("--md", help="write the markdown table here")
    p.add_argument("--reader-child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.reader_child:
        print(json.dumps(reader_child(args.reader_child, args.reader_samples, args.reader_every)))
        return
    src = (REPO / args.data).resolve()
    result = {"machine": f"{os.cpu_count()} CPUs", "shards": []}
    with tempfile.TemporaryDirectory(prefix="bench_memory_") as tmp:
        for k in args.scales:
            data, out = Path(tmp, f"data_{k}x"), Path(tmp, f"shards_{k}x")
            t0 = time.perf_counter()
            rows = synthetic_dataset(src, data, k)
            gen = time.perf_counter() - t0
            r = {"scale": k, "rows": rows, "generate_s": gen, **run_shards(data, out)}
            result["shards"].append(r)
            print(f"{k}x: {r['pairs']:,} pairs, peak RSS {r['peak_rss_mib']:.0f} MiB, {r['wall_s']:.0f}s "
                  f"(data generated in {gen:.0f}s)", flush=True)
            if k != min(args.scales):
                shutil.rmtree(out)
            shutil.rmtree(data)
        if args.reader_samples:
            result["reader"] = run_reader(Path(tmp, f"shards_{min(args.scales)}x"), args.reader_samples,
                                          args.reader_every)
            print(f"reader: {result['reader']['samples']:,} samples, RSS growth "
                  f"{result['reader']['growth_mib']:+.1f} MiB", flush=True)
    base = result["shards"][0]["peak_rss_mib"]
    result["rss_ratio_max_over_min_scale"] = max(r["peak_rss_mib"] for r in result["shards"]) / base
    table = markdown(result)
    print(table)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    if args.md:
        Path(args.md).write_text(table)


if __name__ == "__main__":
    main()
