"""`cldr predict`: exported models -> one row per (compound, cell line), on one process or as
a Ray Data pipeline.

A row holds the predicted ln(IC50) and y (the mean over the models of an ensemble, with their
standard deviation), the cell line's rank within its compound (1 = lowest predicted ln IC50,
the most sensitive), and for CLDR-pretrained models the zero-shot prediction. Compounds stream
through in chunks, so memory stays flat in the library's size; rejected compounds go to a CSV
with their reasons and every other compound is still predicted.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from cldr_dist.data import storage
from cldr_dist.data.tables import DataError
from cldr_dist.eval.metrics import ln_ic50_from_y
from cldr_dist.inference.bundle import Bundle, load_bundle, read_meta, read_training_tables
from cldr_dist.inference.inputs import (CellQuery, CompoundInput, Rejected, align_features,
                                        featurize_compounds, read_cell_table, training_cells,
                                        write_rejected)
from cldr_dist.inference.scoring import PairScorer

ZEROSHOT = ("auto", "on", "off")
OUTPUT_FORMATS = (".csv", ".parquet")
# zero-shot y is a number text's index / 1000; its ln IC50 takes the text's interval middle at
# the two ends, where index / 1000 is 0 (ln IC50 -inf)
ZEROSHOT_Y_FLOOR = 0.5 / 1000
SUCCESS_FILE = "_SUCCESS.json"   # written last under a Ray screen's output: the summary of a finished run


@dataclass
class ScreenSpec:
    """What every process of a screen needs, as plain data (it travels to Ray workers)."""
    models: list[str]
    cells: CellQuery
    missing_features: str = "error"
    zeroshot: str = "auto"
    device: str = "cpu"
    pairs_per_step: int = 16_384    # pairs through the per-pair layers at once: ~70 MiB of fc1 activations


def within_compound_rank(ln: np.ndarray) -> np.ndarray:
    """(U, V) -> each cell line's rank within its compound, 1 = lowest ln IC50."""
    order = np.argsort(ln, axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(1, ln.shape[1] + 1)[None, :].repeat(len(ln), 0), axis=1)
    return rank


def pair_frame(compound_ids: list[str], cells: CellQuery, members: list[dict], filled: int) -> pd.DataFrame:
    """The output rows of U compounds x V cells from each model's score(): ensemble mean and std."""
    U, V = len(compound_ids), len(cells)
    y = np.stack([m["y"] for m in members]).astype(np.float64)           # (M, U, V)
    ln = ln_ic50_from_y(y)
    mean_ln = ln.mean(0)
    cols = {
        "compound_id": np.repeat(np.asarray(compound_ids, dtype=object), V),
        "cell_id": np.tile(np.asarray(cells.ids, dtype=object), U),
        "cell_name": np.tile(np.asarray(cells.names, dtype=object), U),
        "pred_ln_ic50": mean_ln.ravel(),
        "pred_y": y.mean(0).ravel(),
        "rank": within_compound_rank(mean_ln).ravel(),
    }
    if len(members) > 1:
        cols["pred_ln_ic50_std"] = ln.std(0).ravel()
        cols["pred_y_std"] = y.std(0).ravel()
    if "zeroshot_y" in members[0]:
        zy = np.stack([m["zeroshot_y"] for m in members]).astype(np.float64)
        cols["zeroshot_y"] = zy.mean(0).ravel()
        cols["zeroshot_ln_ic50"] = ln_ic50_from_y(np.clip(zy, ZEROSHOT_Y_FLOOR, 1 - ZEROSHOT_Y_FLOOR)).mean(0).ravel()
    if filled:
        cols["filled_features"] = np.full(U * V, filled, dtype=np.int64)
    return pd.DataFrame(cols)


@dataclass
class Plan:
    """What a screen will do, settled on the driver from the models' model.json alone, before
    any worker loads a model: its errors (missing feature columns, zero-shot on an MSE-only
    model) surface as one line, not from inside a Ray actor."""
    zeroshot: bool
    filled: list[str]      # model feature columns the cell table lacks (filled with 0)
    extra: list[str]       # cell table columns no model reads


def plan_screen(spec: ScreenSpec) -> Plan:
    if spec.zeroshot not in ZEROSHOT:
        raise DataError(f"--zeroshot {spec.zeroshot!r}: choose one of {', '.join(ZEROSHOT)}")
    metas = [read_meta(m) for m in spec.models]
    aligned = [align_features(spec.cells, m["feature_names"], spec.missing_features) for m in metas]
    usable = all(m["pretrained"] and m["text_tower"] == "scratch" for m in metas)
    if spec.zeroshot == "on" and not usable:
        raise DataError("--zeroshot on needs CLDR-pretrained models with the scratch text tower; "
                        + ", ".join(f"{p} is {'pretrained' if m['pretrained'] else 'MSE-only'} ({m['text_tower']})"
                                    for p, m in zip(spec.models, metas)))
    filled = sorted({f for a in aligned for f in a.filled})
    wanted = {f for m in metas for f in m["feature_names"]}
    return Plan(spec.zeroshot == "on" or (spec.zeroshot == "auto" and usable), filled,
                [f for f in spec.cells.feature_names if f not in wanted])


