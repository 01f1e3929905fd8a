"""`cldr report` over hand-built run directories (no training): several run directories make
one report, the rows of the later ones tagged with their experiment, and a CLDR variant is
compared with the plain CLDR arm it extends."""

import numpy as np
import pytest

from cldr_dist import cli
from cldr_dist.eval.metrics import all_metrics
from cldr_dist.eval.predict import save_predictions
from cldr_dist.experiment.report import ReportError, ended_by, number_order_score, write_report
from cldr_dist.experiment.runner import write_json

N_TEST = 240
DRUGS = np.array([f"drug{i % 4}" for i in range(N_TEST)])


def add_arm(run_dir, key, *, arm, model="tcnn", variant="", noise=0.1, zeroshot=None, number_texts=None, seed=0,
            run_seed=171):
    rng = np.random.default_rng(seed)
    y = rng.uniform(0.2, 0.9, N_TEST)
    p = y + noise * rng.standard_normal(N_TEST)
    save_predictions(str(run_dir / "predictions" / f"{key}.npz"),
                     {"y": y, "p": p, "drug_ids": DRUGS, "cell_ids": np.array([f"c{i}" for i in range(N_TEST)])})
    result = {"metrics": all_metrics(y, p), "kind": "deep", "arm": arm, "model": model, "split": "drug_blind",
              "seed": run_seed, "variant": variant, "wall_s": 60.0}
    if zeroshot is not None:
        result["zeroshot_pcc"] = zeroshot
    write_json(run_dir / "results" / f"{key}.json", result)
    if number_texts is not None:
        (run_dir / "number_texts").mkdir(parents=True, exist_ok=True)
        np.save(run_dir / "number_texts" / f"{key}.npy", number_texts, allow_pickle=False)
    return result["metrics"]["pcc"]


def new_run_dir(root, name, shards="shards/gdsc_v17"):
    run_dir = root / name
    (run_dir / "results").mkdir(parents=True)
    write_json(run_dir / "experiment.json", {"spec": {"name": name, "command": f"cldr experiment --config {name}.yaml",
                                                      "layers": {"common": {"data": {"shards": shards}}}},
                                             "machine": {"host": "h", "cpus": 2, "gpu": "", "torch": "t"}})
    return run_dir


@pytest.fixture
def two_runs(tmp_path):
    rng = np.random.default_rng(0)
    ordered = np.cumsum(rng.standard_normal((1000, 8)) * 0.1, axis=0).astype(np.float32)  # neighbours alike
    shuffled = rng.standard_normal((1000, 8)).astype(np.float32)
    main = new_run_dir(tmp_path, "main")
    pccs = {"base": add_arm(main, "drug_blind-tcnn-base-s171", arm="base", noise=0.3, seed=1),
            "cldr": add_arm(main, "drug_blind-tcnn-cldr-s171", arm="cldr", noise=0.2, zeroshot=0.25,
                            number_texts=shuffled, seed=2)}
    extra = new_run_dir(tmp_path, "extra")
    pccs["gb1024"] = add_arm(extra, "drug_blind-tcnn-cldr-gb1024-s171", arm="cldr-gb1024", variant="gb1024",
                             noise=0.1, zeroshot=0.5, number_texts=ordered, seed=3)
    pccs["base_extra"] = add_arm(extra, "drug_blind-tcnn-base-s171", arm="base", noise=0.5, seed=4)  # same key as main's
    return main, extra, pccs, (number_order_score(ordered)[1], number_order_score(shuffled)[1])


def test_several_run_directories_make_one_report_with_tagged_rows(tmp_path, two_runs):
    main, extra, pccs, (ordered_score, shuffled_score) = two_runs
    report = write_report([main, extra], tmp_path / "out").read_text()
    # the same arm key in two experiments stays two rows, never two seeds of one row
    assert f"| tcnn (MSE only) | 1 | {pccs['base']:.4f}" in report
    assert f"| tcnn (MSE only) [extra] | 1 | {pccs['base_extra']:.4f}" in report
    assert f"| tcnn (cldr-gb1024) [extra] | 1 | {pccs['gb1024']:.4f}" in report
    gain = (pccs["gb1024"] - pccs["cldr"]) / pccs["cldr"] * 100
    assert (f"- drug_blind, tcnn (cldr-gb1024) [extra] vs tcnn (cldr), seed 171: test PCC {pccs['gb1024']:.4f} vs "
            f"{pccs['cldr']:.4f} ({gain:+.1f}%), zero-shot PCC 0.5000 vs 0.2500, "
            f"number-text order score {ordered_score:.3f} vs {shuffled_score:.3f}") in report
    assert ordered_score > 0.5 > abs(shuffled_score)
    # the claim compares the main experiment's own arms only
    assert f"Drug-blind, tcnn: CLDR PCC {pccs['cldr']:.4f} vs MSE-only {pccs['base']:.4f}" in report
    assert (tmp_path / "out" / "figures" / "per_drug_pcc_drug_blind.png").stat().st_size > 10_000


