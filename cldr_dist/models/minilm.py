"""The text side of CLDR with a pretrained tower (model.text_tower=minilm): all-MiniLM-L6-v2,
mean-pooled over its tokens as sentence-transformers pools it, then one Linear per tower to the
same 128-d features the scratch towers give. The fusion MLP, zero-shot, TransE and the
checkpoint layout outside `text.` are unchanged.

One encoder serves both towers, the caption and the number projection being what tells them
apart: a second copy would double the 22M parameters to tell apart two kinds of English text
that the pretrained encoder already represents. model.minilm_trainable_layers = k trains the top
k of its 6 layers; the embeddings always stay frozen (the 30k-word table is half the model, and
our texts use a few hundred of its words). Dropout is off, as in the scratch towers: a frozen
encoder then is a fixed function, which is what makes the number-text cache below exact.

Captions arrive as MiniLM WordPiece ids in the batch (caption_wp, data/wordpiece.py); number
texts are fixed strings, so the tower keeps their ids and looks them up by number index.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from cldr_dist.config import ModelConfig
from cldr_dist.data.batch import DRPBatch
from cldr_dist.data.wordpiece import model_dir, number_text_ids
from cldr_dist.models.text import TOWER_DIM, fusion_mlp, fuse_features


def load_encoder(trainable_layers: int) -> nn.Module:
    """The bundled BertModel, read from the package directory only (no hub, no download)."""
    from transformers import BertModel
    from transformers.utils import logging as hf_logging
    path = model_dir()
    verbosity, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    # the checkpoint's pooler (a [CLS] dense layer we never run) is skipped: silence the load
    # report about it, and the progress bar every worker would print
    hf_logging.set_verbosity(logging.ERROR)
    hf_logging.disable_progress_bar()
    try:
        encoder = BertModel.from_pretrained(
            str(path), local_files_only=True, add_pooling_layer=False,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()
    layers = encoder.encoder.layer
    if trainable_layers > len(layers):
        raise ValueError(f"model.minilm_trainable_layers={trainable_layers}: {path} has {len(layers)} layers")
    encoder.requires_grad_(False)
    for layer in layers[len(layers) - trainable_layers:]:
        layer.requires_grad_(True)
    return encoder


def mean_pool(hidden: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    """(N, L, H) right-padded states -> (N, H): the mean over each text's own tokens."""
    mask = (torch.arange(hidden.shape[1], device=hidden.device)[None, :] < lens[:, None]).to(hidden.dtype)
    return (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1e-9)


class MiniLMTextEncoder(nn.Module):
    """MiniLM encoder -> mean pool -> caption / number Linear to 128 -> the scratch MLP -> 256."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.encoder = load_encoder(cfg.minilm_trainable_layers)
        self.frozen = cfg.minilm_trainable_layers == 0
        width = self.encoder.config.hidden_size
        self.caption = nn.Linear(width, TOWER_DIM, bias=False)
        self.number = nn.Linear(width, TOWER_DIM, bias=False)
        self.mlp = fusion_mlp()
        ids, lens = number_text_ids()
        # derived from the tokenizer, not learned: non-persistent, so checkpoints hold weights only
        self.register_buffer("number_ids", torch.from_numpy(ids), persistent=False)
        self.register_buffer("number_lens", torch.from_numpy(lens), persistent=False)
        # A frozen encoder is a constant function, so its pooled states of the 1000 number texts
        # never change: computed once (on first use, on the model's device and dtype) and looked
        # up after, TransE and zero-shot then cost one Linear instead of a transformer pass.
        # Loading weights drops it (a checkpoint may hold a different encoder).
        self.register_buffer("number_cache", None, persistent=False)
        self._register_load_state_dict_pre_hook(self._drop_number_cache)

    def _drop_number_cache(self, *args, **kwargs) -> None:
        self.number_cache = None

    def pooled(self, ids: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
        """(N, L) 0-padded WordPiece ids, (N,) lengths -> (N, 384) mean-pooled states."""
        mask = torch.arange(ids.shape[1], device=ids.device)[None, :] < lens[:, None]
        hidden = self.encoder(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        return mean_pool(hidden, lens)

    def encode_captions(self, batch: DRPBatch) -> torch.Tensor:
        if batch.caption_wp is None:
            raise ValueError("model.text_tower=minilm needs batches with caption_wp: collate with "
                             "wordpieces=CaptionWordPieces(tables) (ShardStream(wordpiece=True))")
        return self.caption(self.pooled(batch.caption_wp, batch.caption_wp_len))

    def encode_numbers(self, token_ids: torch.Tensor, lens: torch.Tensor,
                       index: torch.Tensor | None) -> torch.Tensor:
        """Number texts by index (0..999); our BPE token_ids / lens are not MiniLM's and unused."""
        if index is None:
            raise ValueError("model.text_tower=minilm encodes number texts by index: pass index")
        index = index.to(self.number_ids.device)
        if not self.frozen:
            return self.number(self.pooled(self.number_ids[index], self.number_lens[index]))
        if self.number_cache is None:
            with torch.no_grad():
                self.number_cache = self.pooled(self.number_ids, self.number_lens)
        return self.number(self.number_cache[index])

    def fuse(self, caption_feat: torch.Tensor, number_feat: torch.Tensor) -> torch.Tensor:
        return fuse_features(self.mlp, caption_feat, number_feat)
