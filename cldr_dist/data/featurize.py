"""RDKit SMILES -> graph arrays. GraphDRP's 78 atom features plus 12 more (formal charge,
hybridisation, ring membership) make the 90-d atom vector CLDR's GraphDRP configs expect."""
from __future__ import annotations

import numpy as np
from rdkit import Chem, RDLogger

RDLogger.DisableLog("rdApp.*")  # parse failures are reported as bad rows, not on stderr

SYMBOLS = ["C", "N", "O", "S", "F", "Si", "P", "Cl", "Br", "Mg", "Na", "Ca", "Fe", "As", "Al",
           "I", "B", "V", "K", "Tl", "Yb", "Sb", "Sn", "Ag", "Pd", "Co", "Se", "Ti", "Zn", "H",
           "Li", "Ge", "Cu", "Au", "Ni", "Cd", "In", "Mn", "Zr", "Cr", "Pt", "Hg", "Pb", "Unknown"]
SMALL_COUNTS = list(range(11))
FORMAL_CHARGES = [-2, -1, 0, 1, 2]
HYBRIDISATIONS = [Chem.rdchem.HybridizationType.SP, Chem.rdchem.HybridizationType.SP2,
                  Chem.rdchem.HybridizationType.SP3, Chem.rdchem.HybridizationType.SP3D,
                  Chem.rdchem.HybridizationType.SP3D2, "other"]
ATOM_FEATURE_DIM = len(SYMBOLS) + 3 * len(SMALL_COUNTS) + 1 + len(FORMAL_CHARGES) + len(HYBRIDISATIONS) + 1
assert ATOM_FEATURE_DIM == 90


# Bumped whenever atom_features, smiles_to_graph or smiles_codes change what they return: an
# exported model records it, and prediction refuses a model featurised differently.
FEATURIZER_VERSION = "atoms90-v1"


class FeaturizationError(ValueError):
    pass


def _one_hot(value, choices: list) -> list[int]:
    """Unknown values map to the last choice (GraphDRP's one_of_k_encoding_unk)."""
    if value not in choices:
        value = choices[-1]
    return [int(value == c) for c in choices]


def atom_features(atom: Chem.Atom) -> list[int]:
    return (_one_hot(atom.GetSymbol(), SYMBOLS)
            + _one_hot(atom.GetDegree(), SMALL_COUNTS)
            + _one_hot(atom.GetTotalNumHs(), SMALL_COUNTS)
            + _one_hot(atom.GetValence(Chem.ValenceType.IMPLICIT), SMALL_COUNTS)
            + [int(atom.GetIsAromatic())]
            + _one_hot(atom.GetFormalCharge(), FORMAL_CHARGES)
            + _one_hot(atom.GetHybridization(), HYBRIDISATIONS)
            + [int(atom.IsInRing())])


def smiles_to_graph(smiles: str) -> tuple[np.ndarray, np.ndarray]:
    """Returns (atoms (n, 90) uint8, edge_index (2, 2 * bonds) int32, both directions)."""
    mol = Chem.MolFromSmiles(smiles) if smiles else None
    if mol is None or mol.GetNumAtoms() == 0:
        raise FeaturizationError("RDKit cannot parse the SMILES")
    atoms = np.array([atom_features(a) for a in mol.GetAtoms()], dtype=np.uint8)
    pairs = [(b.GetBeginAtomIdx(), b.GetEndAtomIdx()) for b in mol.GetBonds()]
    directed = pairs + [(j, i) for i, j in pairs]
    edge_index = np.array(directed, dtype=np.int32).T.reshape(2, -1)
    return atoms, edge_index


def smiles_codes(smiles: str) -> np.ndarray:
    """Character codes of the SMILES (1..127; 0 is padding), for SMILES CNNs such as tCNNs."""
    return np.frombuffer(smiles.encode("ascii", errors="replace"), dtype=np.uint8).copy()


def canonical_smiles(smiles: str) -> str:
    return Chem.MolToSmiles(Chem.MolFromSmiles(smiles))
