import numpy as np
import pytest
import torch

from cldr_dist.config import ModelConfig
from cldr_dist.data.batch import collate
from cldr_dist.models.text import TextEncoder, TextTower
from conftest import make_samples


def _batches(tables, prepared, n=24):
    rows = np.random.default_rng(1).choice(len(tables.responses), n, replace=False)
    samples = make_samples(tables, prepared, rows)
    cfg = ModelConfig()
    return (collate(samples, prepared[1]),
            collate(samples, prepared[1], cfg.caption_context, cfg.number_context))


def test_tower_pools_at_eos_whatever_the_padding(tiny_tables, tiny_prepared):
    longest, fixed = _batches(tiny_tables, tiny_prepared)
    assert fixed.caption.shape[1] == 300 and longest.caption.shape[1] < 300
    torch.manual_seed(0)
    tower = TextTower(tiny_prepared[0].get_vocab_size(), 128, 3, 8, 300).eval()
    with torch.no_grad():
        a = tower(longest.caption, longest.caption_len)
        b = tower(fixed.caption, fixed.caption_len)
    assert a.shape == (24, 128)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # the pooled token is [EOS]: changing only the padding after it changes nothing,
    # changing a real token does
    ids = fixed.caption.clone()
    ids[0, fixed.caption_len[0] - 2] = 5
    with torch.no_grad():
        assert not torch.allclose(tower(ids, fixed.caption_len)[0], b[0])


def test_buckets_match_unbucketed(tiny_tables, tiny_prepared):
    longest, _ = _batches(tiny_tables, tiny_prepared)
    torch.manual_seed(0)
    tower = TextTower(tiny_prepared[0].get_vocab_size(), 128, 3, 8, 300).eval()
    with torch.no_grad():
        plain = tower(longest.caption, longest.caption_len)
        tower.num_buckets = 4
        bucketed = tower(longest.caption, longest.caption_len)
    torch.testing.assert_close(plain, bucketed, atol=1e-5, rtol=1e-5)


def test_encoder_fixed_vs_longest_and_context_limit(tiny_tables, tiny_prepared):
    longest, fixed = _batches(tiny_tables, tiny_prepared)
    torch.manual_seed(0)
    enc = TextEncoder(tiny_prepared[0].get_vocab_size(), ModelConfig()).eval()
    with torch.no_grad():
        a = enc(longest.caption, longest.caption_len, longest.number, longest.number_len)
        b = enc(fixed.caption, fixed.caption_len, fixed.number, fixed.number_len)
    assert a.shape == (24, 256)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    too_long = torch.ones(2, 301, dtype=torch.long)
    with pytest.raises(ValueError, match="exceeds the context"):
        enc.caption(too_long, torch.tensor([301, 301]))
