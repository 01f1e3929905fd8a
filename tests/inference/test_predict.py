"""`cldr predict`'s inputs: new cell tables matched by name, rejected compounds, ensembles."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import TINY, write_checkpoint

from cldr_dist.cli import main
from cldr_dist.inference.bundle import export_model, load_bundle
from cldr_dist.inference.predict import within_compound_rank


@pytest.fixture(scope="module")
def models(tiny_shards, tmp_path_factory):
    """Two exported MSE-only GraphDRP models (two seeds: an ensemble)."""
    root = tmp_path_factory.mktemp("models")
    out = []
    for seed in (11, 12):
        ck = write_checkpoint(tiny_shards, root / f"ck{seed}", "finetune", seed)
        export_model(ck, str(root / f"m{seed}"))
        out.append(str(root / f"m{seed}"))
    return out


def _read(path) -> pd.DataFrame:
    return pd.read_csv(path, dtype={"compound_id": str, "cell_id": str, "id": str})


def _predict(*argv) -> int:
    return main(["predict", *argv, "--quiet"])


def test_new_cell_table_matched_by_name(models, tmp_path, capsys):
    cells = pd.read_csv(TINY / "cell_lines.csv.gz", dtype=str).iloc[:7]
    meta, features = cells.columns[:4].tolist(), cells.columns[4:].tolist()
    # the same cell lines as the training set's, with the feature columns shuffled, two extra
    # columns the model does not read, and under new ids
    rng = np.random.default_rng(0)
    table = cells[meta + list(rng.permutation(features))].assign(extra_a="1", extra_b="0")
    table["cosmic_id"] = "new-" + table["cosmic_id"]
    table.to_csv(tmp_path / "cells.csv", index=False)

    assert _predict("--model", models[0], "--smiles", "CCO", "--cells", ",".join(cells["cosmic_id"]),
                    "--out", str(tmp_path / "known.csv")) == 0
    assert _predict("--model", models[0], "--smiles", "CCO", "--cell-table", str(tmp_path / "cells.csv"),
                    "--out", str(tmp_path / "new.csv")) == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert '"extra_columns": 2' in summary and '"filled_features": 0' in summary
    known, new = _read(tmp_path / "known.csv"), _read(tmp_path / "new.csv")
    assert (new["cell_id"] == "new-" + known["cell_id"]).all()
    np.testing.assert_array_equal(new["pred_ln_ic50"], known["pred_ln_ic50"])

    # missing model columns: one error line naming them, nothing written
    dropped = features[:3]
    table.drop(columns=dropped).to_csv(tmp_path / "missing.csv", index=False)
    assert _predict("--model", models[0], "--smiles", "CCO", "--cell-table", str(tmp_path / "missing.csv"),
                    "--out", str(tmp_path / "missing_out.csv")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and all(f in err for f in dropped) and "--missing-features zero" in err
    assert not (tmp_path / "missing_out.csv").exists()

    # filled with 0 when asked, and counted: the same as the table with those columns at 0
    assert _predict("--model", models[0], "--smiles", "CCO", "--cell-table", str(tmp_path / "missing.csv"),
                    "--missing-features", "zero", "--out", str(tmp_path / "filled.csv")) == 0
    assert '"filled_features": 3' in capsys.readouterr().out
    table.assign(**{f: "0" for f in dropped}).to_csv(tmp_path / "zeroed.csv", index=False)
    assert _predict("--model", models[0], "--smiles", "CCO", "--cell-table", str(tmp_path / "zeroed.csv"),
                    "--out", str(tmp_path / "zeroed_out.csv")) == 0
    filled, zeroed = _read(tmp_path / "filled.csv"), _read(tmp_path / "zeroed_out.csv")
    assert (filled["filled_features"] == 3).all()
    np.testing.assert_array_equal(filled["pred_ln_ic50"], zeroed["pred_ln_ic50"])


def test_rejected_compounds_are_reported_and_the_rest_predicted(models, tmp_path, capsys):
    drug_id = load_bundle(models[0]).tables.drug_ids[0]
    rows = [("aspirin", "CC(=O)Oc1ccccc1C(=O)O"), ("broken", "C1CC(("), ("huge", "C" * 2001),
            ("unknown-id", ""), (drug_id, ""), ("ethanol", "CCO")]
    pd.DataFrame(rows, columns=["id", "smiles"]).to_csv(tmp_path / "library.csv", index=False)
    code = _predict("--model", models[0], "--compounds", str(tmp_path / "library.csv"),
                    "--cells", "all", "--out", str(tmp_path / "pred.parquet"))
    assert code == 3
    assert "3 input(s) rejected" in capsys.readouterr().err
    rejected = _read(tmp_path / "pred.rejected.csv")
    assert rejected[["line", "id"]].values.tolist() == [[3, "broken"], [4, "huge"], [5, "unknown-id"]]
    assert "RDKit" in rejected["reason"][0] and "limit" in rejected["reason"][1]
    pred = pd.read_parquet(tmp_path / "pred.parquet")
    cells = len(load_bundle(models[0]).tables.cell_ids)
    assert list(pd.unique(pred["compound_id"])) == ["aspirin", drug_id, "ethanol"]
    assert len(pred) == 3 * cells
    for _, one in pred.groupby("compound_id"):
        assert sorted(one["rank"]) == list(range(1, cells + 1))
        assert one.sort_values("rank")["pred_ln_ic50"].is_monotonic_increasing

    # nothing rejected: exit 0, no rejected file
    assert _predict("--model", models[0], "--smiles", "CCO", "--out", str(tmp_path / "ok.csv")) == 0
    assert not (tmp_path / "ok.rejected.csv").exists()


def test_ensemble_mean_and_std(models, tmp_path):
    for i, m in enumerate(models):
        assert _predict("--model", m, "--smiles", "CCO", "--smiles", "c1ccccc1O", "--out", str(tmp_path / f"{i}.csv")) == 0
    assert _predict("--model", models[0], "--model", models[1], "--smiles", "CCO", "--smiles", "c1ccccc1O",
                    "--out", str(tmp_path / "ens.csv")) == 0
    one, two, ens = (_read(tmp_path / f) for f in ("0.csv", "1.csv", "ens.csv"))
    members = np.stack([one["pred_ln_ic50"], two["pred_ln_ic50"]])
    assert not np.allclose(members[0], members[1])
    np.testing.assert_allclose(ens["pred_ln_ic50"], members.mean(0), rtol=1e-12)
    np.testing.assert_allclose(ens["pred_ln_ic50_std"], members.std(0), rtol=1e-9)
    np.testing.assert_allclose(ens["pred_y"], (one["pred_y"] + two["pred_y"]) / 2, rtol=1e-7)


def test_within_compound_rank():
    ln = np.array([[0.5, -1.0, 2.0], [3.0, 3.0, 1.0]])
    np.testing.assert_array_equal(within_compound_rank(ln), [[2, 1, 3], [2, 3, 1]])


def test_user_mistakes_are_one_line(models, tmp_path, capsys):
    cases = [
        (["--model", models[0], "--out", str(tmp_path / "a.csv")], "needs compounds"),
        (["--model", models[0], "--smiles", "CCO", "--out", str(tmp_path / "a.txt")], ".csv or .parquet"),
        (["--model", str(tmp_path), "--smiles", "CCO", "--out", str(tmp_path / "a.csv")], "not an exported model"),
        (["--model", models[0], "--smiles", "CCO", "--cells", "nope", "--out", str(tmp_path / "a.csv")], "nope"),
        (["--model", models[0], "--smiles", "CCO", "--zeroshot", "on", "--out", str(tmp_path / "a.csv")], "MSE-only"),
        (["--model", models[0], "--compounds", str(tmp_path / "none.csv"), "--out", str(tmp_path / "a.csv")], "not found"),
        (["--model", models[0], "--smiles", "CCO", "--ray", "--out", str(tmp_path / "screen")], "not empty"),
    ]
    (tmp_path / "screen").mkdir()
    (tmp_path / "screen" / "part-0.parquet").write_bytes(b"")
    for argv, words in cases:
        assert _predict(*argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err, (argv, err)
