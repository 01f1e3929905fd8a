"""Classical baselines on the tiny shards: features, fallbacks, and that a learned baseline
beats the floors it is meant to beat."""
import numpy as np
import pytest

from cldr_dist.data.reader import open_shards
from cldr_dist.eval.classical import (ClassicalConfig, PartTable, drug_mean, fit_predict,
                                      morgan_fingerprints, part_table)
from cldr_dist.eval.metrics import rmse


def test_morgan_fingerprints_are_bits_and_differ_between_drugs():
    fp = morgan_fingerprints(["CCO", "c1ccccc1O", "CCO"], radius=2, bits=256)
    assert fp.shape == (3, 256) and set(np.unique(fp)) <= {0, 1}
    assert (fp[0] == fp[2]).all() and (fp[0] != fp[1]).any()


def test_drug_mean_falls_back_to_train_mean_for_an_unseen_drug():
    def table(drugs, y):
        n = len(drugs)
        return PartTable(np.zeros(n, int), np.zeros(n, int), np.asarray(y, float), np.asarray(drugs), np.asarray(["c"] * n))
    train = table(["a", "a", "b"], [0.2, 0.4, 0.9])
    assert drug_mean(train, table(["a", "b", "new"], [0, 0, 0])) == pytest.approx([0.3, 0.9, 0.5])


def test_part_table_reads_every_sample_of_a_part(tiny_shards):
    shards = open_shards(tiny_shards)
    t = part_table(shards, "mixed", "test")
    assert len(t.y) == shards.part("mixed", "test")["num_samples"]
    assert ((t.y > 0) & (t.y < 1)).all() and t.drug_rows.max() < len(shards.features.drug_ids)


@pytest.mark.parametrize("kind", ["ridge", "gbm"])
def test_learned_baselines_beat_the_train_mean_on_mixed(tiny_shards, kind):
    shards = open_shards(tiny_shards)
    train, test = part_table(shards, "mixed", "train"), part_table(shards, "mixed", "test")
    cfg = ClassicalConfig(morgan_bits=256, gbm_iters=30)
    p = fit_predict(kind, train, test, shards, cfg, seed=0)
    assert p.shape == test.y.shape and ((p >= 0) & (p <= 1)).all()
    assert rmse(test.y, p) < rmse(test.y, fit_predict("train_mean", train, test, shards, cfg, seed=0))


def test_unknown_baseline_is_named(tiny_shards):
    shards = open_shards(tiny_shards)
    t = part_table(shards, "mixed", "test")
    with pytest.raises(ValueError, match="unknown classical baseline 'svm'"):
        fit_predict("svm", t, t, shards, ClassicalConfig(), seed=0)
