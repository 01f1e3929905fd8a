"""The gathered local-rows loss in 2 gloo processes equals single-process CLIP on the global
batch: same loss (mean over ranks) and same gradients after data-parallel averaging."""
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from cldr_dist.losses.contrastive import clip_loss, gathered_clip_loss
from tests.conftest import free_port

WORLD, LOCAL, IN_DIM, DIM = 2, 6, 5, 4


def _setup(seed=0):
    """Shared params (two linear maps + logit scale) and the global batch, identical on all ranks."""
    g = torch.Generator().manual_seed(seed)
    params = {"wa": torch.randn(IN_DIM, DIM, generator=g), "wb": torch.randn(IN_DIM, DIM, generator=g),
              "scale": torch.tensor(2.0)}
    x = torch.randn(WORLD * LOCAL, IN_DIM, generator=g)
    z = torch.randn(WORLD * LOCAL, IN_DIM, generator=g)
    return {k: v.requires_grad_() for k, v in params.items()}, x, z


def _loss(params, x, z, fn):
    a, b = F.normalize(x @ params["wa"], dim=1), F.normalize(z @ params["wb"], dim=1)
    return fn(a, b, params["scale"].exp())


def _gloo_threads() -> int:
    """gloo's worker threads alive in this process (Linux names them pt_gloo_runloop)."""
    tasks = Path("/proc/self/task")
    return sum((t / "comm").read_text().strip() == "pt_gloo_runloop" for t in tasks.iterdir())


def _worker(rank, port, out_path):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    params, x, z = _setup()
    rows = slice(rank * LOCAL, (rank + 1) * LOCAL)
    loss = _loss(params, x[rows], z[rows], gathered_clip_loss)
    loss.backward()
    result = {"loss": loss.detach().clone()}
    for k, p in params.items():           # what DDP / DeepSpeed do: average gradients
        dist.all_reduce(p.grad)
        result[k] = p.grad / WORLD
    dist.all_reduce(result["loss"])
    result["loss"] /= WORLD
    # `loss` (and its autograd graph) is still alive here, as in a training loop. If the graph
    # held the ProcessGroup, destroy_process_group would leave gloo's threads running, and one
    # of them releasing a tensor during interpreter shutdown aborts the process (SIGABRT).
    dist.destroy_process_group()
    result["gloo_threads_after_destroy"] = torch.tensor(_gloo_threads())
    if rank == 0:
        torch.save(result, out_path)


def test_two_process_gathered_loss_equals_global(tmp_path):
    out = tmp_path / "grads.pt"
    mp.spawn(_worker, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    got = torch.load(out, weights_only=True)
    assert got.pop("gloo_threads_after_destroy").item() == 0
    params, x, z = _setup()
    loss = _loss(params, x, z, clip_loss)
    loss.backward()
    torch.testing.assert_close(got["loss"], loss.detach(), atol=1e-5, rtol=1e-5)
    for k, p in params.items():
        assert p.grad.abs().sum() > 0
        torch.testing.assert_close(got[k], p.grad, atol=1e-5, rtol=1e-5)


def test_world_one_is_plain_clip_loss():
    params, x, z = _setup(1)
    assert not dist.is_initialized()
    torch.testing.assert_close(_loss(params, x, z, gathered_clip_loss), _loss(params, x, z, clip_loss))


def test_clip_loss_matches_definition():
    a = F.normalize(torch.randn(3, 4), dim=1)
    b = F.normalize(torch.randn(3, 4), dim=1)
    logits = 5.0 * a @ b.T
    log_p_ab = logits.log_softmax(1).diagonal()
    log_p_ba = logits.log_softmax(0).diagonal()
    expected = -(log_p_ab.mean() + log_p_ba.mean()) / 2
    torch.testing.assert_close(clip_loss(a, b, torch.tensor(5.0)), expected)
    # perfectly aligned, well separated pairs give a loss near 0
    eye = torch.eye(3, 4)
    assert clip_loss(eye, eye, torch.tensor(100.0)) < 1e-6
