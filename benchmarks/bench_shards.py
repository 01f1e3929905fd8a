"""`make shards` wall time and bytes per sample on a dataset, and reader throughput from local
disk and from a local S3 server (moto, HTTP on 127.0.0.1), side by side in one run.

    .venv/bin/python benchmarks/bench_shards.py --data data/gdsc_v17 [--out docs/bench_shards.json]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cldr_dist.config import load_config  # noqa: E402
from cldr_dist.data.reader import ShardStream, iter_shard_samples, make_loader, open_shards  # noqa: E402
from cldr_dist.data.shards import build_shards  # noqa: E402
from cldr_dist.data import storage  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"S3 server did not open port {port}")


def read_throughput(url: str, split: str, part: str, batch: int, max_samples: int) -> dict:
    shards = open_shards(url)
    stream = ShardStream(shards, split, part, batch_size=batch, drop_last=False, shuffle=True, seed=0)
    n, t0 = 0, time.perf_counter()
    for b in make_loader(stream, 0):
        n += len(b)
        if n >= max_samples:
            break
    batched = n / (time.perf_counter() - t0)
    # decode only (no batching into PyG graphs), over the same shards
    n, t0 = 0, time.perf_counter()
    for u in stream.urls:
        for _ in iter_shard_samples(storage.read_bytes(u), 0, 10**9):
            n += 1
        if n >= max_samples:
            break
    return {"batched_samples_per_s": batched, "decoded_samples_per_s": n / (time.perf_counter() - t0)}


def inline_bytes_per_sample(url: str, split: str, part: str) -> float:
    """What a sample would weigh with its drug graph and cell features inlined as npy arrays
    (uncompressed array bytes + caption), from the real feature tables."""
    shards = open_shards(url)
    f = shards.features
    sizes = []
    stream = ShardStream(shards, split, part, batch_size=1, drop_last=False, shuffle=False)
    for u in stream.urls[:2]:
        for s in iter_shard_samples(storage.read_bytes(u), 0, 10**9):
            atoms, edges = f.drug_graph(s["meta"]["drug"])
            sizes.append(atoms.nbytes + edges.nbytes + f.cell_features.shape[1] + s["caption"].nbytes // 4 + 3 * 128)
    return float(np.mean(sizes))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", default=str(REPO / "data" / "gdsc_v17"))
    p.add_argument("--samples", type=int, default=50000, help="samples per throughput measurement")
    p.add_argument("--out", default="")
    p.add_argument("--shards", default="", help="read these local shards instead of building (skips the build timing)")
    args = p.parse_args()
    out: dict = {"data": args.data, "cores": os.cpu_count()}
    cfg = load_config(None, [f"data.data_dir={args.data}",
                             f"data.held_out_drugs={REPO / 'data/gdsc_v17/drug_blind_test_drugs.txt'}"])
    with tempfile.TemporaryDirectory() as tmp:
        local = args.shards or str(Path(tmp) / "shards")
        if args.shards:
            manifest = json.loads((Path(local) / "manifest.json").read_text())
        else:
            t0 = time.perf_counter()
            manifest = build_shards(cfg, out=local, progress=False)
            out["shards_wall_s"] = time.perf_counter() - t0
        total = sum(p["num_samples"] for s in manifest["splits"].values() for p in s.values())
        shard_bytes = sum(sh["bytes"] for s in manifest["splits"].values() for p in s.values() for sh in p["shards"])
        out["samples_written"] = total
        out["shard_bytes_per_sample"] = shard_bytes / total
        out["features_bytes"] = manifest["features"]["bytes"]
        out["inline_estimate_bytes_per_sample"] = inline_bytes_per_sample(local, "mixed", "train")

        # the S3 server runs in its own process, as a real object store would: in this process
        # it would share the reader's GIL
        port = free_port()
        server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1",
                                   "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(port)
        os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                          AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}")
        try:
            import boto3
            boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).create_bucket(Bucket="bench")
            storage.filesystem("s3://bench").put(local + "/", "s3://bench/shards/", recursive=True)
            for name, url in (("disk", local), ("s3", "s3://bench/shards")):
                out[f"read_{name}"] = read_throughput(url, "mixed", "train", 256, args.samples)
        finally:
            server.terminate()
            server.wait(timeout=10)
    out["s3_over_disk_batched"] = out["read_disk"]["batched_samples_per_s"] / out["read_s3"]["batched_samples_per_s"]
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
