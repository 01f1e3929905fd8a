"""Classical baselines on the same shards and splits as the deep models: what a deep model has to
beat before its result means anything.

    train_mean   the mean training y for every test pair (the drug-blind floor)
    drug_mean    each drug's mean training y, the train mean for an unseen drug (the mixed floor)
    ridge        ridge regression on [Morgan fingerprint of the drug, genomic features of the cell]
    gbm          histogram gradient boosting on the same features
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from cldr_dist.data.reader import ShardSet, part_meta

BASELINES = ("train_mean", "drug_mean", "ridge", "gbm")


@dataclass
class ClassicalConfig:
    baselines: list[str] = field(default_factory=lambda: list(BASELINES))
    morgan_radius: int = 2
    morgan_bits: int = 1024
    ridge_alpha: float = 10.0
    gbm_iters: int = 200
    gbm_learning_rate: float = 0.1
    gbm_leaves: int = 63


@dataclass
class PartTable:
    """One part as rows into the feature tables, with the true y and the ids."""
    drug_rows: np.ndarray
    cell_rows: np.ndarray
    y: np.ndarray
    drug_ids: np.ndarray
    cell_ids: np.ndarray


def part_table(shards: ShardSet, split: str, part: str) -> PartTable:
    metas = list(part_meta(shards, split, part))
    return PartTable(np.array([m["drug"] for m in metas], dtype=np.int64),
                     np.array([m["cell"] for m in metas], dtype=np.int64),
                     np.array([m["y"] for m in metas], dtype=np.float64),
                     np.array([m["drug_id"] for m in metas], dtype=str),
                     np.array([m["cell_id"] for m in metas], dtype=str))


def morgan_fingerprints(smiles: Sequence[str], radius: int, bits: int) -> np.ndarray:
    """(drugs, bits) uint8 Morgan (ECFP-like) bit vectors."""
    from rdkit import Chem, DataStructs
    from rdkit.Chem import rdFingerprintGenerator
    gen = rdFingerprintGenerator.GetMorganGenerator(radius=radius, fpSize=bits)
    out = np.zeros((len(smiles), bits), dtype=np.uint8)
    for i, s in enumerate(smiles):
        mol = Chem.MolFromSmiles(str(s))
        if mol is not None:  # the shards hold only parsable SMILES; kept safe for other inputs
            DataStructs.ConvertToNumpyArray(gen.GetFingerprint(mol), out[i])
    return out


def design_matrix(table: PartTable, drug_fp: np.ndarray, cell_features: np.ndarray) -> np.ndarray:
    return np.hstack([drug_fp[table.drug_rows], cell_features[table.cell_rows]]).astype(np.float32)


def drug_mean(train: PartTable, test: PartTable) -> np.ndarray:
    fallback = train.y.mean()
    sums: dict[str, list[float]] = {}
    for d, y in zip(train.drug_ids, train.y):
        sums.setdefault(d, []).append(y)
    means = {d: float(np.mean(v)) for d, v in sums.items()}
    return np.array([means.get(d, fallback) for d in test.drug_ids])


def fit_predict(kind: str, train: PartTable, test: PartTable, shards: ShardSet, cfg: ClassicalConfig,
                seed: int) -> np.ndarray:
    """Test predictions of one baseline trained on `train`."""
    if kind == "train_mean":
        return np.full(len(test.y), train.y.mean())
    if kind == "drug_mean":
        return drug_mean(train, test)
    features = shards.features
    fp = morgan_fingerprints(features.drug_smiles, cfg.morgan_radius, cfg.morgan_bits)
    x_train = design_matrix(train, fp, features.cell_features)
    x_test = design_matrix(test, fp, features.cell_features)
    if kind == "ridge":
        from sklearn.linear_model import Ridge
        model = Ridge(alpha=cfg.ridge_alpha)
    elif kind == "gbm":
        from sklearn.ensemble import HistGradientBoostingRegressor
        model = HistGradientBoostingRegressor(max_iter=cfg.gbm_iters, learning_rate=cfg.gbm_learning_rate,
                                              max_leaf_nodes=cfg.gbm_leaves, early_stopping=False,
                                              random_state=seed)
    else:
        raise ValueError(f"unknown classical baseline {kind!r}; choose from {', '.join(BASELINES)}")
    model.fit(x_train, train.y)
    return np.clip(model.predict(x_test), 0.0, 1.0)  # y lives in (0, 1), as the deep models' sigmoid
