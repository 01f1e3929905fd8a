import numpy as np
import pytest

from cldr_dist.data.featurize import ATOM_FEATURE_DIM, FeaturizationError, canonical_smiles, smiles_to_graph


@pytest.mark.parametrize("smiles,atoms,bonds", [
    ("CCO", 3, 2),                                   # ethanol
    ("c1ccccc1", 6, 6),                              # benzene
    ("CC(=O)Oc1ccccc1C(=O)O", 13, 13),               # aspirin
    ("CN1C=NC2=C1C(=O)N(C(=O)N2C)C", 14, 15),        # caffeine
    ("[Na+].[Cl-]", 2, 0),                           # a salt: two fragments, no bond
])
def test_known_molecules(smiles, atoms, bonds):
    x, edge_index = smiles_to_graph(smiles)
    assert x.shape == (atoms, ATOM_FEATURE_DIM) == (atoms, 90)
    assert x.dtype == np.uint8 and set(np.unique(x)) <= {0, 1}
    assert edge_index.shape == (2, 2 * bonds)  # both directions, as GraphDRP
    assert edge_index.max(initial=0) < atoms


def test_feature_blocks_are_one_hot():
    x, _ = smiles_to_graph("CC(=O)Oc1ccccc1C(=O)O")
    assert (x[:, :44].sum(1) == 1).all()      # symbol
    assert (x[:, 44:55].sum(1) == 1).all()    # degree
    assert x[:, 0].sum() == 9                 # nine carbons
    aromatic = x[:, 77]
    assert aromatic.sum() == 6


def test_edges_are_symmetric():
    _, e = smiles_to_graph("CN1C=NC2=C1C(=O)N(C(=O)N2C)C")
    pairs = set(map(tuple, e.T.tolist()))
    assert all((j, i) in pairs for i, j in pairs)


@pytest.mark.parametrize("bad", ["C1CC", "not a smiles", "", "C(C"])
def test_unparseable(bad):
    with pytest.raises(FeaturizationError):
        smiles_to_graph(bad)


def test_canonical_groups_spellings():
    assert canonical_smiles("OCC") == canonical_smiles("CCO")
