"""The entity-level step (each distinct drug and cell line encoded once, fc1 split into
per-entity products, only the layers after it per pair) equals the per-pair computation: the
same model on batch.per_pair(), where every pair holds its own drug and cell rows. Loss and
every gradient agree to RTOL of each tensor's largest entry, for each base model, with the
training objectives, in train and eval mode (dropout off: a per-entity dropout mask is shared
by an entity's pairs, so with dropout on the two are different draws, not different maths)."""
import numpy as np
import pytest
import torch
from torch import nn

from cldr_dist.config import LossConfig, ModelConfig
from cldr_dist.data.batch import collate
from cldr_dist.losses.numeric_kg import NumberTexts
from cldr_dist.models.cldr import build_model
from cldr_dist.models.drp.base import BRANCH_DIM, FusionHead
from cldr_dist.train.objectives import FinetuneObjective, PretrainObjective
from conftest import make_samples

MODELS = ["graphdrp", "tcnn", "deepcdr"]
MODES = ["train", "eval"]
DRUGS, CELLS = 5, 8   # the batch: every tiny-GDSC pair of 5 drugs x 8 cell lines, shuffled
RTOL = 1e-5           # the bound; absolute slack is RTOL x the tensor's largest entry
SEED = 0


@pytest.fixture(scope="module")
def grid_batch(tiny_tables, tiny_prepared):
    drows, crows = tiny_prepared[3], tiny_prepared[4]
    rows = np.flatnonzero((drows < DRUGS) & (crows < CELLS))
    rows = np.random.default_rng(SEED).permutation(rows)
    return collate(make_samples(tiny_tables, tiny_prepared, rows), tiny_prepared[1])


def _objective(kind, name, prepared, mode):
    torch.manual_seed(SEED)
    loss_cfg = LossConfig()
    model = build_model(ModelConfig(drp=name, dropout=0.0), loss_cfg, prepared[0].get_vocab_size(),
                        prepared[1].num_cell_features)
    objective = (FinetuneObjective(model) if kind == "finetune"
                 else PretrainObjective(model, NumberTexts(prepared[1]), loss_cfg, SEED))
    return objective.train(mode == "train")


def _loss_and_grads(objective, batch):
    if isinstance(objective, PretrainObjective):   # the same TransE triples on both paths
        objective.generator.manual_seed(SEED)
    loss, _ = objective(batch)
    named = [(n, p) for n, p in objective.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
    return loss.detach(), dict(zip([n for n, _ in named], grads))


def _assert_within_bound(actual, expected, what):
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=RTOL * expected.abs().max().item(),
                               msg=lambda m: f"{what}: {m}")


def test_batch_really_repeats_drugs_and_cells(grid_batch):
    assert len(grid_batch) == DRUGS * CELLS
    assert grid_batch.drug.num_graphs == DRUGS < len(grid_batch)
    assert grid_batch.cell.shape[0] == CELLS < len(grid_batch)
    pairs = grid_batch.per_pair()
    assert pairs.drug.num_graphs == pairs.cell.shape[0] == pairs.smiles.shape[0] == len(grid_batch)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ["finetune", "pretrain"])
@pytest.mark.parametrize("name", MODELS)
def test_entity_step_equals_per_pair(name, kind, mode, grid_batch, tiny_prepared):
    objective = _objective(kind, name, tiny_prepared, mode)
    loss, grads = _loss_and_grads(objective, grid_batch)
    ref_loss, ref_grads = _loss_and_grads(objective, grid_batch.per_pair())
    _assert_within_bound(loss, ref_loss, "loss")
    assert grads.keys() == ref_grads.keys()
    for n, g in ref_grads.items():
        assert (grads[n] is None) == (g is None), n
        if g is not None:
            _assert_within_bound(grads[n], g, n)
    # not vacuous: every base-model parameter the loss reaches has a gradient (pretraining
    # aligns the embedding, so the regression output layer is outside its loss)
    unused = ("model.drp.head.out.", "model.drp.head.convs.") if kind == "pretrain" else ()
    reached = [n for n in grads if n.startswith("model.drp.") and not n.startswith(unused)]
    assert reached and all(grads[n] is not None and grads[n].abs().sum() > 0 for n in reached)


def test_split_fc1_equals_linear_on_the_concatenation():
    torch.manual_seed(SEED)
    head = FusionHead(BRANCH_DIM, BRANCH_DIM, embed_dim=16, dropout=0.0)
    drug, cell = torch.randn(3, BRANCH_DIM), torch.randn(4, BRANCH_DIM)
    drug_index, cell_index = torch.tensor([0, 2, 2, 1, 0]), torch.tensor([3, 3, 0, 1, 2])
    drug_part, cell_part = head.entity_parts(drug, cell)
    concat = torch.cat([drug[drug_index], cell[cell_index]], dim=1)
    expected = head.fc1(concat)
    _assert_within_bound(drug_part[drug_index] + cell_part[cell_index], expected, "fc1")
    # one nn.Linear over the concatenation, as before the split: state dicts are unchanged
    assert isinstance(head.fc1, nn.Linear) and head.fc1.in_features == 2 * BRANCH_DIM
    assert sorted(head.state_dict()) == ["fc1.bias", "fc1.weight", "fc2.bias", "fc2.weight",
                                         "out.bias", "out.weight"]


@pytest.mark.parametrize("kind", ["finetune", "pretrain"])
def test_drugs_only_baseline_equals_entity_step(kind, grid_batch, tiny_prepared):
    """train.encoding=drugs_only (training before entity steps, the benchmark's baseline) is the
    same computation: drugs once per batch, cells and full captions per pair."""
    objective = _objective(kind, "graphdrp", tiny_prepared, "eval")
    baseline = grid_batch.per_pair(keep_drugs=True)
    assert baseline.drug.num_graphs == DRUGS and baseline.cell.shape[0] == len(grid_batch)
    assert baseline.caption_prefix_len is None
    loss, grads = _loss_and_grads(objective, grid_batch)
    ref_loss, ref_grads = _loss_and_grads(objective, baseline)
    _assert_within_bound(loss, ref_loss, "loss")
    for n, g in ref_grads.items():
        if g is not None:
            _assert_within_bound(grads[n], g, n)
