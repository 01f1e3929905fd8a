import numpy as np
import pytest

from cldr_dist.data.splits import make_split, read_held_out_drugs
from cldr_dist.data.tables import DataError, load_tables

from tests.conftest import HELD_OUT, REPO

FULL = REPO / "data" / "gdsc_v17"


@pytest.fixture(scope="module")
def full_tables():
    return load_tables(FULL)


def _parts(tables, split, seed=171):
    return make_split(tables, split, seed, held_out_drugs=read_held_out_drugs(HELD_OUT))


@pytest.mark.parametrize("split", ["mixed", "cell_blind", "drug_blind"])
def test_partition_and_determinism(full_tables, split):
    parts = _parts(full_tables, split)
    allrows = np.concatenate(list(parts.values()))
    assert len(allrows) == len(set(allrows)) == len(full_tables.responses)
    again = _parts(full_tables, split)
    assert all(np.array_equal(parts[p], again[p]) for p in parts)
    other = _parts(full_tables, split, seed=7)
    assert not np.array_equal(parts["train"], other["train"])  # the seed matters


def test_drug_blind_holds_out_the_23_drugs_by_structure(full_tables):
    parts = _parts(full_tables, "drug_blind")
    resp = full_tables.responses
    smiles = {d.drug_id: d.canonical_smiles for d in full_tables.drugs}
    test_drugs = set(resp["drug_id"].iloc[parts["test"]])
    assert len(test_drugs) == 23
    names, ids = read_held_out_drugs(HELD_OUT)
    assert test_drugs == ids
    seen = {p: {smiles[d] for d in resp["drug_id"].iloc[parts[p]]} for p in parts}
    assert not seen["test"] & (seen["train"] | seen["val"])
    assert not seen["train"] & seen["val"]  # duplicated compounds (two ids) stay on one side
    assert len(parts["train"]) / (len(parts["train"]) + len(parts["val"])) == pytest.approx(8 / 9, abs=0.03)


def test_cell_blind_disjoint(full_tables):
    parts = _parts(full_tables, "cell_blind")
    cells = {p: set(full_tables.responses["cosmic_id"].iloc[idx]) for p, idx in parts.items()}
    assert not cells["train"] & cells["val"] and not cells["train"] & cells["test"]
    assert not cells["val"] & cells["test"]


def test_mixed_fractions(full_tables):
    parts = _parts(full_tables, "mixed")
    n = len(full_tables.responses)
    assert abs(len(parts["train"]) - 0.8 * n) <= 1 and abs(len(parts["test"]) - 0.1 * n) <= 1


def test_held_out_list_that_matches_nothing(tiny_tables, tmp_path):
    f = tmp_path / "held.txt"
    f.write_text("# none of these\nNot A Drug\n")
    with pytest.raises(DataError, match="none of the held-out drugs"):
        make_split(tiny_tables, "drug_blind", 1, held_out_drugs=read_held_out_drugs(f))
