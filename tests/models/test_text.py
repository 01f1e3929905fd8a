from dataclasses import replace

import numpy as np
import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel

from cldr_dist.config import ModelConfig
from cldr_dist.data.batch import PAD_ID, collate
from cldr_dist.models.text import MLP_RATIO, TextEncoder, TextTower
from conftest import make_samples

EXACT = dict(atol=1e-5, rtol=1e-5)   # the bar for "the same result"


def _batches(tables, prepared, n=24):
    rows = np.random.default_rng(1).choice(len(tables.responses), n, replace=False)
    samples = make_samples(tables, prepared, rows)
    cfg = ModelConfig()
    return (collate(samples, prepared[1]),
            collate(samples, prepared[1], cfg.caption_context, cfg.number_context))


def _tower(prepared, num_buckets=0):
    torch.manual_seed(0)
    return TextTower(prepared[0].get_vocab_size(), 128, 3, 8, 300, num_buckets=num_buckets)


def _full(tower, batch):
    tower.share_prefix = False
    try:
        return tower(batch.caption, batch.caption_len, batch.drug_index, batch.caption_prefix_len)
    finally:
        tower.share_prefix = True


def _shared(tower, batch):
    return tower(batch.caption, batch.caption_len, batch.drug_index, batch.caption_prefix_len)


def test_tower_pools_at_eos_whatever_the_padding(tiny_tables, tiny_prepared):
    longest, fixed = _batches(tiny_tables, tiny_prepared)
    assert fixed.caption.shape[1] == 300 and longest.caption.shape[1] < 300
    tower = _tower(tiny_prepared).eval()
    with torch.no_grad():
        for encode in (_full, _shared):
            a, b = encode(tower, longest), encode(tower, fixed)
            assert a.shape == (24, 128)
            torch.testing.assert_close(a, b, **EXACT)
            # the pooled token is [EOS]: changing only the padding after it changes nothing,
            # changing a real token (of the suffix, and of the shared prefix) does
            for pos in (fixed.caption_len[0] - 2, fixed.caption_prefix_len[fixed.drug_index[0]] - 1):
                ids = fixed.caption.clone()
                ids[0, pos] = 5
                assert not torch.allclose(encode(tower, replace(fixed, caption=ids))[0], b[0])


def test_buckets_match_unbucketed(tiny_tables, tiny_prepared):
    longest, _ = _batches(tiny_tables, tiny_prepared)
    tower = _tower(tiny_prepared).eval()
    with torch.no_grad():
        plain = _full(tower, longest)
        tower.num_buckets = 4
        torch.testing.assert_close(plain, _full(tower, longest), **EXACT)
        torch.testing.assert_close(plain, _shared(tower, longest), **EXACT)


def test_same_as_transformers_clip_text_model(tiny_tables, tiny_prepared):
    """The tower is CLIP's text transformer: with CLIPTextModel's weights it gives its states."""
    longest, _ = _batches(tiny_tables, tiny_prepared)
    tower = _tower(tiny_prepared).eval()
    config = CLIPTextConfig(vocab_size=tiny_prepared[0].get_vocab_size(), hidden_size=128,
                            intermediate_size=MLP_RATIO * 128, num_hidden_layers=3,
                            num_attention_heads=8, max_position_embeddings=300,
                            pad_token_id=PAD_ID, bos_token_id=2, eos_token_id=3)   # tokenizer's ids
    m = clip = CLIPTextModel(config).eval()
    with torch.no_grad():
        tower.token.weight.copy_(m.embeddings.token_embedding.weight)
        tower.position.weight.copy_(m.embeddings.position_embedding.weight)
        tower.final_ln.load_state_dict(m.final_layer_norm.state_dict())
        for block, layer in zip(tower.blocks, m.encoder.layers):
            a = layer.self_attn
            block.qkv.weight.copy_(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]))
            block.qkv.bias.copy_(torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]))
            block.out.load_state_dict(a.out_proj.state_dict())
            block.ln1.load_state_dict(layer.layer_norm1.state_dict())
            block.ln2.load_state_dict(layer.layer_norm2.state_dict())
            block.fc1.load_state_dict(layer.mlp.fc1.state_dict())
            block.fc2.load_state_dict(layer.mlp.fc2.state_dict())
        hidden = clip(input_ids=longest.caption).last_hidden_state
        expected = tower.proj(hidden[torch.arange(24), longest.caption_len - 1])
        torch.testing.assert_close(_full(tower, longest), expected, **EXACT)
        torch.testing.assert_close(_shared(tower, longest), expected, **EXACT)


def _repeated_drug_batch(tables, prepared, truncate_to):
    """Real captions: a drug with many pairs, several with a few, one with a single pair;
    captions of different lengths, padded (and truncated) to `truncate_to`."""
    drows = prepared[3]
    rng = np.random.default_rng(2)
    drugs, counts = np.unique(drows, return_counts=True)
    busiest = drugs[np.argsort(counts)[::-1]]
    rows = [rng.choice(np.flatnonzero(drows == d), k, replace=False)
            for d, k in zip(busiest, (9, 4, 3, 2, 2, 1))]
    return collate(make_samples(tables, prepared, np.concatenate(rows)), prepared[1], truncate_to)


