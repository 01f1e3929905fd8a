"""`cldr tune`: the pure parts (search space, trial summaries, the tuned-settings file and how an
experiment layers it), then a tiny real search (Ray Tune + ASHA over TorchTrainer runs) end to end."""
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import yaml

from cldr_dist import cli
from cldr_dist.config import ConfigError
from cldr_dist.experiment.spec import load_experiment, stage_config
from cldr_dist.experiment.spec import arm_stages
from cldr_dist.experiment.tune import (TuneError, choose, epoch_rows, fit, logspaced, nested, num_samples,
                                      search_space, trial_config, trial_summary)

from tests.conftest import REPO, local_ray_session, own_state_api


def test_trial_summary_takes_the_best_validated_epoch():
    history = [{"step": 5, "epoch": 0, "loss": 1.0},                      # a step report: no metric
               {"val_mse": 0.04, "epochs_done": 1}, {"val_mse": 0.02, "epochs_done": 2},
               {"val_mse": 0.03, "epochs_done": 3}, {"val_mse": float("nan"), "epochs_done": 4}]
    t = trial_summary({"train.lr": 0.1}, history, "val_mse", lower_is_better=True)
    assert (t["epochs"], t["best_epoch"], t["score"]) == (3, 2, 0.02)
    assert t["scores"] == [[1, 0.04], [2, 0.02], [3, 0.03]]
    higher = trial_summary({}, [{"val_zeroshot_pcc": 0.1, "epochs_done": 1},
                                {"val_zeroshot_pcc": 0.3, "epochs_done": 2}], "val_zeroshot_pcc", False)
    assert higher["best_epoch"] == 2
    assert trial_summary({}, history[:1], "val_mse", True)["score"] is None
    trials = [{"score": 0.03}, {"score": None}, {"score": 0.01}]
    assert choose(trials, True)["score"] == 0.01 and choose(trials, False)["score"] == 0.03


def test_a_resumed_trial_keeps_the_epochs_before_its_resume():
    """Its training run's CSV, appended to across the resume; Tune's rows would start at epoch 2
    and miss the best epoch. An epoch logged again after a resume from an older checkpoint counts
    at its last entry."""
    log = ("time,epoch,step,name,value\n"
           "9.5,1,19,loss,7.4\n9.6,1,19,val_zeroshot_pcc,0.098\n9.6,1,19,best_epoch,1\n"
           "20.1,2,38,val_zeroshot_pcc,0.050\n"
           "3.0,2,38,val_zeroshot_pcc,0.075\n7.2,3,57,val_zeroshot_pcc,0.078\n")  # resumed after epoch 1
    rows = epoch_rows(log, "val_zeroshot_pcc")
    assert [(r["epochs_done"], r["val_zeroshot_pcc"]) for r in rows] == [(1, 0.098), (2, 0.075), (3, 0.078)]
    t = trial_summary({}, rows, "val_zeroshot_pcc", lower_is_better=False)
    assert (t["epochs"], t["best_epoch"], t["score"]) == (3, 1, 0.098)
    assert epoch_rows("time,epoch,step,name,value\n1.0,0,5,loss,3.0\n", "val_mse") == []


def test_an_epoch_whose_model_ignores_the_cell_line_is_no_candidate():
    """A finetune whose cell branch died predicts one value per drug (spread 0): on mixed
    validation its MSE can still be the best of the search, as tCNNs' CLDR finetune at lr 2.2e-3
    showed. The trial keeps its scores but is chosen only for epochs that use the cell line."""
    log = ("time,epoch,step,name,value\n"
           "1.0,1,10,val_mse,0.0040\n1.0,1,10,val_within_drug_std,0.006\n"
           "2.0,2,20,val_mse,0.0013\n2.0,2,20,val_within_drug_std,0.0\n")
    dying = trial_summary({"train.lr": 2e-3}, epoch_rows(log, "val_mse"), "val_mse", lower_is_better=True)
    assert (dying["best_epoch"], dying["score"], dying["ignores_cell_line"]) == (1, 0.0040, [2])
    assert dying["scores"] == [[1, 0.0040], [2, 0.0013]]
    alive = trial_summary({"train.lr": 4e-4}, [{"epochs_done": 2, "val_mse": 0.0014, "val_within_drug_std": 0.007}],
                          "val_mse", True)
    assert choose([dying, alive], lower_is_better=True) is alive
    # runs logged before the spread existed have no value for it: their epochs stay candidates
    assert trial_summary({}, [{"epochs_done": 1, "val_mse": 0.002}], "val_mse", True)["score"] == 0.002
    dead = trial_summary({}, [{"epochs_done": 1, "val_mse": 0.001, "val_within_drug_std": 0.0}], "val_mse", True)
    with pytest.raises(TuneError, match="1 ignored it"):
        choose([dead], lower_is_better=True)


