"""The input contract: a dataset directory in the gdsc_v17 format, loaded and validated.

    responses.csv[.gz]   cosmic_id, drug_id, ln_ic50
    drugs.csv[.gz]       drug_id, name, smiles (other columns ignored)
    cell_lines.csv[.gz]  cosmic_id, name, tissue, msi, then any number of 0/1 genomic features

Ids are opaque strings. A missing file or column is a DataError (nothing is written); a bad row
is dropped and recorded with its reason, file and line number.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cldr_dist.data.featurize import FeaturizationError, canonical_smiles, smiles_to_graph

RESPONSE_COLUMNS = ["cosmic_id", "drug_id", "ln_ic50"]
DRUG_COLUMNS = ["drug_id", "name", "smiles"]
CELL_META_COLUMNS = ["cosmic_id", "name", "tissue", "msi"]
CELL_IGNORED_COLUMNS = ["tissue", "msi"]  # metadata, not model inputs
# Limits that keep absurd input from hanging RDKit or overflowing the label. The largest GDSC
# SMILES has under 300 characters and |ln_ic50| stays under 13; y saturates well before 50.
MAX_SMILES_CHARS = 2000
MAX_ABS_LN_IC50 = 50.0


class DataError(Exception):
    """A user-facing problem with the input data: the message names the file, column or row."""


@dataclass
class BadRow:
    file: str
    line: int       # 1-based line in the file, header is line 1
    reason: str


@dataclass
class Drug:
    drug_id: str
    name: str
    smiles: str
    canonical_smiles: str   # groups the same compound listed under two ids
    atoms: np.ndarray
    edges: np.ndarray


@dataclass
class GDSCTables:
    drugs: list[Drug]                 # usable drugs, in file order
    cell_ids: list[str]
    cell_names: list[str]
    cell_features: np.ndarray         # (C, F) uint8
    feature_names: list[str]
    responses: pd.DataFrame           # cosmic_id, drug_id, ln_ic50 (float), clean
    bad_rows: list[BadRow] = field(default_factory=list)
    source_files: dict[str, Path] = field(default_factory=dict)


def find_table(data_dir: Path, stem: str) -> Path:
    for suffix in (".csv.gz", ".csv"):
        p = data_dir / f"{stem}{suffix}"
        if p.is_file():
            return p
    raise DataError(f"missing file: {data_dir / (stem + '.csv.gz')} (or {stem}.csv)")


CHUNK_ROWS = 65_536        # rows of responses.csv parsed at once: strings exist one chunk at a time
CELL_CHUNK_ROWS = 2_048     # rows of cell_lines.csv (hundreds of feature columns) parsed at once
# duplicate (cell, drug) pairs are found with a cells x drugs table of booleans while it stays
# under this many entries (GDSC x 20: 5 MB); beyond it, with one int64 key per usable row
MAX_SEEN_TABLE = 1 << 26
_CSV_ERRORS = (pd.errors.ParserError, pd.errors.EmptyDataError, OSError, EOFError)


def _csv_error(path: Path, e: Exception) -> DataError:
    if isinstance(e, UnicodeDecodeError):
        return DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})")
    return DataError(f"{path}: cannot be read as CSV ({str(e).splitlines()[0]})")


def _checked(path: Path, df: pd.DataFrame, required: list[str]) -> pd.DataFrame:
    df.columns = [c.strip() for c in df.columns]
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(df.columns[:8])}")
    for c in required:
        df[c] = df[c].str.strip()
    return df


def read_table(path: Path, required: list[str]) -> pd.DataFrame:
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
    except UnicodeDecodeError as e:
        raise _csv_error(path, e) from None
    except _CSV_ERRORS as e:
        raise _csv_error(path, e) from None
    return _checked(path, df, required)


def iter_table(path: Path, required: list[str], chunk_rows: int):
    """read_table's frames, `chunk_rows` rows at a time, each with the index of its first row:
    the same strings, checks and errors, without the whole file's strings at once."""
    try:
        with pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8", chunksize=chunk_rows) as reader:
            start = 0
            for chunk in reader:
                yield start, _checked(path, chunk, required)
                start += len(chunk)
    except UnicodeDecodeError as e:
        raise _csv_error(path, e) from None
    except _CSV_ERRORS as e:
        raise _csv_error(path, e) from None


def _first_occurrence(keys: pd.Series) -> np.ndarray:
    return ~keys.duplicated(keep="first").to_numpy()


