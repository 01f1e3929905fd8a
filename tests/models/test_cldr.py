import math

import numpy as np
import pytest
import torch

from cldr_dist.config import LossConfig, ModelConfig
from cldr_dist.data.batch import collate
from cldr_dist.models.cldr import build_model
from conftest import make_samples


def _model(prepared, **kw):
    torch.manual_seed(0)
    return build_model(ModelConfig(drp="deepcdr"), LossConfig(), prepared[0].get_vocab_size(),
                       prepared[1].num_cell_features, **kw)


def test_outputs_normalised_and_scale(tiny_batch, tiny_prepared):
    out = _model(tiny_prepared)(tiny_batch)
    assert out.sample.shape == out.text.shape == (len(tiny_batch), 256)
    torch.testing.assert_close(out.sample.norm(dim=1), torch.ones(len(tiny_batch)))
    torch.testing.assert_close(out.text.norm(dim=1), torch.ones(len(tiny_batch)))
    assert math.isclose(out.logit_scale.item(), 1 / 0.07, rel_tol=1e-5)
    assert out.prediction.shape == (len(tiny_batch),)


def test_logit_scale_parameter_is_clamped_and_can_come_back(tiny_prepared):
    """Past the cap the output still has a gradient (an output clamp would zero it and leave the
    parameter stuck), and clamp_logit_scale_ brings the parameter itself back to ln(100)."""
    model = _model(tiny_prepared)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    model.scale().backward()
    assert model.logit_scale.grad.abs().item() > 0
    model.clamp_logit_scale_()
    assert model.logit_scale.item() == pytest.approx(math.log(LossConfig().max_logit_scale))
    assert model.scale().item() == pytest.approx(LossConfig().max_logit_scale)


def test_fixed_and_longest_padding_give_same_embeddings(tiny_tables, tiny_prepared):
    rows = np.random.default_rng(2).choice(len(tiny_tables.responses), 32, replace=False)
    samples = make_samples(tiny_tables, tiny_prepared, rows)
    longest = collate(samples, tiny_prepared[1])
    fixed = collate(samples, tiny_prepared[1], 300, 100)
    for kw in ({"text_buckets": 0, "dedup_numbers": False}, {}):  # the paper's path and ours
        model = _model(tiny_prepared, **kw).eval()
        with torch.no_grad():
            a, b = model(longest), model(fixed)
        torch.testing.assert_close(a.text, b.text, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a.sample, b.sample)


def test_speedups_do_not_change_the_result(tiny_batch, tiny_prepared):
    fast = _model(tiny_prepared).eval()
    plain = _model(tiny_prepared, text_buckets=0, dedup_numbers=False).eval()
    with torch.no_grad():
        torch.testing.assert_close(fast(tiny_batch).text, plain(tiny_batch).text, atol=1e-5, rtol=1e-5)


def test_encode_number_texts(tiny_prepared):
    from cldr_dist.losses.numeric_kg import NumberTexts
    numbers = NumberTexts(tiny_prepared[1])
    feats = _model(tiny_prepared).encode_number_texts(numbers.ids[:10], numbers.lens[:10])
    assert feats.shape == (10, 128)
