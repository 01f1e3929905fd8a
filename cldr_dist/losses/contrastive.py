"""CLIP's symmetric cross-entropy, single-process and over the global batch of all ranks.

Gathered loss (open_clip's ClipLoss with local_loss=True, gather_with_grad=True): each rank
all-gathers both sides WITH autograd and computes only its own b rows of the b x B logits, so
logit memory per rank is O(b * B), not O(B * B).

Gradient bookkeeping, checked by tests/losses/test_contrastive.py: rank r returns its local
loss L_r; the global loss is mean_r L_r. The functional all_gather's backward is a
reduce-scatter with SUM, so rank r's embeddings receive d(sum_r L_r)/d(own rows). Data-parallel training (DDP, DeepSpeed) then AVERAGES parameter gradients over ranks,
which gives exactly d(mean_r L_r)/d(params): the single-process gradient on the global batch.
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


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """(b, D) on every rank -> (world * b, D), rank order; gradients flow back to each rank.

    The functional collective names its group in the autograd graph. The deprecated
    torch.distributed.nn.all_gather stores the ProcessGroup object there instead, so a live
    loss tensor kept gloo's worker threads running past destroy_process_group; one of them
    could then release a tensor during interpreter shutdown and abort the process."""
    from torch.distributed._functional_collectives import all_gather_single, wait_tensor
    return wait_tensor(all_gather_single(x.contiguous(), 0, dist.group.WORLD))


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
