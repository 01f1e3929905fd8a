"""`cldr predict --ray`: the Ray Data pipeline on a local Ray cluster, reading compounds from and
writing parquet parts to the local S3 server, equals the single-process prediction."""
from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
from conftest import write_checkpoint

from cldr_dist.cli import main
from cldr_dist.data import storage
from cldr_dist.data.reader import open_shards
from cldr_dist.inference.bundle import export_model
from cldr_dist.inference.predict import SUCCESS_FILE


def test_ray_data_screen_to_s3_equals_single_process(tiny_shards, tmp_path, s3_bucket, ray_local, capsys):
    models = []
    for seed in (21, 22):
        ck = write_checkpoint(tiny_shards, tmp_path / f"ck{seed}", "pretrain", seed)
        models += ["--model", f"{s3_bucket}/models/m{seed}"]
        export_model(ck, models[-1])
    rng = np.random.default_rng(0)
    base = ["CCO", "c1ccccc1O", "CC(=O)Oc1ccccc1C(=O)O", "CN1C=NC2=C1C(=O)N(C(=O)N2C)C", "C1CC((", "OCC(O)CO"]
    n = 12
    library = pd.DataFrame({"id": [f"c{i:03d}" for i in range(n)],
                            "smiles": [base[i] for i in rng.permutation(n) % len(base)]})
    storage.write_bytes(f"{s3_bucket}/library.csv", library.to_csv(index=False).encode())

    # zero-shot on in both runs (the Ray path's default is off: it costs ~1000x a prediction),
    # so on 4 of the cell lines
    cells = ["--cells", ",".join(open_shards(tiny_shards).features.cell_ids[:4])]
    assert main(["predict", *models, "--compounds", f"{s3_bucket}/library.csv", *cells, "--zeroshot", "on",
                 "--out", str(tmp_path / "single.parquet"), "--quiet"]) == 3
    out = f"{s3_bucket}/screen"
    assert main(["predict", *models, "--compounds", f"{s3_bucket}/library.csv", *cells, "--zeroshot", "on",
                 "--ray", "--workers", "2", "--compounds-per-task", "3", "--out", out, "--quiet"]) == 3
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    broken = int((library["smiles"] == "C1CC((").sum())
    assert 0 < broken < n
    assert summary == {**summary, "compounds": n - broken, "rejected": broken, "models": 2, "zeroshot": True}
    assert json.loads(storage.read_bytes(f"{out}/{SUCCESS_FILE}"))["pairs"] == summary["pairs"]
    assert len(summary["parts"]) >= n // 3   # a part per task of at most 3 compounds

    fs = storage.filesystem(out)
    parts = [pd.read_parquet(io.BytesIO(fs.cat(f"{out}/{p}"))) for p in summary["parts"]]
    key = ["compound_id", "cell_id"]
    ray_rows = pd.concat(parts).sort_values(key).reset_index(drop=True)
    single = pd.read_parquet(tmp_path / "single.parquet").sort_values(key).reset_index(drop=True)
    assert len(ray_rows) == summary["pairs"] == (n - broken) * 4
    # float32 sums over other batches of compounds and another thread count: equal to rounding
    pd.testing.assert_frame_equal(ray_rows, single, check_exact=False, rtol=0, atol=1e-5)

    rejected = pd.read_csv(storage.open_read(f"{out}/rejected.csv"), dtype=str)
    single_rejected = pd.read_csv(tmp_path / "single.rejected.csv", dtype=str)
    assert sorted(rejected["id"]) == sorted(single_rejected["id"]) == sorted(library["id"][library["smiles"] == "C1CC(("])
