"""What a training step minimises, as modules DeepSpeed can wrap: every trainable parameter
(the CLDR model and the TransE relation vector) lives under one nn.Module."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cldr_dist.config import LossConfig
from cldr_dist.data.batch import DRPBatch
from cldr_dist.losses.numeric_kg import NumberTexts, build_kg, pretrain_loss
from cldr_dist.models.cldr import CLDRModel
from cldr_dist.models.text import TOWER_DIM


class PretrainObjective(nn.Module):
    """kg_weight * TransE(number texts) + clip_weight * CLIP over the gathered global batch."""

    clamps_logit_scale = True   # the loop clamps model.logit_scale after each optimizer step

    def __init__(self, model: CLDRModel, numbers: NumberTexts, loss_cfg: LossConfig, seed: int):
        super().__init__()
        self.model = model
        self.kg = build_kg(loss_cfg, TOWER_DIM, num_triples=loss_cfg.kg_triples)
        self.numbers, self.loss_cfg = numbers, loss_cfg
        # TransE's corrupted triples come from their own generator, saved in checkpoints
        self.generator = torch.Generator().manual_seed(seed)

    def forward(self, batch: DRPBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        total, parts, out = pretrain_loss(self.model, batch, self.kg, self.numbers, self.loss_cfg,
                                          self.generator)
        parts["logit_scale"] = out.logit_scale.detach()
        return total, parts


class FinetuneObjective(nn.Module):
    """MSE of the base model's sigmoid prediction against y (the text side is carried along
    unused, so pretrain and finetune checkpoints share one state-dict layout)."""

    def __init__(self, model: CLDRModel):
        super().__init__()
        self.model = model

    def forward(self, batch: DRPBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        prediction, _ = self.model.drp(batch)
        loss = F.mse_loss(prediction.float(), batch.y)   # in fp32 whatever the compute dtype
        return loss, {"mse": loss.detach()}
