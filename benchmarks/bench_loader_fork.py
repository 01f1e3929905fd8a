"""Private memory of a forked DataLoader worker after the parent has trained on CPU, with and
without handing freed heap pages back first (`release_free_heap`, what `make_loader` does).

Setup: full GDSC shards (shards/gdsc_v17, `make shards`), mixed/train decoded in memory, DeepCDR
pretraining at batch 8,192, torch at 2 threads, in this process (no Ray). Three optimizer steps
grow the parent's heap; then a loader with one worker forks and feeds three more steps while a
thread samples the worker's USS (psutil) every 0.2 s; the peak is reported.

    .venv/bin/python benchmarks/bench_loader_fork.py            # trim before the fork (shipped)
    .venv/bin/python benchmarks/bench_loader_fork.py --no-trim  # fork over the freed heap
"""
import argparse
import threading
import time

import psutil
import torch
from torch.utils.data import DataLoader

from cldr_dist.config import Config
from cldr_dist.data.reader import ShardStream, make_loader, open_shards
from cldr_dist.train.loop import build_objective


def uss_gib(process: psutil.Process) -> float:
    try:
        return process.memory_full_info().uss / 2**30
    except psutil.Error:   # the worker exited between listing and reading
        return 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-trim", action="store_true", help="fork the loader worker without trimming first")
    ap.add_argument("--shards", default="shards/gdsc_v17")
    ap.add_argument("--batch", type=int, default=8192)
    args = ap.parse_args()
    torch.set_num_threads(2)
    cfg = Config()
    cfg.data.shards, cfg.data.split, cfg.model.drp, cfg.train.mode = args.shards, "mixed", "deepcdr", "pretrain"
    cfg.train.batch_size = args.batch
    shards = open_shards(cfg.data.shards)
    objective = build_objective(cfg, shards, 0)
    optimizer = torch.optim.Adam(objective.parameters(), lr=1e-4)
    stream = ShardStream(shards, "mixed", "train", batch_size=args.batch, seed=1, shuffle=True, drop_last=True)
    stream.load_in_memory()
    me, peak, done = psutil.Process(), [0.0], threading.Event()

    def step(batch) -> None:
        loss, _ = objective(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    batches = iter(make_loader(stream, 0))
    for _ in range(3):
        step(next(batches))
    grown = uss_gib(me)

    def watch() -> None:
        while not done.is_set():
            for child in me.children(recursive=True):
                peak[0] = max(peak[0], uss_gib(child))
            time.sleep(0.2)
    threading.Thread(target=watch, daemon=True).start()
    loader = (DataLoader(stream, batch_size=None, num_workers=1, multiprocessing_context="fork")
              if args.no_trim else make_loader(stream, 1))
    for i, batch in enumerate(loader):
        step(batch)
        if i == 2:
            break
    done.set()
    print(f"{'fork without trim' if args.no_trim else 'trim, then fork'}: parent USS after 3 steps "
          f"{grown:.2f} GiB, loader worker peak USS {peak[0]:.2f} GiB")


if __name__ == "__main__":
    main()
