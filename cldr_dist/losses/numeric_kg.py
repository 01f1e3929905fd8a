"""The numerical knowledge graph: TransE over the 1000 number texts, plus the full pretraining
loss (kg_weight * TransE + clip_weight * CLIP).

Triples are (n_i, r, n_{i+1}): "the next number". A negative corrupts the head or the tail with
a random other number. Entity embeddings are the number tower's features of the number texts,
so this loss trains the text side. Two formulations (loss.kg_form):
  sampled  num_triples random triples a step, L2-normalised entities, the mean loss (default)
  all      CLDR's: every step encodes all 1000 number texts and sums the margin loss over all
           999 triples, one corrupted triple each, on the raw features (on full GDSC the sum
           ran at 12-21 in the first epoch against CLIP's 9; docs/results/kg_form_probe.md)
The relation r is a trained parameter; `train_relation=False` freezes it at its random init, as
the original code (which never handed r to its optimizer) did.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cldr_dist.config import KG_FORMS, LossConfig
from cldr_dist.data.batch import PAD_ID
from cldr_dist.data.labels import NUM_NUMBER_TEXTS
from cldr_dist.losses.contrastive import gathered_clip_loss

RELATION_INIT_STD = 0.01     # small: the chain of 999 steps starts short
DEFAULT_NUM_TRIPLES = 256    # triples sampled per step (form "sampled")
SUCCESSOR_K = 10             # successor_hits: the true next number among the 10 nearest


class Triples(NamedTuple):
    head: torch.Tensor
    tail: torch.Tensor
    neg_head: torch.Tensor
    neg_tail: torch.Tensor


def successor_triples(head: torch.Tensor, num_numbers: int, generator: torch.Generator | None) -> Triples:
    """(n_i, r, n_{i+1}) for each head, each with one corrupted triple: the head or the tail
    shifted by 1..num_numbers-1 (mod n), so a corrupted entity never equals the original."""
    tail = head + 1
    shift = torch.randint(1, num_numbers, (len(head),), generator=generator)
    corrupt_head = torch.rand(len(head), generator=generator) < 0.5
    neg_head = torch.where(corrupt_head, (head + shift) % num_numbers, head)
    neg_tail = torch.where(corrupt_head, tail, (tail + shift) % num_numbers)
    return Triples(head, tail, neg_head, neg_tail)


def sample_triples(num_triples: int, num_numbers: int = NUM_NUMBER_TEXTS,
                   generator: torch.Generator | None = None) -> Triples:
    """num_triples random chain triples (kg_form=sampled)."""
    head = torch.randint(0, num_numbers - 1, (num_triples,), generator=generator)
    return successor_triples(head, num_numbers, generator)


def transe_loss(head, tail, neg_head, neg_tail, relation, margin: float, reduce: str = "mean") -> torch.Tensor:
    """Margin ranking with L1 distance: positives closer than negatives by at least margin."""
    pos = (head + relation - tail).abs().sum(-1)
    neg = (neg_head + relation - neg_tail).abs().sum(-1)
    loss = F.relu(margin + pos - neg)
    return loss.sum() if reduce == "sum" else loss.mean()


def chain_triples(num_numbers: int = NUM_NUMBER_TEXTS, generator: torch.Generator | None = None) -> Triples:
    """Every triple (n_i, r, n_{i+1}) of the chain, each with one corrupted triple (CLDR's)."""
    return successor_triples(torch.arange(num_numbers - 1), num_numbers, generator)


class NumericKG(nn.Module):
    def __init__(self, dim: int, margin: float = 1.0, train_relation: bool = True,
                 num_triples: int = DEFAULT_NUM_TRIPLES, num_numbers: int = NUM_NUMBER_TEXTS,
                 form: str = "sampled"):
        super().__init__()
        if form not in KG_FORMS:
            raise ValueError(f"kg form {form!r} is not one of {', '.join(KG_FORMS)}")
        self.relation = nn.Parameter(torch.randn(dim) * RELATION_INIT_STD,
                                     requires_grad=train_relation)
        self.margin, self.num_triples, self.num_numbers, self.form = margin, num_triples, num_numbers, form

    def forward(self, encode: Callable[[torch.Tensor], torch.Tensor],
                generator: torch.Generator | None = None) -> torch.Tensor:
        """encode: number indices (K,) -> their features (K, dim)."""
        relation = self.relation.float()
        if self.form == "all":
            emb = encode(torch.arange(self.num_numbers, device=self.relation.device)).float()
            t = chain_triples(self.num_numbers, generator)
            h, tl, nh, nt = (emb[i.to(emb.device)] for i in t)
            return transe_loss(h, tl, nh, nt, relation, self.margin, reduce="sum")
        # each distinct number text of the sampled triples is encoded once
        t = sample_triples(self.num_triples, self.num_numbers, generator)
        uniq, inverse = torch.unique(torch.cat(t), return_inverse=True)
        emb = F.normalize(encode(uniq.to(self.relation.device)).float(), dim=-1)
        h, tl, nh, nt = emb[inverse.to(emb.device)].view(4, self.num_triples, -1)
        return transe_loss(h, tl, nh, nt, relation, self.margin)


def successor_hits(features: torch.Tensor, relation: torch.Tensor, normalise: bool, k: int = SUCCESSOR_K) -> float:
    """Whether TransE ordered the number texts: the fraction of texts n_i (i < 999) whose
    successor n_{i+1} is among the k texts nearest to n_i + r (L1, on the entities as the loss
    scores them: L2-normalised for kg_form=sampled, raw for all). Chance is k / 1000."""
    f = F.normalize(features.float(), dim=-1) if normalise else features.float()
    nearest = torch.cdist(f[:-1] + relation.float().to(f.device), f, p=1).topk(k, largest=False).indices
    successor = torch.arange(1, len(f), device=f.device)[:, None]
    return float((nearest == successor).any(1).float().mean())


class NumberTexts:
    """The 1000 number texts' token ids, padded to the longest (or to pad_to), for encoding."""

    def __init__(self, tables, pad_to: int | None = None):
        seqs = [np.asarray(tables.number_tokens(i)) for i in range(NUM_NUMBER_TEXTS)]
        width = pad_to or max(len(s) for s in seqs)
        ids = np.full((len(seqs), width), PAD_ID, dtype=np.int64)
        for i, s in enumerate(seqs):
            ids[i, :len(s)] = s[:width]
        self.ids = torch.from_numpy(ids)
        self.lens = torch.tensor([min(len(s), width) for s in seqs])
        self.index = torch.arange(len(seqs))   # which text each row is (the MiniLM tower reads it)

    def encoder(self, model) -> Callable[[torch.Tensor], torch.Tensor]:
        """indices -> model.encode_number_texts of those texts."""
        def encode(idx: torch.Tensor) -> torch.Tensor:
            idx = idx.cpu()
            device = model.logit_scale.device
            return model.encode_number_texts(self.ids[idx].to(device), self.lens[idx].to(device),
                                             idx.to(device))
        return encode


def pretrain_loss(model, batch, kg: NumericKG, numbers: NumberTexts, cfg: LossConfig,
                  generator: torch.Generator | None = None):
    """kg_weight * TransE + clip_weight * gathered CLIP. Returns (total, parts, model output)."""
    out = model(batch)
    # the loss in fp32 whatever the compute dtype (bf16 logits over thousands of negatives lose the ranking)
    clip = gathered_clip_loss(out.sample.float(), out.text.float(), out.logit_scale.float())
    total = cfg.clip_weight * clip
    parts = {"clip": clip.detach()}
    if cfg.kg_weight > 0:
        transe = kg(numbers.encoder(model), generator)
        total = total + cfg.kg_weight * transe
        parts["kg"] = transe.detach()
    return total, parts, out


def build_kg(loss_cfg: LossConfig, dim: int, num_triples: int = DEFAULT_NUM_TRIPLES) -> NumericKG:
    return NumericKG(dim, loss_cfg.kg_margin, loss_cfg.kg_train_relation, num_triples, form=loss_cfg.kg_form)
