"""Model benchmarks on CPU (real GDSC v17 batches):

1. forward+backward samples/s of each base DRP model at batch 256 (MSE on y only);
2. the CLDR pretraining step (forward, CLIP + TransE loss, backward, Adam) in the paper's
   configuration (captions padded to 300, number texts to 100) against ours (padded to the
   longest, each drug's caption prefix encoded once, each distinct number text encoded once),
   timed side by side, interleaved, in one run;
3. memory of the gathered local-rows CLIP loss against a full B x B logits loss at world 2 and
   4 with 256 samples per rank, simulating one rank in one process.

    .venv/bin/python benchmarks/bench_models.py            # full (a few minutes on 2 cores)
    .venv/bin/python benchmarks/bench_models.py --quick    # smaller: ~1 minute
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import torch
import torch.nn.functional as F

from cldr_dist.config import LossConfig, ModelConfig
from cldr_dist.data.batch import collate
from cldr_dist.data.shards import decoded_samples, prepare
from cldr_dist.data.tables import load_tables
from cldr_dist.losses.contrastive import clip_loss
from cldr_dist.losses.numeric_kg import NumberTexts, build_kg, pretrain_loss
from cldr_dist.models.cldr import DEFAULT_TEXT_BUCKETS, build_model
from cldr_dist.models.drp.base import build_drp

DATA = "data/gdsc_v17"
VOCAB = 2000
BATCH = 256
EMBED = 256
SEED = 0


def samples(tables, prepared, rows) -> list[dict]:
    _, _, caption_ids, drows, crows = prepared
    return [s for _, s in decoded_samples(tables, rows, caption_ids, drows, crows)]


def timed(step, batches, repeats: int) -> float:
    """samples/s of step(batch) over `repeats` passes of the batches, after one warm-up step."""
    step(batches[0])
    t0 = time.perf_counter()
    for _ in range(repeats):
        for b in batches:
            step(b)
    return repeats * sum(len(b) for b in batches) / (time.perf_counter() - t0)


def bench_drp(batches, num_cell_features: int, repeats: int) -> dict[str, float]:
    out = {}
    for name in ("graphdrp", "tcnn", "deepcdr"):
        torch.manual_seed(SEED)
        model = build_drp(ModelConfig(drp=name), num_cell_features)
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)

        def step(b):
            pred, _ = model(b)
            loss = F.mse_loss(pred, b.y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        out[name] = timed(step, batches, repeats)
    return out


def pretrain_stepper(prepared, paper: bool):
    tokenizer, features = prepared[0], prepared[1]
    torch.manual_seed(SEED)
    model = build_model(ModelConfig(), LossConfig(), tokenizer.get_vocab_size(),
                        features.num_cell_features,
                        text_buckets=0 if paper else DEFAULT_TEXT_BUCKETS, dedup_numbers=not paper)
    model.text.caption.share_prefix = not paper   # the paper encodes every caption in full
    kg = build_kg(LossConfig(), model.text.number.proj.out_features)
    numbers = NumberTexts(features, pad_to=ModelConfig().number_context if paper else None)
    opt = torch.optim.Adam(list(model.parameters()) + list(kg.parameters()), lr=5e-5)
    gen = torch.Generator().manual_seed(SEED)

    def step(b):
        loss, _, _ = pretrain_loss(model, b, kg, numbers, LossConfig(), gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return step


def bench_pretrain(tables, prepared, rows_list, repeats: int) -> dict[str, float]:
    cfg = ModelConfig()
    paper_batches = [collate(samples(tables, prepared, r), prepared[1], cfg.caption_context,
                             cfg.number_context) for r in rows_list]
    our_batches = [collate(samples(tables, prepared, r), prepared[1]) for r in rows_list]
    steps = {"paper": pretrain_stepper(prepared, paper=True),
             "ours": pretrain_stepper(prepared, paper=False)}
    batches = {"paper": paper_batches, "ours": our_batches}
    for k in steps:                       # warm-up
        steps[k](batches[k][0])
    elapsed = {k: 0.0 for k in steps}
    for _ in range(repeats):              # interleaved, so both see the same machine state
        for k in steps:
            t0 = time.perf_counter()
            for b in batches[k]:
                steps[k](b)
            elapsed[k] += time.perf_counter() - t0
    n = repeats * sum(len(b) for b in our_batches)
    tokens = {k: sum(b.caption.numel() for b in batches[k]) / len(batches[k]) for k in batches}
    real = sum(int(b.caption_len.sum()) for b in our_batches) / len(our_batches)
    return {"paper_sps": n / elapsed["paper"], "ours_sps": n / elapsed["ours"],
            "paper_caption_tokens": tokens["paper"], "longest_caption_tokens": tokens["ours"],
            "real_caption_tokens": real,
            "unique_numbers": np.mean([len(torch.unique(b.number_index)) for b in our_batches])}


def saved_bytes(fn) -> int:
    """Bytes of the distinct tensors autograd keeps for backward while running fn()."""
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def bench_memory(world: int, local: int = BATCH, dim: int = EMBED) -> dict[str, float]:
    """One rank's logits, simulated in one process: the gathered (B, D) sides are stand-ins."""
    g = torch.Generator().manual_seed(SEED)
    glob = world * local
    all_a = F.normalize(torch.randn(glob, dim, generator=g), dim=1)
    all_b = F.normalize(torch.randn(glob, dim, generator=g), dim=1)
    scale = torch.tensor(14.3, requires_grad=True)
    a = all_a[:local].clone().requires_grad_()
    b = all_b[:local].clone().requires_grad_()
    labels = torch.arange(local)

    def local_rows():
        (F.cross_entropy(scale * a @ all_b.T, labels) + F.cross_entropy(scale * b @ all_a.T, labels)) / 2

    def full():
        A, B = all_a.clone().requires_grad_(), all_b.clone().requires_grad_()
        clip_loss(A, B, scale)
    return {"local_saved_MiB": saved_bytes(local_rows) / 2**20, "full_saved_MiB": saved_bytes(full) / 2**20,
            "local_logits_MiB": 2 * local * glob * 4 / 2**20, "full_logits_MiB": 2 * glob * glob * 4 / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer batches and repeats")
    ap.add_argument("--out", default="", help="also write the markdown table here")
    args = ap.parse_args()
    n_batches, repeats = (1, 1) if args.quick else (2, 2)
    torch.manual_seed(SEED)
    tables = load_tables(DATA)
    prepared = prepare(tables, VOCAB)
    rng = np.random.default_rng(SEED)
    rows_list = [rng.choice(len(tables.responses), BATCH, replace=False) for _ in range(n_batches)]
    drp_batches = [collate(samples(tables, prepared, r), prepared[1]) for r in rows_list]

    lines = [f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
             f"torch {torch.__version__}, threads {torch.get_num_threads()}",
             f"batch {BATCH}, {n_batches} batch(es) x {repeats} repeat(s), real GDSC v17 rows", ""]
    drp = bench_drp(drp_batches, prepared[1].num_cell_features, repeats)
    lines += ["| base model (MSE fwd+bwd+Adam) | samples/s |", "|---|---|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in drp.items()]
    pre = bench_pretrain(tables, prepared, rows_list, repeats)
    lines += ["", "| pretraining step (graphdrp + text, CLIP + TransE) | samples/s |", "|---|---|",
              f"| paper: captions padded to 300, numbers to 100 | {pre['paper_sps']:.1f} |",
              f"| ours: longest padding, {DEFAULT_TEXT_BUCKETS} caption buckets, distinct numbers once | {pre['ours_sps']:.1f} |",
              f"| **speed-up** | **{pre['ours_sps'] / pre['paper_sps']:.2f}x** |", "",
              f"caption tokens per batch: paper {pre['paper_caption_tokens']:.0f}, padded to longest "
              f"{pre['longest_caption_tokens']:.0f}, real {pre['real_caption_tokens']:.0f}; "
              f"distinct number texts per batch {pre['unique_numbers']:.0f} of {BATCH}", ""]
    lines += ["| world | per rank | local-rows logits | full BxB logits | local-rows saved for backward | full saved for backward |",
              "|---|---|---|---|---|---|"]
    for world in (2, 4):
        m = bench_memory(world)
        lines.append(f"| {world} | {BATCH} | {m['local_logits_MiB']:.2f} MiB | {m['full_logits_MiB']:.2f} MiB | "
                     f"{m['local_saved_MiB']:.2f} MiB | {m['full_saved_MiB']:.2f} MiB |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