def test_a_classical_baseline_both_experiments_ran_is_one_row(tmp_path, two_runs):
    main, extra, pccs, _ = two_runs
    y, p = np.linspace(0.2, 0.9, N_TEST), np.full(N_TEST, 0.5)
    train_mean = {"metrics": all_metrics(y, p), "kind": "classical", "arm": "train_mean", "model": "",
                  "split": "drug_blind", "seed": 171, "wall_s": 1.0}
    for run_dir in (main, extra):
        key = "drug_blind-classical-train_mean-s171"
        save_predictions(str(run_dir / "predictions" / f"{key}.npz"),
                         {"y": y, "p": p, "drug_ids": DRUGS, "cell_ids": np.array([f"c{i}" for i in range(N_TEST)])})
        write_json(run_dir / "results" / f"{key}.json", train_mean)
    report = write_report([main, extra], tmp_path / "out").read_text()
    assert "| classical: train_mean | 1 |" in report
    assert "classical: train_mean [extra]" not in report
    # deep arms of the later experiment keep their own rows
    assert f"| tcnn (MSE only) [extra] | 1 | {pccs['base_extra']:.4f}" in report


def test_a_variant_over_several_seeds_gets_a_paired_interval(tmp_path):
    main, extra = new_run_dir(tmp_path, "main"), new_run_dir(tmp_path, "extra")
    diffs = []
    for i, run_seed in enumerate((171, 172, 173)):
        plain = add_arm(main, f"drug_blind-tcnn-cldr-s{run_seed}", arm="cldr", noise=0.3, seed=10 + i, run_seed=run_seed)
        kg = add_arm(extra, f"drug_blind-tcnn-cldr-kg_all-s{run_seed}", arm="cldr-kg_all", variant="kg_all",
                     noise=0.1, seed=20 + i, run_seed=run_seed)
        diffs.append(kg - plain)
    report = write_report([main, extra], tmp_path / "out").read_text()
    line = next(x for x in report.splitlines() if x.startswith("- drug_blind, tcnn (cldr-kg_all) [extra] vs tcnn (cldr)"))
    assert "seeds 171, 172, 173" in line
    assert f"paired test PCC difference {np.mean(diffs):+.4f}, 95% interval [" in line
    assert line.endswith(": shown")  # noise 0.1 against 0.3 on every seed


def test_report_refuses_two_run_directories_of_one_name(tmp_path, two_runs):
    main = two_runs[0]
    with pytest.raises(ReportError, match="same experiment name"):
        write_report([main, main], tmp_path / "out")


def test_report_refuses_run_directories_on_other_shards(tmp_path, two_runs):
    other = new_run_dir(tmp_path, "tiny", shards="shards/tiny")
    add_arm(other, "drug_blind-tcnn-cldr-minilm-s171", arm="cldr-minilm", variant="minilm")
    with pytest.raises(ReportError, match=r"different shards \(shards/gdsc_v17, shards/tiny\)"):
        write_report([two_runs[0], other], tmp_path / "out")


