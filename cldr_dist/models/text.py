"""The text side of CLDR: a caption tower and a number tower (causal CLIP-style transformers
trained from scratch), each pooled at its [EOS] token and projected to 128, concatenated and
mapped by an MLP 256 -> 512 -> 512 -> 256.

Pooling: the [EOS] token is the last non-pad token, position len - 1. With causal attention no
token attends to anything after it, so the [EOS] state ignores the padding that follows: the
output is the same whether a batch is padded to its longest text or to a fixed 300/100. That
is what lets `num_buckets` cut the padding away (sort by length, run each bucket at its own
longest length) without changing the result.

Prefix sharing: a caption is "[SOS] The drug response value between {SMILES} and {cell} is
[EOS]". Under the causal mask every state up to the end of the SMILES depends on those tokens
alone, so it is the same for every pair of a drug: the caption tower runs each distinct drug's
prefix once, keeps each layer's keys and values, and runs only each pair's suffix (~5 of ~65
tokens) at positions prefix_len.. against them. The result is the full-sequence encoding, not
an approximation (tests/models/test_text.py checks outputs and gradients).

The transformer is written here rather than taken from transformers' CLIPTextModel, which
cannot take cached keys and values; it is CLIP's text architecture (token + position
embeddings, pre-LN blocks of causal multi-head attention and a quick_gelu MLP, a final
LayerNorm) with CLIP's initialisation.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cldr_dist.config import ModelConfig

TOWER_DIM = 128              # each tower's projection; concatenated = 256
MLP_WIDTHS = (256, 512, 512, 256)
MLP_RATIO = 4                # CLIP's feed-forward width = 4 x width
QUICK_GELU = 1.702           # CLIP's activation: x * sigmoid(1.702 x)
EMBED_STD = 0.02             # CLIP's token and position embedding init
# pairs of one drug whose suffixes attend to its prefix together: a block gathers the prefix's
# keys and values once (per pair, that copy was a third of a pretraining step); a larger block
# attends over more masked-out positions and pads more pairs
PAIRS_PER_BLOCK = 8


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


def _normal_(linear: nn.Linear, std: float) -> None:
    nn.init.normal_(linear.weight, std=std)
    nn.init.zeros_(linear.bias)


class Block(nn.Module):
    """A pre-LN transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, width: int, heads: int, layers: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.fc1 = nn.Linear(width, MLP_RATIO * width)
        self.fc2 = nn.Linear(MLP_RATIO * width, width)
        # CLIP's init (transformers' CLIPPreTrainedModel._init_weights): residual branches
        # scaled down with depth
        depth_std = width ** -0.5 * (2 * layers) ** -0.5
        for linear, std in ((self.qkv, depth_std), (self.out, width ** -0.5),
                            (self.fc1, (2 * width) ** -0.5), (self.fc2, depth_std)):
            _normal_(linear, std)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """x (N, T, W) -> (x', (k, v)): causal attention over x, and this block's keys and
        values (N, heads, T, W/heads), which a drug's prefix keeps for its pairs' suffixes."""
        n, t, w = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(n, t, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.out(a.transpose(1, 2).reshape(n, t, w))
        h = self.fc1(self.ln2(x))
        return x + self.fc2(h * torch.sigmoid(QUICK_GELU * h)), (k, v)

    def forward_pairs(self, x: torch.Tensor, prefix_kv: tuple[torch.Tensor, torch.Tensor],
                      layout: "PairBlocks") -> torch.Tensor:
        """x (n, t, W): pairs' own tokens, each pair seeing its drug's prefix keys and values
        (prefix_kv, (G, heads, P, W/heads)) and its own tokens causally. Token-wise layers run
        per pair; attention runs per block of up to c pairs of one drug, which gathers a
        drug's prefix keys and values once per block instead of once per pair."""
        n, t, w = x.shape
        qkv = self.qkv(self.ln1(x)).view(n, t, 3, self.heads, w // self.heads)
        blocks = qkv.new_zeros(layout.num_blocks * layout.size, t, 3, self.heads, w // self.heads)
        blocks[layout.row] = qkv
        q, k, v = blocks.view(layout.num_blocks, layout.size * t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        keys = torch.cat([prefix_kv[0][layout.drug], k], 2)
        values = torch.cat([prefix_kv[1][layout.drug], v], 2)
        a = F.scaled_dot_product_attention(q, keys, values, attn_mask=layout.mask)   # (B, heads, c*t, W/heads)
        a = a.transpose(1, 2).reshape(layout.num_blocks * layout.size, t, w)[layout.row]
        x = x + self.out(a)
        h = self.fc1(self.ln2(x))
        return x + self.fc2(h * torch.sigmoid(QUICK_GELU * h))


class PairBlocks:
    """Pairs grouped into blocks of at most `size` pairs of one drug, for attention against that
    drug's shared prefix: row (n,) each pair's row in the (blocks x size) layout, drug (B,) each
    block's drug, mask (B, 1, size*t, P + size*t): a pair's tokens see its drug's prefix up to
    its start and its own tokens causally, nothing of the block's other pairs. Empty rows (a
    drug's last block not full) see their own tokens only, so no attention row is empty."""

    def __init__(self, slot: torch.Tensor, start: torch.Tensor, t: int, p: int, size: int):
        device = slot.device
        order = torch.argsort(slot, stable=True)
        counts = torch.bincount(slot, minlength=int(slot.max()) + 1)
        rank = torch.empty_like(slot)
        rank[order] = torch.arange(len(slot), device=device) - (counts.cumsum(0) - counts)[slot[order]]
        per_drug = (counts + size - 1) // size                       # blocks of each drug
        first_block = per_drug.cumsum(0) - per_drug
        self.size, self.num_blocks = size, int(per_drug.sum())
        self.drug = torch.repeat_interleave(torch.arange(len(counts), device=device), per_drug)
        self.row = (first_block[slot] + rank // size) * size + rank % size
        block_start = torch.zeros(self.num_blocks, dtype=start.dtype, device=device)
        block_start[self.row // size] = start
        sees_prefix = torch.arange(p, device=device)[None, None, :] < block_start[:, None, None]
        token = torch.arange(size * t, device=device)
        own = (token[:, None] // t == token[None, :] // t) & (token[:, None] % t >= token[None, :] % t)
        self.mask = torch.cat([sees_prefix.expand(-1, size * t, -1),
                               own.expand(self.num_blocks, -1, -1)], dim=-1)[:, None]


class TextTower(nn.Module):
    """A causal transformer over token ids, pooled at the [EOS] position and projected."""

    def __init__(self, vocab_size: int, width: int, layers: int, heads: int, context: int,
                 out_dim: int = TOWER_DIM, num_buckets: int = 0):
        super().__init__()
        self.token = nn.Embedding(vocab_size, width)
        self.position = nn.Embedding(context, width)
        for emb in (self.token, self.position):
            nn.init.normal_(emb.weight, std=EMBED_STD)
        self.blocks = nn.ModuleList(Block(width, heads, layers) for _ in range(layers))
        self.final_ln = nn.LayerNorm(width)
        self.proj = nn.Linear(width, out_dim, bias=False)
        self.context = context
        # 0: run the batch as padded (the paper); k: k length buckets (of texts, or of drugs'
        # prefixes when sharing them)
        self.num_buckets = num_buckets
        self.share_prefix = True   # False: every caption in full (the reference the tests use)
        self.pairs_per_block = PAIRS_PER_BLOCK

    def _embed(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.token(ids) + self.position(positions)

    def _encode(self, ids: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
        # no padding mask: the causal mask alone keeps [EOS] blind to the padding after it
        x = self._embed(ids, torch.arange(ids.shape[1], device=ids.device))
        for block in self.blocks:
            x, _ = block(x)
        return self.final_ln(x)[torch.arange(len(ids), device=ids.device), lens - 1]

    def _encode_group(self, prefix: torch.Tensor, ids: torch.Tensor, lens: torch.Tensor,
                      start: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
        """Some drugs' prefixes, run once, and their pairs' suffixes against them.
        prefix (G, P) the drugs' first P caption tokens; ids (n, L) and lens (n,) their pairs'
        captions; slot (n,) each pair's drug in `prefix`; start (n,) where its own tokens begin
        (its drug's shared prefix length, at most lens - 1) -> (n, W) state at each len - 1."""
        device, p = ids.device, prefix.shape[1]
        x, cache = self._embed(prefix, torch.arange(p, device=device)), []
        for block in self.blocks:
            x, kv = block(x)
            cache.append(kv)
        # pairs run in groups of equal own length, so no pair pays for another's padding
        # (own lengths are 4-10 tokens, most of them 4)
        own_len = lens - start
        pooled, rows = [], []
        for length in torch.unique(own_len).tolist():
            group = (own_len == length).nonzero().squeeze(1)
            positions = start[group, None] + torch.arange(length, device=device)
            layout = PairBlocks(slot[group], start[group], length, p, self.pairs_per_block)
            y = self._embed(ids[group].gather(1, positions), positions)
            for block, kv in zip(self.blocks, cache):
                y = block.forward_pairs(y, kv, layout)
            pooled.append(self.final_ln(y[:, -1]))
            rows.append(group)
        return torch.cat(pooled)[torch.argsort(torch.cat(rows))]

    def _encode_shared(self, ids: torch.Tensor, lens: torch.Tensor, drug_index: torch.Tensor,
                       prefix_len: torch.Tensor) -> torch.Tensor:
        drugs, pair_drug = torch.unique(drug_index, return_inverse=True)
        # each drug shares only what precedes every one of its pairs' pooled tokens, so a
        # caption truncated inside the prefix stays exact; any row is then a source of it
        shared = prefix_len[drugs].scatter_reduce(0, pair_drug, lens - 1, "amin")
        rows = torch.arange(len(ids), device=ids.device)
        source = torch.zeros_like(drugs).scatter_reduce(0, pair_drug, rows, "amin", include_self=False)
        # buckets of drugs by prefix length (prefixes run 15-179 tokens): each runs at its own
        # longest prefix, and only its own pairs gather (and attend over) those keys and values
        order = torch.argsort(shared)
        slot_of = torch.empty_like(drugs)   # a drug's row within its bucket
        pooled, pair_rows = [], []
        for group in torch.tensor_split(order, max(min(self.num_buckets, len(order)), 1)):
            slot_of[group] = torch.arange(len(group), device=ids.device)
            pairs = torch.isin(pair_drug, group).nonzero().squeeze(1)
            p = int(shared[group].max())
            pooled.append(self._encode_group(ids[source[group], :p], ids[pairs], lens[pairs],
                                             shared[pair_drug[pairs]], slot_of[pair_drug[pairs]]))
            pair_rows.append(pairs)
        return torch.cat(pooled)[torch.argsort(torch.cat(pair_rows))]

    def forward(self, ids: torch.Tensor, lens: torch.Tensor, drug_index: torch.Tensor | None = None,
                prefix_len: torch.Tensor | None = None) -> torch.Tensor:
        """ids (N, L) PAD-padded, lens (N,) -> (N, out_dim). With drug_index (N,) and prefix_len
        (U,) (every caption of drug u begins with the same prefix_len[u] tokens), each drug's
        prefix is encoded once."""
        if ids.shape[1] > self.context:
            raise ValueError(f"text of {ids.shape[1]} tokens exceeds the context {self.context}")
        if self.share_prefix and prefix_len is not None:
            return self.proj(self._encode_shared(ids, lens, drug_index, prefix_len))
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
        """A DRPBatch's captions -> (B, 128) caption-tower features; each drug's caption prefix
        once where the batch knows its length."""
        return self.caption(batch.caption, batch.caption_len, batch.drug_index, batch.caption_prefix_len)

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
