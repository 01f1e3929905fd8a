"""Rank 0's record of a training run: metrics as CSV and TensorBoard under log_dir, and one
progress line per event on the console."""
from __future__ import annotations

import csv
import time
from pathlib import Path


class RunLog:
    def __init__(self, log_dir: str | None, mode: str, rank: int):
        self.mode, self.t0, self.rank = mode, time.time(), rank
        self.csv = self.tb = None
        if log_dir:
            Path(log_dir).mkdir(parents=True, exist_ok=True)
            path = Path(log_dir) / f"{mode}_metrics.csv"
            new = not path.exists()
            self.csv_file = open(path, "a", newline="")
            self.csv = csv.writer(self.csv_file)
            if new:
                self.csv.writerow(["time", "epoch", "step", "name", "value"])
            from tensorboardX import SummaryWriter
            self.tb = SummaryWriter(str(Path(log_dir) / "tensorboard" / mode))

    def scalars(self, epoch: int, step: int, values: dict[str, float]) -> None:
        if self.csv:
            now = round(time.time() - self.t0, 3)
            for k, v in values.items():
                self.csv.writerow([now, epoch, step, k, v])
                self.tb.add_scalar(f"{self.mode}/{k}", v, step)
            self.csv_file.flush()

    def line(self, text: str) -> None:
        if self.rank == 0:
            print(f"[{self.mode}] {text}", flush=True)
