"""One optimizer step of the real pretraining objective through a real DeepSpeed ZeRO-2 engine
on 2 gloo processes equals one plain single-process step on the concatenated batch: the loss
(mean over ranks), the gradient (DeepSpeed's averaged one) and every parameter afterwards.

This is the loop's step (loop.py: engine(batch) / backward / step, AdamW as the client
optimizer, the DeepSpeed config loop.deepspeed_config builds from configs/deepspeed/zero2.json,
gradient clipping included) with the gathered CLIP loss and TransE in it."""
import os

import torch

from tests.conftest import free_port, train_config

WORLD, LOCAL = 2, 8            # 2 ranks x 8 samples = the single process's batch of 16
SETTINGS = ["model.dropout=0",  # deterministic: no dropout masks to differ between the two runs
            "model.text_layers=1", "loss.kg_triples=32", f"train.batch_size={LOCAL}",
            "train.lr=0.001", "train.weight_decay=0.01"]
KG_SEED = 5                    # TransE's triples: the same on every rank and in the reference
# Adam's first step moves a weight by lr * g / (|g| + eps). With the default eps (1e-8) a
# gradient of 1e-8 - float noise of a sum over 16 rows, which two ways of summing get
# differently - moves a weight by up to lr/2 either way. A larger eps keeps the step a smooth
# function of the gradient (and proportional to it for most weights, so a gradient of the
# wrong scale, a sum over ranks instead of a mean, shows in the weights too).
ADAM_EPS = 1e-3


def _config(shards: str, tmp: str):
    return train_config(shards, tmp, "ds-step", *SETTINGS)


def _objective(cfg, shards):
    from cldr_dist.losses.numeric_kg import NumberTexts
    from cldr_dist.train.loop import make_model
    from cldr_dist.train.objectives import PretrainObjective
    torch.manual_seed(0)
    return PretrainObjective(make_model(cfg, shards), NumberTexts(shards.features), cfg.loss, seed=KG_SEED)


def _optimizer(cfg, objective):
    return torch.optim.AdamW(objective.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
                             eps=ADAM_EPS)


def _batches(shards, batch_size: int, n: int):
    """The first n batches of mixed/train in shard order: batches of LOCAL are consecutive
    slices of the batch of WORLD * LOCAL."""
    from cldr_dist.data.reader import ShardStream
    it = iter(ShardStream(shards, "mixed", "train", batch_size=batch_size, shuffle=False, drop_last=True))
    return [next(it) for _ in range(n)]


def gloo_threads() -> list[str]:
    names = []
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                names.append(f.read().strip())
        except OSError:
            pass
    return [n for n in names if "gloo" in n]


def _worker(rank: int, port: int, cfg_dict: dict, out_dir: str) -> None:
    import torch.distributed as dist
    torch.set_num_threads(1)
    # what Ray Train sets up before train_loop_per_worker runs: env and the gloo group
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    from cldr_dist.config import config_from_dict
    from cldr_dist.data.reader import open_shards
    from cldr_dist.train.checkpoint import full_state_dict
    from cldr_dist.train.loop import deepspeed_config

    cfg = config_from_dict(cfg_dict)
    shards = open_shards(cfg.data.shards)
    objective = _objective(cfg, shards)
    engine, *_ = deepspeed.initialize(model=objective, optimizer=_optimizer(cfg, objective),
                                      config=deepspeed_config(cfg.train, use_gpu=False))
    assert engine.zero_optimization_stage() == 2 and engine.gradient_clipping() == cfg.train.grad_clip
    loss, parts = engine(_batches(shards, LOCAL, WORLD)[rank])
    engine.backward(loss)
    # the averaged gradient, gathered from the ZeRO partitions (a collective: every rank)
    grads = {n: safe_get_full_grad(p).detach().float().clone() for n, p in engine.module.named_parameters()}
    engine.step()
    weights = full_state_dict(engine)  # the fp32 master weights (a collective as well)
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    result = {"loss": mean_loss / WORLD, "local_loss": loss.detach().clone(), "grads": grads, "weights": weights}
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))

    engine.destroy()
    del engine, objective, loss, parts, grads, weights, result, mean_loss
    dist.destroy_process_group()
    # End the process here, without interpreter shutdown. After destroy_process_group, gloo's
    # threads (pt_gloo_runloop) of both groups still run in this process - the default group
    # and the one DeepSpeed cloned from it (deepspeed.utils.groups._WORLD_GROUP, each
    # parameter's _dp_group): DeepSpeed's engine and ZeRO optimizer stay alive after
    # engine.destroy() and `del` (torch 2.13, deepspeed 0.19.8). No Python-visible path holds
    # them (a search from every module and live frame finds none; something outside Python's
    # gc keeps the engine and its optimizer alive), so this process cannot let them go.
    # A live gloo thread that frees a tensor while the interpreter shuts down aborts the
    # process (SIGABRT, "terminate called without an active exception"): the flaky failure
    # of DESIGN.md 6. The results are on disk (torch.save closed the file); os._exit skips
    # only the interpreter's teardown.
    os._exit(0)


def test_two_rank_zero2_step_equals_single_process_step(tiny_shards, tmp_path):
    import torch.multiprocessing as mp

    from cldr_dist.data.reader import open_shards
    cfg = _config(tiny_shards, str(tmp_path))
    mp.spawn(_worker, args=(free_port(), cfg.to_dict(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]

    # the reference: plain PyTorch on one process, the whole batch, no process group
    shards = open_shards(tiny_shards)
    objective = _objective(cfg, shards)
    before = {k: v.detach().clone() for k, v in objective.state_dict().items()}
    optimizer = _optimizer(cfg, objective)
    loss, _ = objective(_batches(shards, WORLD * LOCAL, 1)[0])
    loss.backward()
    grads = {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p)
             for n, p in objective.named_parameters()}
    torch.nn.utils.clip_grad_norm_(objective.parameters(), cfg.train.grad_clip)
    optimizer.step()
    after = objective.state_dict()

    got = ranks[0]
    # the two ranks saw different samples: their local losses differ, their mean is the loss
    assert abs(float(ranks[0]["local_loss"]) - float(ranks[1]["local_loss"])) > 1e-3
    torch.testing.assert_close(got["loss"], loss.detach(), atol=1e-5, rtol=0)
    assert set(got["grads"]) == set(grads)
    assert max(float(g.abs().max()) for g in grads.values()) > 0.01   # a real gradient ...
    assert sum(float(g.norm() ** 2) for g in grads.values()) ** 0.5 > cfg.train.grad_clip  # ... that clipping acts on
    for name, g in grads.items():
        torch.testing.assert_close(got["grads"][name], g, atol=1e-5, rtol=1e-4, msg=f"gradient of {name}")
    assert set(after) <= set(got["weights"])
    moved = 0
    for name, w in after.items():
        torch.testing.assert_close(got["weights"][name], w, atol=1e-5, rtol=0, msg=f"weights of {name}")
        torch.testing.assert_close(ranks[1]["weights"][name], got["weights"][name], atol=0, rtol=0)
        moved += float((w - before[name]).abs().max()) > 1e-4
    assert moved > len(after) // 2  # the step moved most tensors by far more than the tolerance
