"""CLIP's symmetric cross-entropy, single-process and over the global batch of all ranks.

Gathered loss (open_clip's ClipLoss with local_loss=True, gather_with_grad=True): each rank
all-gathers both sides WITH autograd and computes only its own b rows of the b x B logits, so
logit memory per rank is O(b * B), not O(B * B).

Gradient bookkeeping, checked by tests/losses/test_contrastive.py: rank r returns its local
loss L_r; the global loss is mean_r L_r. gather_with_grad's backward sums over ranks, so
rank r's embeddings receive d(sum_r L_r)/d(own rows). Data-parallel training (DDP,
DeepSpeed) then AVERAGES parameter gradients over ranks, which gives exactly d(mean_r L_r)/d(params): the single-process gradient on the global batch.
Do not also divide the loss by the world size.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def clip_loss(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Single process: a, b (B, D) L2-normalised, row i of a pairs with row i of b."""
    logits = scale * a @ b.T
    labels = torch.arange(a.shape[0], device=a.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    """all_gather (torch 2.13's dist.all_gather_single) whose backward hands each rank the SUM
    over ranks of the gradient of its own rows (all-reduce, then this rank's slice), as
    open_clip's gather with gradients.

    Written out rather than taken from torch because of what it must not hold: gloo joins its
    worker threads only when the last reference to the process group goes. The deprecated
    torch.distributed.nn.all_gather binds the live group as a default argument (imported after
    init), and the functional all_gather_single keeps one as well; either way the threads outlive
    destroy_process_group, and one of them releasing a finished collective's tensor during
    interpreter shutdown aborts the process (SIGABRT, "terminate called without an active
    exception"). This Function keeps nothing: the collectives use the default group when called."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        out = x.new_empty((dist.get_world_size() * x.shape[0], *x.shape[1:]))
        dist.all_gather_single(out, x.contiguous())
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        rows = grad.shape[0] // dist.get_world_size()
        return grad[dist.get_rank() * rows:(dist.get_rank() + 1) * rows]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """(b, D) on every rank -> (world * b, D), rank order; gradients flow back to each rank.
    Every rank must pass the same b (the reader's drop_last guarantees it)."""
    return _GatherWithGrad.apply(x)


def gathered_clip_loss(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """This rank's rows of the CLIP loss over the global batch; equals clip_loss at world 1."""
    rank, world = _world()
    if world == 1:
        return clip_loss(a, b, scale)
    all_a, all_b = gather_with_grad(a), gather_with_grad(b)
    labels = torch.arange(a.shape[0], device=a.device) + rank * a.shape[0]
    a_to_b = scale * a @ all_b.T      # (b, B): this rank's samples vs every text
    b_to_a = scale * b @ all_a.T      # (b, B): this rank's texts vs every sample
    return (F.cross_entropy(a_to_b, labels) + F.cross_entropy(b_to_a, labels)) / 2
