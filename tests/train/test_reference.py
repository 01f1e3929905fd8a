"""Every base model trains end to end through the plain-PyTorch reference path on tiny shards."""
import pytest

from cldr_dist.train.reference import train_reference

from tests.conftest import train_config


@pytest.mark.parametrize("drp", ["graphdrp", "tcnn", "deepcdr"])
def test_finetune_and_pretrain_run_end_to_end(tiny_shards, tmp_path, drp):
    for mode in ("finetune", "pretrain"):
        cfg = train_config(tiny_shards, str(tmp_path), "ref", f"model.drp={drp}", f"train.mode={mode}",
                           "train.max_steps=4", "train.log_every=2")
        out = train_reference(cfg, log=lambda *_: None)
        assert out["step"] == 4
        assert out["test_samples"] == 120  # mixed test split of the tiny data, every sample read
        assert 0 <= out["test_rmse"] < 1
        if mode == "pretrain":
            assert "clip" in out and "kg" in out and -1 <= out["test_zeroshot_pcc"] <= 1
