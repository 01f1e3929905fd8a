import pytest
import torch
from torch import nn

from cldr_dist.config import LossConfig
from cldr_dist.losses.numeric_kg import (NumericKG, NumberTexts, chain_triples, sample_triples,
                                         successor_hits, transe_loss)

STEPS = 150


def test_triples_are_successors_and_negatives_differ():
    t = sample_triples(500, 1000, torch.Generator().manual_seed(0))
    assert torch.equal(t.tail, t.head + 1) and t.tail.max() <= 999
    changed = (t.neg_head != t.head) ^ (t.neg_tail != t.tail)   # exactly one side corrupted
    assert changed.all()
    assert t.neg_head.min() >= 0 and t.neg_tail.max() <= 999


def test_transe_loss_definition():
    h, t = torch.zeros(1, 3), torch.ones(1, 3)
    r = torch.ones(3)
    assert transe_loss(h, t, h, h, r, 1.0).item() == 0.0          # pos 0, neg 3: beyond margin
    assert transe_loss(h, h, h, t, r, 1.0).item() == 1.0 + 3 - 0  # pos 3, neg 0


def _train(train_relation: bool):
    torch.manual_seed(0)
    table = nn.Embedding(1000, 16)     # stand-in for the number tower: free entity vectors
    kg = NumericKG(16, margin=1.0, train_relation=train_relation, num_triples=256, form="sampled")
    opt = torch.optim.Adam([*table.parameters(), *[p for p in kg.parameters() if p.requires_grad]], lr=0.05)
    r0 = kg.relation.detach().clone()
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(STEPS):
        loss = kg(table, gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return table, kg, r0, losses


def test_loss_falls_and_neighbours_end_closer():
    table, kg, r0, losses = _train(True)
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10
    assert not torch.equal(kg.relation.detach(), r0)
    e = nn.functional.normalize(table.weight.detach(), dim=1)
    near = (e[1:] - e[:-1]).abs().sum(1).mean()
    far = (e[100:] - e[:-100]).abs().sum(1).mean()
    assert near < far


def test_frozen_relation_stays_fixed():
    _, kg, r0, losses = _train(False)
    assert not kg.relation.requires_grad
    assert torch.equal(kg.relation.detach(), r0)
    assert losses[-1] < losses[0]


def test_transe_trains_the_number_tower(tiny_prepared):
    from cldr_dist.config import ModelConfig
    from cldr_dist.models.cldr import build_model
    model = build_model(ModelConfig(drp="deepcdr", text_layers=1), LossConfig(),
                        tiny_prepared[0].get_vocab_size(), tiny_prepared[1].num_cell_features)
    kg = NumericKG(128, num_triples=16)
    kg(NumberTexts(tiny_prepared[1]).encoder(model), torch.Generator().manual_seed(0)).backward()
    assert model.text.number.proj.weight.grad.abs().sum() > 0
    assert model.text.caption.proj.weight.grad is None


def test_all_form_is_cldrs_summed_chain():
    """form "all": every number text encoded, the margin loss summed over all 999 chain triples
    on the raw features, one corrupted triple each."""
    torch.manual_seed(1)
    table = nn.Embedding(1000, 8)
    kg = NumericKG(8, margin=1.0, form="all")
    loss = kg(table, torch.Generator().manual_seed(5))
    t = chain_triples(1000, torch.Generator().manual_seed(5))
    assert torch.equal(t.head, torch.arange(999)) and torch.equal(t.tail, torch.arange(1, 1000))
    assert bool(((t.neg_head != t.head) | (t.neg_tail != t.tail)).all())
    e, r = table.weight, kg.relation
    pos = (e[t.head] + r - e[t.tail]).abs().sum(1)
    neg = (e[t.neg_head] + r - e[t.neg_tail]).abs().sum(1)
    assert torch.allclose(loss, torch.relu(1.0 + pos - neg).sum())
    sampled = NumericKG(8, margin=1.0, form="sampled", num_triples=64)(table, torch.Generator().manual_seed(5))
    assert sampled.item() < loss.item() / 100   # a mean over normalised entities, not a sum


def test_successor_hits_reads_the_chain():
    torch.manual_seed(0)
    r = torch.rand(16) + 0.5
    chain = torch.arange(1000.0)[:, None] * r + 0.01 * torch.randn(1000, 16)
    assert successor_hits(chain, r, normalise=False) == 1.0
    assert successor_hits(torch.randn(1000, 16), r, normalise=False) < 0.05    # chance: 10 / 1000
    # trained free entity vectors: TransE puts each successor among the nearest, for both forms
    for form in ("sampled", "all"):
        torch.manual_seed(0)
        table = nn.Embedding(1000, 16)
        kg = NumericKG(16, form=form)
        before = successor_hits(table.weight.detach(), kg.relation.detach(), normalise=form == "sampled")
        opt = torch.optim.Adam([*table.parameters(), *kg.parameters()], lr=0.05)
        gen = torch.Generator().manual_seed(0)
        for _ in range(STEPS):
            loss = kg(table, gen)
            opt.zero_grad()
            loss.backward()
            opt.step()
        after = successor_hits(table.weight.detach(), kg.relation.detach(), normalise=form == "sampled")
        assert before < 0.05 and after > 0.5, (form, before, after)


def test_unknown_kg_form_is_an_error():
    with pytest.raises(ValueError, match="kg form"):
        NumericKG(8, form="some")
