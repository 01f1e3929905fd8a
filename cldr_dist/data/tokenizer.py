"""A BPE tokenizer trained offline on the dataset's own text, saved with the shards.

SMILES are split into atoms and bonds (the regex of Schwaller et al., Molecular Transformer)
before BPE sees them: BPE on a few hundred drugs otherwise learns each whole SMILES as one token,
a drug-id token that an unseen (drug-blind) drug never trained. English words and cell-line
names are left to BPE.
"""
from __future__ import annotations

import re
from collections.abc import Iterable

from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

from cldr_dist.data.labels import CAPTION_TEMPLATE

SMILES_TOKEN = re.compile(r"(\[[^\]]+]|Br?|Cl?|N|O|S|P|F|I|b|c|n|o|s|p|\(|\)|\.|=|#|-|\+|\\|/|:|~|@|\?|>|\*|\$|%[0-9]{2}|[0-9])")
SOS, EOS = "[SOS]", "[EOS]"
SPECIAL_TOKENS = ["[PAD]", "[UNK]", SOS, EOS]  # [PAD] must be id 0 (data/batch.py PAD_ID)


def split_smiles(smiles: str) -> str:
    """'CC(=O)N' -> 'C C ( = O ) N': one whitespace-separated word per SMILES token."""
    return " ".join(SMILES_TOKEN.findall(smiles))


def caption_words(smiles: str, cell_name: str) -> str:
    """The caption as the tokenizer sees it (labels.caption with the SMILES split into atoms)."""
    return CAPTION_TEMPLATE.format(smiles=split_smiles(smiles), cell=cell_name)


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{SOS} $A {EOS}", special_tokens=[(SOS, tok.token_to_id(SOS)), (EOS, tok.token_to_id(EOS))])
    return tok


def encode_all(tok: Tokenizer, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in tok.encode_batch(texts)]


def load_tokenizer(json_text: str) -> Tokenizer:
    return Tokenizer.from_str(json_text)
