"""train.precision=bf16 on the CPU through a real DeepSpeed engine (ZeRO-2, gloo, world size 1,
in a spawned process so that pytest's own process never holds a process group): both training
modes take steps with a finite loss, the engine's module holds bf16 parameters, and
full_state_dict hands out the optimizer's fp32 master weights, not the module's rounded copy."""
import json
import os

import pytest
import torch

from tests.conftest import free_port, train_config

STEPS = 2


def _worker(rank: int, port: int, cfg_dicts: dict, out_dir: str) -> None:
    import torch.distributed as dist
    torch.set_num_threads(1)
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    import deepspeed

    from cldr_dist.config import config_from_dict
    from cldr_dist.data.reader import ShardStream, open_shards
    from cldr_dist.train.checkpoint import full_state_dict
    from cldr_dist.train.loop import build_objective, deepspeed_config, uses_bf16

    for mode, cfg_dict in cfg_dicts.items():
        cfg = config_from_dict(cfg_dict)
        out = {"mode": mode}
        try:
            shards = open_shards(cfg.data.shards)
            objective = build_objective(cfg, shards, rank=0)
            optimizer = torch.optim.AdamW(objective.parameters(), lr=cfg.train.lr)
            ds = deepspeed_config(cfg.train, use_gpu=False)
            out["bf16_config"] = ds["bf16"]["enabled"] and uses_bf16(cfg.train, use_gpu=False)
            engine, *_ = deepspeed.initialize(model=objective, optimizer=optimizer, config=ds)
            stream = ShardStream(shards, "mixed", "train", batch_size=cfg.train.batch_size, seed=cfg.data.seed)
            losses = []
            for step, batch in zip(range(STEPS), stream):
                loss, parts = engine(batch.to("cpu", torch.bfloat16))   # as loop.py feeds bf16 runs
                engine.backward(loss)
                engine.step()
                losses.append({"loss": float(loss), **{k: float(v) for k, v in parts.items()}})
            out["losses"] = losses
            module = {n: p for n, p in engine.module.named_parameters()}
            out["module_dtypes"] = sorted({str(p.dtype) for p in module.values()})
            weights = full_state_dict(engine)
            out["weight_dtypes"] = sorted({str(weights[n].dtype) for n in module})
            # master weights whose value the bf16 module copy does not hold exactly
            out["differ"] = [n for n, p in module.items() if not torch.equal(weights[n], p.detach().float())]
            # and the module copy is the master weight rounded to bf16
            out["rounded"] = all(torch.equal(weights[n].to(torch.bfloat16), p.detach()) for n, p in module.items())
            out["num_params"] = len(module)
            engine.destroy()
            del engine, objective, optimizer, loss, parts, weights, module
        except Exception:  # noqa: BLE001 - reported to the test with its traceback
            import traceback
            out["error"] = traceback.format_exc()
        with open(os.path.join(out_dir, f"{mode}.json"), "w") as f:
            json.dump(out, f)
    dist.destroy_process_group()
    os._exit(0)  # gloo threads outlive destroy_process_group: see test_deepspeed_step._worker


@pytest.mark.parametrize("drp", ["graphdrp", "tcnn", "deepcdr"])
def test_bf16_steps_keep_fp32_master_weights(tiny_shards, tmp_path, drp):
    import torch.multiprocessing as mp
    cfgs = {mode: train_config(tiny_shards, str(tmp_path), "bf16", f"model.drp={drp}", f"train.mode={mode}",
                               "train.precision=bf16", "train.lr=0.001", "model.text_layers=1",
                               "loss.kg_triples=32").to_dict()
            for mode in ("finetune", "pretrain")}
    mp.spawn(_worker, args=(free_port(), cfgs, str(tmp_path)), nprocs=1, join=True)
    for mode in cfgs:
        out = json.loads((tmp_path / f"{mode}.json").read_text())
        assert "error" not in out, f"{drp} {mode} under bf16:\n{out['error']}"
        assert out["bf16_config"]
        assert len(out["losses"]) == STEPS
        for step in out["losses"]:
            assert all(torch.isfinite(torch.tensor(v)) for v in step.values()), step
        assert out["module_dtypes"] == ["torch.bfloat16"]
        assert out["weight_dtypes"] == ["torch.float32"]
        # the fp32 master copy holds bits bf16 cannot (of the fp32 init and of the updates):
        # full_state_dict returns it, not the module's copy (which is it rounded to bf16)
        assert len(out["differ"]) > out["num_params"] // 2, out["differ"]
        assert out["rounded"]
