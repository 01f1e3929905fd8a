"""The batch every model consumes: one dataclass, built by `collate` from decoded samples.

Entity-level: each distinct drug of a batch appears once in `drug` (a PyG Batch of graphs) and
`smiles`, each distinct cell line once in `cell`; `drug_index` and `cell_index` map every sample
(pair) to its rows there, so a model encodes each drug and each cell line once per batch and
only its pair-level layers run per sample. `per_pair()` gives the same batch with every pair
holding its own rows: the per-pair reference the entity-level step is tested against.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import numpy as np
import torch
from torch_geometric.data import Batch as GraphBatch

from cldr_dist.data.features import FeatureTables
from cldr_dist.data.wordpiece import CaptionWordPieces

PAD_ID = 0  # tokenizer reserves id 0 for [PAD]; see data/tokenizer.py
ENTITY_FIELDS = ("drug", "smiles", "cell", "caption_prefix_len")   # tables of distinct entities, indexed by *_index


@dataclass
class DRPBatch:
    drug: GraphBatch            # unique drugs of the batch: x (atoms, 90) float, edge_index, batch, ptr
    drug_index: torch.Tensor    # (B,) long: sample -> row of `drug` / `smiles`
    smiles: torch.Tensor        # (U, Ls) long: SMILES character codes, 0-padded (for SMILES CNNs)
    cell: torch.Tensor          # (V, F) float: genomic features of the distinct cell lines
    cell_index: torch.Tensor    # (B,) long: sample -> row of `cell`
    y: torch.Tensor             # (B,) float: normalised response in (0, 1)
    ln_ic50: torch.Tensor       # (B,) float
    number_index: torch.Tensor  # (B,) long: round(y * 1000), the index of the number text
    caption: torch.Tensor       # (B, Lc) long token ids, PAD_ID-padded
    caption_len: torch.Tensor   # (B,) long
    number: torch.Tensor        # (B, Ln) long token ids of the number text, PAD_ID-padded
    number_len: torch.Tensor    # (B,) long
    cell_ids: list[str]
    drug_ids: list[str]
    # model.text_tower=minilm only (collate's `wordpieces`): the captions in MiniLM's WordPiece ids
    caption_wp: torch.Tensor | None = None       # (B, Lw) long, 0-padded (MiniLM's [PAD] is 0 too)
    caption_wp_len: torch.Tensor | None = None   # (B,) long
    # tables with caption_prefix_len (FeatureTables): every caption of unique drug u begins with
    # the same caption_prefix_len[u] tokens (unless caption_pad_to cut it shorter), which the
    # caption tower then encodes once
    caption_prefix_len: torch.Tensor | None = None   # (U,) long, rows of `drug`

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def select(self, rows: torch.Tensor) -> "DRPBatch":
        """The samples `rows` (a long tensor) as a batch of their own. The entity tables stay
        whole (rows no sample uses any more are harmless), only the per-sample fields and the
        indices into the tables are selected."""
        picked = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in ENTITY_FIELDS or v is None:
                picked[f.name] = v
            elif isinstance(v, list):
                picked[f.name] = [v[i] for i in rows.tolist()]
            else:
                picked[f.name] = v[rows.to(v.device)]
        return DRPBatch(**picked)

    def per_pair(self, keep_drugs: bool = False) -> "DRPBatch":
        """The same samples with every pair holding its own drug graph, SMILES and cell row
        (indices = arange(B)) and its caption encoded in full (no shared prefix): the per-pair
        computation, kept only as the reference the entity-level step must equal.
        keep_drugs: drugs stay once per batch (cells and captions per pair), as training ran
        before entity-level steps; benchmarks compare with it."""
        pairs = torch.arange(len(self), device=self.drug_index.device)
        drugs = {} if keep_drugs else dict(drug=_expand_graphs(self.drug, self.drug_index),
                                           smiles=self.smiles[self.drug_index], drug_index=pairs)
        return replace(self, cell=self.cell[self.cell_index], cell_index=pairs, caption_prefix_len=None, **drugs)

    def to(self, device, feature_dtype: torch.dtype | None = None) -> "DRPBatch":
        """Moved to `device`; feature_dtype casts the model's float inputs (atom and cell
        features) to the parameters' dtype (bf16 under DeepSpeed's bf16), never the labels."""
        moved = {}
        for f in fields(self):
            v = getattr(self, f.name)
            moved[f.name] = v.to(device) if hasattr(v, "to") else v
        if feature_dtype is not None:
            drug = moved["drug"]
            drug.x = drug.x.to(feature_dtype)
            moved["cell"] = moved["cell"].to(feature_dtype)
        return DRPBatch(**moved)


def _expand_graphs(drug: GraphBatch, index: torch.Tensor) -> GraphBatch:
    """A graph batch whose graph j is graph index[j] of `drug`, atoms and edges in their
    original order (so message passing sums in the same order as on the entity table)."""
    sizes = drug.ptr[1:] - drug.ptr[:-1]
    new_sizes = sizes[index]
    new_ptr = torch.cat([new_sizes.new_zeros(1), new_sizes.cumsum(0)])
    new_batch = torch.repeat_interleave(torch.arange(len(index), device=index.device), new_sizes)
    atom = drug.ptr[index][new_batch] + torch.arange(len(new_batch), device=index.device) - new_ptr[new_batch]

    # edges grouped by graph, stable, so each graph keeps its edge order
    edge_graph = drug.batch[drug.edge_index[0]]
    order = torch.sort(edge_graph, stable=True).indices
    edge_counts = torch.bincount(edge_graph, minlength=len(sizes))
    edge_ptr = torch.cat([edge_counts.new_zeros(1), edge_counts.cumsum(0)])
    new_edge_counts = edge_counts[index]
    new_edge_ptr = torch.cat([new_edge_counts.new_zeros(1), new_edge_counts.cumsum(0)])
    edge_of = torch.repeat_interleave(torch.arange(len(index), device=index.device), new_edge_counts)
    edge = order[edge_ptr[index][edge_of] + torch.arange(len(edge_of), device=index.device)
                 - new_edge_ptr[edge_of]]
    # atom ids move from the source graph's offset to the copy's
    edge_index = drug.edge_index[:, edge] - drug.ptr[index][edge_of] + new_ptr[edge_of]

    out = GraphBatch(x=drug.x[atom], edge_index=edge_index, batch=new_batch, ptr=new_ptr)
    out._num_graphs = len(index)
    return out


def graph_batch(graphs: list[tuple[np.ndarray, np.ndarray]]) -> GraphBatch:
    """(atoms (n, 90), edge_index (2, e)) per drug -> one PyG batch, graph g = graphs[g]."""
    xs, edges, graph_of_atom, n_atoms = [], [], [], 0
    for g, (atoms, edge_index) in enumerate(graphs):
        xs.append(atoms)
        edges.append(edge_index + n_atoms)
        graph_of_atom.append(np.full(len(atoms), g, dtype=np.int64))
        n_atoms += len(atoms)
    sizes = np.array([len(a) for a in xs], dtype=np.int64)
    drug = GraphBatch(
        x=torch.from_numpy(np.concatenate(xs).astype(np.float32)),
        edge_index=torch.from_numpy(np.concatenate(edges, axis=1).astype(np.int64)),
        batch=torch.from_numpy(np.concatenate(graph_of_atom)),
        ptr=torch.from_numpy(np.concatenate([[0], np.cumsum(sizes)])),
    )
    drug._num_graphs = len(graphs)
    return drug


def pad_sequences(seqs: list[np.ndarray], length: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    lens = np.array([len(s) for s in seqs], dtype=np.int64)
    width = int(lens.max()) if length is None else length
    out = np.full((len(seqs), width), PAD_ID, dtype=np.int64)
    for i, s in enumerate(seqs):
        n = min(len(s), width)
        out[i, :n] = s[:n]
    return torch.from_numpy(out), torch.from_numpy(np.minimum(lens, width))


def _caption_prefix_len(tables: FeatureTables, unique_drugs: np.ndarray, drug_index: np.ndarray,
                        caption: torch.Tensor) -> torch.Tensor | None:
    """The tables' per-drug caption prefix lengths for this batch, checked against its captions:
    a prefix that differs between two pairs of a drug (tables of another tokenizer) would make
    shared-prefix encoding silently wrong."""
    if tables.caption_prefix_len is None:
        return None
    prefix_len = tables.caption_prefix_len[unique_drugs].astype(np.int64)
    ids = caption.numpy()
    width = min(int(prefix_len.max()), ids.shape[1])
    some_row = np.zeros(len(unique_drugs), dtype=np.int64)
    some_row[drug_index] = np.arange(len(drug_index))   # any one pair of each drug
    in_prefix = np.arange(width) < prefix_len[drug_index, None]
    if np.any((ids[:, :width] != ids[some_row][drug_index, :width]) & in_prefix):
        raise ValueError("captions of one drug differ within its caption_prefix_len: the feature "
                         "tables do not belong to these captions' tokenizer")
    return torch.from_numpy(prefix_len)


def collate(samples: list[dict], tables: FeatureTables,
            caption_pad_to: int | None = None, number_pad_to: int | None = None,
            wordpieces: CaptionWordPieces | None = None) -> DRPBatch:
    """samples: decoded shard samples ({"meta": dict, "caption": int array}).

    caption_pad_to / number_pad_to = None pads to the longest sequence in the batch;
    an int pads (or truncates) to that fixed length, as the paper's 300/100 do.
    wordpieces: also carry the captions' MiniLM ids (caption_wp), padded to the longest.
    """
    drug_rows = np.array([s["meta"]["drug"] for s in samples], dtype=np.int64)
    cell_rows = np.array([s["meta"]["cell"] for s in samples], dtype=np.int64)
    unique_drugs, drug_index = np.unique(drug_rows, return_inverse=True)
    unique_cells, cell_index = np.unique(cell_rows, return_inverse=True)

    drug = graph_batch([tables.drug_graph(int(d)) for d in unique_drugs])
    smiles, _ = pad_sequences([tables.smiles_codes(int(d)) for d in unique_drugs], None)
    number_index = np.array([s["meta"]["number"] for s in samples], dtype=np.int64)
    caption, caption_len = pad_sequences([s["caption"] for s in samples], caption_pad_to)
    number, number_len = pad_sequences([tables.number_tokens(int(i)) for i in number_index], number_pad_to)
    caption_wp = caption_wp_len = None
    if wordpieces is not None:
        caption_wp, caption_wp_len = pad_sequences([wordpieces.ids(d, c) for d, c in zip(drug_rows, cell_rows)], None)
    return DRPBatch(
        drug=drug,
        drug_index=torch.from_numpy(drug_index.astype(np.int64)),
        smiles=smiles,
        cell=torch.from_numpy(tables.cell_features[unique_cells].astype(np.float32)),
        cell_index=torch.from_numpy(cell_index.astype(np.int64)),
        y=torch.tensor([s["meta"]["y"] for s in samples], dtype=torch.float32),
        ln_ic50=torch.tensor([s["meta"]["ln_ic50"] for s in samples], dtype=torch.float32),
        number_index=torch.from_numpy(number_index),
        caption=caption,
        caption_len=caption_len,
        number=number,
        number_len=number_len,
        cell_ids=[s["meta"]["cell_id"] for s in samples],
        drug_ids=[s["meta"]["drug_id"] for s in samples],
        caption_wp=caption_wp,
        caption_wp_len=caption_wp_len,
        caption_prefix_len=_caption_prefix_len(tables, unique_drugs, drug_index, caption),
    )
