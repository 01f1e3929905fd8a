"""Deterministic train/val/test splits of the response pairs: mixed, cell-blind, drug-blind.

Blind splits assign whole groups (a cell line; a drug structure = canonical SMILES), so the same
compound listed under two drug ids never sits on both sides.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

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


def _group_split(groups: np.ndarray, fractions: tuple[float, ...], rng: np.random.Generator) -> list[np.ndarray]:
    """Split sample indices by group: groups are shuffled, then cut by cumulative fraction of groups."""
    unique = np.unique(groups)
    rng.shuffle(unique)
    cuts = np.round(np.cumsum(fractions)[:-1] / sum(fractions) * len(unique)).astype(int)
    parts = np.split(unique, cuts)
    return [np.flatnonzero(np.isin(groups, p)) for p in parts]


def make_split(tables: GDSCTables, split: str, seed: int,
               fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
               held_out_drugs: tuple[set[str], set[str]] | None = None) -> dict[str, np.ndarray]:
    """Row indices of tables.responses for each part."""
    rng = np.random.default_rng(seed)
    n = len(tables.responses)
    if split == "mixed":
        order = rng.permutation(n)
        cuts = np.round(np.cumsum(fractions)[:-1] / sum(fractions) * n).astype(int)
        parts = np.split(order, cuts)
    elif split == "cell_blind":
        parts = _group_split(tables.responses["cosmic_id"].to_numpy(), fractions, rng)
    elif split == "drug_blind":
        if held_out_drugs is None:
            raise DataError("drug_blind split needs a held-out drug list")
        names, ids = held_out_drugs
        held = {d.canonical_smiles for d in tables.drugs
                if d.drug_id in ids or _normalise_name(d.name) in names}
        if not held:
            raise DataError("drug_blind: none of the held-out drugs is in this dataset")
        structure = {d.drug_id: d.canonical_smiles for d in tables.drugs}
        groups = tables.responses["drug_id"].map(structure).to_numpy()
        is_test = np.isin(groups, list(held))
        rest = np.flatnonzero(~is_test)
        train, val = _group_split(groups[rest], fractions[:2], rng)
        parts = [rest[train], rest[val], np.flatnonzero(is_test)]
    else:
        raise DataError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    return {part: np.sort(idx) for part, idx in zip(PARTS, parts)}
