"""Scaling past this machine, on paper: measure on this CPU what a training step costs, then
predict step time and scaling efficiency on 1-64 GPUs (docs/scaling.md explains the model).

Measured here, with the project's real code on batches of the full shipped GDSC v17 tables
(pairs drawn at random, decoded and collated as the reader does, no shards):
  * FLOPs of one forward+backward of the finetune objective (GraphDRP, MSE) and the pretrain
    objective (GraphDRP + text towers, CLIP + TransE) at local batches 256-16384, with
    torch.utils.flop_counter.FlopCounterMode, plus a tally of what it does not count (see
    OpTally): kernels launched and elements touched by elementwise, reduction and PyG
    gather/scatter ops;
  * parameters and the gradient bytes a step all-reduces; the CLIP embeddings' gathered bytes
    as a function of world size and global batch (losses/contrastive.py);
  * the input pipeline's samples/s on one core (`collate` into batches of 4096);
  * a 2-process gloo all-reduce of the gradient's size, and the CPU FLOP rate, to predict the
    2 workers x 1 thread against 1 worker x 2 threads check on this machine.
Everything about GPUs and networks is an assumption: the constants below, each with its reason.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/scaling_model.py --out docs/results/scaling_model.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data" / "gdsc_v17"
SEED = 0
FLOP_BATCHES = (256, 1024, 4096, 16384)    # local batches whose step FLOPs are counted
CHECK_BATCH = 4096                         # global batch of bench_throughput's 2x1 against 1x2 check
COLLATE_BATCH = 4096
COLLATE_REPEATS = 3
ALLREDUCE_REPEATS = 5

# ----------------------------------------------------------------------------- the prediction's grid
WORLD_SIZES = (1, 2, 4, 8, 16, 32, 64)
GPUS_PER_NODE = (1, 8)
LINK_GBIT = (100, 400)                     # inter-node link, Gb/s per GPU (see NIC_PER_GPU)
WEAK_LOCAL_BATCH = 4096                    # weak scaling: every GPU keeps 4096 pairs
STRONG_GLOBAL_BATCH = 16384                # strong scaling: 16384 pairs split over the GPUs

# ----------------------------------------------------------------------------- assumptions: the GPU
# An H100 SXM: 989 TFLOP/s dense bf16 (NVIDIA's datasheet figure without sparsity).
GPU_PEAK_FLOPS = 989e12
# These models are small matmuls (widths 90-1800, 128-wide text tower) in eager PyTorch: far
# from the large square GEMMs that reach 60-70 % of peak. 20 % is the assumption; the
# sensitivity line halves it.
GPU_MATMUL_FRACTION = 0.20
# Ops FlopCounterMode does not count (elementwise, reductions, layer norms, softmax, PyG's
# gather/scatter) are memory-bound: time = elements x bytes / bandwidth. H100 SXM HBM3 is
# 3.35 TB/s; half of it is reached by small eager kernels; ~8 bytes move per element-op (a
# 2-byte bf16 or 4-byte fp32 operand read, one written, more for binary ops).
GPU_HBM_BYTES_PER_S = 3.35e12
GPU_HBM_FRACTION = 0.5
BYTES_PER_ELEMENT_OP = 8
# Eager PyTorch dispatches every op from Python: ~6 us of host time per kernel (dispatcher +
# CUDA launch) bounds a step from below however fast the GPU is. No CUDA graphs, no
# torch.compile: the trainer uses neither.
HOST_SECONDS_PER_KERNEL = 6e-6
SENSITIVITY = 2.0                          # the sensitivity line: GPU rates (FLOP/s, HBM) this much lower

# ----------------------------------------------------------------------------- assumptions: the network
# Within a node: NVLink 4 (900 GB/s bidirectional per H100); NCCL's all-reduce bus bandwidth on
# 8 H100s measures ~350-450 GB/s, 350e9 is the assumption.
NVLINK_BUS_BYTES_PER_S = 350e9
# Across nodes: one NIC per GPU (rail-optimised H100 nodes: 8 NICs per 8 GPUs), NCCL one ring per
# rail, so the ring's slowest hop is one NIC at the stated link speed, at 80 % of line rate.
NIC_PER_GPU = True
NIC_EFFICIENCY = 0.8
# Per-collective latency (small-message NCCL all-reduce): ~15 us within an NVLink node, ~40 us
# across an InfiniBand/RoCE fabric.
LATENCY_INTRA_S = 15e-6
LATENCY_INTER_S = 40e-6
# configs/deepspeed/zero2.json leaves overlap_comm at DeepSpeed's default, False for stage 2:
# the gradient reduction runs after backward, not under it, so all of it is exposed. The CLIP
# gathers sit on the critical path by construction (the forward needs them; the backward's
# all-reduce is mid-backward).
EXPOSED_GRADIENT_FRACTION = 1.0
# Collectives per step besides the CLIP ones: ZeRO-2's gradient reduce-scatter (one bucket:
# reduce_bucket_size 5e8 elements exceeds the models), the updated parameters' all-gather, and
# the scalar all-reduce of the global gradient norm for clipping (train.grad_clip = 1.0).
GRADIENT_COLLECTIVES = 3
CLIP_COLLECTIVES = 4                       # all_gather of (b, D) sample and text; all_reduce of both (B, D) grads
CLIP_BYTES_PER_ELEMENT = 4                 # pretrain_loss gathers out.sample.float(): fp32 whatever the compute dtype

# ----------------------------------------------------------------------------- assumptions: the input pipeline
# Loader cores per GPU feeding batches (collate) in parallel: H100 nodes carry 12-24 cores per
# GPU; 8 of them as loaders is the assumption (the trainer's data.loader_workers, per rank).
LOADER_CORES_PER_GPU = 8
# The loader runs in DataLoader worker processes and prefetches, so it overlaps the step: a
# step takes the longer of the two. Its per-core rate is the measured `collate` of decoded
# samples (the trainer decodes a training part that fits data.memory_budget_mb into memory once
# and then only collates); streamed from shards it is the reader's batched rate instead,
# 15,006 samples/s from local disk (docs/benchmarks.md), shown as the pessimistic case.
STREAMED_SAMPLES_PER_S_PER_CORE = 15006


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


# ----------------------------------------------------------------------------- assumptions: the CPU check
# Speedup of one process from 1 to 2 threads on this machine's 2 cores at global batch 4096.
# Measuring it needs both cores idle; with the test suite running alongside, the 2-thread step
# ran slower than the 1-thread one, so the prediction takes it as an assumption: large GEMMs and
# convolutions parallelise well in oneDNN, 1.8 is the central value, the range is the whole
# trainer's 1.17x at batch 32 (docs/benchmarks_train.md, finetune 166.2 -> 195.2 samples/s)
# up to 2.0 (perfect).
CPU_TWO_THREAD_SPEEDUP = 1.8
CPU_TWO_THREAD_SPEEDUP_RANGE = (1.17, 2.0)


# ----------------------------------------------------------------------------- measuring

def cpu_flash_attention_formulas() -> dict:
    """FlopCounterMode's registry has the CUDA SDPA kernels but not the CPU one SDPA picks
    here; its FLOPs are those of the same attention, so it gets the same formulas (which, as
    for CUDA, count the full T x T scores whatever the mask)."""
    from torch.utils import flop_counter as fc
    aten = torch.ops.aten
    return {getattr(aten, name): formula for name, formula in
            (("_scaled_dot_product_flash_attention_for_cpu", fc.sdpa_flop.__wrapped__),
             ("_scaled_dot_product_flash_attention_for_cpu_backward", fc.sdpa_backward_flop.__wrapped__))
            if hasattr(aten, name)}


class OpTally(TorchDispatchMode):
    """What FlopCounterMode leaves out: every non-view aten op is one kernel; an op without a
    FLOP formula (`counted`: elementwise, reductions, norms, softmax, indexing, PyG's
    scatter/gather message passing) counts the elements of its largest tensor, input or
    output: for a scatter-add that is the (edges, channels) messages, for an index_select its
    output. That is the memory-bound work the GPU model charges HBM bandwidth for."""

    def __init__(self, counted):
        super().__init__()
        self.counted = counted
        self.kernels, self.element_ops, self.by_op = 0, 0, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view or func._overloadpacket in VIEWLIKE:
            return out
        self.kernels += 1
        if func._overloadpacket not in self.counted:
            tensors = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
            n = max((t.numel() for t in tensors), default=0)
            self.element_ops += n
            name = func._overloadpacket.__name__
            self.by_op[name] = self.by_op.get(name, 0) + n
        return out


# ops that launch no kernel (allocation, aliasing, reading a scalar) although not marked as views
VIEWLIKE = {torch.ops.aten.detach, torch.ops.aten.lift_fresh, torch.ops.aten.empty, torch.ops.aten.empty_like,
            torch.ops.aten.empty_strided, torch.ops.aten.new_empty, torch.ops.aten.new_empty_strided,
            torch.ops.aten._local_scalar_dense}


def count_step(objective, batch) -> dict:
    """FLOPs (forward+backward), kernels and element-ops of one training step's loss.backward()."""
    from torch.utils.flop_counter import FlopCounterMode, flop_registry
    custom = cpu_flash_attention_formulas()
    counted = set(flop_registry) | set(custom)
    objective.zero_grad(set_to_none=True)
    flops = FlopCounterMode(display=False, custom_mapping=custom)
    tally = OpTally(counted)
    t0 = time.perf_counter()
    with flops, tally:
        loss, _ = objective(batch)
        loss.backward()
    wall = time.perf_counter() - t0
    per_op = {str(k): v for k, v in flops.get_flop_counts().get("Global", {}).items()}
    top = dict(sorted(tally.by_op.items(), key=lambda kv: -kv[1])[:8])
    return {"flops": int(flops.get_total_flops()), "flops_by_op": per_op, "kernels": tally.kernels,
            "element_ops": int(tally.element_ops), "element_ops_top": top, "counted_wall_s": round(wall, 2),
            "counted_wall_s_exact": wall}