class Screen:
    """The models of a screen, each holding the cell side encoded once; `predict` turns a chunk
    of compound inputs into output rows and rejected inputs. One per process (or Ray worker)."""

    def __init__(self, spec: ScreenSpec, plan: Plan):
        self.spec, self.plan = spec, plan
        self.bundles: list[Bundle] = [load_bundle(m, spec.device) for m in spec.models]
        self.scorers = [PairScorer(b, align_features(spec.cells, b.feature_names, spec.missing_features).features,
                                   spec.cells.names, plan.zeroshot) for b in self.bundles]
        self.compounds_per_step = max(1, spec.pairs_per_step // max(len(spec.cells), 1))

    def predict(self, inputs: list[CompoundInput]):
        """(frames, one per step of compounds, as a generator; the rejected inputs)."""
        compounds, rejected = featurize_compounds(inputs, self.bundles[0].tables)

        def frames():
            for start in range(0, len(compounds), self.compounds_per_step):
                part = compounds.take(slice(start, start + self.compounds_per_step))
                yield pair_frame(part.ids, self.spec.cells, [s.score(part) for s in self.scorers],
                                 len(self.plan.filled))
        return frames(), rejected


def cell_query(bundle_path: str, cells: str | None, cell_table: str | None) -> tuple[CellQuery, list[Rejected]]:
    """--cells all | ID,ID,... (the first model's training cell lines) or --cell-table FILE."""
    if cell_table and cells:
        raise DataError("give --cells or --cell-table, not both")
    if cell_table:
        return read_cell_table(cell_table)
    ids = None if (cells or "all") == "all" else [c.strip() for c in cells.split(",") if c.strip()]
    return training_cells(read_training_tables(bundle_path), ids), []


# ----------------------------------------------------------------------------- outputs

def output_format(url: str) -> str:
    suffix = Path(url).suffix.lower()
    if suffix not in OUTPUT_FORMATS:
        raise DataError(f"--out {url}: name a .csv or .parquet file")
    return suffix


class TableWriter:
    """Frames appended to one .csv or .parquet file, published whole at the end (local or s3://):
    a reader never sees half a prediction file."""

    def __init__(self, url: str):
        self.url, self.format = url, output_format(url)
        self.tmp = tempfile.NamedTemporaryFile(suffix=self.format, delete=False)
        self.tmp.close()
        self.parquet = None
        self.rows = 0

    def write(self, frame: pd.DataFrame) -> None:
        if self.format == ".csv":
            frame.to_csv(self.tmp.name, mode="a", header=self.rows == 0, index=False)
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq
            table = pa.Table.from_pandas(frame, preserve_index=False)
            if self.parquet is None:
                self.parquet = pq.ParquetWriter(self.tmp.name, table.schema)
            self.parquet.write_table(table)
        self.rows += len(frame)

    def close(self, empty_columns: list[str]) -> None:
        if self.rows == 0:   # nothing predicted: still a valid, empty table
            self.write(pd.DataFrame({c: [] for c in empty_columns}))
        if self.parquet is not None:
            self.parquet.close()
        try:
            storage.put_file(self.tmp.name, self.url)
        finally:
            os.unlink(self.tmp.name)


def write_frames(writer: TableWriter, frames) -> tuple[int, list[str]]:
    """Appends the frames; returns the rows written and the columns of the last frame."""
    rows, columns = 0, []
    for frame in frames:
        writer.write(frame)
        rows, columns = rows + len(frame), list(frame.columns)
    return rows, columns


def default_rejected_url(out: str, ray: bool) -> str:
    if ray:
        return storage.join(out, "rejected.csv")
    stem = out[: -len(Path(out).suffix)] if Path(out).suffix else out
    return f"{stem}.rejected.csv"


@dataclass
class Summary:
    compounds: int = 0
    rejected: int = 0
    cells: int = 0
    pairs: int = 0
    models: int = 0
    zeroshot: bool = False
    filled_features: int = 0
    extra_columns: int = 0
    seconds: float = 0.0
    out: str = ""
    rejected_file: str = ""
    parts: list[str] = field(default_factory=list)

    def line(self) -> str:
        d = dict(self.__dict__)
        d["pairs_per_s"] = round(self.pairs / self.seconds) if self.seconds > 0 else math.nan
        if not d["parts"]:
            d.pop("parts")
        return json.dumps(d)


# ----------------------------------------------------------------------------- one process

def predict_local(spec: ScreenSpec, inputs, out: str, rejected_url: str, cell_rejects: list[Rejected],
                  progress: bool = True) -> Summary:
    """inputs: an iterable of lists of CompoundInput (chunks of the library)."""
    t0 = time.time()
    output_format(out)
    plan = plan_screen(spec)
    screen = Screen(spec, plan)
    writer = TableWriter(out)
    rejected = list(cell_rejects)
    summary = Summary(cells=len(spec.cells), models=len(spec.models), zeroshot=plan.zeroshot,
                      filled_features=len(plan.filled), extra_columns=len(plan.extra), out=out)
    columns: list[str] = []
    with tqdm(unit="compound", desc="predict", disable=not progress) as bar:
        for chunk in inputs:
            frames, bad = screen.predict(chunk)
            rejected.extend(bad)
            pairs, chunk_columns = write_frames(writer, frames)
            summary.pairs += pairs
            columns = chunk_columns or columns
            summary.compounds += len(chunk) - len(bad)
            bar.update(len(chunk))
    writer.close(columns or ["compound_id", "cell_id", "cell_name", "pred_ln_ic50", "pred_y", "rank"])
    summary.rejected = len(rejected)
    summary.rejected_file = write_rejected(rejected, rejected_url)
    summary.seconds = round(time.time() - t0, 3)
    return summary


# ----------------------------------------------------------------------------- Ray Data

class ScreenWorker:
    """A Ray Data actor: the models loaded and the cell side encoded once, then each batch of
    compounds predicted and written as its own parquet part under `out`."""

    def __init__(self, spec: ScreenSpec, plan: Plan, out: str):
        self.screen, self.out = Screen(spec, plan), out

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        inputs = [CompoundInput(str(src), int(line), str(cid), str(smi))
                  for src, line, cid, smi in zip(batch["source"], batch["line"], batch["id"], batch["smiles"])]
        frames, rejected = self.screen.predict(inputs)
        name = f"part-{uuid.uuid4().hex}.parquet"
        writer = TableWriter(storage.join(self.out, name))
        pairs, columns = write_frames(writer, frames)
        if pairs:
            writer.close(columns)
        else:
            os.unlink(writer.tmp.name)
            name = ""
        return pd.DataFrame({"part": [name], "pairs": [pairs], "compounds": [len(inputs) - len(rejected)],
                             "rejected": [json.dumps([r.__dict__ for r in rejected])]})


def compound_dataset(compounds_url: str | None, inline: list[CompoundInput]):
    """The compounds as a Ray dataset of (source, line, id, smiles) strings. A file is read by
    Ray Data itself (read_csv: local, or s3:// through the configured endpoint); its line
    numbers, which pyarrow does not report, are left 0 (the id names the row)."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import ray.data
    if compounds_url is None:
        return ray.data.from_items([c.__dict__ for c in inline])
    fs = None
    if storage.is_s3(compounds_url):
        from pyarrow.fs import FSSpecHandler, PyFileSystem
        fs = PyFileSystem(FSSpecHandler(storage.filesystem(compounds_url)))
    types = {"id": pa.string(), "smiles": pa.string()}
    ds = ray.data.read_csv(compounds_url.removeprefix("s3://") if fs else compounds_url, filesystem=fs,
                           convert_options=pacsv.ConvertOptions(column_types=types, strings_can_be_null=False))
    name = Path(compounds_url).name
    return ds.map_batches(lambda b: pd.DataFrame({"source": name, "line": 0, "id": b["id"].fillna(""),
                                                  "smiles": b["smiles"].fillna("")}),
                          batch_format="pandas")


def predict_ray(spec: ScreenSpec, compounds_url: str | None, inline: list[CompoundInput], out: str,
                rejected_url: str, cell_rejects: list[Rejected], workers: int, compounds_per_task: int,
                address: str | None = None) -> Summary:
    """The same prediction as a Ray Data pipeline: `workers` actors each hold the models once
    and map over batches of compounds_per_task compounds, each writing a parquet part to `out`."""
    import ray
    t0 = time.time()
    if spec.zeroshot == "auto":   # zero-shot costs ~1000x a prediction: a screen asks for it explicitly
        spec = replace(spec, zeroshot="off")
    plan = plan_screen(spec)
    fs = storage.filesystem(out)
    if fs.exists(out) and fs.ls(out):   # parts of another screen would mix with this one's
        raise DataError(f"--out {out} is not empty; a --ray screen writes its parts into a new directory")
    from cldr_dist.train.trainer import start_ray
    started = start_ray(address, workers + 1)   # a CPU per worker and one for reading
    try:
        ds = compound_dataset(compounds_url, inline).map_batches(
            ScreenWorker, fn_constructor_kwargs={"spec": spec, "plan": plan, "out": out},
            batch_size=compounds_per_task, batch_format="pandas", concurrency=workers, num_cpus=1,
            num_gpus=1 if spec.device.startswith("cuda") else 0)
        results = pd.concat(list(ds.iter_batches(batch_format="pandas")), ignore_index=True)
    finally:
        if started:
            ray.shutdown()
    rejected = list(cell_rejects) + [Rejected(**r) for rows in results["rejected"] for r in json.loads(rows)]
    summary = Summary(compounds=int(results["compounds"].sum()), rejected=len(rejected), cells=len(spec.cells),
                      pairs=int(results["pairs"].sum()), models=len(spec.models), zeroshot=plan.zeroshot,
                      filled_features=len(plan.filled), extra_columns=len(plan.extra), out=out,
                      parts=sorted(p for p in results["part"] if p))
    summary.rejected_file = write_rejected(rejected, rejected_url)
    summary.seconds = round(time.time() - t0, 3)
    storage.write_bytes(storage.join(out, SUCCESS_FILE), summary.line().encode())
    return summary