def test_nested_settings_are_config_sections():
    assert nested({"train.lr": 1e-3, "model.dropout": 0.1, "train.batch_size": 64}) == \
        {"train": {"lr": 1e-3, "batch_size": 64}, "model": {"dropout": 0.1}}


@pytest.mark.parametrize("space, message", [
    ({"train.lr": {"loguniform": [0, 1]}}, "tune.space.train.lr: loguniform needs 0 < low < high"),
    ({"train.lrr": {"choice": [1]}}, "tune.space.train.lrr: unknown config key train.lrr"),
    ({"train.lr": {"normal": [0, 1]}}, "tune.space.train.lr: expected one of"),
    ({"train.batch_size": {"choice": [1.5]}}, "tune.space.train.batch_size: config key train.batch_size: expected int"),
    ({"train.lr": {"loguniform": [1.0e-5, "3e-3"]}}, "tune.space.train.lr: loguniform needs two numbers"),
    ({"train.batch_size": {"uniform": [64, 256]}}, "tune.space.train.batch_size: an integer setting: use choice"),
    ({"train.test_at_end": {"choice": [True]}}, "tune.space.train.test_at_end: set by `cldr tune` itself"),
    ({"ray.num_workers": {"choice": [2]}}, "tune.space.ray.num_workers: set by `cldr tune` itself"),
    ([1, 2], "tune.space: expected a mapping"),
    ({"train.lr": {"logspaced": [1.0e-3, 1.0e-4]}}, "tune.space.train.lr: logspaced needs 0 < low < high"),
    ({"train.lr": {"logspaced": [1.0e-4, 1.0e-3]}, "model.dropout": {"logspaced": [0.1, 0.5]}},
     "tune.space: one logspaced key at most"),
])
def test_a_bad_search_space_is_one_error_naming_the_key(space, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_experiment(REPO / "configs" / "experiments" / "tiny.yaml", [f"tune.space={json.dumps(space)}"])


def test_logspaced_gives_each_trial_its_own_stretch_of_the_range():
    assert logspaced(1e-4, 1e-1, 3) == pytest.approx([10 ** -3.5, 10 ** -2.5, 10 ** -1.5])
    space = {"train.lr": {"logspaced": [4.0e-5, 5.0e-3]}, "model.dropout": {"choice": [0.1, 0.5]}}
    assert search_space(space, 3)["train.lr"] == {"grid_search": pytest.approx([9.0e-5, 4.47e-4, 2.24e-3], rel=1e-2)}
    # the grid makes the trials: Tune repeats a grid num_samples times
    assert num_samples(space, 3) == 1
    assert num_samples({"train.lr": {"loguniform": [4.0e-5, 5.0e-3]}}, 3) == 3


def write_tuned(path, best_epoch=3):
    path.write_text(yaml.safe_dump({"graphdrp": {
        "base": {"settings": {"train": {"lr": 0.002}, "model": {"dropout": 0.3}}, "best_epoch": best_epoch,
                 "max_epochs": 6},
        "pretrain": {"settings": {"train": {"batch_size": 64}}, "best_epoch": 2, "max_epochs": 2},
        "cldr_finetune": {"settings": {"train": {"lr": 2e-5}}, "best_epoch": 1, "max_epochs": 6}}}))


def test_the_experiment_layers_tuned_settings_per_stage_and_split(tmp_path):
    tuned = tmp_path / "tuned.yaml"
    write_tuned(tuned)
    exp = tmp_path / "exp.yaml"
    exp.write_text((REPO / "configs" / "experiments" / "tiny.yaml").read_text()
                   + "by_split:\n  drug_blind: {train: {select: last}}\n")
    spec = load_experiment(exp, [f"experiment.tuned={tuned}", "experiment.splits=[mixed,drug_blind]"])
    base = stage_config(spec, "finetune", "graphdrp", "mixed", 1)
    cldr = stage_config(spec, "finetune", "graphdrp", "mixed", 1, pretrained=True)
    pre = stage_config(spec, "pretrain", "graphdrp", "mixed", 1)
    assert (base.train.lr, base.model.dropout, base.train.select, base.train.epochs) == (0.002, 0.3, "best_val", 1)
    assert (cldr.train.lr, cldr.model.dropout) == (2e-5, -1.0)
    assert (pre.train.lr, pre.train.batch_size) == (0.0005, 64)      # lr untuned: the layers'
    assert stage_config(spec, "finetune", "graphdrp", "mixed", 1, tuned=False).train.lr == 0.001
    # drug-blind: a fixed budget, the tuned trial's own schedule stopped at its best epoch,
    # tested at the last epoch it ran
    db = stage_config(spec, "finetune", "graphdrp", "drug_blind", 1)
    assert (db.train.select, db.train.epochs, db.train.stop_epoch, db.train.lr) == ("last", 6, 3, 0.002)
    assert stage_config(spec, "finetune", "graphdrp", "drug_blind", 1, pretrained=True).train.stop_epoch == 1
    # the command line is the top layer, above the tuned settings
    spec = load_experiment(exp, [f"experiment.tuned={tuned}", "finetune.train.lr=0.0003"])
    assert stage_config(spec, "finetune", "graphdrp", "mixed", 1).train.lr == 0.0003


def test_trials_may_run_on_fewer_cpus_than_the_stage():
    """tune.cpus_per_worker sets a trial's worker CPUs (and so its torch threads) without
    touching the experiment's own runs; 0 keeps the stage's."""
    config = REPO / "configs" / "experiments" / "tiny.yaml"
    spec = load_experiment(config, ["common.ray.cpus_per_worker=2", "tune.cpus_per_worker=1"], tuned=False)
    assert trial_config(spec, "graphdrp", "base").ray.cpus_per_worker == 1
    assert stage_config(spec, "finetune", "graphdrp", "mixed", 1, tuned=False).ray.cpus_per_worker == 2
    spec = load_experiment(config, ["common.ray.cpus_per_worker=2"], tuned=False)
    assert trial_config(spec, "graphdrp", "pretrain").ray.cpus_per_worker == 2
    with pytest.raises(ConfigError, match="tune.cpus_per_worker"):
        load_experiment(config, ["tune.cpus_per_worker=-1"], tuned=False)


def test_pretrain_trials_may_have_their_own_epoch_cap():
    """tune.pretrain_max_epochs caps pretrain trials only, and leaves the other stages' searches
    (and so the digests their committed records carry) as they were."""
    from cldr_dist.experiment.tune import search_digest
    config = REPO / "configs" / "experiments" / "tiny.yaml"
    spec = load_experiment(config, ["tune.max_epochs=6"], tuned=False)
    capped = load_experiment(config, ["tune.max_epochs=6", "tune.pretrain_max_epochs=4"], tuned=False)
    assert trial_config(spec, "graphdrp", "pretrain").train.epochs == 6
    assert trial_config(capped, "graphdrp", "pretrain").train.epochs == 4
    assert trial_config(capped, "graphdrp", "base").train.epochs == 6
    assert search_digest(capped, "graphdrp", "base", "") == search_digest(spec, "graphdrp", "base", "")
    assert search_digest(capped, "graphdrp", "pretrain", "") != search_digest(spec, "graphdrp", "pretrain", "")
    with pytest.raises(ConfigError, match="tune.grace_epochs must not exceed"):
        load_experiment(config, ["tune.grace_epochs=3", "tune.pretrain_max_epochs=2"], tuned=False)
    with pytest.raises(ConfigError, match="tune.pretrain_max_epochs"):
        load_experiment(config, ["tune.pretrain_max_epochs=-1"], tuned=False)


def test_an_arm_without_tuned_settings_is_refused(tmp_path):
    tuned = tmp_path / "tuned.yaml"
    write_tuned(tuned)
    with pytest.raises(ConfigError, match="has no tuned settings for tcnn.base, tcnn.pretrain"):
        load_experiment(REPO / "configs" / "experiments" / "tiny.yaml",
                        [f"experiment.tuned={tuned}", "experiment.models=[graphdrp,tcnn]"])


def test_a_missing_or_malformed_tuned_file_is_one_error(tmp_path, capsys):
    tiny = str(REPO / "configs" / "experiments" / "tiny.yaml")
    assert cli.main(["experiment", "--config", tiny, f"experiment.tuned={tmp_path / 'none.yaml'}"]) == 2
    assert "none.yaml not found; `cldr tune --config` on this experiment writes it" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    for entry in ({"finetune": {"settings": {}, "best_epoch": 1, "max_epochs": 1}},
                  {"base": {"settings": [1], "best_epoch": 1, "max_epochs": 1}},
                  {"base": {"settings": {}, "best_epoch": 0, "max_epochs": 1}}):
        bad.write_text(yaml.safe_dump({"graphdrp": entry}))
        assert cli.main(["experiment", "--config", tiny, f"experiment.tuned={bad}"]) == 2
        assert f"graphdrp.{next(iter(entry))} is not a tuned stage entry" in capsys.readouterr().err


def test_select_last_refuses_early_stopping(tmp_path, capsys):
    assert cli.main(["finetune", "train.select=last", "train.patience=2"]) == 2
    assert "early stopping needs train.select=best_val" in capsys.readouterr().err


def test_a_finetune_search_whose_pretrained_start_is_gone_is_one_error(tmp_path, capsys):
    """On a fresh clone the committed pretrain record outlives its checkpoint: tuning CLDR's
    finetune then stops before Ray starts, naming the record to remove."""
    from cldr_dist.experiment.tune import search_digest
    config = REPO / "configs" / "experiments" / "tiny.yaml"
    overrides = [f"experiment.out={tmp_path / 'runs'}", f"tune.out={tmp_path / 'tuned.yaml'}", "experiment.arms=[cldr]"]
    spec = load_experiment(config, overrides, tuned=False)
    gone = tmp_path / "ray" / "trial" / "checkpoint_000001"
    record = {"model": "graphdrp", "stage": "pretrain", "metric": "val_zeroshot_pcc", "lower_is_better": False,
              "chosen": {"score": 0.3, "params": {"train.lr": 1e-4}}, "settings": {"train": {"lr": 1e-4}},
              "best_epoch": 1, "max_epochs": 2, "trials": [{}], "split": "mixed", "checkpoint": str(gone),
              "digest": search_digest(spec, "graphdrp", "pretrain", "")}
    path = tmp_path / "runs" / "tiny" / "tune" / "graphdrp-pretrain.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(record))
    with pytest.raises(SystemExit) as stop:
        cli.main(["tune", "--config", str(config), *overrides])
    err = capsys.readouterr().err
    assert stop.value.code == 1 and f"checkpoint {gone} is gone" in err and f"remove {path} to tune graphdrp pretrain again" in err
    assert "Traceback" not in err and not (path.parent / "graphdrp-cldr_finetune.json").exists()


# two trials at once (Ray 3 CPUs: one worker each) and short epochs: the search's own machinery is
# what is under test, not the settings it finds
TINY_TUNE = ["tune.max_epochs=2", "tune.trials=2", "tune.concurrent=2", "common.train.zeroshot_samples=32",
             "common.train.log_every=100",
             'tune.space={"train.lr": {"loguniform": [0.0001, 0.003]}, "train.batch_size": {"choice": [64, 128]}}',
             'tune.pretrain_space={"train.lr": {"loguniform": [0.0001, 0.001]}, "train.batch_size": {"choice": [128]}}']


def test_the_stages_tuned_are_those_of_the_arms():
    assert arm_stages(["base", "cldr"]) == ["base", "pretrain", "cldr_finetune"]
    assert arm_stages(["cldr"]) == ["pretrain", "cldr_finetune"] and arm_stages(["base"]) == ["base"]
    # an experiment of variants alone (compared with another experiment's plain CLDR arms) trains CLDR's stages
    assert arm_stages([], {"kg_all": {}}) == ["pretrain", "cldr_finetune"]


def test_a_tiny_tune_end_to_end(s3_server, tiny_shards, tmp_path, capsys):
    """CLDR's two stages searched on validation only (the base stage is the same search without a
    pretrained start): every trial trains, ASHA's rungs
    are epochs, the chosen settings land in the tuned file, CLDR's finetune trials start from the
    chosen pretrained model, no trial ran a test pass, and the CPUs of trials ASHA stopped come back."""
    import ray

    from cldr_dist.experiment.tune import run_tune
    from cldr_dist.train.trainer import start_ray
    config = REPO / "configs" / "experiments" / "tiny.yaml"
    out = tmp_path / "tiny_tuned.yaml"
    overrides = [f"experiment.out={tmp_path / 'runs'}", f"tune.out={out}", f"common.data.shards={tiny_shards}",
                 f"common.train.deepspeed_config={REPO / 'configs' / 'deepspeed' / 'zero2.json'}",
                 "experiment.arms=[cldr]", *TINY_TUNE]
    spec = load_experiment(config, overrides, tuned=False)
    with own_state_api():
        assert start_ray("", 3, state_api=True)   # what `cldr tune` starts, kept open to look inside
        try:
            assert run_tune(spec, config, log=print) == out
            # Ray Train's cleaner polls the controllers it watches, and a removed group's CPUs
            # reach ray.available_resources() a moment later (the resource view syncs
            # asynchronously: a group removed half a second before the check still counted once in a full make test)
            deadline = time.time() + 60
            while time.time() < deadline and (_reserved_groups() or _free_cpus() < 2.99):
                time.sleep(1)
            assert not _reserved_groups()
            assert _free_cpus() >= 2.99
        finally:
            ray.shutdown()
    assert not (tmp_path / "runs" / "tiny" / "tune" / "graphdrp-base.json").exists()
    records = {s: json.loads((tmp_path / "runs" / "tiny" / "tune" / f"graphdrp-{s}.json").read_text())
               for s in ("pretrain", "cldr_finetune")}
    for stage, r in records.items():
        assert len(r["trials"]) == 2 and r["metric"] == ("val_zeroshot_pcc" if stage == "pretrain" else "val_mse")
        for t in r["trials"]:
            assert not t["error"] and 1 <= t["best_epoch"] <= t["epochs"] <= 2, t
        pick = min if r["lower_is_better"] else max
        assert r["chosen"]["score"] == pick(t["score"] for t in r["trials"])
        assert r["settings"] == nested(r["chosen"]["params"])
    assert records["cldr_finetune"]["trials"][0]["params"].keys() == {"train.lr", "train.batch_size"}  # tune.space
    tuned = yaml.safe_load(out.read_text())
    assert set(tuned["graphdrp"]) == {"pretrain", "cldr_finetune"}
    assert tuned["graphdrp"]["cldr_finetune"]["settings"]["train"]["lr"] == records["cldr_finetune"]["chosen"]["params"]["train.lr"]
    assert tuned["graphdrp"]["pretrain"]["best_epoch"] == records["pretrain"]["best_epoch"]
    # each trial is a real training run under the experiment's storage; CLDR's finetune trials
    # started from the chosen pretrain trial's checkpoint, and no run looked at test
    storage = tmp_path / "runs" / "tiny" / "ray"
    for stage in ("pretrain", "cldr_finetune"):
        states = sorted(storage.glob(f"tiny-tune-graphdrp-{stage}-*/checkpoint_*/trainer_state.json"))
        assert states, stage
        for path in states:
            state = json.loads(path.read_text())
            assert not any(k.startswith("test_") for k in state["metrics"]), path
            want = records["pretrain"]["checkpoint"] if stage == "cldr_finetune" else ""
            assert state["config"]["train"]["init_from"] == want
    # a rerun finds every stage done (no Ray started); another search is refused, not mixed in;
    # and the experiment reads the file back
    capsys.readouterr()
    assert cli.main(["tune", "--config", str(config), *overrides]) == 0
    assert capsys.readouterr().out.count("tuned earlier") == 2
    assert cli.main(["tune", "--config", str(config), *overrides, "tune.trials=3"]) == 2
    assert "graphdrp-pretrain.json was tuned with other settings" in capsys.readouterr().err
    spec = load_experiment(config, [f"experiment.tuned={out}", "experiment.arms=[cldr]"])
    assert stage_config(spec, "finetune", "graphdrp", "mixed", 1, pretrained=True).train.lr == \
        tuned["graphdrp"]["cldr_finetune"]["settings"]["train"]["lr"]


def test_ctrl_c_stops_a_search_instead_of_ending_it_as_finished(tmp_path):
    """Tune's own SIGINT handler ends a search early and returns it as if finished (a stage would
    be recorded half-searched); through tune.fit, Ctrl+C raises KeyboardInterrupt once Tune has
    stopped its trials, as in any command."""
    import ray
    from ray import tune

    def report_until_stopped(config):
        """A trial that runs for minutes unless stopped; once it has reported (the search is
        under way), it sends the driver the SIGINT of a user's Ctrl+C. (Defined here: Ray ships a
        local function by value, and workers cannot import a test module.)"""
        from ray import tune
        for step in range(1, 4000):
            tune.report({"step": step})
            if step == 1 and config["interrupt"]:
                os.kill(config["driver"], signal.SIGINT)
            time.sleep(0.05)

    def search(name: str, interrupt: bool):
        return fit(tune.Tuner(report_until_stopped, param_space={"driver": os.getpid(), "interrupt": interrupt},
                              tune_config=tune.TuneConfig(num_samples=1),
                              run_config=tune.RunConfig(name=name, storage_path=str(tmp_path), verbose=0,
                                                        stop=None if interrupt else {"step": 3})))
    handler = signal.getsignal(signal.SIGINT)    # a background job's pytest ignores SIGINT
    with local_ray_session():
        finished = search("finished", interrupt=False)
        assert (len(finished), finished.num_terminated) == (1, 1)
        t0 = time.time()
        with pytest.raises(KeyboardInterrupt):
            search("interrupted", interrupt=True)
        assert time.time() - t0 < 100     # stopped by the interrupt, not by the trial's own end
        assert ray.is_initialized()
    assert signal.getsignal(signal.SIGINT) is handler   # Tune left no handler behind
    assert "TUNE_DISABLE_SIGINT_HANDLER" not in os.environ


def _free_cpus() -> float:
    import ray
    return ray.available_resources().get("CPU", 0)


def _reserved_groups() -> list:
    import ray
    return [pg for pg in ray.util.placement_group_table().values() if pg["state"] == "CREATED"]


EPOCH_LINE = re.compile(r"graphdrp base trial (\S+): epoch (\d+) val_mse")   # `cldr tune`'s progress lines


def test_an_interrupted_stage_resumes_where_it_stopped(tiny_shards, tmp_path):
    """Ctrl+C in the middle of a stage's second trial, then the same command again: the search
    resumes instead of starting over. The finished trial is not trained again, the interrupted one
    goes on from its last checkpoint (not from epoch 1), and the record holds both trials."""
    config = REPO / "configs" / "experiments" / "tiny.yaml"
    command = [sys.executable, "-m", "cldr_dist.cli", "tune", "--config", str(config),
               f"experiment.out={tmp_path / 'runs'}", f"tune.out={tmp_path / 'tiny_tuned.yaml'}",
               f"common.data.shards={tiny_shards}", "experiment.arms=[base]", "tune.max_epochs=3",
               "tune.grace_epochs=3", "tune.trials=2", "tune.concurrent=1", "common.train.log_every=100",
               'tune.space={"train.lr": {"logspaced": [0.0001, 0.003]}, "train.batch_size": {"choice": [128]}}']
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0"}
    # a shell's Ctrl+C: SIGINT to the command, whose default handler a background pytest may not pass on
    first = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    # a command that never ends fails the test instead of hanging the run; generous, because
    # under load Ray's start and a trial's worker start take minutes
    watchdog = threading.Timer(600, first.kill)
    watchdog.start()
    lines, interrupted = [], False
    for line in first.stdout:
        lines.append(line)
        # trial 1's 3 epochs, then trial 2's first: its other two take far longer than Tune's stop
        if not interrupted and len(EPOCH_LINE.findall("".join(lines))) == 4:
            first.send_signal(signal.SIGINT)
            interrupted = True
    watchdog.cancel()
    assert first.wait(timeout=120) == 130, "".join(lines)
    assert "graphdrp base: interrupted; nothing recorded (a rerun with the same settings resumes" in "".join(lines)
    before = [(trial, int(epoch)) for trial, epoch in EPOCH_LINE.findall("".join(lines))]
    done_trial, cut_trial = before[0][0], before[-1][0]
    assert [e for t, e in before if t == done_trial] == [1, 2, 3] and done_trial != cut_trial, "".join(lines)
    cut_at = max(e for t, e in before if t == cut_trial)
    assert cut_at < 3, before
    record = tmp_path / "runs" / "tiny" / "tune" / "graphdrp-base.json"
    assert not record.exists()

    second = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "graphdrp base: resuming the interrupted search" in second.stdout
    after = [(trial, int(epoch)) for trial, epoch in EPOCH_LINE.findall(second.stdout)]
    # only the cut trial trains, from past its last reported epoch (a checkpoint saved just as
    # Ctrl+C came may be one epoch later than the last report) up to the cap
    assert after and {t for t, _ in after} == {cut_trial}, second.stdout
    assert after[0][1] in (cut_at + 1, cut_at + 2) and [e for _, e in after] == list(range(after[0][1], 4))
    trials = json.loads(record.read_text())["trials"]
    assert [t["epochs"] for t in trials] == [3, 3] and not any(t["error"] for t in trials)
    # the cut trial's record holds its epochs from before the resume too
    assert [[e for e, _ in t["scores"]] for t in trials] == [[1, 2, 3], [1, 2, 3]], trials
