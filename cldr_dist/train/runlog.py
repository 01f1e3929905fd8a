"""Rank 0's record of a training run: metrics as CSV and TensorBoard under log_dir, and one
progress line per event on the console.

log_dir is on the run's storage (trainer.log_dir: `<storage_path>/<name>/logs`), so the logs
outlive the node rank 0 ran on. A local log_dir is written in place. An s3:// log_dir is
written to a temporary directory on the worker and uploaded by sync() - each file whole, in
one PUT, so a reader sees a complete CSV - which the loop calls after each checkpoint and at
the end of the run; a resumed run first downloads the CSV and appends to it.
"""
from __future__ import annotations

import csv
import io
import tempfile
import time
import uuid
from pathlib import Path

from cldr_dist.data import storage


CSV_HEADER = ["time", "epoch", "step", "name", "value"]


class MetricsCSVError(ValueError):
    """A metrics CSV that does not start with RunLog's header."""


def metric_rows(metrics_csv: str, source: str = "metrics CSV") -> list[dict[str, str]]:
    """The rows of a RunLog CSV (none for an empty one). A CSV without the header is one error
    naming `source`: read as data, its first row would be taken for the column names."""
    reader = csv.DictReader(io.StringIO(metrics_csv))
    if reader.fieldnames is None:
        return []
    if reader.fieldnames != CSV_HEADER:
        raise MetricsCSVError(f"{source}: not a metrics CSV: its first line is {','.join(reader.fieldnames)!r}, "
                              f"not the header {','.join(CSV_HEADER)!r}")
    return list(reader)


def epoch_table(metrics_csv: str, names: list[str], source: str = "metrics CSV") -> dict[str, dict[int, float]]:
    """{name: {epoch: value}} of several metrics in a RunLog CSV, read in one pass. A resumed run
    appends to its CSV, so an epoch logged twice (resumed from a checkpoint older than its last
    line) counts at its last entry."""
    table: dict[str, dict[int, float]] = {name: {} for name in names}
    for row in metric_rows(metrics_csv, source):
        if row["name"] in table:
            table[row["name"]][int(row["epoch"])] = float(row["value"])
    return table


def epoch_values(metrics_csv: str, name: str, source: str = "metrics CSV") -> dict[int, float]:
    """{epoch: value} of one metric in a RunLog CSV (see epoch_table)."""
    return epoch_table(metrics_csv, [name], source)[name]


class RunLog:
    def __init__(self, log_dir: str | None, mode: str, rank: int):
        self.mode, self.t0, self.rank = mode, time.time(), rank
        self.csv = self.tb = None
        self.dest, self.tmp = log_dir, None
        self.uploaded: dict[str, tuple[int, int]] = {}   # file -> (size, mtime_ns) at its last upload
        if log_dir:
            name = f"{mode}_metrics.csv"
            if storage.is_s3(log_dir):
                self.tmp = tempfile.TemporaryDirectory(prefix=f"cldr-{mode}-logs-")
                self.local = Path(self.tmp.name)
                if storage.exists(storage.join(log_dir, name)):  # a resumed run appends
                    (self.local / name).write_bytes(storage.read_bytes(storage.join(log_dir, name)))
            else:
                self.local = Path(log_dir)
                self.local.mkdir(parents=True, exist_ok=True)
            path = self.local / name
            # an empty file is a run killed before its header reached the disk: its resume must
            # not append rows to it headerless
            new = not path.exists() or path.stat().st_size == 0
            self.csv_file = open(path, "a", newline="")
            self.csv = csv.writer(self.csv_file)
            if new:
                self.csv.writerow(CSV_HEADER)
                self.csv_file.flush()
            from tensorboardX import SummaryWriter
            # its file is named by the second and the host: a run resumed within the same second
            # would overwrite the earlier file (on S3, at upload); a random suffix keeps both
            self.tb = SummaryWriter(str(self.local / "tensorboard" / mode), filename_suffix=f".{uuid.uuid4().hex[:8]}")

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

    def sync(self) -> None:
        """Flushes the CSV and TensorBoard files and, for an s3:// log_dir, uploads the ones that
        changed since the last sync. A failed upload costs a warning, not the run: the next sync
        tries again."""
        if not self.csv:
            return
        self.csv_file.flush()
        self.tb.flush()
        if self.tmp is None:
            return
        for path in sorted(p for p in self.local.rglob("*") if p.is_file()):
            rel = path.relative_to(self.local).as_posix()
            st = path.stat()
            if self.uploaded.get(rel) == (st.st_size, st.st_mtime_ns):
                continue
            try:
                storage.put_file(path, storage.join(self.dest, rel))
            except storage.StorageError as e:
                self.line(f"warning: logs not uploaded this time: {e}")
                return
            self.uploaded[rel] = (st.st_size, st.st_mtime_ns)
