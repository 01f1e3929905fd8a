"""The learning-rate schedule and the best-epoch rule: pure functions."""
import pytest

from cldr_dist.config import ConfigError, load_config
from cldr_dist.train.schedule import is_better, lr_at, scaled_lr, select_metric, takes_selection


def test_warmup_rises_linearly_to_the_peak():
    rates = [lr_at(s, 100, 10, 1.0, "cosine") for s in range(10)]
    assert rates == pytest.approx([(s + 1) / 10 for s in range(10)])


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_decay_runs_from_the_peak_to_the_floor_at_the_last_step(schedule):
    rates = [lr_at(s, 100, 10, 2.0, schedule, min_lr_ratio=0.1) for s in range(100)]
    assert rates[10] == pytest.approx(2.0)
    assert rates[-1] == pytest.approx(0.2)
    assert all(a >= b for a, b in zip(rates[10:], rates[11:]))   # never rises after warmup


def test_cosine_is_at_half_way_down_half_way_through_the_decay():
    assert lr_at(50, 101, 0, 1.0, "cosine") == pytest.approx(0.5)
    assert lr_at(50, 101, 0, 1.0, "linear") == pytest.approx(0.5)


def test_constant_stays_at_the_peak_after_warmup():
    assert [lr_at(s, 10, 2, 3.0, "constant") for s in range(10)] == pytest.approx([1.5, 3.0] + [3.0] * 8)


def test_steps_past_the_plan_stay_at_the_floor():
    """A resumed run given a longer max_steps than its schedule was planned for."""
    assert lr_at(500, 100, 0, 1.0, "cosine", min_lr_ratio=0.05) == pytest.approx(0.05)


def test_one_step_runs_do_not_divide_by_zero():
    assert lr_at(0, 1, 0, 1.0, "cosine") == pytest.approx(1.0)


@pytest.mark.parametrize("rule, expected", [("none", 1e-3), ("linear", 16e-3), ("sqrt", 4e-3)])
def test_lr_scaling_rules(rule, expected):
    assert scaled_lr(1e-3, 4096, rule, 256) == pytest.approx(expected)


def test_is_better_respects_the_metric_direction():
    assert is_better(0.5, None, lower_is_better=True)
    assert is_better(0.4, 0.5, lower_is_better=True) and not is_better(0.5, 0.5, lower_is_better=True)
    assert is_better(0.6, 0.5, lower_is_better=False) and not is_better(0.4, 0.5, lower_is_better=False)


@pytest.mark.parametrize("override, named", [
    ("train.lr_schedule=step", "train.lr_schedule"), ("train.lr_scaling=quadratic", "train.lr_scaling"),
    ("train.warmup_epochs=-1", "train.warmup_epochs"), ("train.min_lr_ratio=2", "train.min_lr_ratio"),
    ("train.patience=-1", "train.patience"), ("train.lr_base_batch=0", "train.lr_base_batch"),
    ("train.encoding=pairs", "train.encoding"), ("data.memory_budget_mb=-1", "data.memory_budget_mb"),
    ("ray.worker_niceness=-1", "ray.worker_niceness"), ("ray.worker_niceness=20", "ray.worker_niceness"),
    ("train.select_metric=val_loss", "train.select_metric"),
    ("train.select_metric=val_pcc train.mode=pretrain", "train.select_metric")])
def test_bad_training_settings_name_their_key(override, named):
    with pytest.raises(ConfigError, match=named):
        load_config(None, override.split())


def test_each_mode_selects_on_its_default_unless_told():
    assert select_metric("finetune") == ("val_mse", True)
    assert select_metric("pretrain") == ("val_zeroshot_pcc", False)
    assert select_metric("finetune", "val_pcc") == ("val_pcc", False)
    assert select_metric("finetune", "val_rmse") == ("val_rmse", True)
    assert load_config(None, ["train.mode=finetune", "train.select_metric=val_drug_pcc"]).train.select_metric == "val_drug_pcc"


def test_an_epoch_without_a_score_never_displaces_a_scored_best():
    nan = float("nan")
    # no epoch scored yet: the newest weights stand
    assert takes_selection(None, None, lower_is_better=False) and takes_selection(nan, None, lower_is_better=False)
    # a scored best stays against a constant prediction's NaN or a missing score
    assert not takes_selection(nan, 0.3, lower_is_better=False)
    assert not takes_selection(None, 0.02, lower_is_better=True)
    # the first real score after unscored epochs is selected
    assert takes_selection(0.1, None, lower_is_better=False)
    assert takes_selection(0.4, 0.3, lower_is_better=False) and not takes_selection(0.2, 0.3, lower_is_better=False)
