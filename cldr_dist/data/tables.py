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


def read_table(path: Path, required: list[str]) -> pd.DataFrame:
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, OSError, EOFError) as e:
        raise DataError(f"{path}: cannot be read as CSV ({str(e).splitlines()[0]})") from None
    df.columns = [c.strip() for c in df.columns]
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(df.columns[:8])}")
    for c in required:
        df[c] = df[c].str.strip()
    return df


def _first_occurrence(keys: pd.Series) -> np.ndarray:
    return ~keys.duplicated(keep="first").to_numpy()


def load_tables(data_dir: str | Path, max_smiles_chars: int = MAX_SMILES_CHARS,
                max_abs_ln_ic50: float = MAX_ABS_LN_IC50) -> GDSCTables:
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"data directory not found: {data_dir}")
    paths = {s: find_table(data_dir, s) for s in ("responses", "drugs", "cell_lines")}
    responses = read_table(paths["responses"], RESPONSE_COLUMNS)
    drugs_df = read_table(paths["drugs"], DRUG_COLUMNS)
    cells_df = read_table(paths["cell_lines"], CELL_META_COLUMNS)
    bad: list[BadRow] = []

    def reject(file: Path, mask: np.ndarray, reason: str | list[str]):
        lines = np.flatnonzero(mask) + 2
        reasons = [reason] * len(lines) if isinstance(reason, str) else reason
        bad.extend(BadRow(file.name, int(n), r) for n, r in zip(lines, reasons))

    # drugs: unique id, parseable SMILES, featurised once per drug
    drugs: list[Drug] = []
    keep = _first_occurrence(drugs_df["drug_id"])
    reject(paths["drugs"], ~keep, "duplicate drug_id")
    for i in np.flatnonzero(keep):
        row = drugs_df.iloc[i]
        if not row["drug_id"]:
            reject(paths["drugs"], np.arange(len(drugs_df)) == i, "empty drug_id")
            continue
        if len(row["smiles"]) > max_smiles_chars:
            reject(paths["drugs"], np.arange(len(drugs_df)) == i,
                   f"SMILES of {len(row['smiles'])} characters (limit {max_smiles_chars})")
            continue
        try:
            atoms, edges = smiles_to_graph(row["smiles"])
        except FeaturizationError as e:
            reject(paths["drugs"], np.arange(len(drugs_df)) == i, f"{e}: {row['smiles'][:80]!r}")
            continue
        drugs.append(Drug(row["drug_id"], row["name"], row["smiles"],
                          canonical_smiles(row["smiles"]), atoms, edges))

    # cells: unique id, every genomic feature a finite number
    feature_names = [c for c in cells_df.columns if c not in CELL_META_COLUMNS]
    if not feature_names:
        raise DataError(f"{paths['cell_lines']}: no genomic feature columns after {', '.join(CELL_META_COLUMNS)}")
    feats = cells_df[feature_names].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
    finite = np.isfinite(feats).all(axis=1)
    reject(paths["cell_lines"], ~finite, "non-numeric or missing genomic feature value")
    unique_cell = _first_occurrence(cells_df["cosmic_id"]) | ~finite
    reject(paths["cell_lines"], finite & ~unique_cell, "duplicate cosmic_id")
    empty_id = (cells_df["cosmic_id"] == "").to_numpy()
    reject(paths["cell_lines"], finite & unique_cell & empty_id, "empty cosmic_id")
    good_cells = finite & unique_cell & ~empty_id
    cell_ids = cells_df["cosmic_id"][good_cells].tolist()
    # a cell line without a name is captioned by its id
    names = cells_df["name"][good_cells].tolist()
    cell_names = [n or i for n, i in zip(names, cell_ids)]
    cell_features = np.clip(feats[good_cells], 0, 255).astype(np.uint8)

    # responses: numeric finite ln_ic50, known ids, one row per pair
    ln = pd.to_numeric(responses["ln_ic50"], errors="coerce").to_numpy(dtype=np.float64)
    numeric = np.isfinite(ln)
    reject(paths["responses"], ~numeric, "missing or non-numeric ln_ic50")
    ok_value = numeric & (np.abs(np.nan_to_num(ln)) <= max_abs_ln_ic50)
    reject(paths["responses"], numeric & ~ok_value, f"ln_ic50 beyond +-{max_abs_ln_ic50:g}")
    known_drug = responses["drug_id"].isin({d.drug_id for d in drugs}).to_numpy()
    known_cell = responses["cosmic_id"].isin(set(cell_ids)).to_numpy()
    reject(paths["responses"], ok_value & ~known_drug,
           [f"unknown or unusable drug_id {d!r}" for d in responses["drug_id"][ok_value & ~known_drug]])
    m = ok_value & known_drug & ~known_cell
    reject(paths["responses"], m, [f"unknown or unusable cosmic_id {c!r}" for c in responses["cosmic_id"][m]])
    usable = ok_value & known_drug & known_cell
    pair = responses["cosmic_id"] + "\x1f" + responses["drug_id"]
    dup = np.zeros(len(responses), dtype=bool)
    dup[usable] = ~_first_occurrence(pair[usable])
    reject(paths["responses"], dup, "duplicate (cosmic_id, drug_id) pair")
    clean = responses.loc[usable & ~dup, ["cosmic_id", "drug_id"]].copy()
    clean["ln_ic50"] = ln[usable & ~dup]
    clean = clean.reset_index(drop=True)
    if len(clean) == 0:
        raise DataError(f"{paths['responses']}: no usable rows ({len(bad)} bad rows)")
    bad.sort(key=lambda b: (b.file, b.line))
    return GDSCTables(drugs, cell_ids, cell_names, cell_features, feature_names, clean, bad, paths)
