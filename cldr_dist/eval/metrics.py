"""Regression metrics on y (in (0, 1)) and on ln(IC50); pure numpy."""
from __future__ import annotations

import numpy as np

MIN_SAMPLES_PER_DRUG = 10  # a drug's PCC over fewer cell lines is noise
CONSTANT_SPREAD = 1e-6     # float32 rounding of one value is ~1e-7; a model that uses cell lines spreads ~1e-2
LN_IC50_SCALE = 10.0  # y = sigmoid(0.1 * ln_ic50)  =>  ln_ic50 = 10 * logit(y)
Y_EPS = 1e-6          # keeps logit finite for predictions at exactly 0 or 1


def mse(y, p) -> float:
    y, p = np.asarray(y, float), np.asarray(p, float)
    return float(np.mean((y - p) ** 2))


def rmse(y, p) -> float:
    return float(np.sqrt(mse(y, p)))


def pearson(y, p) -> float:
    y, p = np.asarray(y, float), np.asarray(p, float)
    if len(y) == 0 or np.ptp(y) == 0 or np.ptp(p) == 0:
        return 0.0   # constant input: no correlation (its mean's rounding must not fake one)
    yc, pc = y - y.mean(), p - p.mean()
    return float((yc * pc).sum() / np.sqrt((yc ** 2).sum() * (pc ** 2).sum()))


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1 with ties given their average rank (as scipy.stats.rankdata - 1)."""
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    ranks = np.empty(len(x), float)
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_x)) + 1]
    ends = np.r_[starts[1:], len(x)]
    for s, e in zip(starts, ends):
        ranks[order[s:e]] = (s + e - 1) / 2
    return ranks


def spearman(y, p) -> float:
    return pearson(_ranks(np.asarray(y, float)), _ranks(np.asarray(p, float)))


def r2(y, p) -> float:
    y, p = np.asarray(y, float), np.asarray(p, float)
    ss_tot = ((y - y.mean()) ** 2).sum()
    return float(1 - ((y - p) ** 2).sum() / ss_tot) if ss_tot > 0 else 0.0


def ln_ic50_from_y(y) -> np.ndarray:
    y = np.clip(np.asarray(y, float), Y_EPS, 1 - Y_EPS)
    return LN_IC50_SCALE * np.log(y / (1 - y))


def all_metrics(y, p) -> dict[str, float]:
    """Every reported metric for true y and predicted y."""
    return {"rmse": rmse(y, p), "mse": mse(y, p), "pcc": pearson(y, p), "scc": spearman(y, p),
            "r2": r2(y, p), "rmse_ln_ic50": rmse(ln_ic50_from_y(y), ln_ic50_from_y(p))}


def _drug_rows(drug_ids, min_samples: int):
    """(drug, row indices) for each drug with at least min_samples rows."""
    drug_ids = np.asarray(drug_ids)
    drugs, inverse, counts = np.unique(drug_ids, return_inverse=True, return_counts=True)
    order = np.argsort(inverse, kind="stable")
    for drug, rows in zip(drugs, np.split(order, np.cumsum(counts)[:-1])):
        if len(rows) >= min_samples:
            yield str(drug), rows


def per_drug_pcc(y, p, drug_ids, min_samples: int = MIN_SAMPLES_PER_DRUG) -> dict[str, float]:
    """PCC over each drug's cell lines, for drugs with at least min_samples pairs: how well a
    model ranks cell lines for one drug, which the pooled PCC hides behind drug differences."""
    y, p = np.asarray(y, float), np.asarray(p, float)
    return {drug: pearson(y[rows], p[rows]) for drug, rows in _drug_rows(drug_ids, min_samples)}


def mean_per_drug_pcc(y, p, drug_ids) -> float | None:
    """The mean of per_drug_pcc over drugs; None when no drug has enough pairs."""
    per = per_drug_pcc(y, p, drug_ids)
    return float(np.mean(list(per.values()))) if per else None


def within_drug_spread(p, drug_ids, min_samples: int = 2) -> float | None:
    """The median over drugs of the std of a drug's predictions across its cell lines; 0 when
    a model predicts one value per drug, i.e. ignores the cell line. None: no drug has enough pairs."""
    p = np.asarray(p, float)
    spreads = [p[rows].std() for _, rows in _drug_rows(drug_ids, min_samples)]
    return float(np.median(spreads)) if spreads else None


def ignores_cell_line(spread: float | None) -> bool:
    return spread is not None and spread < CONSTANT_SPREAD
