"""`cldr export` -> `cldr predict`: the exported model answers exactly as the checkpoint does."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import REPO, write_checkpoint

from cldr_dist.cli import main
from cldr_dist.config import load_config
from cldr_dist.data.reader import open_shards
from cldr_dist.eval.metrics import all_metrics
from cldr_dist.eval.predict import predict_part
from cldr_dist.inference.bundle import META_FILE, WEIGHTS_FILE, BundleError, export_model, load_bundle
from cldr_dist.train.checkpoint import load_model_weights
from cldr_dist.train.loop import make_model


def _test_part(shards: str, checkpoint: str, *overrides: str):
    """`cldr evaluate`'s own computation: the checkpoint's model over the test part."""
    cfg = load_config(REPO / "configs" / "demo.yaml", [f"data.shards={shards}", *overrides])
    s = open_shards(shards)
    model = make_model(cfg, s)
    load_model_weights(model, checkpoint)
    return cfg, s, model, predict_part(cfg, s, model, "test", keep_samples=10_000)


@pytest.mark.parametrize("drp", ["graphdrp", "tcnn", "deepcdr"])
def test_export_then_predict_equals_evaluate(tiny_shards, tmp_path, capsys, drp):
    ck = write_checkpoint(tiny_shards, tmp_path / "ck", "finetune", 3, f"model.drp={drp}",
                          metrics={"test_pcc": 0.25, "test_mse": 0.01})
    assert main(["export", "--checkpoint", ck, "--out", str(tmp_path / "model")]) == 0
    meta = json.loads((tmp_path / "model" / META_FILE).read_text())
    assert meta["base_model"] == drp and not meta["pretrained"]
    assert meta["test_metrics"] == {"test_pcc": 0.25, "test_mse": 0.01}
    assert meta["feature_names"] == open_shards(tiny_shards).features.feature_names.tolist()

    _, _, _, part = _test_part(tiny_shards, ck, f"model.drp={drp}")
    drugs, cells = sorted(set(part["drug_ids"])), sorted(set(part["cell_ids"]))
    out = tmp_path / "pred.parquet"
    argv = ["predict", "--model", str(tmp_path / "model"), "--cells", ",".join(cells), "--out", str(out), "--quiet"]
    for d in drugs:
        argv += ["--drug", d]
    assert main(argv) == 0
    pred = pd.read_parquet(out).set_index(["compound_id", "cell_id"])
    assert len(pred) == len(drugs) * len(cells) and "zeroshot_y" not in pred
    p = pred.loc[list(zip(part["drug_ids"], part["cell_ids"])), "pred_y"].to_numpy()
    np.testing.assert_allclose(p, part["p"], rtol=0, atol=1e-6)

    # the metrics `cldr evaluate` prints for the checkpoint, from the exported model's rows
    capsys.readouterr()
    assert main(["evaluate", "--config", str(REPO / "configs" / "demo.yaml"), "--checkpoint", ck,
                 f"data.shards={tiny_shards}", f"model.drp={drp}"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    for k, v in all_metrics(part["y"], p).items():
        assert abs(evaluated[f"test_{k}"] - v) < 1e-6, k


def test_zeroshot_equals_evaluation_zeroshot(tiny_shards, tmp_path):
    """A CLDR-pretrained model's zero-shot column is eval/zeroshot.py's prediction per pair."""
    from cldr_dist.eval.zeroshot import zeroshot_predict
    from cldr_dist.losses.numeric_kg import NumberTexts
    ck = write_checkpoint(tiny_shards, tmp_path / "ck", "pretrain", 4)
    export_model(ck, str(tmp_path / "model"))
    cfg, s, model, part = _test_part(tiny_shards, ck)
    batch = part["batches"][0].select(torch.arange(16))   # zero-shot costs ~1000x a prediction
    y, zs = zeroshot_predict(model, [batch], NumberTexts(s.features))
    ids = list(zip(batch.drug_ids, batch.cell_ids))
    argv = ["predict", "--model", str(tmp_path / "model"), "--out", str(tmp_path / "p.csv"), "--quiet",
            "--cells", ",".join(sorted({c for _, c in ids}))]
    for d in sorted({d for d, _ in ids}):
        argv += ["--drug", d]
    assert main(argv) == 0
    pred = pd.read_csv(tmp_path / "p.csv", dtype={"compound_id": str, "cell_id": str}).set_index(["compound_id", "cell_id"])
    got = pred.loc[ids, "zeroshot_y"].to_numpy()
    assert len(np.unique(got)) > 1
    np.testing.assert_allclose(got, zs, atol=1e-9)


def test_bundle_loads_without_ray_or_deepspeed(tiny_shards, tmp_path):
    ck = write_checkpoint(tiny_shards, tmp_path / "ck", "pretrain", 5)
    export_model(ck, str(tmp_path / "model"))
    code = f"""
import sys
from cldr_dist.inference.bundle import load_bundle
from cldr_dist.inference.predict import ScreenSpec, predict_local
from cldr_dist.inference.inputs import command_line_compounds, training_cells
b = load_bundle({str(tmp_path / 'model')!r})
spec = ScreenSpec([b.path], training_cells(b.tables), zeroshot="off")
s = predict_local(spec, [command_line_compounds(["CCO"], [])], {str(tmp_path / 'p.csv')!r}, "", [], progress=False)
assert s.pairs == len(b.tables.cell_ids), s
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("ray", "deepspeed"))
assert not heavy, heavy
"""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_export_to_s3_and_predict_from_it(tiny_shards, tmp_path, s3_bucket):
    ck = write_checkpoint(tiny_shards, tmp_path / "ck", "finetune", 6)
    url = f"{s3_bucket}/models/m1"
    export_model(ck, url)
    export_model(ck, str(tmp_path / "model"))
    local = load_bundle(str(tmp_path / "model"))
    remote = load_bundle(url)
    for (k, a), (_, b) in zip(local.model.state_dict().items(), remote.model.state_dict().items()):
        assert torch.equal(a, b), k


def test_export_refuses_what_it_cannot_use(tiny_shards, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["export", "--checkpoint", str(tmp_path / "empty"), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err.strip()
    assert "not a training checkpoint" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "m").exists()

    ck = write_checkpoint(tiny_shards, tmp_path / "ck", "finetune", 7)
    assert main(["export", "--checkpoint", ck, "--out", str(tmp_path / "m"), "--shards", str(tmp_path / "nowhere")]) == 2
    assert "pass --shards" in capsys.readouterr().err and not (tmp_path / "m").exists()

    export_model(ck, str(tmp_path / "m"))
    with pytest.raises(BundleError, match="already holds"):
        export_model(ck, str(tmp_path / "m"))
    weights = tmp_path / "m" / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:-8])
    with pytest.raises(BundleError, match="checksum mismatch"):
        load_bundle(str(tmp_path / "m"))
