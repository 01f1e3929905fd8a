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


def _linear(i, o):
    return i * o + o


def _conv(c_in, c_out, k):
    return c_in * c_out * k + c_out


def _stack_len(length, layers):
    """Length after valid Conv1d(kernel) + MaxPool(pool) layers, as the official code computes it."""
    for kernel, pool in layers:
        length = (length - kernel + 1) // pool
    return length


F_CELL = 677   # genomic features of the shipped GDSC v17 (the official configs have 735)


def _official_params(name: str) -> int:
    """Parameter counts written out from the official configs (../shared/DESIGN.md section 5),
    layer by layer, for 90-d atoms, 677 cell features, 127 SMILES codes and a 256-d embedding."""
    if name == "graphdrp":   # GAT(90->90 x10 heads) -> GCN(900) -> max|mean -> 1500 -> 128; cell CNN; fusion
        gat = 90 * 900 + 2 * 900 + 900                       # lin, att_src + att_dst, bias
        drug = gat + _linear(900, 900) + _linear(1800, 1500) + _linear(1500, 128)
        cell_len = _stack_len(F_CELL, [(8, 3)] * 3)
        cell = _conv(1, 32, 8) + _conv(32, 64, 8) + _conv(64, 128, 8) + _linear(128 * cell_len, 128)
        return drug + cell + _linear(256, 1024) + _linear(1024, 256) + _linear(256, 1)
    if name == "tcnn":       # one-hot 127 x 228 and 1 x 677, 3x [k7, pool 3] at 40/80/60, flattened
        drug = _conv(127, 40, 7) + _conv(40, 80, 7) + _conv(80, 60, 7)
        cell = _conv(1, 40, 7) + _conv(40, 80, 7) + _conv(80, 60, 7)
        flat = 60 * _stack_len(228, [(7, 3)] * 3) + 60 * _stack_len(F_CELL, [(7, 3)] * 3)
        return drug + cell + _linear(flat, 1024) + _linear(1024, 256) + _linear(256, 1)
    if name == "deepcdr":    # GCN 90->256->256->256->200, cell MLP ->256->200, 400->256, conv stack -> 60 -> 1
        drug = _linear(90, 256) + 2 * _linear(256, 256) + _linear(256, 200)
        cell = _linear(F_CELL, 256) + _linear(256, 200)
        convs = _conv(1, 30, 5) + _conv(30, 10, 5) + _conv(10, 5, 5)
        return drug + cell + _linear(400, 256) + convs + _linear(5 * _stack_len(256, [(5, 2), (5, 3), (5, 3)]), 1)
    raise AssertionError(name)


@pytest.mark.parametrize("name,params,drug_dim,cell_dim,dropout", [
    ("graphdrp", 4_740_645, 128, 128, 0.5),
    ("tcnn", 2_070_761, 300, 1320, 0.0),
    ("deepcdr", 535_910, 200, 200, 0.1),
])
def test_architecture_matches_the_official_config(name, params, drug_dim, cell_dim, dropout, tiny_batch, tiny_prepared):
    assert tiny_prepared[1].num_cell_features == F_CELL
    model = _build(name, tiny_prepared[1])
    assert sum(p.numel() for p in model.parameters()) == _official_params(name) == params
    assert model.head.split == (drug_dim, cell_dim)
    # the published dropout unless the config sets one
    rates = {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)}
    assert rates == {dropout}
    assert {m.p for m in build_drp(ModelConfig(drp=name, dropout=0.25), F_CELL).modules()
            if isinstance(m, torch.nn.Dropout)} == {0.25}
    model.eval()
    drug = model.encode_drugs(tiny_batch.drug, tiny_batch.smiles)
    cell = model.encode_cells(tiny_batch.cell)
    assert drug.shape == (tiny_batch.drug.num_graphs, drug_dim) and cell.shape == (len(tiny_batch.cell), cell_dim)


def test_tcnn_positions_matter(tiny_prepared):
    """Flattened, not pooled: the same characters at other positions give another drug code."""
    model = _build("tcnn", tiny_prepared[1]).eval()
    codes = torch.tensor([[67, 67, 79, 0, 0, 0], [0, 0, 0, 67, 67, 79]])
    a, b = model.encode_drugs(None, codes)
    assert not torch.allclose(a, b)


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
