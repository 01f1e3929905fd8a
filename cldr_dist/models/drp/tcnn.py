"""tCNNs-style model (Liu et al. 2019): a 1-D CNN over the SMILES characters and a 1-D CNN over
the cell line's genomic vector, fused by the shared MLP head.

The original one-hot encodes characters; an embedding of the character codes is the same
thing (one-hot times a matrix) without the (U, 128, L) one-hot tensor.
"""
from __future__ import annotations

import torch
from torch import nn

from cldr_dist.config import ModelConfig
from cldr_dist.data.batch import DRPBatch
from cldr_dist.models.drp.base import BRANCH_DIM, FusionHead, conv_out_len, register
from cldr_dist.models.drp.graphdrp import CellCNN

NUM_SMILES_CODES = 128       # ASCII codes 1..127, 0 = padding (data/featurize.smiles_codes)
CHAR_EMBED = 32
SMILES_CHANNELS = (40, 80, 60)  # tCNNs' filter counts
SMILES_KERNEL = 7
SMILES_POOL = 3
CELL_CHANNELS = (40, 80, 60)


class SmilesCNN(nn.Module):
    """3x (Conv1d, ReLU, MaxPool), then a max over the valid positions only, so a drug's code
    does not depend on how long the other SMILES of its batch are."""

    def __init__(self, out_dim: int = BRANCH_DIM):
        super().__init__()
        self.embed = nn.Embedding(NUM_SMILES_CODES, CHAR_EMBED, padding_idx=0)
        layers, c_in = [], CHAR_EMBED
        for c_out in SMILES_CHANNELS:
            layers += [nn.Conv1d(c_in, c_out, SMILES_KERNEL), nn.ReLU(), nn.MaxPool1d(SMILES_POOL)]
            c_in = c_out
        self.convs = nn.Sequential(*layers)
        self.fc = nn.Linear(c_in, out_dim)
        self.min_len = 1
        for _ in SMILES_CHANNELS:  # shortest input that leaves one position after the stack
            self.min_len = self.min_len * SMILES_POOL + SMILES_KERNEL - 1

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        if codes.shape[1] < self.min_len:  # very short SMILES: pad so the convolutions fit
            codes = nn.functional.pad(codes, (0, self.min_len - codes.shape[1]))
        lengths = (codes > 0).sum(1).clamp(min=self.min_len)
        h = self.convs(self.embed(codes).transpose(1, 2))                # (U, C, L')
        for _ in SMILES_CHANNELS:
            lengths = conv_out_len(lengths, SMILES_KERNEL, SMILES_POOL)
        valid = torch.arange(h.shape[2], device=h.device)[None, :] < lengths[:, None]
        h = h.masked_fill(~valid[:, None, :], float("-inf")).amax(dim=2)
        return self.fc(h)


class TCNN(nn.Module):
    def __init__(self, num_cell_features: int, embed_dim: int = 256, dropout: float = 0.2):
        super().__init__()
        self.drug = SmilesCNN()
        self.cell = CellCNN(num_cell_features, channels=CELL_CHANNELS, kernel=SMILES_KERNEL,
                            pool=SMILES_POOL)
        self.head = FusionHead(BRANCH_DIM, BRANCH_DIM, embed_dim, dropout)

    def encode_drugs(self, graphs, smiles: torch.Tensor) -> torch.Tensor:
        """(U, Ls) SMILES codes -> (U, 128); the graphs are for graph models, unused here."""
        return self.drug(smiles)

    def encode_cells(self, cell: torch.Tensor) -> torch.Tensor:
        return self.cell(cell)                  # (V, F) -> (V, 128)

    def forward(self, batch: DRPBatch) -> tuple[torch.Tensor, torch.Tensor]:
        drug = self.encode_drugs(batch.drug, batch.smiles)   # (U, 128): unique drugs
        cell = self.encode_cells(batch.cell)                 # (V, 128): unique cells
        return self.head(drug, cell, batch.drug_index, batch.cell_index)


@register("tcnn")
def build(cfg: ModelConfig, num_cell_features: int) -> TCNN:
    return TCNN(num_cell_features, cfg.embed_dim, cfg.dropout)
