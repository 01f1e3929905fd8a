import pytest
import torch
import torch.nn.functional as F

from cldr_dist.config import ModelConfig
from cldr_dist.models.drp.base import build_drp

MODELS = ["graphdrp", "tcnn", "deepcdr"]


def _build(name, tables, seed=0):
    torch.manual_seed(seed)
    return build_drp(ModelConfig(drp=name), tables.num_cell_features)


@pytest.mark.parametrize("name", MODELS)
def test_shapes_range_and_dtype(name, tiny_batch, tiny_prepared):
    model = _build(name, tiny_prepared[1])
    pred, emb = model(tiny_batch)
    assert pred.shape == (len(tiny_batch),) and pred.dtype == torch.float32
    assert emb.shape == (len(tiny_batch), 256) and emb.dtype == torch.float32
    assert torch.all((pred > 0) & (pred < 1))
    # two samples of one drug share the drug branch but not the cell branch
    assert not torch.allclose(emb[0], emb[1])


@pytest.mark.parametrize("name", MODELS)
def test_seeded_determinism(name, tiny_batch, tiny_prepared):
    a, b = _build(name, tiny_prepared[1], seed=3).eval(), _build(name, tiny_prepared[1], seed=3).eval()
    pa, ea = a(tiny_batch)
    pb, eb = b(tiny_batch)
    assert torch.equal(pa, pb) and torch.equal(ea, eb)
    c = _build(name, tiny_prepared[1], seed=4).eval()
    assert not torch.allclose(c(tiny_batch)[1], ea)


@pytest.mark.parametrize("name", MODELS)
def test_mse_gradients_reach_every_parameter(name, tiny_batch, tiny_prepared):
    model = _build(name, tiny_prepared[1])
    pred, _ = model(tiny_batch)
    F.mse_loss(pred, tiny_batch.y).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_unknown_model_is_an_error(tiny_prepared):
    with pytest.raises(ValueError, match="unknown base model"):
        build_drp(ModelConfig(drp="nope"), tiny_prepared[1].num_cell_features)


@pytest.mark.parametrize("name", MODELS)
def test_grid_of_every_pair_equals_the_model_on_those_pairs(name, tiny_batch, tiny_prepared):
    """The screen's path (branches once, FusionHead.grid over drugs x cells) is the model's
    forward pass on the batch of all those pairs, value for value."""
    model = _build(name, tiny_prepared[1]).eval()
    b = tiny_batch
    U, V = b.drug.num_graphs, len(b.cell)
    with torch.no_grad():
        drug = model.head.drug_part(model.encode_drugs(b.drug, b.smiles))
        cell = model.head.cell_part(model.encode_cells(b.cell))
        pred, emb = model.head.grid(drug, cell)
        every = b.select(torch.zeros(U * V, dtype=torch.long))
        every.drug_index = torch.arange(U).repeat_interleave(V)
        every.cell_index = torch.arange(V).repeat(U)
        ref_pred, ref_emb = model(every)
    assert pred.shape == (U, V) and emb.shape == (U, V, 256)
    torch.testing.assert_close(pred.reshape(-1), ref_pred, rtol=0, atol=1e-6)
    torch.testing.assert_close(emb.reshape(U * V, -1), ref_emb, rtol=0, atol=1e-5)
