"""Per-dataset lookup tables stored beside the shards (features.npz, no pickle).

Drug graphs and cell features repeat across samples (248 drugs, 988 cells, 200k pairs), so a
sample stores row indices into these tables instead of inlining the arrays; see
docs/benchmarks.md for the bytes per sample of both layouts.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np


DERIVED = ("caption_prefix_len",)   # fields to_bytes leaves out


def _ragged(arrays: list[np.ndarray], axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.concatenate([[0], np.cumsum([a.shape[axis] for a in arrays])]).astype(np.int64)
    return np.concatenate(arrays, axis=axis), offsets


@dataclass
class FeatureTables:
    drug_ids: np.ndarray        # (D,) str
    drug_smiles: np.ndarray     # (D,) str
    atoms: np.ndarray           # (total atoms, 90) uint8
    atom_offsets: np.ndarray    # (D + 1,) int64
    edges: np.ndarray           # (2, total directed edges) int32, local atom indices
    edge_offsets: np.ndarray    # (D + 1,) int64
    smiles_chars: np.ndarray    # (total chars,) uint8
    smiles_offsets: np.ndarray  # (D + 1,)
    cell_ids: np.ndarray        # (C,) str
    cell_names: np.ndarray      # (C,) str
    cell_features: np.ndarray   # (C, F) uint8
    feature_names: np.ndarray   # (F,) str
    number_token_ids: np.ndarray   # (total,) int32: token ids of the 1000 number texts
    number_offsets: np.ndarray     # (1001,)
    # (D,) tokens every caption of the drug begins with: [SOS] + the template's words through
    # the SMILES. Derived from the tokenizer (shards.prepare, reader.open_shards), not stored:
    # features.npz, and so the shards, stay as they were
    caption_prefix_len: np.ndarray | None = None

    @classmethod
    def build(cls, drug_ids, drug_smiles, graphs, smiles_codes, cell_ids, cell_names,
              cell_features, feature_names, number_tokens, caption_prefix_len=None) -> "FeatureTables":
        atoms, atom_offsets = _ragged([g[0] for g in graphs])
        edges, edge_offsets = _ragged([g[1] for g in graphs], axis=1)
        chars, char_offsets = _ragged(smiles_codes)
        num, num_offsets = _ragged([np.asarray(t, dtype=np.int32) for t in number_tokens])
        return cls(np.asarray(drug_ids, dtype=str), np.asarray(drug_smiles, dtype=str),
                   atoms, atom_offsets, edges, edge_offsets, chars, char_offsets,
                   np.asarray(cell_ids, dtype=str), np.asarray(cell_names, dtype=str),
                   np.asarray(cell_features, dtype=np.uint8), np.asarray(feature_names, dtype=str),
                   num, num_offsets,
                   None if caption_prefix_len is None else np.asarray(caption_prefix_len, dtype=np.int32))

    def drug_graph(self, row: int) -> tuple[np.ndarray, np.ndarray]:
        a0, a1 = self.atom_offsets[row], self.atom_offsets[row + 1]
        e0, e1 = self.edge_offsets[row], self.edge_offsets[row + 1]
        return self.atoms[a0:a1], self.edges[:, e0:e1]

    def smiles_codes(self, row: int) -> np.ndarray:
        return self.smiles_chars[self.smiles_offsets[row]:self.smiles_offsets[row + 1]]

    def number_tokens(self, index: int) -> np.ndarray:
        return self.number_token_ids[self.number_offsets[index]:self.number_offsets[index + 1]]

    @property
    def num_cell_features(self) -> int:
        return int(self.cell_features.shape[1])

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, **{k: v for k, v in self.__dict__.items() if k not in DERIVED})
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "FeatureTables":
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return cls(**{k: z[k] for k in z.files})
