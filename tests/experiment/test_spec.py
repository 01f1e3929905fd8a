"""Experiment files: layering of the stage configs, overrides, and one-line errors for typos."""
import pytest

from cldr_dist.config import ConfigError
from cldr_dist.experiment.runner import plan
from cldr_dist.experiment.spec import load_experiment, stage_config

from tests.conftest import REPO

SPEC = """
experiment: {name: t, models: [graphdrp, tcnn], splits: [drug_blind, mixed], seeds: [1, 2],
             variants: {gb1024: {pretrain: {train: {batch_size: 1024}}}}}
classical: {baselines: [train_mean, gbm]}
common: {train: {batch_size: 64, lr: 0.01}, ray: {num_workers: 1}}
pretrain: {train: {lr: 0.0005}}
finetune: {train: {epochs: 3}}
cldr_finetune: {train: {lr: 0.00001}}
"""


@pytest.fixture
def spec_file(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text(SPEC)
    return path


def test_stage_configs_layer_common_then_stage_then_variant(spec_file):
    spec = load_experiment(spec_file)
    pre = stage_config(spec, "pretrain", "tcnn", "mixed", 2)
    fine = stage_config(spec, "finetune", "tcnn", "mixed", 2)
    assert (pre.train.mode, pre.model.drp, pre.data.split, pre.train.seed) == ("pretrain", "tcnn", "mixed", 2)
    assert pre.train.lr == 0.0005 and fine.train.lr == 0.01 and fine.train.epochs == 3
    assert pre.train.batch_size == fine.train.batch_size == 64
    assert stage_config(spec, "pretrain", "tcnn", "mixed", 2, "gb1024").train.batch_size == 1024
    assert stage_config(spec, "finetune", "tcnn", "mixed", 2, "gb1024").train.batch_size == 64  # same finetune budget
    # the CLDR arm finetunes its pretrained model at its own rate; the MSE-only model keeps finetune's
    cldr_fine = stage_config(spec, "finetune", "tcnn", "mixed", 2, pretrained=True)
    assert cldr_fine.train.lr == 0.00001 and cldr_fine.train.epochs == 3 and cldr_fine.train.mode == "finetune"
    assert stage_config(spec, "finetune", "tcnn", "mixed", 2, "gb1024", pretrained=True).train.lr == 0.00001


def test_plan_covers_every_arm_once(spec_file):
    arms = plan(load_experiment(spec_file))
    keys = [a.key for a in arms]
    assert len(keys) == len(set(keys))
    deep = [a for a in arms if a.kind == "deep"]
    assert len(deep) == 2 * 2 * 2 * 3  # splits x models x seeds x (base, cldr, cldr-gb1024)
    classical = [a for a in arms if a.kind == "classical"]
    assert sorted((a.name, a.seed) for a in classical if a.split == "mixed") == [("gbm", 1), ("gbm", 2), ("train_mean", 1)]


def test_overrides_reach_every_layer(spec_file):
    spec = load_experiment(spec_file, ["experiment.seeds=[7]", "classical.gbm_iters=5",
                                       "pretrain.train.epochs=9", "common.ray.num_workers=4"])
    assert spec.seeds == [7] and spec.classical.gbm_iters == 5
    assert stage_config(spec, "pretrain", "graphdrp", "mixed", 7).train.epochs == 9
    assert stage_config(spec, "finetune", "graphdrp", "mixed", 7).ray.num_workers == 4


@pytest.mark.parametrize("override, message", [
    (["experiment.splits=[drugblind]"], "experiment.splits: unknown split"),
    (["experiment.model=[tcnn]"], "unknown key experiment.model"),
    (["experiment.models=[gnn]"], "model.drp: unknown base model 'gnn'"),
    (["pretrain.train.lr=fast"], "train.lr: expected float"),
    (["finetune.trian.lr=1"], "unknown config section 'trian'"),
    (["classical.baselines=[svm]"], "unknown baseline"),
    (["pretrain.lr=1"], "use experiment.KEY"),
])
def test_mistakes_are_one_line_errors_naming_the_key(spec_file, override, message):
    with pytest.raises(ConfigError, match=message) as e:
        load_experiment(spec_file, override)
    assert "\n" not in str(e.value)


def test_a_missing_or_unknown_section_is_named(tmp_path):
    with pytest.raises(ConfigError, match="experiment file not found"):
        load_experiment(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("experimnt: {name: x}\n")
    with pytest.raises(ConfigError, match="unknown section 'experimnt'"):
        load_experiment(bad)


@pytest.mark.parametrize("path", sorted(p.name for p in (REPO / "configs" / "experiments").glob("*.yaml")
                                        if not p.stem.endswith("_tuned")))
def test_every_shipped_experiment_file_loads(path):
    """Before `cldr tune` has written their tuned settings too (what `cldr tune` itself reads)."""
    spec = load_experiment(REPO / "configs" / "experiments" / path, tuned=False)
    assert spec.models and spec.splits and spec.seeds
