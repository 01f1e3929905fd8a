"""tCNNs (Liu et al. 2019) as CLDR trains it: a 1-D CNN over the one-hot SMILES and a 1-D CNN
over the cell line's genomic vector, each FLATTENED (a feature's position matters, as in the
original; no global pooling), fused by concat -> 1024 -> 256 (the embedding) -> 1.

    drug  one-hot SMILES (127 codes x 228 positions) -> 3x [Conv1d k7 -> ReLU -> MaxPool 3],
          channels 40/80/60 -> flatten                                    (U, 60 x 5 = 300)
    cell  (1 x F) -> the same stack                                       (V, 60 x 22 = 1320 at F = 677)
    head  concat -> 1024 -> 256 -> 1, sigmoid, dropout 0.0 (CLDR's tCNNs config)

The one-hot covers the 127 ASCII codes (data/featurize.smiles_codes; 0 = padding, all zeros),
not the 32 characters of the published GDSC table: a code no training SMILES contains is always
0, so its weights never act and the function class on GDSC is the published one. SMILES are
padded (or cut) to SMILES_LEN positions, the fixed input that flattening needs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cldr_dist.config import ModelConfig
from cldr_dist.data.batch import DRPBatch
from cldr_dist.models.drp.base import FusionHead, conv_out_len, dropout_rate, register
from cldr_dist.models.drp.graphdrp import CellCNN

NUM_SMILES_CODES = 128       # ASCII codes 1..127, 0 = padding (data/featurize.smiles_codes)
SMILES_LEN = 228             # CLDR's tCNNs input length; longer SMILES are cut here
CHANNELS = (40, 80, 60)      # tCNNs' filter counts, both branches
KERNEL = 7
POOL = 3
DROPOUT = 0.0                # CLDR's tCNNs config


class SmilesCNN(nn.Module):
    """One-hot SMILES (U, codes) -> 3x (Conv1d, ReLU, MaxPool) -> flattened (U, 300)."""

    def __init__(self):
        super().__init__()
        layers, c_in, length = [], NUM_SMILES_CODES - 1, SMILES_LEN
        for c_out in CHANNELS:
            layers += [nn.Conv1d(c_in, c_out, KERNEL), nn.ReLU(), nn.MaxPool1d(POOL)]
            c_in, length = c_out, conv_out_len(length, KERNEL, POOL)
        self.convs = nn.Sequential(*layers)
        self.out_dim = c_in * length

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        codes = F.pad(codes[:, :SMILES_LEN], (0, max(0, SMILES_LEN - codes.shape[1])))
        # channel c is code c + 1: padding (code 0) is the all-zero column
        one_hot = F.one_hot(codes.long(), NUM_SMILES_CODES)[..., 1:].transpose(1, 2)
        return self.convs(one_hot.to(self.convs[0].weight.dtype)).flatten(1)


class TCNN(nn.Module):
    def __init__(self, num_cell_features: int, embed_dim: int = 256, dropout: float = DROPOUT):
        super().__init__()
        self.drug = SmilesCNN()
        self.cell = CellCNN(num_cell_features, out_dim=None, channels=CHANNELS, kernel=KERNEL, pool=POOL)
        self.head = FusionHead(self.drug.out_dim, self.cell.out_dim, embed_dim, dropout)

    def encode_drugs(self, graphs, smiles: torch.Tensor) -> torch.Tensor:
        """(U, Ls) SMILES codes -> (U, 300); the graphs are for graph models, unused here."""
        return self.drug(smiles)

    def encode_cells(self, cell: torch.Tensor) -> torch.Tensor:
        return self.cell(cell)                  # (V, F) -> (V, 1320 at F = 677)

    def forward(self, batch: DRPBatch) -> tuple[torch.Tensor, torch.Tensor]:
        drug = self.encode_drugs(batch.drug, batch.smiles)   # unique drugs
        cell = self.encode_cells(batch.cell)                 # unique cells
        return self.head(drug, cell, batch.drug_index, batch.cell_index)


@register("tcnn")
def build(cfg: ModelConfig, num_cell_features: int) -> TCNN:
    return TCNN(num_cell_features, cfg.embed_dim, dropout_rate(cfg, DROPOUT))
