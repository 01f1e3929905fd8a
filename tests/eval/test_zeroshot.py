import numpy as np
import pytest
import torch

from cldr_dist.config import LossConfig, ModelConfig
from cldr_dist.data.batch import collate
from cldr_dist.eval.metrics import pearson
from cldr_dist.eval.zeroshot import nearest_number, zeroshot_predict
from cldr_dist.losses.numeric_kg import NumberTexts, build_kg, pretrain_loss
from cldr_dist.models.cldr import build_model
from conftest import make_samples

# small and fast; seed chosen once, and the pretraining run is deterministic on CPU
PRETRAIN = dict(seed=1, batch=32, batches=4, steps=40, lr=1e-3)
SMALL_TEXT = dict(text_layers=1, text_width=64, text_heads=4, dropout=0.0)


def test_nearest_number_shared_and_per_sample_texts():
    texts = torch.eye(4)
    sample = torch.tensor([[0.0, 0.9, 0.1, 0.0], [0.0, 0.0, 0.2, 0.8]])
    assert nearest_number(sample, texts).tolist() == [1, 3]
    per_sample = torch.stack([texts, texts.flip(0)])
    assert nearest_number(sample, per_sample).tolist() == [1, 0]


def _model(prepared, seed):
    torch.manual_seed(seed)
    return build_model(ModelConfig(drp="deepcdr", **SMALL_TEXT), LossConfig(),
                       prepared[0].get_vocab_size(), prepared[1].num_cell_features)


def test_zeroshot_predicts_number_grid(tiny_batch, tiny_prepared):
    model = _model(tiny_prepared, 0)
    model.train()
    y, y_pred = zeroshot_predict(model, [tiny_batch], NumberTexts(tiny_prepared[1]), chunk=7)
    assert model.training                         # restored
    assert y.shape == y_pred.shape == (len(tiny_batch),)
    assert np.all((y_pred >= 0) & (y_pred <= 0.999))
    np.testing.assert_allclose(y_pred * 1000, np.round(y_pred * 1000), atol=1e-6)
    # parts of a batch (7 rows at a time) encode their captions as the whole batch does
    _, whole = zeroshot_predict(model, [tiny_batch], NumberTexts(tiny_prepared[1]), chunk=len(tiny_batch))
    np.testing.assert_array_equal(y_pred, whole)


@pytest.fixture
def one_thread():
    """On a shared 2-core machine, 2 OpenMP threads spin-wait each other into a 10x slowdown."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_short_pretraining_lowers_clip_loss_and_helps_zeroshot(tiny_tables, tiny_prepared, one_thread):
    cfg = PRETRAIN
    rows = np.random.default_rng(cfg["seed"]).permutation(len(tiny_tables.responses))
    batches = [collate(make_samples(tiny_tables, tiny_prepared, rows[i:i + cfg["batch"]]), tiny_prepared[1])
               for i in range(0, cfg["batch"] * cfg["batches"], cfg["batch"])]
    model = _model(tiny_prepared, cfg["seed"])
    numbers = NumberTexts(tiny_prepared[1])
    kg = build_kg(LossConfig(), 128, num_triples=64)
    y, before = zeroshot_predict(model, batches, numbers)
    opt = torch.optim.Adam([*model.parameters(), *kg.parameters()], lr=cfg["lr"])
    gen = torch.Generator().manual_seed(cfg["seed"])
    clip = []
    for step in range(cfg["steps"]):
        loss, parts, _ = pretrain_loss(model, batches[step % len(batches)], kg, numbers, LossConfig(), gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        clip.append(parts["clip"].item())
    first, last = np.mean(clip[:cfg["batches"]]), np.mean(clip[-cfg["batches"]:])
    assert last < first - 0.3
    _, after = zeroshot_predict(model, batches, numbers)
    assert pearson(y, after) > pearson(y, before) + 0.1
