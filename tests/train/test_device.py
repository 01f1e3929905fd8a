"""Where a run computes: DeepSpeed's accelerator and torch.distributed's backend from ray.use_gpu."""
import torch

from cldr_dist.train.device import accelerator_name, process_group_backend


def test_gpu_group_has_a_backend_for_cpu_tensors_too():
    # object collectives and CPU metrics need gloo; an NCCL-only group has no CPU backend
    assert process_group_backend(True) == "cpu:gloo,cuda:nccl"
    assert process_group_backend(False) == "gloo"


def test_accelerator_follows_use_gpu():
    assert accelerator_name(True) == "cuda"
    assert accelerator_name(False) == "cpu"


def test_mean_over_ranks_at_world_one_returns_plain_floats():
    from cldr_dist.train.loop import _mean_over_ranks
    values = {"loss": torch.tensor(1.5, requires_grad=True) * 1, "clip": torch.tensor(0.25),
              "kg": torch.tensor(2.0, dtype=torch.bfloat16), "logit_scale": torch.tensor(14.0)}
    out = _mean_over_ranks(values, 1, torch.device("cpu"))
    assert out == {"loss": 1.5, "clip": 0.25, "kg": 2.0, "logit_scale": 14.0}
    assert all(type(v) is float for v in out.values())
    assert _mean_over_ranks({"loss": torch.tensor(3.0)}, 1, "cpu") == {"loss": 3.0}
