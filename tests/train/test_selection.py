"""Best-validation selection and early stopping through the real trainer: the test metrics a
finetune run reports are those of its best validation epoch's weights, which its checkpoint
carries, and a run stops once `patience` epochs pass without a better validation score (MSE,
or the train.select_metric chosen)."""
import csv
from pathlib import Path

import pytest
import torch

from cldr_dist.data.reader import open_shards
from cldr_dist.train import trainer
from cldr_dist.train.checkpoint import BEST_MODEL_FILE, MODEL_FILE
from cldr_dist.train.loop import evaluate, plain_copy

from tests.conftest import train_config

EPOCHS, PATIENCE = 2, 1


def epoch_values(csv_path: Path, name: str) -> dict[int, float]:
    with open(csv_path) as f:
        return {int(r["epoch"]): float(r["value"]) for r in csv.DictReader(f) if r["name"] == name}


@pytest.mark.slow  # a new Ray test: joins make test once it has passed 20 runs in a row
@pytest.mark.parametrize("select_metric, pick", [("", min), ("val_pcc", max)])
def test_test_metrics_come_from_the_best_validation_epoch(ray_local, tiny_shards, tmp_path, select_metric, pick):
    runs = tmp_path / "runs"
    # a high constant rate makes validation scores wander, so early stopping has something to do
    cfg = train_config(tiny_shards, str(runs), "select", "train.mode=finetune", f"train.epochs={EPOCHS}",
                       f"train.patience={PATIENCE}", "train.lr=0.003", "train.lr_schedule=constant",
                       "train.batch_size=64", f"train.select_metric={select_metric}")
    result = trainer.run(cfg)
    assert result.error is None
    m = result.metrics
    scores = epoch_values(runs / "select" / "logs" / "finetune_metrics.csv", select_metric or "val_mse")
    assert sorted(scores) == list(range(1, m["epochs_run"] + 1))
    best = pick(scores, key=scores.get)
    assert m["selected_epoch"] == best
    if m["stopped_early"]:
        assert m["epochs_run"] == best + PATIENCE
    else:
        assert m["epochs_run"] == EPOCHS and EPOCHS - best <= PATIENCE

    ckpt = Path(result.checkpoint.path)
    best_weights = torch.load(ckpt / BEST_MODEL_FILE, weights_only=True)
    last_weights = torch.load(ckpt / MODEL_FILE, weights_only=True)
    assert (m["selected_epoch"] == m["epochs_run"]) == all(torch.equal(best_weights[k], last_weights[k])
                                                           for k in best_weights)
    # the reported test metrics are the selected weights', recomputed here in one process
    shards = open_shards(tiny_shards)
    again = evaluate(cfg, shards, plain_copy(cfg, shards, best_weights), "test", 0, 1, zero_shot=False)
    assert again["test_pcc"] == pytest.approx(m["test_pcc"], abs=1e-5)
    assert again["test_mse"] == pytest.approx(m["test_mse"], abs=1e-6)


@pytest.mark.slow  # a new Ray test: joins make test once it has passed 20 runs in a row
def test_a_fixed_budget_stops_at_stop_epoch_and_tests_its_last_weights(ray_local, tiny_shards, tmp_path):
    """train.select=last with train.stop_epoch: the schedule is `epochs` long (its learning rate
    at the stop is mid-schedule), the run ends after stop_epoch epochs, and the tested weights
    are the last epoch's, whatever validation said."""
    runs = tmp_path / "runs"
    cfg = train_config(tiny_shards, str(runs), "budget", "train.mode=finetune", "train.epochs=3",
                       "train.stop_epoch=2", "train.select=last", "train.lr=0.003", "train.batch_size=64")
    result = trainer.run(cfg)
    assert result.error is None
    m = result.metrics
    assert m["epochs_run"] == 2 and m["selected_epoch"] == 2 and not m["stopped_early"]
    lrs = epoch_values(runs / "budget" / "logs" / "finetune_metrics.csv", "lr")
    assert min(lrs.values()) > 0.003 * 0.05   # cosine over 3 epochs: not yet at its end after 2
    ckpt = Path(result.checkpoint.path)
    last = torch.load(ckpt / MODEL_FILE, weights_only=True)
    selected = torch.load(ckpt / BEST_MODEL_FILE, weights_only=True)
    assert all(torch.equal(selected[k], last[k]) for k in last)
    shards = open_shards(tiny_shards)
    again = evaluate(cfg, shards, plain_copy(cfg, shards, last), "test", 0, 1, zero_shot=False)
    assert again["test_pcc"] == pytest.approx(m["test_pcc"], abs=1e-5)