def code_dtype(n_categories: int) -> np.dtype:
    """The codes dtype pandas gives a Categorical of n categories: codes stored in it are not copied."""
    return pd.Categorical.from_codes(np.zeros(0, dtype=np.int64), categories=pd.RangeIndex(max(n_categories, 1))).codes.dtype


class _Rejects:
    """Bad rows of one file, recorded as (line, reason) where line = the row's index + 2."""

    def __init__(self, bad: list[BadRow], file: Path):
        self.bad, self.name = bad, file.name

    def __call__(self, mask: np.ndarray, reason, offset: int = 0):
        self.at(np.flatnonzero(mask) + offset, reason)

    def at(self, rows: np.ndarray, reason):
        lines = np.asarray(rows) + 2
        reasons = [reason] * len(lines) if isinstance(reason, str) else reason
        self.bad.extend(BadRow(self.name, int(n), r) for n, r in zip(lines, reasons))


def _load_drugs(path: Path, drugs_df: pd.DataFrame, bad: list[BadRow], max_smiles_chars: int) -> list[Drug]:
    """Usable drugs, in file order: unique id, parseable SMILES, featurised once per drug."""
    reject = _Rejects(bad, path)
    drugs: list[Drug] = []
    keep = _first_occurrence(drugs_df["drug_id"])
    reject(~keep, "duplicate drug_id")
    for i in np.flatnonzero(keep):
        row = drugs_df.iloc[i]
        one = np.arange(len(drugs_df)) == i
        if not row["drug_id"]:
            reject(one, "empty drug_id")
            continue
        if len(row["smiles"]) > max_smiles_chars:
            reject(one, f"SMILES of {len(row['smiles'])} characters (limit {max_smiles_chars})")
            continue
        try:
            atoms, edges = smiles_to_graph(row["smiles"])
        except FeaturizationError as e:
            reject(one, f"{e}: {row['smiles'][:80]!r}")
            continue
        drugs.append(Drug(row["drug_id"], row["name"], row["smiles"],
                          canonical_smiles(row["smiles"]), atoms, edges))
    return drugs


def load_cells(path: Path, bad: list[BadRow]):
    """Usable cell lines (unique non-empty id, every genomic feature a finite number), read in
    chunks: (ids, names, uint8 features, feature names). A cell costs its id, name and F bytes."""
    reject = _Rejects(bad, path)
    ids: list[str] = []
    names: list[str] = []
    feats: list[np.ndarray] = []
    seen: set[str] = set()
    feature_names = None
    for start, chunk in iter_table(path, CELL_META_COLUMNS, CELL_CHUNK_ROWS):
        if feature_names is None:
            feature_names = [c for c in chunk.columns if c not in CELL_META_COLUMNS]
        values = chunk[feature_names].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
        finite = np.isfinite(values).all(axis=1)
        reject(~finite, "non-numeric or missing genomic feature value", start)
        # the first occurrence of each id in the file, counting rows with bad features
        chunk_ids = chunk["cosmic_id"]
        first = _first_occurrence(chunk_ids) & ~chunk_ids.isin(seen).to_numpy()
        seen.update(chunk_ids[first].tolist())
        unique_cell = first | ~finite
        reject(finite & ~unique_cell, "duplicate cosmic_id", start)
        empty_id = (chunk_ids == "").to_numpy()
        reject(finite & unique_cell & empty_id, "empty cosmic_id", start)
        good = finite & unique_cell & ~empty_id
        good_ids = chunk_ids[good].tolist()
        ids.extend(good_ids)
        # a cell line without a name is captioned by its id
        names.extend(n or i for n, i in zip(chunk["name"][good].tolist(), good_ids))
        feats.append(np.clip(values[good], 0, 255).astype(np.uint8))
    features = np.concatenate(feats) if feats else np.zeros((0, len(feature_names)), dtype=np.uint8)
    return ids, names, features, feature_names


def _header(path: Path, required: list[str]) -> list[str]:
    """The file's checked column names (its first chunk of one row: parse, encoding and
    missing-column errors of the header and first row surface here, before any work)."""
    for _, chunk in iter_table(path, required, 1):
        return list(chunk.columns)
    return []


