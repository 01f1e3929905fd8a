"""Regression metrics on y (in (0, 1)) and on ln(IC50); pure numpy."""
from __future__ import annotations

import numpy as np

LN_IC50_SCALE = 10.0  # y = sigmoid(0.1 * ln_ic50)  =>  ln_ic50 = 10 * logit(y)
Y_EPS = 1e-6          # keeps logit finite for predictions at exactly 0 or 1


def mse(y, p) -> float:
    y, p = np.asarray(y, float), np.asarray(p, float)
    return float(np.mean((y - p) ** 2))


def rmse(y, p) -> float:
    return float(np.sqrt(mse(y, p)))


def pearson(y, p) -> float:
    y, p = np.asarray(y, float), np.asarray(p, float)
    yc, pc = y - y.mean(), p - p.mean()
    denom = np.sqrt((yc ** 2).sum() * (pc ** 2).sum())
    return float((yc * pc).sum() / denom) if denom > 0 else 0.0   # constant input: no correlation


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
