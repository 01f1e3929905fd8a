"""What `cldr predict` is asked about: compounds and cell lines, read, checked and featurised.

Compounds come as SMILES (`--smiles`), training drug ids (`--drug`), or a CSV with columns
id, smiles (an empty smiles names a training drug by its id). A compound RDKit rejects, or one
over the length limit, becomes a Rejected row with its reason; the others go on.

Cell lines come from the model's training set (`all`, or ids) or from a table in the input
contract's cell-line format (data/tables.py). A model reads its genomic features by name, in
its own order: `align_features` picks the table's columns by name, counts the extra ones, and
either refuses the missing ones in one line or, when asked, fills them with 0 and counts them.
"""
from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cldr_dist.data import storage
from cldr_dist.data.features import FeatureTables
from cldr_dist.data.featurize import FeaturizationError, smiles_codes, smiles_to_graph
from cldr_dist.data.tables import (CELL_META_COLUMNS, MAX_SMILES_CHARS, DataError, iter_table,
                                   load_cells)

COMPOUND_COLUMNS = ["id", "smiles"]
MISSING_FEATURES = ("error", "zero")
REJECTED_COLUMNS = ["source", "line", "id", "smiles", "reason"]


@dataclass
class Rejected:
    source: str      # the file, or --smiles / --drug
    line: int        # 1-based line of the file (header = 1); the position on the command line
    id: str
    smiles: str
    reason: str


@dataclass
class CompoundInput:
    source: str
    line: int
    id: str
    smiles: str      # empty: the id names a training drug


@dataclass
class Compounds:
    """Featurised compounds, in input order."""
    ids: list[str]
    smiles: list[str]
    graphs: list[tuple[np.ndarray, np.ndarray]]   # (atoms (n, 90) uint8, edges (2, e) int32)
    codes: list[np.ndarray]                       # SMILES character codes

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, rows: slice) -> "Compounds":
        return Compounds(self.ids[rows], self.smiles[rows], self.graphs[rows], self.codes[rows])


def command_line_compounds(smiles: list[str], drug_ids: list[str]) -> list[CompoundInput]:
    """--smiles S (the id is the SMILES itself) and --drug ID, in the order given."""
    return ([CompoundInput("--smiles", i + 1, s, s) for i, s in enumerate(smiles)]
            + [CompoundInput("--drug", i + 1, d, "") for i, d in enumerate(drug_ids)])