def clip_element_ops_per_logit(dim: int, sizes: tuple[int, int] = (256, 1024)) -> float:
    """Element-ops of clip_loss (forward+backward) per logit: what the logits' softmax, cross
    entropy and their backward cost beyond the matmuls, to rescale from b x b (world 1) to the
    two b x B matrices of the gathered loss. E(b) = c b^2 + l b at two sizes, solved for c (the
    l b part is the (b, D) embeddings' own ops)."""
    from torch.utils.flop_counter import flop_registry

    from cldr_dist.losses.contrastive import clip_loss
    counts = []
    for b in sizes:
        a = torch.nn.functional.normalize(torch.randn(b, dim), dim=-1).requires_grad_()
        t = torch.nn.functional.normalize(torch.randn(b, dim), dim=-1).requires_grad_()
        tally = OpTally(set(flop_registry))
        with tally:
            clip_loss(a, t, torch.tensor(10.0)).backward()
        counts.append(tally.element_ops)
    (b1, b2), (e1, e2) = sizes, counts
    return (e2 / b2 - e1 / b1) / (b2 - b1)


def time_step(objective, batch, threads: int) -> float:
    """Seconds of one forward+backward (no counters), after the counted run warmed it up."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        objective.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        loss, _ = objective(batch)
        loss.backward()
        return time.perf_counter() - t0
    finally:
        torch.set_num_threads(saved)


def time_adamw(numel: int, threads: int, repeats: int = 3) -> float:
    """Seconds of one AdamW step over one flat fp32 tensor of `numel` (ZeRO keeps each rank's
    partition flat); best of `repeats`."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        p = torch.nn.Parameter(torch.zeros(numel))
        p.grad = torch.randn(numel)
        opt = torch.optim.AdamW([p], lr=1e-3)
        opt.step()   # allocates the moments
        best = math.inf
        for _ in range(repeats):
            t0 = time.perf_counter()
            opt.step()
            best = min(best, time.perf_counter() - t0)
        return best
    finally:
        torch.set_num_threads(saved)


