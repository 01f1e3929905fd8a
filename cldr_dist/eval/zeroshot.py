"""Zero-shot drug response: no regression head. For each sample, the prediction is the number
text whose text embedding is most similar to the sample embedding: y = argmax index / 1000.

A sample's candidate texts are its own caption with each of the 1000 number texts (the pairs
CLDR was trained to align). The number tower runs once per evaluation over the 1000 texts, the
caption tower once per sample; only the small fusion MLP runs per (sample, number) pair.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F

from cldr_dist.data.batch import DRPBatch
from cldr_dist.data.labels import NUM_NUMBER_TEXTS
from cldr_dist.losses.numeric_kg import NumberTexts

SAMPLES_PER_CHUNK = 32   # (chunk, 1000, 512) floats of fusion activations at a time


def nearest_number(sample: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
    """sample (B, D), texts (K, D) or per-sample (B, K, D), all normalised -> (B,) argmax index."""
    sims = sample @ texts.T if texts.dim() == 2 else torch.einsum("bd,bkd->bk", sample, texts)
    return sims.argmax(dim=1)


@torch.no_grad()
def zeroshot_predict(model, batches: Iterable[DRPBatch], numbers: NumberTexts,
                     chunk: int = SAMPLES_PER_CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """(true y, zero-shot y) over the batches, with the model in eval mode."""
    was_training = model.training
    model.eval()
    device = model.logit_scale.device
    number_feats = model.encode_number_texts(numbers.ids.to(device), numbers.lens.to(device),
                                             numbers.index.to(device))
    ys, preds = [], []
    for batch in batches:
        batch = batch.to(device)
        sample = F.normalize(model.drp(batch)[1], dim=-1)
        for rows in torch.split(torch.arange(len(batch), device=device), chunk):
            part = _rows(batch, rows)
            texts = model.pair_text_embeddings(part, number_feats)
            preds.append(nearest_number(sample[rows], texts).cpu())
        ys.append(batch.y.cpu())
    model.train(was_training)
    return torch.cat(ys).numpy(), torch.cat(preds).numpy() / NUM_NUMBER_TEXTS


def _rows(batch: DRPBatch, rows: torch.Tensor) -> DRPBatch:
    """The caption fields of some rows (all pair_text_embeddings reads); drug_index still into
    the batch's drugs, whose caption prefixes the tower encodes once per part."""
    wordpieces = {}
    if batch.caption_wp is not None:   # model.text_tower=minilm
        wordpieces = dict(caption_wp=batch.caption_wp[rows], caption_wp_len=batch.caption_wp_len[rows])
    return replace(batch, caption=batch.caption[rows], caption_len=batch.caption_len[rows],
                   drug_index=batch.drug_index[rows], **wordpieces)