def test_report_of_a_folder_that_is_no_run_directory_is_one_line(tmp_path, two_runs, capsys):
    assert cli.main(["report", str(two_runs[0]), str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nothing: not an experiment run directory" in err


def test_summary_json_holds_means_and_paired_differences_with_intervals(tmp_path):
    """Three seeds per arm: summary.json has each arm's mean and std over seeds, and the paired
    CLDR - MSE-only PCC difference per seed with a Student-t 95% interval; the report says
    whether the interval excludes zero."""
    import json

    from scipy import stats
    run_dir = new_run_dir(tmp_path, "seeds")
    pccs = {"base": [], "cldr": []}
    for seed in (171, 172, 173):
        for arm, noise in (("base", 0.4), ("cldr", 0.1)):
            key = f"drug_blind-tcnn-{arm}-s{seed}"
            pccs[arm].append(add_arm(run_dir, key, arm=arm, noise=noise, seed=seed * 10 + (arm == "cldr")))
            result = json.loads((run_dir / "results" / f"{key}.json").read_text())
            result["seed"] = seed
            write_json(run_dir / "results" / f"{key}.json", result)
    report = write_report(run_dir).read_text()
    summary = json.loads((run_dir / "summary.json").read_text())
    base = summary["arms"]["drug_blind"]["tcnn (MSE only)"]
    assert base["n_seeds"] == 3 and base["seeds"] == [171, 172, 173]
    assert base["pcc"]["mean"] == pytest.approx(np.mean(pccs["base"]))
    assert base["pcc"]["std"] == pytest.approx(np.std(pccs["base"], ddof=1))
    assert base["per_drug_pcc"]["mean"] is not None and base["epochs_reached"] == [None, None, None]
    paired = summary["paired_cldr_minus_mse"]["drug_blind"]["tcnn"]
    diffs = np.subtract(pccs["cldr"], pccs["base"])
    assert paired["per_seed"] == pytest.approx(diffs) and paired["mean"] == pytest.approx(diffs.mean())
    half = stats.t.ppf(0.975, 2) * diffs.std(ddof=1) / np.sqrt(3)
    assert paired["ci95"] == pytest.approx([diffs.mean() - half, diffs.mean() + half])
    assert paired["ci95"][0] > 0    # far less noise in every CLDR seed
    assert "drug_blind, tcnn: CLDR - MSE-only PCC" in report and "CLDR higher, interval excludes zero" in report


def test_one_seed_gives_no_interval(tmp_path, two_runs):
    import json
    main, *_ = two_runs
    report = write_report(main).read_text()
    paired = json.loads((main / "summary.json").read_text())["paired_cldr_minus_mse"]["drug_blind"]["tcnn"]
    assert paired["n"] == 1 and paired["ci95"] is None
    assert "from 1 seed: no interval; NOT shown with a 95% interval" in report


def test_few_finetune_epochs_against_the_converged_mse_only_arm(tmp_path, two_runs):
    """The CLDR arm's validation PCC after 1, 3 and 5 finetune epochs, from its training log,
    against the MSE-only arm's best validation PCC."""
    main, *_ = two_runs

    def curve(key, values):
        rows = ["time,epoch,step,name,value"] + [f"{e},{e},{10 * e},val_pcc,{v}" for e, v in enumerate(values, 1)]
        (main / "curves").mkdir(exist_ok=True)
        (main / "curves" / f"{key}-finetune.csv").write_text("\n".join(rows + [f"9,1,12,mse,0.01"]) + "\n")
    curve("drug_blind-tcnn-base-s171", [0.2, 0.4, 0.5, 0.45, 0.44, 0.43, 0.42])
    curve("drug_blind-tcnn-cldr-s171", [0.3, 0.45, 0.52, 0.55, 0.56])
    report = write_report(main).read_text()
    assert ("drug_blind, tcnn: CLDR finetune validation PCC after epochs 1: 0.3000, 3: 0.5200, 5: 0.5600; "
            "MSE-only converged 0.5000: reached after 3 epoch(s).") in report
    assert (main / "figures" / "finetune_epochs.png").stat().st_size > 5_000


def test_the_report_lists_every_tuning_trial_with_the_chosen_one_marked(tmp_path, two_runs):
    """RUN_DIR/tune/MODEL-STAGE.json, as `cldr tune` writes it, becomes one table row per trial,
    base before pretrain; a trial ASHA stopped shows the epochs it reached against the cap, and one
    whose model came to ignore the cell line says from which epochs."""
    main = two_runs[0]
    trial = {"checkpoint": "", "error": ""}
    base = {"model": "tcnn", "stage": "base", "metric": "val_mse", "max_epochs": 6, "trials": [
        {**trial, "params": {"train.lr": 4.5e-4, "train.batch_size": 4096}, "epochs": 6, "best_epoch": 5, "score": 0.0013},
        {**trial, "params": {"train.lr": 2.2e-3, "train.batch_size": 8192}, "epochs": 2, "best_epoch": 1, "score": 0.0037,
         "ignores_cell_line": [2]}]}
    base["chosen"] = base["trials"][0]
    pretrain = {"model": "tcnn", "stage": "pretrain", "metric": "val_zeroshot_pcc", "max_epochs": 4, "trials": [
        {**trial, "params": {"train.lr": 1e-4}, "epochs": 4, "best_epoch": 3, "score": 0.41}]}
    pretrain["chosen"] = pretrain["trials"][0]
    write_json(main / "tune" / "tcnn-pretrain.json", pretrain)
    write_json(main / "tune" / "tcnn-base.json", base)
    report = write_report([main], tmp_path / "out").read_text()
    rows = [line for line in report.splitlines() if line.startswith("| tcnn | ")]
    assert rows == ["| tcnn | base | 0.00045 | 4096 | 6 (6) | 5 | **val_mse 0.0013** |",
                    "| tcnn | base | 0.0022 | 8192 | 2 (6) | 1 | val_mse 0.0037 (epoch 2 ignores the cell line) |",
                    "| tcnn | pretrain | 0.0001 | - | 4 (4) | 3 | **val_zeroshot_pcc 0.41** |"]


def test_a_curve_without_its_header_is_one_line_naming_it(tmp_path, two_runs, capsys):
    main, *_ = two_runs
    (main / "curves").mkdir()
    (main / "curves" / "drug_blind-tcnn-cldr-s171-pretrain.csv").write_text("363.774,1,19,val_mse,0.005\n")
    assert cli.main(["report", str(main)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "drug_blind-tcnn-cldr-s171-pretrain.csv: not a metrics CSV" in err


@pytest.mark.parametrize("mode, train, expected", [
    ("finetune", {"epochs": 60}, "early stopping on val_mse (best epoch 7)"),   # records from before select_metric
    ("finetune", {"epochs": 60, "select_metric": "val_pcc"}, "early stopping on val_pcc (best epoch 7)"),
    ("pretrain", {"epochs": 12, "select_metric": ""}, "early stopping on val_zeroshot_pcc (best epoch 7)")])
def test_an_early_stopped_run_names_the_number_it_stopped_on(mode, train, expected):
    stage = {"mode": mode, "config": {"train": train}, "metrics": {"stopped_early": 1, "selected_epoch": 7}}
    assert ended_by(stage) == expected


def test_a_rerun_of_both_arms_pairs_its_own_arms_and_meets_the_first_experiments(tmp_path):
    """The same arms rerun in a later experiment (e.g. another selection rule): its CLDR and
    MSE-only rows pair among themselves, and each row meets the first experiment's same arm,
    seed by seed."""
    import json
    main, rerun = new_run_dir(tmp_path, "main"), new_run_dir(tmp_path, "rerun")
    pccs = {}
    for i, seed in enumerate((171, 172)):
        for run_dir, noises in ((main, {"base": 0.4, "cldr": 0.3}), (rerun, {"base": 0.2, "cldr": 0.1})):
            for arm, noise in noises.items():
                pccs[run_dir.name, arm, seed] = add_arm(run_dir, f"drug_blind-tcnn-{arm}-s{seed}", arm=arm, noise=noise,
                                                        seed=100 * i + len(pccs), run_seed=seed)
    report = write_report([main, rerun], tmp_path / "out").read_text()
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    own = summary["paired_cldr_minus_mse"]["drug_blind"]["tcnn [rerun]"]
    assert own["per_seed"] == pytest.approx([pccs["rerun", "cldr", s] - pccs["rerun", "base", s] for s in (171, 172)])
    later = summary["later_experiments_vs_first"]["drug_blind"]["tcnn (MSE only) [rerun]"]
    diffs = [pccs["rerun", "base", s] - pccs["main", "base", s] for s in (171, 172)]
    assert later["against"] == "tcnn (MSE only)" and later["seeds"] == [171, 172]
    assert later["per_seed"] == pytest.approx(diffs) and later["ci95"] is not None
    assert (f"- drug_blind, tcnn (MSE only) [rerun] vs tcnn (MSE only), seeds 171, 172: test PCC "
            f"{np.mean([pccs['rerun', 'base', s] for s in (171, 172)]):.4f} vs "
            f"{np.mean([pccs['main', 'base', s] for s in (171, 172)]):.4f}, paired difference {np.mean(diffs):+.4f}") in report
    assert "- drug_blind, tcnn [rerun]: CLDR - MSE-only PCC" in report


def test_a_stage_a_later_experiment_starts_from_is_one_budget_row(tmp_path, two_runs):
    """A later experiment whose CLDR arms start from the first one's pretrain stage carries a
    copy of its record: the Budget table lists that training run once, and its own runs too."""
    main, extra, _, _ = two_runs

    def stage(run, mode, **train):
        return {"run": run, "mode": mode, "wall_s": 120.0, "metrics": {"step": 40, "epochs_run": 4},
                "config": {"train": {"batch_size": 256, "grad_accum": 1, "epochs": 12, **train}, "ray": {"num_workers": 2}}}
    shared = stage("main-drug_blind-tcnn-cldr-s171-pretrain", "pretrain")
    for run_dir in (main, extra):
        write_json(run_dir / "stages" / "drug_blind-tcnn-cldr-s171-pretrain.json", shared)
    write_json(extra / "stages" / "drug_blind-tcnn-cldr-s171-finetune.json",
               stage("extra-drug_blind-tcnn-cldr-s171-finetune", "finetune", select_metric="val_pcc"))
    report = write_report([main, extra], tmp_path / "out").read_text()
    budget = report.split("## Budget")[1]
    assert budget.count("| main-drug_blind-tcnn-cldr-s171-pretrain | pretrain | 40 | 512 | 20,480 | 4 (12) |") == 1
    assert "| extra-drug_blind-tcnn-cldr-s171-finetune | finetune | 40 | 512 |" in budget
