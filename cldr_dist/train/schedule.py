"""The learning rate of every optimizer step, and which epoch's weights a run keeps.

Large global batches (4k-16k pairs) train well with a linear warmup then a decay (Goyal et
al. 2017; the CLIP recipe). The rate is a pure function of the optimizer step, so a resumed
run continues the exact schedule from its checkpoint's step with no scheduler state to save.

Learning-rate scaling: with lr_scaling=none, train.lr is the rate of the run's global batch.
With linear (or sqrt), train.lr is the rate for train.lr_base_batch pairs and the run uses
lr * (global/base) (or its square root), so a config keeps its meaning on more workers.
"""
from __future__ import annotations

import math

SCHEDULES = ("constant", "cosine", "linear")
LR_SCALING = ("none", "linear", "sqrt")
# The validation numbers a run can select and stop on, and whether lower is better.
LOWER_IS_BETTER = {"val_mse": True, "val_rmse": True, "val_pcc": False, "val_scc": False,
                   "val_drug_pcc": False, "val_zeroshot_pcc": False}
SELECTABLE = {"finetune": ("val_mse", "val_rmse", "val_pcc", "val_scc", "val_drug_pcc"),
              "pretrain": ("val_zeroshot_pcc",)}
# Each mode's default: finetuning regresses y (MSE, as GraphDRP selects); pretraining has no
# regression head yet, its number is zero-shot PCC.
DEFAULT_SELECT_METRIC = {"finetune": "val_mse", "pretrain": "val_zeroshot_pcc"}


def scaled_lr(lr: float, global_batch: int, rule: str, base_batch: int) -> float:
    if rule == "none":
        return lr
    ratio = global_batch / base_batch
    return lr * (ratio if rule == "linear" else math.sqrt(ratio))


def lr_at(step: int, total_steps: int, warmup_steps: int, peak_lr: float, schedule: str,
          min_lr_ratio: float = 0.0) -> float:
    """The rate of optimizer step `step` (0-based): linear warmup from peak/warmup to peak over
    warmup_steps, then constant, or a cosine or linear decay to min_lr_ratio * peak at the last step."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return peak_lr
    decay_steps = max(1, total_steps - warmup_steps - 1)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
    return peak_lr * (min_lr_ratio + (1 - min_lr_ratio) * shape)


def select_metric(mode: str, name: str = "") -> tuple[str, bool]:
    """The validation number a run in `mode` selects on (train.select_metric, empty: the mode's
    default) and whether lower is better."""
    name = name or DEFAULT_SELECT_METRIC[mode]
    return name, LOWER_IS_BETTER[name]


def is_better(score: float, best: float | None, lower_is_better: bool) -> bool:
    if best is None:
        return True
    return score < best if lower_is_better else score > best


def takes_selection(score: float | None, best: float | None, lower_is_better: bool) -> bool:
    """Whether an epoch with validation `score` becomes the selected one. An epoch without a
    score (None, or NaN from a constant prediction) is selected only while no epoch has had
    one, so the newest weights stand; it never displaces a scored best."""
    if score is None or math.isnan(score):
        return best is None
    return is_better(score, best, lower_is_better)
