"""Every base model trains end to end through the plain-PyTorch reference path on tiny shards:
the steps lower the loss on the batches they trained on, the regression head predicts, and
zero-shot picks number texts that depend on the sample."""
import numpy as np
import pytest
import torch

from cldr_dist.data.labels import NUM_NUMBER_TEXTS
from cldr_dist.data.reader import ShardStream, make_loader, open_shards
from cldr_dist.eval import predict as predict_mod
from cldr_dist.eval import zeroshot as zeroshot_mod
from cldr_dist.eval.metrics import all_metrics, per_drug_pcc, within_drug_spread
from cldr_dist.train.loop import build_objective, uses_captions
from cldr_dist.train.reference import train_reference

from tests.conftest import train_config

STEPS = 4


def trained_batches(cfg, shards, n: int) -> list:
    """The first n batches train_reference takes (its stream, epoch 0)."""
    stream = ShardStream(shards, cfg.data.split, "train", batch_size=cfg.train.batch_size, seed=cfg.data.seed,
                         shuffle_buffer=cfg.data.shuffle_buffer, caption_pad_to=cfg.model.caption_pad_to or None,
                         number_pad_to=cfg.model.number_pad_to or None, wordpiece=uses_captions(cfg))
    return [b for _, b in zip(range(n), make_loader(stream, cfg.data.loader_workers))]


@torch.no_grad()
def mean_loss(objective, batches) -> float:
    """The objective's loss on fixed batches, without dropout; TransE's triples drawn from the
    same generator state each time, and the generator left as it was."""
    generator = getattr(objective, "generator", None)
    state = generator.get_state() if generator is not None else None
    objective.eval()
    losses = []
    for batch in batches:
        if generator is not None:
            generator.set_state(state)
        losses.append(float(objective(batch)[0]))
    if generator is not None:
        generator.set_state(state)
    objective.train()
    return float(np.mean(losses))


def capture(monkeypatch, module, name: str, into: dict) -> None:
    """Record what evaluate() gets from module.name (it imports them at call time)."""
    real = getattr(module, name)

    def spy(*args, **kwargs):
        into[name] = real(*args, **kwargs)
        return into[name]
    monkeypatch.setattr(module, name, spy)


@pytest.mark.parametrize("drp", ["graphdrp", "tcnn", "deepcdr"])
def test_finetune_and_pretrain_run_end_to_end(tiny_shards, tmp_path, monkeypatch, drp):
    shards = open_shards(tiny_shards)
    for mode in ("finetune", "pretrain"):
        cfg = train_config(tiny_shards, str(tmp_path), "ref", f"model.drp={drp}", f"train.mode={mode}",
                           f"train.max_steps={STEPS}", "train.log_every=2")
        torch.manual_seed(cfg.train.seed)   # the init train_reference itself would draw
        objective = build_objective(cfg, shards, rank=0)
        batches = trained_batches(cfg, shards, STEPS)
        before = mean_loss(objective, batches)
        untrained = None
        if mode == "finetune":
            untrained = predict_mod.predict_part(cfg, shards, objective.model, "test")["p"]
            objective.train()
        seen: dict = {}
        capture(monkeypatch, predict_mod, "predict_part", seen)
        capture(monkeypatch, zeroshot_mod, "zeroshot_predict", seen)

        out = train_reference(cfg, objective=objective, log=lambda *_: None)

        assert out["step"] == STEPS
        assert out["test_samples"] == 120  # mixed test split of the tiny data, every sample read
        # the steps lowered the loss on the very batches they trained on
        after = mean_loss(objective, batches)
        assert after < before, f"{drp} {mode}: loss on the trained batches {before:.5f} -> {after:.5f}"

        y, p = seen["predict_part"]["y"], seen["predict_part"]["p"]
        assert len(p) == 120 and np.all((p > 0) & (p < 1))
        assert p.std() > 1e-5                  # the prediction depends on the sample
        assert out["test_rmse"] == pytest.approx(all_metrics(y, p)["rmse"])   # reported from these
        # no tiny test drug has the 10 cell lines a per-drug PCC needs; every one has the 2 a spread needs
        assert per_drug_pcc(y, p, seen["predict_part"]["drug_ids"]) == {} and "test_drug_pcc" not in out
        assert out["test_within_drug_std"] == pytest.approx(within_drug_spread(p, seen["predict_part"]["drug_ids"]))
        assert out["test_within_drug_std"] > 1e-6    # the prediction depends on the cell line too
        if mode == "finetune":
            # MSE steps moved the test predictions towards y (they start near the sigmoid's centre)
            assert out["test_rmse"] < all_metrics(y, untrained)["rmse"]
        else:
            assert "clip" in out and "kg" in out
            zy, zp = seen["zeroshot_predict"]
            assert len(zp) == cfg.train.zeroshot_samples
            assert np.all((zp >= 0) & (zp < 1))
            np.testing.assert_allclose(zp * NUM_NUMBER_TEXTS, np.round(zp * NUM_NUMBER_TEXTS), atol=1e-6)
            assert len(np.unique(zp)) > 1      # not one number text for every sample
            assert out["test_zeroshot_pcc"] == pytest.approx(all_metrics(zy, zp)["pcc"])
