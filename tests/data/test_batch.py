"""DRPBatch's entity tables: each distinct drug and cell line once, indexed by every sample;
per_pair() expands them to one row per sample; select() keeps them whole."""
import numpy as np
import torch

from cldr_dist.data.batch import collate
from conftest import make_samples


def _graph(batch, g):
    """Atoms and edges (atom ids local to the graph) of graph g of batch.drug."""
    d = batch.drug
    lo, hi = int(d.ptr[g]), int(d.ptr[g + 1])
    mask = (d.edge_index[0] >= lo) & (d.edge_index[0] < hi)
    return d.x[lo:hi], d.edge_index[:, mask] - lo


def test_collate_holds_each_cell_line_once(tiny_batch, tiny_prepared):
    cell_rows = [list(tiny_prepared[1].cell_ids).index(c) for c in tiny_batch.cell_ids]
    assert tiny_batch.cell.shape[0] == len(set(tiny_batch.cell_ids)) < len(tiny_batch)
    expected = torch.from_numpy(tiny_prepared[1].cell_features[cell_rows].astype(np.float32))
    assert torch.equal(tiny_batch.cell[tiny_batch.cell_index], expected)
    assert tiny_batch.cell_index.dtype == torch.long and tiny_batch.cell.dtype == torch.float32


def test_per_pair_gives_every_sample_its_own_rows(tiny_batch):
    pairs = tiny_batch.per_pair()
    arange = torch.arange(len(tiny_batch))
    assert torch.equal(pairs.drug_index, arange) and torch.equal(pairs.cell_index, arange)
    assert torch.equal(pairs.cell, tiny_batch.cell[tiny_batch.cell_index])
    assert torch.equal(pairs.smiles, tiny_batch.smiles[tiny_batch.drug_index])
    assert pairs.drug.num_graphs == len(tiny_batch) and torch.equal(pairs.y, tiny_batch.y)
    for i, g in enumerate(tiny_batch.drug_index.tolist()):
        (x, edges), (x_ref, edges_ref) = _graph(pairs, i), _graph(tiny_batch, g)
        assert torch.equal(x, x_ref) and torch.equal(edges, edges_ref)
    assert torch.equal(pairs.drug.batch, torch.repeat_interleave(arange, pairs.drug.ptr.diff()))


def test_select_keeps_entity_tables_and_picks_sample_rows(tiny_batch):
    rows = torch.tensor([5, 0, 7])
    part = tiny_batch.select(rows)
    assert len(part) == 3 and part.cell_ids == [tiny_batch.cell_ids[i] for i in rows.tolist()]
    assert part.drug is tiny_batch.drug and part.cell is tiny_batch.cell
    assert torch.equal(part.cell[part.cell_index], tiny_batch.cell[tiny_batch.cell_index[rows]])
    assert torch.equal(part.caption, tiny_batch.caption[rows])


def test_feature_dtype_casts_entity_features_not_labels(tiny_batch):
    moved = tiny_batch.to("cpu", feature_dtype=torch.bfloat16)
    assert moved.cell.dtype == moved.drug.x.dtype == torch.bfloat16
    assert moved.y.dtype == torch.float32 and moved.cell_index.dtype == torch.long


def test_collate_of_repeated_pairs(tiny_tables, tiny_prepared):
    """A batch of one pair repeated has one drug and one cell row."""
    samples = make_samples(tiny_tables, tiny_prepared, [3, 3, 3])
    batch = collate(samples, tiny_prepared[1])
    assert batch.drug.num_graphs == batch.cell.shape[0] == 1
    assert batch.cell_index.tolist() == batch.drug_index.tolist() == [0, 0, 0]