def iter_compound_file(url: str, chunk_rows: int) -> Iterator[list[CompoundInput]]:
    """The compounds CSV (local or s3://), chunk_rows at a time: the library is never in
    memory at once (an s3:// file is copied to a local temporary file first)."""
    if storage.is_s3(url):
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / Path(url).name
            with storage.open_read(url) as src, open(local, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            yield from iter_compound_file(str(local), chunk_rows)
        return
    path = Path(url)
    if not path.is_file():
        raise DataError(f"compounds file not found: {path}")
    for start, chunk in iter_table(path, COMPOUND_COLUMNS, chunk_rows):
        yield [CompoundInput(path.name, start + i + 2, cid, smi)
               for i, (cid, smi) in enumerate(zip(chunk["id"].tolist(), chunk["smiles"].tolist()))]


def featurize_compounds(inputs: list[CompoundInput], training: FeatureTables,
                        max_smiles_chars: int = MAX_SMILES_CHARS) -> tuple[Compounds, list[Rejected]]:
    known = {d: i for i, d in enumerate(training.drug_ids.tolist())}
    out = Compounds([], [], [], [])
    rejected: list[Rejected] = []
    for c in inputs:
        smiles = c.smiles
        if not smiles:
            if c.id not in known:
                rejected.append(Rejected(c.source, c.line, c.id, "", "no SMILES, and not a training drug id"))
                continue
            smiles = str(training.drug_smiles[known[c.id]])
        if len(smiles) > max_smiles_chars:
            rejected.append(Rejected(c.source, c.line, c.id, smiles[:80],
                                     f"SMILES of {len(smiles)} characters (limit {max_smiles_chars})"))
            continue
        try:
            graph = smiles_to_graph(smiles)
        except FeaturizationError as e:
            rejected.append(Rejected(c.source, c.line, c.id, smiles, str(e)))
            continue
        out.ids.append(c.id or smiles)
        out.smiles.append(smiles)
        out.graphs.append(graph)
        out.codes.append(smiles_codes(smiles))
    return out, rejected


@dataclass
class CellQuery:
    """The cell lines asked about, with their features under their own column names."""
    ids: list[str]
    names: list[str]
    values: np.ndarray          # (C, F') uint8, columns = feature_names
    feature_names: list[str]

    def __len__(self) -> int:
        return len(self.ids)


def training_cells(tables: FeatureTables, ids: list[str] | None = None) -> CellQuery:
    """The model's training cell lines: all of them (ids None) or the ones named, in that order."""
    all_ids = tables.cell_ids.tolist()
    rows = np.arange(len(all_ids))
    if ids is not None:
        where = {c: i for i, c in enumerate(all_ids)}
        unknown = [c for c in ids if c not in where]
        if unknown:
            raise DataError(f"cell line id(s) not in the model's training set: {', '.join(unknown)} "
                            f"(use --cell-table FILE for new cell lines)")
        rows = np.array([where[c] for c in ids], dtype=np.int64)
    return CellQuery([all_ids[i] for i in rows], tables.cell_names[rows].tolist(),
                     tables.cell_features[rows], tables.feature_names.tolist())


def read_cell_table(path: str | Path) -> tuple[CellQuery, list[Rejected]]:
    """A cell-line table in the input contract's format; bad rows become Rejected rows."""
    from cldr_dist.data.tables import BadRow
    path = Path(path)
    if not path.is_file():
        raise DataError(f"cell table not found: {path}")
    bad: list[BadRow] = []
    ids, names, values, feature_names = load_cells(path, bad)
    if not feature_names:
        raise DataError(f"{path}: no genomic feature columns after {', '.join(CELL_META_COLUMNS)}")
    if not ids:
        raise DataError(f"{path}: no usable cell lines ({len(bad)} bad rows)")
    return (CellQuery(ids, names, values, feature_names),
            [Rejected(b.file, b.line, "", "", f"cell line: {b.reason}") for b in bad])


@dataclass
class AlignedCells:
    features: np.ndarray   # (C, F) float32 in the model's column order
    filled: list[str]      # model columns the table lacked, filled with 0
    extra: list[str]       # table columns the model does not read


def align_features(cells: CellQuery, model_features: list[str], missing: str = "error",
                   source: str = "the cell table") -> AlignedCells:
    if missing not in MISSING_FEATURES:
        raise DataError(f"--missing-features {missing!r}: choose one of {', '.join(MISSING_FEATURES)}")
    column = {name: i for i, name in enumerate(cells.feature_names)}
    absent = [f for f in model_features if f not in column]
    if absent and missing == "error":
        raise DataError(f"{source} lacks {len(absent)} of the model's {len(model_features)} feature "
                        f"columns: {', '.join(absent)} (--missing-features zero fills them with 0)")
    wanted = set(model_features)
    out = np.zeros((len(cells), len(model_features)), dtype=np.float32)
    for j, name in enumerate(model_features):
        if name in column:
            out[:, j] = cells.values[:, column[name]]
    return AlignedCells(out, absent, [f for f in cells.feature_names if f not in wanted])


def write_rejected(rejected: list[Rejected], url: str) -> str:
    """The rejected inputs as a CSV at url (local or s3://); returns url, or "" (and writes
    nothing) when there are none."""
    if not rejected:
        return ""
    frame = pd.DataFrame([r.__dict__ for r in rejected], columns=REJECTED_COLUMNS)
    storage.write_bytes(url, frame.to_csv(index=False).encode())
    return url
