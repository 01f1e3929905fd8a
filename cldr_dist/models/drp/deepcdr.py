"""DeepCDR-style model (Liu et al. 2020): a GCN over the drug graph and an MLP over the cell
line's mutation/CNA vector, fused by the shared MLP head. (DeepCDR's expression and methylation
branches are left out: GDSC v17 here has only the 0/1 genomic features.)"""
from __future__ import annotations

import torch
from torch import nn
from torch_geometric.nn import GCNConv, global_max_pool, global_mean_pool

from cldr_dist.config import ModelConfig
from cldr_dist.data.batch import DRPBatch
from cldr_dist.models.drp.base import ATOM_FEATURE_DIM, BRANCH_DIM, FusionHead, register

GCN_WIDTHS = (256, 256, 256)   # DeepCDR's GCN layer sizes
CELL_HIDDEN = 256


class DeepCDR(nn.Module):
    def __init__(self, num_cell_features: int, embed_dim: int = 256, dropout: float = 0.2,
                 atom_dim: int = ATOM_FEATURE_DIM):
        super().__init__()
        widths = (atom_dim, *GCN_WIDTHS)
        self.gcns = nn.ModuleList(GCNConv(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.drug_fc = nn.Linear(2 * widths[-1], BRANCH_DIM)
        # the cell branch runs once per distinct cell line, so in train mode its dropout draws
        # one mask per cell line of the step, shared by that line's pairs (per pair, each pair
        # drew its own); with dropout off the two are exactly equal
        self.cell = nn.Sequential(nn.Linear(num_cell_features, CELL_HIDDEN), nn.ReLU(),
                                  nn.Dropout(dropout), nn.Linear(CELL_HIDDEN, BRANCH_DIM))
        self.head = FusionHead(BRANCH_DIM, BRANCH_DIM, embed_dim, dropout)

    def encode_drugs(self, g, smiles: torch.Tensor) -> torch.Tensor:
        """(U graphs) -> (U, 128); the SMILES codes are for SMILES models, unused here."""
        h = g.x
        for gcn in self.gcns:
            h = torch.relu(gcn(h, g.edge_index))
        h = torch.cat([global_max_pool(h, g.batch, g.num_graphs),
                       global_mean_pool(h, g.batch, g.num_graphs)], dim=1)
        return self.drug_fc(h)

    def encode_cells(self, cell: torch.Tensor) -> torch.Tensor:
        return self.cell(cell)                  # (V, F) -> (V, 128)

    def forward(self, batch: DRPBatch) -> tuple[torch.Tensor, torch.Tensor]:
        drug = self.encode_drugs(batch.drug, batch.smiles)   # (U, 128): unique drugs
        cell = self.encode_cells(batch.cell)                 # (V, 128): unique cells
        return self.head(drug, cell, batch.drug_index, batch.cell_index)


@register("deepcdr")
def build(cfg: ModelConfig, num_cell_features: int) -> DeepCDR:
    return DeepCDR(num_cell_features, cfg.embed_dim, cfg.dropout)