def load_tables(data_dir: str | Path, max_smiles_chars: int = MAX_SMILES_CHARS,
                max_abs_ln_ic50: float = MAX_ABS_LN_IC50) -> GDSCTables:
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"data directory not found: {data_dir}")
    paths = {s: find_table(data_dir, s) for s in ("responses", "drugs", "cell_lines")}
    # headers first, in this order, as when the three files were read whole before any work
    _header(paths["responses"], RESPONSE_COLUMNS)
    drugs_df = read_table(paths["drugs"], DRUG_COLUMNS)
    if not [c for c in _header(paths["cell_lines"], CELL_META_COLUMNS) if c not in CELL_META_COLUMNS]:
        raise DataError(f"{paths['cell_lines']}: no genomic feature columns after {', '.join(CELL_META_COLUMNS)}")
    bad: list[BadRow] = []
    drugs = _load_drugs(paths["drugs"], drugs_df, bad, max_smiles_chars)
    del drugs_df
    cell_ids, cell_names, cell_features, feature_names = load_cells(paths["cell_lines"], bad)
    responses = _load_responses(paths["responses"], bad, [d.drug_id for d in drugs], cell_ids, max_abs_ln_ic50)
    if len(responses) == 0:
        raise DataError(f"{paths['responses']}: no usable rows ({len(bad)} bad rows)")
    bad.sort(key=lambda b: (b.file, b.line))
    return GDSCTables(drugs, cell_ids, cell_names, cell_features, feature_names, responses, bad, paths)


def _load_responses(path: Path, bad: list[BadRow], drug_ids: list[str], cell_ids: list[str],
                    max_abs_ln_ic50: float) -> pd.DataFrame:
    """responses.csv, streamed in chunks: numeric finite ln_ic50, known ids, one row per pair
    (its first in the file). A kept row costs its cell and drug codes (categorical codes over
    cell_ids and drug ids: 2 bytes each up to 32,767 ids) and its float64 ln_ic50; its strings
    exist only while its chunk is parsed."""
    reject = _Rejects(bad, path)
    drug_index, cell_index = pd.Index(drug_ids), pd.Index(cell_ids)
    n_drugs = len(drug_ids)
    ddtype, cdtype = code_dtype(len(drug_ids)), code_dtype(len(cell_ids))
    use_table = len(drug_ids) * len(cell_ids) <= MAX_SEEN_TABLE
    seen = np.zeros(len(drug_ids) * len(cell_ids) if use_table else 0, dtype=bool)
    rows, dcodes, ccodes, lns = [], [], [], []
    for start, chunk in iter_table(path, RESPONSE_COLUMNS, CHUNK_ROWS):
        ln = pd.to_numeric(chunk["ln_ic50"], errors="coerce").to_numpy(dtype=np.float64)
        numeric = np.isfinite(ln)
        reject(~numeric, "missing or non-numeric ln_ic50", start)
        ok_value = numeric & (np.abs(np.nan_to_num(ln)) <= max_abs_ln_ic50)
        reject(numeric & ~ok_value, f"ln_ic50 beyond +-{max_abs_ln_ic50:g}", start)
        drow = drug_index.get_indexer(chunk["drug_id"])
        crow = cell_index.get_indexer(chunk["cosmic_id"])
        known_drug, known_cell = drow >= 0, crow >= 0
        m = ok_value & ~known_drug
        reject(m, [f"unknown or unusable drug_id {d!r}" for d in chunk["drug_id"][m]], start)
        m = ok_value & known_drug & ~known_cell
        reject(m, [f"unknown or unusable cosmic_id {c!r}" for c in chunk["cosmic_id"][m]], start)
        usable = np.flatnonzero(ok_value & known_drug & known_cell)
        if use_table:
            # a pair's first row in the file: first in this chunk and in no earlier chunk
            key = crow[usable].astype(np.int64) * n_drugs + drow[usable]
            dup = pd.Series(key).duplicated(keep="first").to_numpy() | seen[key]
            seen[key] = True
            reject.at(usable[dup] + start, "duplicate (cosmic_id, drug_id) pair")
            usable = usable[~dup]
        else:
            rows.append(usable + start)  # duplicates are found once every row is read
        dcodes.append(drow[usable].astype(ddtype))
        ccodes.append(crow[usable].astype(cdtype))
        lns.append(ln[usable])
        del chunk
    dcode, ccode, ln = (np.concatenate(a) for a in (dcodes, ccodes, lns))
    del dcodes, ccodes, lns
    if not use_table:
        row = np.concatenate(rows)
        dup = pd.Series(ccode.astype(np.int64) * n_drugs + dcode).duplicated(keep="first").to_numpy()
        reject.at(row[dup], "duplicate (cosmic_id, drug_id) pair")
        dcode, ccode, ln = dcode[~dup], ccode[~dup], ln[~dup]
    return pd.DataFrame({"cosmic_id": pd.Categorical.from_codes(ccode, categories=cell_index),
                         "drug_id": pd.Categorical.from_codes(dcode, categories=drug_index),
                         "ln_ic50": ln}, copy=False)
