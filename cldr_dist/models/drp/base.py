"""The one interface every base drug-response (DRP) model follows, and a registry to build one.

A base model maps a DRPBatch to (prediction, embedding):
    prediction (B,) in (0, 1): sigmoid of the regression head, trained with MSE on batch.y
    embedding  (B, embed_dim): the fused drug+cell representation, the layer before the head;
                               CLDR pretraining aligns it with the text embedding.
Entity-level step: the drug branch encodes each distinct drug of the batch once (batch.drug /
batch.smiles), the cell branch each distinct cell line once (batch.cell), and FusionHead's first
layer multiplies each of them once too; only the layers after it run per pair, through
batch.drug_index / batch.cell_index (SplitHead). Each model exposes its two branches as
encode_drugs(graphs, smiles) -> (U, 128) and encode_cells(cell) -> (V, 128), and `head`, so
prediction (cldr_dist/inference) encodes a screen's cell lines once. Run on batch.per_pair(),
the same model is the per-pair computation (the reference the tests compare with).
"""
from __future__ import annotations

from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from cldr_dist.config import ModelConfig
from cldr_dist.data.batch import DRPBatch
from cldr_dist.data.featurize import ATOM_FEATURE_DIM  # noqa: F401  (re-exported for models)

BRANCH_DIM = 128      # drug and cell branches each end at 128, fused by concatenation
FUSION_HIDDEN = 1024  # GraphDRP's hidden width between the concatenation and the embedding


class DRPModel(Protocol):
    head: "SplitHead"

    def __call__(self, batch: DRPBatch) -> tuple[torch.Tensor, torch.Tensor]: ...
    def encode_drugs(self, graphs, smiles: torch.Tensor) -> torch.Tensor: ...
    def encode_cells(self, cell: torch.Tensor) -> torch.Tensor: ...


class SplitHead(nn.Module):
    """A fusion head whose first layer is linear in concat(drug, cell), split per entity:
    W·[d;c] + b = (W_d·d + b) + W_c·c. Each distinct drug and cell line is multiplied once per
    step, and a pair only adds its two rows before the head's per-pair layers (`after_first`).
    fc1 stays one nn.Linear (its weight sliced by columns), so state dicts and parameter counts
    are those of the concatenating head."""

    def __init__(self, drug_dim: int, cell_dim: int, first_dim: int):
        super().__init__()
        self.split = (drug_dim, cell_dim)
        self.fc1 = nn.Linear(drug_dim + cell_dim, first_dim)

    def after_first(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """fc1's output (..., first_dim) -> prediction (...), embedding (..., embed_dim)."""
        raise NotImplementedError

    def entity_parts(self, drug: torch.Tensor, cell: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """fc1's drug part (U, first_dim), bias included, and cell part (V, first_dim)."""
        return self.drug_part(drug), self.cell_part(cell)

    def drug_part(self, drug: torch.Tensor) -> torch.Tensor:
        return F.linear(drug, self.fc1.weight[:, :self.split[0]], self.fc1.bias)

    def cell_part(self, cell: torch.Tensor) -> torch.Tensor:
        return F.linear(cell, self.fc1.weight[:, self.split[0]:])

    def forward(self, drug: torch.Tensor, cell: torch.Tensor, drug_index: torch.Tensor,
                cell_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """drug (U, drug_dim), cell (V, cell_dim): distinct entities; *_index (B,): each pair's rows."""
        return self.pairs(*self.entity_parts(drug, cell), drug_index, cell_index)

    def pairs(self, drug_part: torch.Tensor, cell_part: torch.Tensor, drug_index: torch.Tensor,
              cell_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The per-pair layers from entity_parts' rows: prediction (B,), embedding (B, embed_dim).
        Prediction reuses cell parts computed once for every compound it screens."""
        return self.after_first(drug_part[drug_index] + cell_part[cell_index])

    def grid(self, drug_part: torch.Tensor, cell_part: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`pairs` over every (drug, cell) of U drugs x V cells: prediction (U, V), embedding
        (U, V, embed_dim). The same arithmetic, without materialising the two gathered (U*V, first_dim)
        operands: a screen's per-pair cost is this sum and the layers after it."""
        return self.after_first(drug_part[:, None, :] + cell_part[None, :, :])


class FusionHead(SplitHead):
    """GraphDRP's and tCNNs' head: concat(drug, cell) -> 1024 -> embed_dim (the embedding) -> 1 -> sigmoid."""

    def __init__(self, drug_dim: int, cell_dim: int, embed_dim: int, dropout: float):
        super().__init__(drug_dim, cell_dim, FUSION_HIDDEN)
        self.fc2 = nn.Linear(FUSION_HIDDEN, embed_dim)
        self.out = nn.Linear(embed_dim, 1)
        self.drop = nn.Dropout(dropout)

    def after_first(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # in place: h is the fresh sum of two entity parts, and a screen's (U, V, 1024) is
        # the largest tensor of a prediction
        emb = self.fc2(self.drop(torch.relu_(h)))
        pred = torch.sigmoid(self.out(self.drop(torch.relu(emb)))).squeeze(-1)
        return pred, emb


def dropout_rate(cfg: ModelConfig, published: float) -> float:
    """model.dropout, or the base model's published rate where the config leaves it negative."""
    return published if cfg.dropout < 0 else cfg.dropout


def conv_out_len(length: int | torch.Tensor, kernel: int, pool: int):
    """Length after a valid Conv1d(kernel) and MaxPool1d(pool) (floor), as PyTorch computes it."""
    return (length - kernel + 1) // pool


_REGISTRY: dict[str, Callable[[ModelConfig, int], nn.Module]] = {}


def register(name: str):
    def wrap(builder):
        _REGISTRY[name] = builder
        return builder
    return wrap


def build_drp(cfg: ModelConfig, num_cell_features: int) -> nn.Module:
    """The base model named by cfg.drp (graphdrp | tcnn | deepcdr)."""
    # the model modules register themselves on import
    from cldr_dist.models.drp import deepcdr, graphdrp, tcnn  # noqa: F401
    if cfg.drp not in _REGISTRY:
        raise ValueError(f"unknown base model {cfg.drp!r}; choose one of {sorted(_REGISTRY)}")
    return _REGISTRY[cfg.drp](cfg, num_cell_features)