def _forward_and_grads(tower, encode, batch):
    tower.zero_grad()
    out = encode(tower, batch)
    weights = torch.linspace(-1, 1, out.numel()).view_as(out)   # every output feeds the loss
    (out * weights).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in tower.named_parameters() if p.grad is not None}


def _assert_same_as_full(tower, batch):
    """Outputs and every parameter's gradient. In float64 to EXACT; in float32 the gradients
    (sums over up to ~100 tokens of ~20 pairs, |g| up to ~100) differ in rounding only, by the
    order of summation: to EXACT relative to each gradient's largest entry."""
    for dtype in (torch.float64, torch.float32):
        tower.to(dtype)
        out, grads = _forward_and_grads(tower, _shared, batch)
        ref, ref_grads = _forward_and_grads(tower, _full, batch)
        torch.testing.assert_close(out, ref, **EXACT)
        assert grads.keys() == ref_grads.keys() == {n for n, _ in tower.named_parameters()}
        for name, g in ref_grads.items():
            scale = 1.0 if dtype == torch.float64 else max(float(g.abs().max()), 1.0)
            torch.testing.assert_close(grads[name], g, atol=EXACT["atol"] * scale, rtol=EXACT["rtol"],
                                       msg=lambda m: f"{dtype} {name}: {m}")


@pytest.mark.parametrize("num_buckets,pairs_per_block", [(0, 8), (3, 8), (3, 1), (0, 3)])
def test_shared_prefix_forward_and_gradients_equal_full_sequence(tiny_tables, tiny_prepared, num_buckets,
                                                                 pairs_per_block):
    batch = _repeated_drug_batch(tiny_tables, tiny_prepared, truncate_to=None)
    counts = torch.bincount(batch.drug_index)
    assert counts.max() > 2 and counts.min() == 1 and len(batch.caption_len.unique()) > 3
    # blocks of 3 split some drugs' pairs over several blocks and leave some blocks part-empty
    assert counts.max() > 3 and (counts % 3 != 0).any()
    # the prefixes are most of each caption, which is what sharing them saves
    assert (batch.caption_prefix_len[batch.drug_index] > batch.caption_len * 3 // 4).all()
    tower = _tower(tiny_prepared, num_buckets)
    tower.pairs_per_block = pairs_per_block
    _assert_same_as_full(tower, batch)


def test_shared_prefix_exact_for_truncated_captions(tiny_tables, tiny_prepared):
    """caption_pad_to cuts captions: some inside their suffix, some inside their shared prefix
    (their pooled token is then a prefix token); a caption cut shorter than the rest of its
    drug's (not something collate makes) must not shorten what the others see either."""
    batch = _repeated_drug_batch(tiny_tables, tiny_prepared, truncate_to=None)
    prefix = batch.caption_prefix_len[batch.drug_index]
    # the longest prefix is cut, the next longest keeps it and 2 of its >= 4 suffix tokens
    cut = int(prefix.unique()[-2]) + 2
    batch = _repeated_drug_batch(tiny_tables, tiny_prepared, truncate_to=cut)
    assert batch.caption.shape[1] == cut
    assert ((prefix >= cut) & (batch.caption_len == cut)).any()                 # inside the prefix
    assert ((prefix < cut - 1) & (batch.caption_len == cut)).any()             # inside the suffix
    ids, lens = batch.caption.clone(), batch.caption_len.clone()
    busiest = torch.bincount(batch.drug_index).argmax()
    row = int(torch.nonzero(batch.drug_index == busiest)[0])
    lens[row] = batch.caption_prefix_len[busiest] // 2
    ids[row, lens[row]:] = PAD_ID
    for b in (batch, replace(batch, caption=ids, caption_len=lens)):
        _assert_same_as_full(_tower(tiny_prepared, num_buckets=2), b)


def test_shared_prefix_on_a_subset_of_rows(tiny_batch, tiny_prepared):
    """Zero-shot encodes some rows of a batch (drug_index still into the batch's drugs)."""
    tower = _tower(tiny_prepared, num_buckets=4).eval()
    rows = torch.tensor([5, 0, 7, 3])
    part = replace(tiny_batch, caption=tiny_batch.caption[rows], caption_len=tiny_batch.caption_len[rows],
                   drug_index=tiny_batch.drug_index[rows])
    with torch.no_grad():
        torch.testing.assert_close(_shared(tower, part), _full(tower, tiny_batch)[rows], **EXACT)


def test_encoder_fixed_vs_longest_and_context_limit(tiny_tables, tiny_prepared):
    longest, fixed = _batches(tiny_tables, tiny_prepared)
    torch.manual_seed(0)
    enc = TextEncoder(tiny_prepared[0].get_vocab_size(), ModelConfig()).eval()
    with torch.no_grad():
        a = enc(longest.caption, longest.caption_len, longest.number, longest.number_len)
        b = enc(fixed.caption, fixed.caption_len, fixed.number, fixed.number_len)
        torch.testing.assert_close(enc.encode_captions(fixed), enc.caption(fixed.caption, fixed.caption_len), **EXACT)
    assert a.shape == (24, 256)
    torch.testing.assert_close(a, b, **EXACT)
    too_long = torch.ones(2, 301, dtype=torch.long)
    with pytest.raises(ValueError, match="exceeds the context"):
        enc.caption(too_long, torch.tensor([301, 301]))
