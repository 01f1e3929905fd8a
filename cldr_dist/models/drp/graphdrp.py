"""GraphDRP, GAT_GCN variant (Nguyen et al. 2021): a GAT+GCN drug graph branch and a 1-D CNN
over the cell line's genomic 0/1 vector, fused by GraphDRP's MLP head."""
from __future__ import annotations

import torch
from torch import nn
from torch_geometric.data import Batch as GraphBatch
from torch_geometric.nn import GATConv, GCNConv, global_max_pool, global_mean_pool

from cldr_dist.config import ModelConfig
from cldr_dist.data.batch import DRPBatch
from cldr_dist.models.drp.base import (ATOM_FEATURE_DIM, BRANCH_DIM, FusionHead, conv_out_len,
                                       dropout_rate, register)

GAT_HEADS = 10
DRUG_HIDDEN = 1500
CELL_CHANNELS = (32, 64, 128)
CELL_KERNEL = 8
CELL_POOL = 3
DROPOUT = 0.5          # GraphDRP's gat_gcn.py


class CellCNN(nn.Module):
    """3x (Conv1d, ReLU, MaxPool) over the feature vector as a 1-channel sequence, flattened,
    then Linear to out_dim (None: the flattened maps themselves, as tCNNs)."""

    def __init__(self, num_features: int, out_dim: int | None = BRANCH_DIM,
                 channels=CELL_CHANNELS, kernel: int = CELL_KERNEL, pool: int = CELL_POOL):
        super().__init__()
        layers, c_in, length = [], 1, num_features
        for c_out in channels:
            layers += [nn.Conv1d(c_in, c_out, kernel), nn.ReLU(), nn.MaxPool1d(pool)]
            c_in, length = c_out, conv_out_len(length, kernel, pool)
        if length < 1:
            raise ValueError(f"{num_features} cell features are too few for a {len(channels)}-layer CNN")
        self.convs = nn.Sequential(*layers)
        self.fc = nn.Linear(c_in * length, out_dim) if out_dim else nn.Identity()
        self.out_dim = out_dim or c_in * length

    def forward(self, cell: torch.Tensor) -> torch.Tensor:
        return self.fc(self.convs(cell.unsqueeze(1)).flatten(1))


class GraphDRP(nn.Module):
    def __init__(self, num_cell_features: int, embed_dim: int = 256, dropout: float = DROPOUT,
                 atom_dim: int = ATOM_FEATURE_DIM):
        super().__init__()
        self.gat = GATConv(atom_dim, atom_dim, heads=GAT_HEADS)
        self.gcn = GCNConv(atom_dim * GAT_HEADS, atom_dim * GAT_HEADS)
        self.drug_fc1 = nn.Linear(2 * atom_dim * GAT_HEADS, DRUG_HIDDEN)
        self.drug_fc2 = nn.Linear(DRUG_HIDDEN, BRANCH_DIM)
        self.cell = CellCNN(num_cell_features)
        self.head = FusionHead(BRANCH_DIM, BRANCH_DIM, embed_dim, dropout)
        self.drop = nn.Dropout(dropout)

    def encode_drugs(self, g: GraphBatch, smiles: torch.Tensor) -> torch.Tensor:
        """(U graphs) -> (U, 128); the SMILES codes are for SMILES models, unused here."""
        h = torch.relu(self.gat(g.x, g.edge_index))
        h = torch.relu(self.gcn(h, g.edge_index))
        h = torch.cat([global_max_pool(h, g.batch, g.num_graphs),
                       global_mean_pool(h, g.batch, g.num_graphs)], dim=1)
        return self.drug_fc2(self.drop(torch.relu(self.drug_fc1(h))))

    def encode_cells(self, cell: torch.Tensor) -> torch.Tensor:
        return self.cell(cell)                                          # (V, F) -> (V, 128)

    def forward(self, batch: DRPBatch) -> tuple[torch.Tensor, torch.Tensor]:
        drug = self.encode_drugs(batch.drug, batch.smiles)   # (U, 128): unique drugs
        cell = self.encode_cells(batch.cell)                 # (V, 128): unique cells
        return self.head(drug, cell, batch.drug_index, batch.cell_index)


@register("graphdrp")
def build(cfg: ModelConfig, num_cell_features: int) -> GraphDRP:
    return GraphDRP(num_cell_features, cfg.embed_dim, dropout_rate(cfg, DROPOUT))
