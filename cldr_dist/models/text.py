"""The text side of CLDR: a caption tower and a number tower (causal CLIP-style transformers
trained from scratch), each pooled at its [EOS] token and projected to 128, concatenated and
mapped by an MLP 256 -> 512 -> 512 -> 256.

Pooling: the [EOS] token is the last non-pad token, position len - 1. With causal attention no
token attends to anything after it, so the [EOS] state ignores the padding that follows: the
output is the same whether a batch is padded to its longest text or to a fixed 300/100. That
is what lets `num_buckets` cut the padding away (sort by length, run each bucket at its own
longest length) without changing the result.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

from cldr_dist.config import ModelConfig
from cldr_dist.data.batch import PAD_ID

SOS_ID, EOS_ID = 2, 3        # data/tokenizer.py SPECIAL_TOKENS
TOWER_DIM = 128              # each tower's projection; concatenated = 256
MLP_WIDTHS = (256, 512, 512, 256)
MLP_RATIO = 4                # CLIP's feed-forward width = 4 x width


def fusion_mlp() -> nn.Sequential:
    """The MLP 256 -> 512 -> 512 -> 256 over the concatenated tower features."""
    layers = []
    for a, b in zip(MLP_WIDTHS[:-1], MLP_WIDTHS[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])   # no ReLU on the output embedding


def fuse_features(mlp: nn.Module, caption_feat: torch.Tensor, number_feat: torch.Tensor) -> torch.Tensor:
    """(..., 128) + (..., 128) -> (..., 256); broadcasts, so zero-shot can pair every caption
    with every number text."""
    caption_feat, number_feat = torch.broadcast_tensors(caption_feat, number_feat)
    return mlp(torch.cat([caption_feat, number_feat], dim=-1))


class TextTower(nn.Module):
    """A causal transformer over token ids, pooled at the [EOS] position and projected."""

    def __init__(self, vocab_size: int, width: int, layers: int, heads: int, context: int,
                 out_dim: int = TOWER_DIM, num_buckets: int = 0):
        super().__init__()
        config = CLIPTextConfig(
            vocab_size=vocab_size, hidden_size=width, intermediate_size=MLP_RATIO * width,
            num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=context,
            pad_token_id=PAD_ID, bos_token_id=SOS_ID, eos_token_id=EOS_ID,
            attention_dropout=0.0)
        config._attn_implementation = "sdpa"
        self.transformer = CLIPTextModel(config)
        self.proj = nn.Linear(width, out_dim, bias=False)
        self.context = context
        self.num_buckets = num_buckets   # 0: run the batch as padded (the paper); k: k buckets

    def _encode(self, ids: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
        # no attention mask: the causal mask alone keeps [EOS] blind to the padding after it
        hidden = self.transformer(input_ids=ids).last_hidden_state
        return hidden[torch.arange(ids.shape[0], device=ids.device), lens - 1]

    def forward(self, ids: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
        """ids (N, L) PAD-padded, lens (N,) -> (N, out_dim)."""
        if ids.shape[1] > self.context:
            raise ValueError(f"text of {ids.shape[1]} tokens exceeds the context {self.context}")
        if self.num_buckets <= 0:
            return self.proj(self._encode(ids, lens))
        order = torch.argsort(lens)
        pooled = []
        for chunk in torch.tensor_split(order, min(self.num_buckets, len(order))):
            longest = int(lens[chunk].max())
            pooled.append(self._encode(ids[chunk, :longest], lens[chunk]))
        return self.proj(torch.cat(pooled)[torch.argsort(order)])


class TextEncoder(nn.Module):
    """caption tower + number tower -> concatenation -> MLP -> the 256-d text embedding."""

    def __init__(self, vocab_size: int, cfg: ModelConfig, num_buckets: int = 0):
        super().__init__()
        common = dict(vocab_size=vocab_size, width=cfg.text_width, layers=cfg.text_layers,
                      heads=cfg.text_heads)
        self.caption = TextTower(context=cfg.caption_context, num_buckets=num_buckets, **common)
        # number texts are all about the same length: bucketing buys nothing there
        self.number = TextTower(context=cfg.number_context, num_buckets=min(num_buckets, 1), **common)
        self.mlp = fusion_mlp()

    def encode_captions(self, batch) -> torch.Tensor:
        """A DRPBatch's captions -> (B, 128) caption-tower features."""
        return self.caption(batch.caption, batch.caption_len)

    def encode_numbers(self, token_ids: torch.Tensor, lens: torch.Tensor,
                       index: torch.Tensor | None = None) -> torch.Tensor:
        """(K, L) number-text token ids -> (K, 128); `index` (which texts) is for towers that
        tokenise the texts their own way (models/minilm.py), unused here."""
        return self.number(token_ids, lens)

    def fuse(self, caption_feat: torch.Tensor, number_feat: torch.Tensor) -> torch.Tensor:
        return fuse_features(self.mlp, caption_feat, number_feat)

    def forward(self, caption: torch.Tensor, caption_len: torch.Tensor,
                number: torch.Tensor, number_len: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.caption(caption, caption_len), self.number(number, number_len))
