"""CLDR: a base DRP model (the sample side) and a text encoder (the text side) aligned CLIP-style.

    sample embedding = normalise(drp(batch).embedding)         (B, 256)
    text embedding   = normalise(text(caption, number text))   (B, 256)
    logits           = exp(logit_scale) * sample @ text.T      (in losses/contrastive.py)
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from cldr_dist.config import Config, LossConfig, ModelConfig
from cldr_dist.data.batch import DRPBatch
from cldr_dist.models.drp.base import build_drp
from cldr_dist.models.text import TextEncoder

if TYPE_CHECKING:
    from cldr_dist.models.minilm import MiniLMTextEncoder

DEFAULT_TEXT_BUCKETS = 4   # caption length buckets; 0 = run captions as padded (the paper)


class CLDROutput(NamedTuple):
    sample: torch.Tensor       # (B, D) L2-normalised sample embedding
    text: torch.Tensor         # (B, D) L2-normalised text embedding
    logit_scale: torch.Tensor  # () exp(logit_scale); training clamps the parameter at ln(max_logit_scale)
    prediction: torch.Tensor   # (B,) the base model's regression output in (0, 1)


class CLDRModel(nn.Module):
    def __init__(self, drp: nn.Module, text: TextEncoder | MiniLMTextEncoder, init_logit_scale: float,
                 max_logit_scale: float, dedup_numbers: bool = True):
        super().__init__()
        self.drp = drp
        self.text = text
        # shape (1,), not (): DeepSpeed's parameter broadcast cannot view a 0-dim tensor as bytes
        self.logit_scale = nn.Parameter(torch.tensor([float(init_logit_scale)]))
        self.max_logit_scale = max_logit_scale
        self.dedup_numbers = dedup_numbers   # encode each distinct number text of a batch once

    def scale(self) -> torch.Tensor:
        # no clamp here: a clamped output has no gradient, so a parameter past the cap could
        # never come back; train/loop.py clamps the parameter itself after each step
        return self.logit_scale.exp().squeeze(0)

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        """The parameter (not the output) at most ln(max_logit_scale), as open_clip does."""
        self.logit_scale.clamp_(max=math.log(self.max_logit_scale))

    def encode_number_texts(self, token_ids: torch.Tensor, lens: torch.Tensor,
                            index: torch.Tensor | None = None) -> torch.Tensor:
        """(K, L) number-text token ids -> (K, 128) number-tower features (not normalised);
        zero-shot pairs them with each caption, TransE uses them as entity embeddings.
        index (K,): which number texts these are; the MiniLM tower needs it (its own ids)."""
        return self.text.encode_numbers(token_ids, lens, index)

    def batch_number_features(self, batch: DRPBatch) -> torch.Tensor:
        if not self.dedup_numbers:
            return self.encode_number_texts(batch.number, batch.number_len, batch.number_index)
        # y clusters around 0.5: a batch of 256 holds far fewer distinct number texts
        uniq, inverse = torch.unique(batch.number_index, return_inverse=True)
        first = torch.empty_like(uniq).scatter_(0, inverse, torch.arange(len(inverse), device=inverse.device))
        return self.encode_number_texts(batch.number[first], batch.number_len[first], uniq)[inverse]

    def forward(self, batch: DRPBatch) -> CLDROutput:
        prediction, sample = self.drp(batch)
        caption = self.text.encode_captions(batch)
        text = self.text.fuse(caption, self.batch_number_features(batch))
        return CLDROutput(F.normalize(sample, dim=-1), F.normalize(text, dim=-1),
                          self.scale(), prediction)

    def pair_text_embeddings(self, batch: DRPBatch, number_feats: torch.Tensor) -> torch.Tensor:
        """Every caption of the batch with every number text: (B, K, D), L2-normalised."""
        caption = self.text.encode_captions(batch)
        return F.normalize(self.text.fuse(caption[:, None, :], number_feats[None, :, :]), dim=-1)


def model_for_data(cfg: Config, vocab_size: int, num_cell_features: int) -> CLDRModel:
    """The run's model for a shard set's tokenizer and cell features (training, export, predict)."""
    return build_model(cfg.model, cfg.loss, vocab_size=vocab_size, num_cell_features=num_cell_features,
                       text_buckets=cfg.model.text_buckets, dedup_numbers=cfg.model.dedup_numbers)


def build_model(model_cfg: ModelConfig, loss_cfg: LossConfig, vocab_size: int,
                num_cell_features: int, text_buckets: int = DEFAULT_TEXT_BUCKETS,
                dedup_numbers: bool = True) -> CLDRModel:
    drp = build_drp(model_cfg, num_cell_features)
    if model_cfg.text_tower == "minilm":
        from cldr_dist.models.minilm import MiniLMTextEncoder
        text = MiniLMTextEncoder(model_cfg)
    else:
        text = TextEncoder(vocab_size, model_cfg, num_buckets=text_buckets)
    return CLDRModel(drp, text, loss_cfg.init_logit_scale, loss_cfg.max_logit_scale, dedup_numbers)
