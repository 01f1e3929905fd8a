import math

import numpy as np
import pytest

from cldr_dist.data.labels import y_from_ln_ic50
from cldr_dist.eval import metrics as M


def test_perfect_prediction():
    y = np.array([0.1, 0.4, 0.5, 0.9])
    m = M.all_metrics(y, y)
    assert m["rmse"] == 0 and m["mse"] == 0 and m["r2"] == 1
    assert m["pcc"] == pytest.approx(1) and m["scc"] == pytest.approx(1)
    assert m["rmse_ln_ic50"] == pytest.approx(0, abs=1e-9)


def test_against_hand_values_and_numpy():
    rng = np.random.default_rng(0)
    y, p = rng.random(50), rng.random(50)
    assert M.mse(y, p) == pytest.approx(np.mean((y - p) ** 2))
    assert M.rmse(y, p) == pytest.approx(math.sqrt(np.mean((y - p) ** 2)))
    assert M.pearson(y, p) == pytest.approx(np.corrcoef(y, p)[0, 1])
    assert M.r2(y, p) == pytest.approx(1 - np.sum((y - p) ** 2) / np.sum((y - y.mean()) ** 2))
    assert M.mse([0, 0], [1, 3]) == 5.0


def test_spearman_with_ties():
    # ranks of [1, 2, 2, 3] are [0, 1.5, 1.5, 3]; of [10, 20, 30, 40] are [0, 1, 2, 3]
    expected = np.corrcoef([0, 1.5, 1.5, 3], [0, 1, 2, 3])[0, 1]
    assert M.spearman([1, 2, 2, 3], [10, 20, 30, 40]) == pytest.approx(expected)
    assert M.spearman([1, 2, 3, 4], [40, 30, 20, 10]) == pytest.approx(-1)
    assert M.spearman([1, 2, 3], [1, 4, 9]) == pytest.approx(1)   # monotone, not linear


def test_ln_ic50_inverts_the_label():
    ln = np.array([-5.0, 0.0, 2.5, 9.0])
    y = np.array([y_from_ln_ic50(v) for v in ln])
    np.testing.assert_allclose(M.ln_ic50_from_y(y), ln, atol=1e-9)
    assert M.rmse(M.ln_ic50_from_y(y), ln + 1) == pytest.approx(1)
    assert np.isfinite(M.ln_ic50_from_y([0.0, 1.0])).all()


def test_constant_input_gives_zero_correlation():
    assert M.pearson([1, 2, 3], [5, 5, 5]) == 0.0


def test_per_drug_pcc_and_the_within_drug_spread():
    rng = np.random.default_rng(1)
    drugs = np.repeat(["a", "b", "c"], [20, 20, 5])          # c has too few cell lines for a PCC
    y = rng.random(45)
    p = y + 0.1 * rng.random(45)
    per = M.per_drug_pcc(y, p, drugs)
    assert set(per) == {"a", "b"} and per["a"] == pytest.approx(np.corrcoef(y[:20], p[:20])[0, 1])
    assert M.within_drug_spread(p, drugs) == pytest.approx(np.median([p[:20].std(), p[20:40].std(), p[40:].std()]))
    assert not M.ignores_cell_line(M.within_drug_spread(p, drugs))
    drug_only = np.repeat([0.3, 0.6, 0.5], [20, 20, 5])       # one prediction per drug
    assert M.ignores_cell_line(M.within_drug_spread(drug_only, drugs))   # float noise, not exactly 0
    assert M.per_drug_pcc(y, drug_only, drugs) == {"a": 0.0, "b": 0.0}
    assert M.within_drug_spread(p[:1], drugs[:1]) is None and not M.ignores_cell_line(None)
