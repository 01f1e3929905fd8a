"""DeepCDR as CLDR trains it (Liu et al. 2020; CLDR's config_GDSC DeepCDR): a 4-layer GCN over
the drug graph, max-pooled to 200; an MLP over the cell line's genomic vector to 200; fused by
a linear layer to the embedding and DeepCDR's 1-channel Conv1d stack to the response.
(DeepCDR's expression and methylation branches are left out: GDSC v17 here has only the 0/1
genomic features.)

    drug  GCN 90->256->256->256->200 (ReLU), global max pool            (U, 200)
    cell  Linear F->256, ReLU, dropout, Linear 256->200, ReLU            (V, 200)
    head  concat 400 -> Linear 256 (the embedding) -> ReLU, dropout -> as (1, 256):
          Conv1d k5 1->30, pool 2 -> Conv1d k5 30->10, pool 3 -> Conv1d k5 10->5, pool 3
          -> dropout -> flatten 60 -> Linear 1 -> sigmoid
"""
from __future__ import annotations

import torch
from torch import nn
from torch_geometric.nn import GCNConv, global_max_pool

from cldr_dist.config import ModelConfig
from cldr_dist.data.batch import DRPBatch
from cldr_dist.models.drp.base import ATOM_FEATURE_DIM, SplitHead, conv_out_len, dropout_rate, register

GCN_WIDTHS = (256, 256, 256, 200)   # CLDR's DeepCDR GCN layers
CELL_WIDTHS = (256, 200)
HEAD_CONVS = ((30, 5, 2), (10, 5, 3), (5, 5, 3))   # (channels, kernel, pool) over the embedding
DROPOUT = 0.1                        # CLDR's DeepCDR


class ConvFusionHead(SplitHead):
    """concat(drug, cell) -> Linear embed_dim (the embedding) -> DeepCDR's Conv1d stack -> 1."""

    def __init__(self, drug_dim: int, cell_dim: int, embed_dim: int, dropout: float):
        super().__init__(drug_dim, cell_dim, embed_dim)
        layers, c_in, length = [], 1, embed_dim
        for c_out, kernel, pool in HEAD_CONVS:
            layers += [nn.Conv1d(c_in, c_out, kernel), nn.ReLU(), nn.MaxPool1d(pool)]
            c_in, length = c_out, conv_out_len(length, kernel, pool)
        self.convs = nn.Sequential(*layers)
        self.out = nn.Linear(c_in * length, 1)
        self.drop = nn.Dropout(dropout)

    def after_first(self, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lead = emb.shape[:-1]   # (B,) for pairs, (U, V) for a grid
        h = self.convs(self.drop(torch.relu(emb)).reshape(-1, 1, emb.shape[-1]))
        pred = torch.sigmoid(self.out(self.drop(h.flatten(1)))).reshape(lead)
        return pred, emb


class DeepCDR(nn.Module):
    def __init__(self, num_cell_features: int, embed_dim: int = 256, dropout: float = DROPOUT,
                 atom_dim: int = ATOM_FEATURE_DIM):
        super().__init__()
        widths = (atom_dim, *GCN_WIDTHS)
        self.gcns = nn.ModuleList(GCNConv(a, b) for a, b in zip(widths[:-1], widths[1:]))
        # the cell branch runs once per distinct cell line, so in train mode its dropout draws
        # one mask per cell line of the step, shared by that line's pairs (per pair, each pair
        # drew its own); with dropout off the two are exactly equal
        self.cell = nn.Sequential(nn.Linear(num_cell_features, CELL_WIDTHS[0]), nn.ReLU(),
                                  nn.Dropout(dropout), nn.Linear(*CELL_WIDTHS), nn.ReLU())
        self.head = ConvFusionHead(GCN_WIDTHS[-1], CELL_WIDTHS[-1], embed_dim, dropout)

    def encode_drugs(self, g, smiles: torch.Tensor) -> torch.Tensor:
        """(U graphs) -> (U, 200); the SMILES codes are for SMILES models, unused here."""
        h = g.x
        for gcn in self.gcns:
            h = torch.relu(gcn(h, g.edge_index))
        return global_max_pool(h, g.batch, g.num_graphs)

    def encode_cells(self, cell: torch.Tensor) -> torch.Tensor:
        return self.cell(cell)                  # (V, F) -> (V, 200)

    def forward(self, batch: DRPBatch) -> tuple[torch.Tensor, torch.Tensor]:
        drug = self.encode_drugs(batch.drug, batch.smiles)   # (U, 200): unique drugs
        cell = self.encode_cells(batch.cell)                 # (V, 200): unique cells
        return self.head(drug, cell, batch.drug_index, batch.cell_index)


@register("deepcdr")
def build(cfg: ModelConfig, num_cell_features: int) -> DeepCDR:
    return DeepCDR(num_cell_features, cfg.embed_dim, dropout_rate(cfg, DROPOUT))
