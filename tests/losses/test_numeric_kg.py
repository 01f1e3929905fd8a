import torch
from torch import nn

from cldr_dist.config import LossConfig
from cldr_dist.losses.numeric_kg import NumericKG, NumberTexts, sample_triples, transe_loss

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
    kg = NumericKG(16, margin=1.0, train_relation=train_relation, num_triples=256)
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
