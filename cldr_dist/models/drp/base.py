"""The one interface every base drug-response (DRP) model follows, and a registry to build one.

A base model maps a DRPBatch to (prediction, embedding):
    prediction (B,) in (0, 1): sigmoid of the regression head, trained with MSE on batch.y
    embedding  (B, embed_dim): the fused drug+cell representation, the layer before the head;
                               CLDR pretraining aligns it with the text embedding.
Drug branches encode each distinct drug of the batch once (batch.drug / batch.smiles) and
then index with batch.drug_index, so repeated drugs cost nothing.
"""
from __future__ import annotations

from typing import Callable, Protocol

import torch
from torch import nn

from cldr_dist.config import ModelConfig
from cldr_dist.data.batch import DRPBatch
from cldr_dist.data.featurize import ATOM_FEATURE_DIM  # noqa: F401  (re-exported for models)

BRANCH_DIM = 128      # drug and cell branches each end at 128, fused by concatenation
FUSION_HIDDEN = 1024  # GraphDRP's hidden width between the concatenation and the embedding


class DRPModel(Protocol):
    def __call__(self, batch: DRPBatch) -> tuple[torch.Tensor, torch.Tensor]: ...


class FusionHead(nn.Module):
    """concat(drug, cell) -> 1024 -> embed_dim (the embedding) -> 1 -> sigmoid, as GraphDRP."""

    def __init__(self, in_dim: int, embed_dim: int, dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, FUSION_HIDDEN)
        self.fc2 = nn.Linear(FUSION_HIDDEN, embed_dim)
        self.out = nn.Linear(embed_dim, 1)
        self.drop = nn.Dropout(dropout)

    def forward(self, drug: torch.Tensor, cell: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.drop(torch.relu(self.fc1(torch.cat([drug, cell], dim=1))))
        emb = self.fc2(h)
        pred = torch.sigmoid(self.out(self.drop(torch.relu(emb)))).squeeze(1)
        return pred, emb


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