def count_adamw(numel: int) -> dict:
    """Kernels and element-ops of one AdamW step over one flat tensor (foreach, as on CUDA)."""
    p = torch.nn.Parameter(torch.zeros(numel))
    p.grad = torch.zeros(numel)
    opt = torch.optim.AdamW([p], lr=1e-3, foreach=True)
    opt.step()
    tally = OpTally(set())
    with tally:
        opt.step()
    return {"kernels": tally.kernels, "element_ops_per_param": tally.element_ops / numel}


def _allreduce_worker(rank: int, port: int, numels: list[int], repeats: int, out: str) -> None:
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        result = {}
        for n in numels:
            x = torch.ones(n)
            dist.all_reduce(x)           # warm-up: gloo's pairs connect on first use
            times = []
            for _ in range(repeats):
                dist.barrier()
                t0 = time.perf_counter()
                dist.all_reduce(x)
                times.append(time.perf_counter() - t0)
            result[str(n)] = {"median_s": float(np.median(times)), "min_s": min(times)}
            del x
        if rank == 0:
            Path(out).write_text(json.dumps(result))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def gloo_allreduce(numels: list[int]) -> dict:
    """fp32 all-reduce of each size between 2 local processes (gloo over 127.0.0.1, 1 thread each)."""
    import socket

    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as d:
        out = str(Path(d) / "allreduce.json")
        mp.spawn(_allreduce_worker, args=(port, numels, ALLREDUCE_REPEATS, out), nprocs=2, join=True)
        return json.loads(Path(out).read_text())


