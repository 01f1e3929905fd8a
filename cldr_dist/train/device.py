"""Where a training run computes, decided in one place from `ray.use_gpu`.

DeepSpeed picks its accelerator once per process, from DS_ACCELERATOR when set: a value
inherited from a shell or a runtime_env would put the model on the CPU while batches go to
CUDA (or the reverse). Workers therefore set it from the run's config before DeepSpeed loads.
"""
from __future__ import annotations

import os

import torch


class DeviceError(RuntimeError):
    """The worker's accelerator does not match ray.use_gpu; the message says what to change."""


def accelerator_name(use_gpu: bool) -> str:
    """DeepSpeed's accelerator name for a run."""
    return "cuda" if use_gpu else "cpu"


def process_group_backend(use_gpu: bool) -> str:
    """torch.distributed backend: on GPU, NCCL carries CUDA tensors and gloo the CPU ones
    (object collectives, metrics); an NCCL-only group has no CPU backend."""
    return "cpu:gloo,cuda:nccl" if use_gpu else "gloo"


def select_accelerator(use_gpu: bool) -> None:
    """Call before DeepSpeed is imported in this process; fails if it already chose another."""
    wanted = accelerator_name(use_gpu)
    os.environ["DS_ACCELERATOR"] = wanted
    if use_gpu and not torch.cuda.is_available():
        raise DeviceError("ray.use_gpu=true but this worker sees no CUDA device")
    from deepspeed.accelerator import get_accelerator
    have = get_accelerator().device_name()
    if have != wanted:
        raise DeviceError(f"DeepSpeed already runs on {have!r} in this process, but ray.use_gpu="
                          f"{str(use_gpu).lower()} needs {wanted!r}")
