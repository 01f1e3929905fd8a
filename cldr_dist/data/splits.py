"""Deterministic train/val/test splits of the response pairs: mixed, cell-blind, drug-blind.

Blind splits assign whole groups (a cell line; a drug structure = canonical SMILES), so the same
compound listed under two drug ids never sits on both sides.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from cldr_dist.data.tables import DataError, GDSCTables

SPLITS = ("mixed", "cell_blind", "drug_blind")
PARTS = ("train", "val", "test")


def _normalise_name(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def read_held_out_drugs(path: str | Path) -> tuple[set[str], set[str]]:
    """The held-out list: one drug name per line, or `drug_id,name` lines; '#' starts a comment.
    Returns (normalised names, ids)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"missing file: {path} (held-out drugs for the drug-blind split)")
    names, ids = set(), set()
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "," in line:
            drug_id, name = line.split(",", 1)
            if drug_id.strip() == "drug_id":
                continue
            ids.add(drug_id.strip())
            names.add(_normalise_name(name))
        else:
            names.add(_normalise_name(line))
    return names, ids


def _index_dtype(n: int) -> type:
    return np.int32 if n <= np.iinfo(np.int32).max else np.int64


def _ranked_codes(column, key=None) -> tuple[np.ndarray, list]:
    """Each row's group as an integer whose order is the sort order of the group's string (the
    id, or key(id)): np.unique of these codes visits groups in the order np.unique of the
    strings did, without a string per row. A categorical column (load_tables') costs no copy."""
    cat = column.array if isinstance(column.dtype, pd.CategoricalDtype) else pd.Categorical(column)
    labels = [key(c) if key else c for c in cat.categories.tolist()]
    # rank of each category's label among the distinct labels, sorted as np.unique sorts them
    distinct = sorted(set(labels))
    rank = {g: i for i, g in enumerate(distinct)}
    to_rank = np.asarray([rank[g] for g in labels], dtype=_index_dtype(len(distinct)))
    return to_rank[cat.codes], distinct


def _group_split(groups: np.ndarray, n_groups: int, fractions: tuple[float, ...],
                 rng: np.random.Generator) -> list[np.ndarray]:
    """Split sample indices by group: groups are shuffled, then cut by cumulative fraction of groups.
    groups: integer group of each sample, in [0, n_groups)."""
    unique = np.unique(groups)
    rng.shuffle(unique)
    cuts = np.round(np.cumsum(fractions)[:-1] / sum(fractions) * len(unique)).astype(int)
    part_of = np.full(n_groups, -1, dtype=np.int8)
    for k, p in enumerate(np.split(unique, cuts)):
        part_of[p] = k
    of_row = part_of[groups]
    dtype = _index_dtype(len(groups))
    return [np.flatnonzero(of_row == k).astype(dtype) for k in range(len(fractions))]


def make_split(tables: GDSCTables, split: str, seed: int,
               fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
               held_out_drugs: tuple[set[str], set[str]] | None = None) -> dict[str, np.ndarray]:
    """Row indices of tables.responses for each part (int32 below 2**31 rows: 4 bytes a row)."""
    rng = np.random.default_rng(seed)
    n = len(tables.responses)
    dtype = _index_dtype(n)
    if split == "mixed":
        # the permutation rng.permutation(n) makes, in 4-byte indices
        order = np.arange(n, dtype=dtype)
        rng.shuffle(order)
        cuts = np.round(np.cumsum(fractions)[:-1] / sum(fractions) * n).astype(int)
        parts = np.split(order, cuts)
    elif split == "cell_blind":
        groups, distinct = _ranked_codes(tables.responses["cosmic_id"])
        parts = _group_split(groups, len(distinct), fractions, rng)
    elif split == "drug_blind":
        if held_out_drugs is None:
            raise DataError("drug_blind split needs a held-out drug list")
        names, ids = held_out_drugs
        held = {d.canonical_smiles for d in tables.drugs
                if d.drug_id in ids or _normalise_name(d.name) in names}
        if not held:
            raise DataError("drug_blind: none of the held-out drugs is in this dataset")
        structure = {d.drug_id: d.canonical_smiles for d in tables.drugs}
        # groups: structures (canonical SMILES), ranked in string order
        groups, distinct = _ranked_codes(tables.responses["drug_id"], key=structure.__getitem__)
        is_test = np.asarray([g in held for g in distinct], dtype=bool)[groups]
        rest = np.flatnonzero(~is_test).astype(dtype)
        train, val = _group_split(groups[rest], len(distinct), fractions[:2], rng)
        parts = [rest[train], rest[val], np.flatnonzero(is_test).astype(dtype)]
    else:
        raise DataError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    return {part: np.sort(idx) for part, idx in zip(PARTS, parts)}
