"""One model's predictions for every (compound, cell line) pair of a screen.

The cell branch and fc1's cell part run once per scorer (once per worker), the drug branch and
fc1's drug part once per compound, and only the head's per-pair layers per pair: the same
arithmetic as the model's forward pass on a batch of those pairs (models/drp/base.py).

Zero-shot (CLDR models): a pair's prediction is the number text whose text embedding, with the
pair's own caption, is nearest its sample embedding (eval/zeroshot.py). Its fusion MLP runs
over all 1000 number texts per pair, so it costs about a thousand times the regression
prediction: it is on by default for a handful of compounds, and `--zeroshot off` skips it.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from cldr_dist.data.batch import graph_batch, pad_sequences
from cldr_dist.data.labels import CAPTION_TEMPLATE, NUM_NUMBER_TEXTS
from cldr_dist.data.shards import SMILES_FIELD, drug_pieces, encode_pieces
from cldr_dist.data.tokenizer import EOS, SOS, load_tokenizer, split_smiles
from cldr_dist.eval.zeroshot import SAMPLES_PER_CHUNK, nearest_number
from cldr_dist.inference.bundle import Bundle
from cldr_dist.inference.inputs import Compounds
from cldr_dist.losses.numeric_kg import NumberTexts


class PairScorer:
    """One exported model and one set of cell lines (features already in the model's column
    order); `score` then predicts any number of compounds against all of those cell lines."""

    def __init__(self, bundle: Bundle, cell_features: np.ndarray, cell_names: list[str], zeroshot: bool):
        self.bundle, self.model, self.device = bundle, bundle.model, bundle.device
        self.drp = self.model.drp
        self.num_cells = len(cell_features)
        with torch.no_grad():
            cells = torch.from_numpy(np.asarray(cell_features, dtype=np.float32)).to(self.device)
            self.cell_part = self.drp.head.cell_part(self.drp.encode_cells(cells))   # (V, first layer)
        self.zeroshot = zeroshot
        if zeroshot:
            if bundle.cfg.model.text_tower != "scratch":
                raise ValueError(f"{bundle.path}: zero-shot prediction supports the scratch text tower "
                                 f"(this model's is {bundle.cfg.model.text_tower}); pass --zeroshot off")
            self.tokenizer = load_tokenizer(bundle.tokenizer_json)
            tail = CAPTION_TEMPLATE.split(SMILES_FIELD)[1]
            self.cell_tokens = encode_pieces(self.tokenizer, [tail.format(cell=n) for n in cell_names])
            self.sos = np.asarray([self.tokenizer.token_to_id(SOS)], dtype=np.int64)
            self.eos = np.asarray([self.tokenizer.token_to_id(EOS)], dtype=np.int64)
            numbers = NumberTexts(bundle.tables, pad_to=bundle.cfg.model.number_pad_to or None)
            with torch.no_grad():
                self.number_feats = self.model.encode_number_texts(
                    numbers.ids.to(self.device), numbers.lens.to(self.device), numbers.index.to(self.device))

    @torch.no_grad()
    def score(self, compounds: Compounds) -> dict[str, np.ndarray]:
        """{"y": (U, V)} normalised responses, and "zeroshot_y" (U, V) when zero-shot is on."""
        U, V = len(compounds), self.num_cells
        graphs = graph_batch(compounds.graphs).to(self.device)
        smiles, _ = pad_sequences(compounds.codes, None)
        drug = self.drp.encode_drugs(graphs, smiles.to(self.device))
        drug_part = self.drp.head.drug_part(drug)                                   # (U, first layer)
        y, emb = self.drp.head.grid(drug_part, self.cell_part)                     # (U, V), (U, V, E)
        out = {"y": y.float().cpu().numpy()}
        if self.zeroshot:
            drug_index = torch.arange(U, device=self.device).repeat_interleave(V)
            cell_index = torch.arange(V, device=self.device).repeat(U)
            sample = F.normalize(emb.reshape(U * V, -1), dim=-1)
            out["zeroshot_y"] = self._zeroshot(compounds, sample, drug_index, cell_index).reshape(U, V)
        return out

    def _zeroshot(self, compounds: Compounds, sample: torch.Tensor, drug_index: torch.Tensor,
                  cell_index: torch.Tensor) -> np.ndarray:
        cfg = self.bundle.cfg.model
        drug_tokens = encode_pieces(self.tokenizer, drug_pieces([split_smiles(s) for s in compounds.smiles]))
        prefix_len = torch.tensor([len(self.sos) + len(t) for t in drug_tokens], device=self.device)
        captions = [np.concatenate([self.sos, drug_tokens[d], self.cell_tokens[c], self.eos])
                    for d, c in zip(drug_index.tolist(), cell_index.tolist())]
        ids, lens = pad_sequences(captions, cfg.caption_pad_to or None)
        if ids.shape[1] > cfg.caption_context:   # a SMILES longer than training's: cut as caption_pad_to cuts
            ids, lens = ids[:, :cfg.caption_context], lens.clamp(max=cfg.caption_context)
        caption = self.model.text.caption(ids.to(self.device), lens.to(self.device), drug_index, prefix_len)
        preds = []
        for rows in torch.split(torch.arange(len(captions), device=self.device), SAMPLES_PER_CHUNK):
            texts = F.normalize(self.model.text.fuse(caption[rows, None, :], self.number_feats[None]), dim=-1)
            preds.append(nearest_number(sample[rows], texts).cpu())
        return torch.cat(preds).numpy() / NUM_NUMBER_TEXTS