def measure(args) -> dict:
    from cldr_dist.config import load_config
    from cldr_dist.data.batch import collate
    from cldr_dist.data.shards import decoded_samples, prepare
    from cldr_dist.data.tables import load_tables
    from cldr_dist.losses.numeric_kg import NumberTexts
    from cldr_dist.models.cldr import build_model
    from cldr_dist.train.objectives import FinetuneObjective, PretrainObjective

    torch.set_num_threads(1)
    torch.manual_seed(SEED)
    cfg = load_config(None, [f"data.data_dir={DATA}"])
    t0 = time.perf_counter()
    tables = load_tables(DATA)
    # the tokenizer exactly as `cldr shards` trains it (data.vocab_size, 2000): ~7 s here
    tokenizer, features, caption_ids, drows, crows = prepare(tables, cfg.data.vocab_size)
    setup_s = time.perf_counter() - t0
    model = build_model(cfg.model, cfg.loss, vocab_size=tokenizer.get_vocab_size(),
                        num_cell_features=features.num_cell_features, text_buckets=cfg.model.text_buckets,
                        dedup_numbers=cfg.model.dedup_numbers)
    objectives = {"finetune": FinetuneObjective(model),
                  "pretrain": PretrainObjective(model, NumberTexts(features), cfg.loss, seed=SEED)}
    rng = np.random.default_rng(SEED)
    n_pairs = len(tables.responses)

    def batch_of(b: int):
        rows = rng.choice(n_pairs, b, replace=False)
        samples = [s for _, s in decoded_samples(tables, rows, caption_ids, drows, crows)]
        return samples, collate(samples, features)

    report = {"setup_s": round(setup_s, 1), "pairs": n_pairs, "drugs": len(tables.drugs),
              "cell_lines": len(tables.cell_ids), "embed_dim": cfg.model.embed_dim,
              "vocab_size": tokenizer.get_vocab_size(), "steps": {}, "cpu": {}}

    # parameters, and which of them a step gives gradients (the ones ZeRO reduces)
    params = {}
    first_batch = None
    check = {}
    flop_batches = tuple(args.flop_batches)
    batches = sorted(set(flop_batches) | {CHECK_BATCH // 2, CHECK_BATCH})
    for b in batches:
        samples, batch = batch_of(b)
        if b == COLLATE_BATCH:
            first_batch = samples
        entities = {"unique_drugs": int(batch.drug.num_graphs), "unique_cells": int(batch.cell.shape[0]),
                    "unique_numbers": int(torch.unique(batch.number_index).numel()),
                    "atoms": int(batch.drug.x.shape[0]), "edges": int(batch.drug.edge_index.shape[1]),
                    "caption_len_max": int(batch.caption.shape[1])}
        for name, obj in objectives.items():
            if name == "pretrain" and b not in flop_batches:
                continue
            row = {"batch": b, **entities, **count_step(obj, batch)}
            if name not in params:
                grads = [p for p in obj.parameters() if p.grad is not None]
                params[name] = {"total": sum(p.numel() for p in obj.parameters()),
                                "with_grad": sum(p.numel() for p in grads)}
            if name == "finetune" and b == CHECK_BATCH // 2:
                # the counted run is the 1-thread timing: ~200 kernels, so the counters' per-op
                # Python cost (tens of us each) is well under 1 % of a multi-second step
                check["fb_s_1thread_local"] = row["counted_wall_s_exact"]
            if name == "finetune" and b == CHECK_BATCH:
                # recorded, not used by the prediction: see CPU_TWO_THREAD_SPEEDUP
                check["fb_s_2threads_global"] = time_step(obj, batch, 2)
            report["steps"].setdefault(name, []).append(row)
            print(f"[scaling] {name:8s} batch {b:6d}: {row['flops'] / 1e9:8.1f} GFLOP, "
                  f"{row['element_ops'] / 1e9:6.2f} G element-ops, {row['kernels']} kernels, "
                  f"{entities['unique_drugs']} drugs, {entities['unique_cells']} cells "
                  f"(counted in {row['counted_wall_s']} s)", flush=True)
    report["params"] = params
    report["clip_element_ops_per_logit"] = clip_element_ops_per_logit(cfg.model.embed_dim)

    # the input pipeline: collate of decoded samples, one core
    times = []
    for _ in range(COLLATE_REPEATS):
        t0 = time.perf_counter()
        collate(first_batch, features)
        times.append(time.perf_counter() - t0)
    report["collate"] = {"batch": COLLATE_BATCH, "best_s": min(times), "median_s": float(np.median(times)),
                         "samples_per_s_per_core": COLLATE_BATCH / float(np.median(times))}
    print(f"[scaling] collate {COLLATE_BATCH}: {report['collate']['samples_per_s_per_core']:,.0f} samples/s "
          f"on one core", flush=True)

    # the CPU check's pieces: FLOP rate at 1 and 2 threads, AdamW, gloo all-reduce of the gradient
    fine = {r["batch"]: r for r in report["steps"]["finetune"]}
    p_fine = params["finetune"]["with_grad"]
    check["flops_local"] = fine[CHECK_BATCH // 2]["flops"]
    check["flops_global"] = fine[CHECK_BATCH]["flops"]
    check["cpu_flops_per_s_1thread"] = check["flops_local"] / check["fb_s_1thread_local"]
    check["cpu_flops_per_s_2threads"] = check["flops_global"] / check["fb_s_2threads_global"]
    check["adamw_s_1thread_half"] = time_adamw(math.ceil(p_fine / 2), 1)
    check["adamw_s_2threads_full"] = time_adamw(p_fine, 2)
    report["adamw_gpu_counts"] = count_adamw(p_fine)
    ar = gloo_allreduce([p_fine])
    check["gloo_allreduce_s"] = ar[str(p_fine)]["median_s"]
    check["gloo_allreduce_min_s"] = ar[str(p_fine)]["min_s"]
    check["gloo_allreduce_bytes"] = 4 * p_fine
    report["cpu"] = check
    print(f"[scaling] CPU: {check['cpu_flops_per_s_1thread'] / 1e9:.1f} GFLOP/s at 1 thread, "
          f"{check['cpu_flops_per_s_2threads'] / 1e9:.1f} at 2; gloo all-reduce of {4 * p_fine / 2**20:.1f} MiB: "
          f"{check['gloo_allreduce_s'] * 1e3:.1f} ms", flush=True)
    return report


# ----------------------------------------------------------------------------- the model

def interpolate(points: dict[int, float], b: int) -> float:
    """Linear in the batch between the nearest measured batches (the step's cost is a
    per-pair part, linear in b, plus per-entity parts that saturate at the dataset's 248 drugs
    and 988 cell lines); beyond the largest, the last segment's slope."""
    xs = sorted(points)
    if b in points:
        return points[b]
    lo = max([x for x in xs if x < b], default=xs[0])
    hi = min([x for x in xs if x > b], default=xs[-1])
    if lo == hi:
        lo, hi = xs[-2], xs[-1]
    return points[lo] + (points[hi] - points[lo]) * (b - lo) / (hi - lo)


def clip_matmul_flops(b: int, global_b: int, dim: int, world: int) -> float:
    """FLOPs of the CLIP logits' matmuls, forward+backward, on one rank. World 1 (clip_loss):
    one b x b product, 2b^2D forward, 4b^2D backward. Gathered: two b x B products (this
    rank's samples against every text and its texts against every sample): 12 b B D."""
    return 6 * b * b * dim if world == 1 else 12 * b * global_b * dim


def gpu_step(m: dict, objective: str, local_b: int, world: int, rate_scale: float = 1.0) -> dict:
    """Seconds of the compute of one step of one GPU at this local batch and world size."""
    dim = m["embed_dim"]
    rows = {r["batch"]: r for r in m["steps"][objective]}
    global_b = local_b * world
    flops = {b: r["flops"] for b, r in rows.items()}
    elems = {b: r["element_ops"] for b, r in rows.items()}
    kernels = {b: r["kernels"] for b, r in rows.items()}
    if objective == "pretrain":
        # measured at world 1: take the b x b loss out, put the world's gathered loss in
        c = m["clip_element_ops_per_logit"]
        model_flops = interpolate({b: f - clip_matmul_flops(b, b, dim, 1) for b, f in flops.items()}, local_b)
        model_elems = interpolate({b: e - c * b * b for b, e in elems.items()}, local_b)
        clip_f, clip_e = clip_matmul_flops(local_b, global_b, dim, world), c * local_b * global_b
        f, e = model_flops + clip_f, model_elems + clip_e
    else:
        f, e = interpolate(flops, local_b), interpolate(elems, local_b)
        clip_f = clip_e = 0.0
    p = m["params"][objective]["with_grad"]
    e += m["adamw_gpu_counts"]["element_ops_per_param"] * p / world   # ZeRO-2: each rank steps its 1/N
    k = interpolate(kernels, local_b) + m["adamw_gpu_counts"]["kernels"]
    matmul_s = f / (GPU_PEAK_FLOPS * GPU_MATMUL_FRACTION * rate_scale)
    memory_s = e * BYTES_PER_ELEMENT_OP / (GPU_HBM_BYTES_PER_S * GPU_HBM_FRACTION * rate_scale)
    host_s = k * HOST_SECONDS_PER_KERNEL
    # the part of matmul_s + memory_s that is the CLIP logits (grows with the global batch)
    clip_s = (clip_f / (GPU_PEAK_FLOPS * GPU_MATMUL_FRACTION * rate_scale)
              + clip_e * BYTES_PER_ELEMENT_OP / (GPU_HBM_BYTES_PER_S * GPU_HBM_FRACTION * rate_scale))
    return {"flops": f, "element_ops": e, "kernels": k, "matmul_s": matmul_s, "memory_s": memory_s,
            "host_s": host_s, "clip_logits_s": clip_s, "compute_s": max(matmul_s + memory_s, host_s)}


def bus_bytes_per_s(world: int, per_node: int, link_gbit: float) -> tuple[float, float]:
    """(bandwidth of the ring's slowest hop, per-collective latency)."""
    if world <= per_node:
        return NVLINK_BUS_BYTES_PER_S, LATENCY_INTRA_S
    nic = link_gbit * 1e9 / 8 * NIC_EFFICIENCY
    if not NIC_PER_GPU:
        nic /= per_node
    return min(nic, NVLINK_BUS_BYTES_PER_S), LATENCY_INTER_S


def gradient_bytes(m: dict, objective: str, bytes_per_param: int) -> int:
    return m["params"][objective]["with_grad"] * bytes_per_param


def clip_wire_bytes(world: int, global_b: int, dim: int) -> float:
    """Bytes each rank sends (= receives) for the CLIP loss per step, ring algorithms: two
    all-gathers of (b, D) into (B, D), (N-1)/N B D each, and two all-reduces of the (B, D)
    gradients in the backward, 2 (N-1)/N B D each: 6 (N-1)/N B D elements, fp32."""
    return 6 * (world - 1) / world * global_b * dim * CLIP_BYTES_PER_ELEMENT


def comm_step(m: dict, objective: str, local_b: int, world: int, per_node: int, link_gbit: float,
              grad_bytes_per_param: int = 2) -> dict:
    """Exposed communication of one step. Gradients: ZeRO-2's reduce-scatter + all-gather move
    what a ring all-reduce does, 2 (N-1)/N x the gradient's bytes."""
    if world == 1:
        return {"gradient_s": 0.0, "clip_s": 0.0, "comm_s": 0.0}
    bw, lat = bus_bytes_per_s(world, per_node, link_gbit)
    grad = 2 * (world - 1) / world * gradient_bytes(m, objective, grad_bytes_per_param) / bw \
        + GRADIENT_COLLECTIVES * lat
    grad *= EXPOSED_GRADIENT_FRACTION
    clip = 0.0
    if objective == "pretrain":
        clip = clip_wire_bytes(world, local_b * world, m["embed_dim"]) / bw + CLIP_COLLECTIVES * lat
    return {"gradient_s": grad, "clip_s": clip, "comm_s": grad + clip}


def predict(m: dict, objective: str, scaling: str, world: int, per_node: int, link_gbit: float,
            rate_scale: float = 1.0) -> dict:
    local_b = WEAK_LOCAL_BATCH if scaling == "weak" else STRONG_GLOBAL_BATCH // world
    gpu = gpu_step(m, objective, local_b, world, rate_scale)
    comm = comm_step(m, objective, local_b, world, per_node, link_gbit)
    input_s = local_b / (LOADER_CORES_PER_GPU * m["collate"]["samples_per_s_per_core"])
    train_s = gpu["compute_s"] + comm["comm_s"]
    step = max(train_s, input_s)
    return {"objective": objective, "scaling": scaling, "gpus": world, "gpus_per_node": per_node,
            "link_gbit": link_gbit, "local_batch": local_b, "global_batch": local_b * world,
            **{k: gpu[k] for k in ("flops", "element_ops", "kernels", "matmul_s", "memory_s", "host_s",
                                   "clip_logits_s", "compute_s")},
            **comm, "input_s": input_s, "step_s": step,
            "input_s_streamed": local_b / (LOADER_CORES_PER_GPU * STREAMED_SAMPLES_PER_S_PER_CORE),
            # what the step waits on: the loader, the network, or compute (host dispatch or the GPU)
            "bound": "input" if input_s > train_s else "comm" if comm["comm_s"] > gpu["compute_s"]
            else "host" if gpu["host_s"] >= gpu["matmul_s"] + gpu["memory_s"] else "gpu",
            "samples_per_s": local_b * world / step,
            "samples_per_s_without_input_bound": local_b * world / train_s}


def tables(m: dict, rate_scale: float = 1.0) -> list[dict]:
    rows = []
    for objective in ("finetune", "pretrain"):
        for scaling in ("weak", "strong"):
            base = {}
            for per_node in GPUS_PER_NODE:
                for link in LINK_GBIT:
                    for n in WORLD_SIZES:
                        r = predict(m, objective, scaling, n, per_node, link, rate_scale)
                        if n == 1:
                            base = r
                        # efficiency: samples/s against N x one GPU's, both with and without the
                        # input pipeline's bound
                        r["efficiency"] = r["samples_per_s"] / (n * base["samples_per_s"])
                        r["efficiency_without_input_bound"] = (r["samples_per_s_without_input_bound"]
                                                               / (n * base["samples_per_s_without_input_bound"]))
                        rows.append(r)
    return rows


def cpu_check(m: dict) -> dict:
    """bench_throughput's distributed check on this machine, predicted: global batch 4096 of
    GraphDRP finetune as 1 worker x 2 threads against 2 workers x 1 thread (2048 each).

        1x2: F(4096) / (s R1) + AdamW(P) / s
        2x1: F(2048) / R1 + AdamW(P / 2) + gloo all-reduce(P fp32)

    R1: the measured 1-thread FLOP rate; s: the 2-thread speedup (CPU_TWO_THREAD_SPEEDUP);
    F: counted FLOPs; each rank of 2x1 encodes the distinct drugs and cell lines of its own
    2048 pairs, so 2 F(2048) > F(4096). distributed_overhead = 1x2 samples/s / 2x1 samples/s
    = step(2x1) / step(1x2)."""
    c = m["cpu"]
    adam_full_1thread = 2 * c["adamw_s_1thread_half"]
    two = c["flops_local"] / c["cpu_flops_per_s_1thread"] + c["adamw_s_1thread_half"] + c["gloo_allreduce_s"]

    def one(s: float) -> float:
        return c["flops_global"] / (s * c["cpu_flops_per_s_1thread"]) + adam_full_1thread / s
    lo, hi = CPU_TWO_THREAD_SPEEDUP_RANGE
    return {"two_thread_speedup": CPU_TWO_THREAD_SPEEDUP, "step_s_1x2": one(CPU_TWO_THREAD_SPEEDUP),
            "step_s_2x1": two, "compute_s_2x1": c["flops_local"] / c["cpu_flops_per_s_1thread"],
            "allreduce_s_2x1": c["gloo_allreduce_s"],
            "samples_per_s_1x2": CHECK_BATCH / one(CPU_TWO_THREAD_SPEEDUP), "samples_per_s_2x1": CHECK_BATCH / two,
            "predicted_distributed_overhead": two / one(CPU_TWO_THREAD_SPEEDUP),
            "predicted_range": [two / one(lo), two / one(hi)],
            "entity_flops_duplicated": 2 * c["flops_local"] / c["flops_global"],
            "measured_2thread_step_s_unused": c["fb_s_2threads_global"]}


# ----------------------------------------------------------------------------- printing

def print_tables(rows: list[dict], low: list[dict]) -> None:
    def key(r):
        return r["objective"], r["scaling"], r["gpus"], r["gpus_per_node"], r["link_gbit"]
    low_by = {key(r): r for r in low}
    configs = [(g, l) for g in GPUS_PER_NODE for l in LINK_GBIT]
    for objective in ("finetune", "pretrain"):
        for scaling in ("weak", "strong"):
            sel = [r for r in rows if r["objective"] == objective and r["scaling"] == scaling]
            batch = f"local batch {WEAK_LOCAL_BATCH}" if scaling == "weak" else f"global batch {STRONG_GLOBAL_BATCH}"
            print(f"\n{objective}, {scaling} scaling ({batch}): step ms / efficiency [bound]")
            print("| GPUs | local b | " + " | ".join(f"{g}/node, {l} Gb/s" for g, l in configs) + " |")
            print("|---|---|" + "---|" * len(configs))
            for n in WORLD_SIZES:
                cells = []
                for g, l in configs:
                    r = next(x for x in sel if x["gpus"] == n and x["gpus_per_node"] == g and x["link_gbit"] == l)
                    cells.append(f"{r['step_s'] * 1e3:.2f} / {r['efficiency']:.0%} [{r['bound']}]")
                print(f"| {n} | {r['local_batch']} | " + " | ".join(cells) + " |")
            for n in (WORLD_SIZES[0], WORLD_SIZES[-1]):
                r = next(x for x in sel if x["gpus"] == n and x["gpus_per_node"] == 8 and x["link_gbit"] == 400)
                print(f"  {n} GPU(s), 8/node, 400 Gb/s, ms: matmul {r['matmul_s'] * 1e3:.2f}, memory-bound ops "
                      f"{r['memory_s'] * 1e3:.2f} (CLIP logits {r['clip_logits_s'] * 1e3:.2f} of matmul+memory), "
                      f"host dispatch {r['host_s'] * 1e3:.2f} ({r['kernels']:.0f} kernels), gradients "
                      f"{r['gradient_s'] * 1e3:.2f}, CLIP collectives {r['clip_s'] * 1e3:.2f}, input {r['input_s'] * 1e3:.2f} "
                      f"(streamed from shards: {r['input_s_streamed'] * 1e3:.2f})")
            for g, l in configs:
                r = next(x for x in sel if x["gpus"] == WORLD_SIZES[-1] and x["gpus_per_node"] == g and x["link_gbit"] == l)
                lo = low_by[key(r)]
                print(f"  {WORLD_SIZES[-1]} GPUs {g}/node {l} Gb/s: without the input bound "
                      f"{r['global_batch'] / r['samples_per_s_without_input_bound'] * 1e3:.2f} ms, "
                      f"{r['efficiency_without_input_bound']:.0%}; GPU rates {SENSITIVITY:g}x lower: "
                      f"{lo['step_s'] * 1e3:.2f} ms, {lo['efficiency']:.0%} "
                      f"(without input bound {lo['efficiency_without_input_bound']:.0%})")


def assumptions() -> dict:
    names = ("GPU_PEAK_FLOPS", "GPU_MATMUL_FRACTION", "GPU_HBM_BYTES_PER_S", "GPU_HBM_FRACTION",
             "BYTES_PER_ELEMENT_OP", "HOST_SECONDS_PER_KERNEL", "SENSITIVITY", "NVLINK_BUS_BYTES_PER_S",
             "NIC_PER_GPU", "NIC_EFFICIENCY", "LATENCY_INTRA_S", "LATENCY_INTER_S", "EXPOSED_GRADIENT_FRACTION",
             "GRADIENT_COLLECTIVES", "CLIP_COLLECTIVES", "CLIP_BYTES_PER_ELEMENT", "LOADER_CORES_PER_GPU",
             "STREAMED_SAMPLES_PER_S_PER_CORE",
             "WEAK_LOCAL_BATCH", "STRONG_GLOBAL_BATCH", "CPU_TWO_THREAD_SPEEDUP", "CPU_TWO_THREAD_SPEEDUP_RANGE")
    return {n: globals()[n] for n in names}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="scaling_model.json", help="JSON file for measurements and predictions")
    p.add_argument("--flop-batches", type=lambda v: [int(x) for x in v.split(",")], default=list(FLOP_BATCHES),
                   help="local batches whose steps are counted (comma-separated; the pretrain step at 16384 "
                        "is most of the run's time)")
    p.add_argument("--measured", default="", help="a previous --out JSON: reuse its measurements, "
                   "recompute the predictions (for changed assumptions)")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    la = loadavg()
    measurement_run = None
    if args.measured:
        previous = json.loads(Path(args.measured).read_text())
        m = previous["measured"]
        measurement_run = previous.get("measurement_run") or {k: previous.get(k) for k in ("date", "command", "machine", "elapsed_s")}
    else:
        m = measure(args)
        Path(args.out).write_text(json.dumps({"measured": m}, indent=1))   # kept if modelling fails
        measurement_run = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                           "command": "benchmarks/scaling_model.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                           "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                       "torch": torch.__version__, "loadavg_start": la, "loadavg_end": loadavg()},
                           "elapsed_s": round(time.perf_counter() - t0, 1)}
    rows, low = tables(m), tables(m, 1 / SENSITIVITY)
    check = cpu_check(m)
    sizes = {o: {"params": m["params"][o]["total"], "params_with_grad": m["params"][o]["with_grad"],
                 "gradient_bytes_fp32": gradient_bytes(m, o, 4), "gradient_bytes_bf16": gradient_bytes(m, o, 2)}
             for o in ("finetune", "pretrain")}
    clip = {f"{n}x{b}": {"gathered_bytes": 2 * n * b * m["embed_dim"] * CLIP_BYTES_PER_ELEMENT,
                         "wire_bytes_per_rank": clip_wire_bytes(n, n * b, m["embed_dim"])}
            for n in WORLD_SIZES for b in (WEAK_LOCAL_BATCH, STRONG_GLOBAL_BATCH // n)}
    report = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "command": "benchmarks/scaling_model.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                          "loadavg_start": la, "loadavg_end": loadavg()},
              "measurement_run": measurement_run, "assumptions": assumptions(), "measured": m, "sizes": sizes, "clip_bytes": clip,
              "cpu_check": check, "predictions": rows, "predictions_rates_low": low,
              "elapsed_s": round(time.perf_counter() - t0, 1)}
    Path(args.out).write_text(json.dumps(report, indent=1))
    for o, s in sizes.items():
        print(f"[scaling] {o}: {s['params']:,} parameters, {s['params_with_grad']:,} with gradients: "
              f"{s['gradient_bytes_fp32'] / 2**20:.1f} MiB fp32, {s['gradient_bytes_bf16'] / 2**20:.1f} MiB bf16")
    print(f"[scaling] CPU check (2-thread speedup {CPU_TWO_THREAD_SPEEDUP}): 1x2 {check['samples_per_s_1x2']:,.0f} "
          f"samples/s, 2x1 {check['samples_per_s_2x1']:,.0f}: predicted distributed_overhead "
          f"{check['predicted_distributed_overhead']:.2f}x ({check['predicted_range'][0]:.2f}-"
          f"{check['predicted_range'][1]:.2f}x over speedups {CPU_TWO_THREAD_SPEEDUP_RANGE})")
    print_tables(rows, low)
    print(f"\n[scaling] wrote {args.out} in {report['elapsed_s']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
