"""Each drug's caption prefix length (FeatureTables.caption_prefix_len), which lets the caption
tower encode the prefix once per drug: exact, carried by collate, checked against the captions."""
import dataclasses
from pathlib import Path

import numpy as np
import pytest

from cldr_dist.data.batch import collate
from cldr_dist.data.features import FeatureTables
from cldr_dist.data.reader import open_shards
from cldr_dist.data.shards import caption_prefix_lengths
from cldr_dist.data.tokenizer import SOS, caption_words
from conftest import make_samples


def test_prefix_is_sos_and_the_words_through_the_smiles(tiny_prepared):
    tokenizer, features = tiny_prepared[0], tiny_prepared[1]
    for row in (0, len(features.drug_smiles) - 1):
        smiles = str(features.drug_smiles[row])
        ids = tokenizer.encode(caption_words(smiles, str(features.cell_names[0]))).ids
        words = tokenizer.encode(caption_words(smiles, "X").split(" and X")[0], add_special_tokens=False).ids
        assert ids[0] == tokenizer.token_to_id(SOS)
        assert features.caption_prefix_len[row] == 1 + len(words)
        assert ids[1:features.caption_prefix_len[row]] == words
    np.testing.assert_array_equal(caption_prefix_lengths(tokenizer, features.drug_smiles),
                                  features.caption_prefix_len)


def test_collate_carries_prefix_per_unique_drug(tiny_batch, tiny_prepared):
    features = tiny_prepared[1]
    drug_rows = [int(np.flatnonzero(features.drug_ids == d)[0]) for d in tiny_batch.drug_ids]
    per_pair = tiny_batch.caption_prefix_len[tiny_batch.drug_index].numpy()
    np.testing.assert_array_equal(per_pair, features.caption_prefix_len[drug_rows])
    first = {}
    for i, d in enumerate(tiny_batch.drug_index.tolist()):
        first.setdefault(d, i)
        n = per_pair[i]
        assert tiny_batch.caption[i, :n].tolist() == tiny_batch.caption[first[d], :n].tolist()


def test_collate_refuses_prefix_lengths_of_other_captions(tiny_tables, tiny_prepared):
    rows = np.random.default_rng(0).choice(len(tiny_tables.responses), 64, replace=False)
    samples = make_samples(tiny_tables, tiny_prepared, rows)
    features = tiny_prepared[1]
    # 2 more tokens reach into the cell's name, which differs between a drug's pairs
    wrong = dataclasses.replace(features, caption_prefix_len=features.caption_prefix_len + 2)
    with pytest.raises(ValueError, match="caption_prefix_len"):
        collate(samples, wrong)
    older = dataclasses.replace(features, caption_prefix_len=None)
    assert collate(samples, older).caption_prefix_len is None


def test_open_shards_derives_it_and_features_npz_does_not_hold_it(tiny_shards, tiny_prepared):
    shards = open_shards(tiny_shards)
    np.testing.assert_array_equal(shards.features.caption_prefix_len, tiny_prepared[1].caption_prefix_len)
    stored = np.load(Path(tiny_shards) / shards.manifest["features"]["file"])
    assert "caption_prefix_len" not in stored.files
    assert FeatureTables.from_bytes(tiny_prepared[1].to_bytes()).caption_prefix_len is None
