"""The experiment runner end to end on the tiny shards (real Ray Train + DeepSpeed runs): every
arm lands with its predictions, a rerun skips what finished, and the report is built from it."""
import json

import numpy as np
import pytest

from cldr_dist.eval.metrics import all_metrics
from cldr_dist.eval.predict import load_predictions
from cldr_dist.experiment.report import write_report
from cldr_dist.experiment.runner import plan, run_experiment
from cldr_dist.experiment.spec import load_experiment

from tests.conftest import REPO


@pytest.fixture
def spec(tmp_path, tiny_shards):
    path = tmp_path / "tiny.yaml"
    path.write_text((REPO / "configs" / "experiments" / "tiny.yaml").read_text())
    return load_experiment(path, [
        f"experiment.out={tmp_path / 'out'}", "classical.gbm_iters=10", "classical.morgan_bits=256",
        f"common.data.shards={tiny_shards}",
        f"common.train.deepspeed_config={REPO / 'configs' / 'deepspeed' / 'zero2.json'}",
        "common.train.max_steps=4", "common.train.batch_size=16", "common.train.zeroshot_samples=32"])


def test_experiment_runs_every_arm_resumes_and_reports(ray_local, spec, capsys):
    logs = []
    run_dir = run_experiment(spec, log=logs.append)
    arms = plan(spec)
    results = {a.key: json.loads((run_dir / "results" / f"{a.key}.json").read_text()) for a in arms}
    assert {r["arm"] for r in results.values()} == {"train_mean", "drug_mean", "ridge", "gbm", "base", "cldr"}
    for key, r in results.items():
        pred = load_predictions(str(run_dir / "predictions" / f"{key}.npz"))
        assert len(pred["y"]) == len(pred["p"]) == len(pred["drug_ids"]) > 0
        assert r["metrics"]["pcc"] == pytest.approx(all_metrics(pred["y"], pred["p"])["pcc"])  # from these predictions
    cldr = results["mixed-graphdrp-cldr-s171"]
    assert cldr["stages"]["pretrain"]["step"] == cldr["stages"]["finetune"]["step"] == 4
    # the fitted baselines know more than the training mean (mixed split: every test drug and
    # cell line is also in training)
    rmse = {r["arm"]: r["metrics"]["rmse"] for r in results.values()}
    assert max(rmse["drug_mean"], rmse["ridge"], rmse["gbm"]) < rmse["train_mean"], rmse
    # the trained models predict per sample, and the CLDR arm's finetune started from its
    # pretrained weights (same seed, same data: with the init ignored both would be equal)
    base = load_predictions(str(run_dir / "predictions" / "mixed-graphdrp-base-s171.npz"))
    tuned = load_predictions(str(run_dir / "predictions" / "mixed-graphdrp-cldr-s171.npz"))
    assert base["p"].std() > 1e-5 and tuned["p"].std() > 1e-5
    assert np.all((tuned["p"] > 0) & (tuned["p"] < 1))
    assert np.array_equal(base["y"], tuned["y"]) and np.abs(base["p"] - tuned["p"]).max() > 1e-4
    # zero-shot: pearson() gives exactly 0.0 for constant predictions (one number text for all)
    assert np.isfinite(cldr["zeroshot_pcc"]) and cldr["zeroshot_pcc"] != 0.0
    numbers = np.load(run_dir / "number_texts" / "mixed-graphdrp-cldr-s171.npy")
    assert numbers.shape == (1000, 128) and np.isfinite(numbers).all()
    assert len(np.unique(numbers, axis=0)) == 1000   # each number text its own features

    # `cldr evaluate` on the finetuned checkpoint agrees with the experiment's own prediction
    from cldr_dist import cli
    stage = json.loads((run_dir / "stages" / "mixed-graphdrp-cldr-s171-finetune.json").read_text())
    capsys.readouterr()
    assert cli.main(["evaluate", "--checkpoint", stage["checkpoint"], f"data.shards={spec.layers['common']['data']['shards']}",
                     "data.split=mixed", "train.batch_size=16"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["test_pcc"] == pytest.approx(cldr["metrics"]["pcc"], abs=1e-6)

    # a stopped experiment: the CLDR finetune never recorded, everything else did
    (run_dir / "results" / "mixed-graphdrp-cldr-s171.json").unlink()
    (run_dir / "stages" / "mixed-graphdrp-cldr-s171-finetune.json").unlink()
    logs.clear()
    run_experiment(spec, log=logs.append)
    assert sum("finished earlier" in line for line in logs) == len(arms) - 1
    assert [line.strip() for line in logs if "ray run" in line] == ["finetune: ray run tiny-mixed-graphdrp-cldr-s171-finetune"]

    report = write_report(run_dir).read_text()
    assert "| graphdrp (cldr) | 1 |" in report and "| classical: ridge | 1 |" in report
    assert "Mixed, GraphDRP MSE-only PCC" in report and "order score" in report
    for figure in ("pred_vs_true_mixed.png", "number_text_similarity.png", "training_curves.png"):
        assert (run_dir / "figures" / figure).stat().st_size > 10_000


def test_a_rerun_with_other_settings_is_refused(tmp_path, spec):
    from cldr_dist.config import ConfigError
    from cldr_dist.experiment.runner import pin_spec
    pin_spec(spec)
    spec.layers["pretrain"]["train"]["lr"] = 0.1
    with pytest.raises(ConfigError, match="was started with other layers settings"):
        pin_spec(spec)
    spec.layers["pretrain"]["train"]["lr"] = 0.0005
    first = spec.command
    spec.seeds, spec.command = [171, 172], first + " experiment.seeds=[171,172]"  # the same experiment, extended
    pin_spec(spec)
    pin_spec(spec)  # a resume with the same command is not a new command
    recorded = json.loads((spec.run_dir / "experiment.json").read_text())
    assert recorded["commands"] == [first, spec.command] and recorded["spec"]["seeds"] == [171, 172]


def test_only_the_models_an_experiment_trains_have_their_tuned_settings_pinned(spec):
    """A model still being tuned (base stage done, CLDR stages not yet) may be tuned further after
    an experiment on the other models started; a tuned stage a finished run used may not change."""
    from cldr_dist.config import ConfigError
    from cldr_dist.experiment.runner import pin_spec
    done = {"base": {"settings": {"train": {"lr": 1e-3}}, "best_epoch": 2, "max_epochs": 2}}
    spec.models = ["graphdrp"]
    spec.tuned_settings = {"graphdrp": done, "deepcdr": done}
    pin_spec(spec)
    spec.tuned_settings = {"graphdrp": done, "deepcdr": {**done, "pretrain": done["base"]}}
    spec.models = ["graphdrp", "deepcdr"]
    pin_spec(spec)
    spec.models = ["graphdrp"]
    pin_spec(spec)  # a rerun of fewer models keeps the pinned settings of the rest
    recorded = json.loads((spec.run_dir / "experiment.json").read_text())["spec"]["tuned_settings"]
    assert set(recorded) == {"graphdrp", "deepcdr"} and "pretrain" in recorded["deepcdr"]
    spec.models = ["deepcdr"]
    retuned = {**done, "pretrain": {**done["base"], "best_epoch": 1}}
    spec.tuned_settings = {"deepcdr": retuned}
    pin_spec(spec)   # no deepcdr run used its earlier pretrain settings: retuning the stage is fine
    for name in ("stages/drug_blind-deepcdr-cldr-s171-pretrain.json", "results/drug_blind-deepcdr-base-s171.json"):
        (spec.run_dir / name).parent.mkdir(exist_ok=True)
        (spec.run_dir / name).write_text("{}")
    spec.tuned_settings = {"deepcdr": {**retuned, "cldr_finetune": done["base"]}}
    pin_spec(spec)   # a finished base arm does not hold CLDR's finetune settings
    spec.tuned_settings = {"deepcdr": {**retuned, "pretrain": done["base"], "cldr_finetune": done["base"]}}
    with pytest.raises(ConfigError, match=r"deepcdr pretrain: stages/drug_blind-deepcdr-cldr-s171-pretrain\.json\)"):
        pin_spec(spec)
    spec.tuned_settings = {"deepcdr": {**retuned, "base": retuned["pretrain"], "cldr_finetune": done["base"]}}
    with pytest.raises(ConfigError, match=r"deepcdr base: results/drug_blind-deepcdr-base-s171\.json\)"):
        pin_spec(spec)


def test_a_failed_run_is_named_by_the_workers_own_error():
    from cldr_dist.train.trainer import root_cause

    class WorkerGroupError(Exception):
        pass
    snippet = ("Training failed due to worker errors:\n[Rank 0,1 Error Snippet]:\nTraceback (most recent call last):\n"
               '  File "loop.py", line 3, in train\n    raise ValueError(f"{split}/train has {n} samples")\n'
               "ValueError: drug_blind/train has 900 samples: too few for 2 workers x batch 512 x grad_accum 1\n")
    assert root_cause(WorkerGroupError(snippet)) == ("ValueError: drug_blind/train has 900 samples: "
                                                     "too few for 2 workers x batch 512 x grad_accum 1")
    assert root_cause(RuntimeError("disk full\nmore")) == "RuntimeError: disk full"


def test_a_run_directory_from_before_tuning_still_resumes(spec):
    """experiment.json written before by_split, overrides and tuned settings existed: their
    absence means their defaults, not a change."""
    from cldr_dist.experiment.runner import pin_spec
    pin_spec(spec)
    path = spec.run_dir / "experiment.json"
    recorded = json.loads(path.read_text())
    for key in ("by_split", "overrides", "tuned_settings", "tune", "tuned"):
        recorded["spec"].pop(key)
    path.write_text(json.dumps(recorded))
    pin_spec(spec)


def test_a_stage_whose_checkpoint_is_gone_trains_again(tmp_path):
    """A fresh clone holds an unfinished arm's pretrain record, not the local checkpoint it names:
    the finetune cannot start from it, so the stage counts as not finished."""
    from cldr_dist.experiment.runner import finished_record
    checkpoint = tmp_path / "ray" / "checkpoint_0"
    checkpoint.mkdir(parents=True)
    record_path = tmp_path / "stages" / "mixed-tcnn-cldr-s171-pretrain.json"
    record_path.parent.mkdir()
    record_path.write_text(json.dumps({"mode": "pretrain", "checkpoint": str(checkpoint), "metrics": {}}))
    logs = []
    assert finished_record(record_path, logs.append)["checkpoint"] == str(checkpoint)
    assert finished_record(tmp_path / "stages" / "absent.json", logs.append) is None
    checkpoint.rmdir()
    assert finished_record(record_path, logs.append) is None
    assert logs == [f"    pretrain: checkpoint {checkpoint} is gone; training this stage again"]
