"""Predictions of a model on one part of a split, kept per sample (y, prediction, drug, cell):
the metrics, the report's scatter plots and its per-drug PCC all start from these arrays."""
from __future__ import annotations

import io

import numpy as np
import torch

from cldr_dist.config import Config
from cldr_dist.data import storage
from cldr_dist.data.reader import ShardSet, ShardStream, make_loader


def eval_stream(cfg: Config, shards: ShardSet, part: str, rank: int = 0, world: int = 1,
                wordpiece: bool = False) -> ShardStream:
    """Every sample of `part` exactly once across ranks, in shard order, short last batch kept."""
    return ShardStream(shards, cfg.data.split, part, batch_size=cfg.train.eval_batch_size, rank=rank,
                       world_size=world, seed=cfg.data.seed, shuffle=False, drop_last=False,
                       caption_pad_to=cfg.model.caption_pad_to or None,
                       number_pad_to=cfg.model.number_pad_to or None, wordpiece=wordpiece)


PREDICTION_KEYS = ("y", "p", "drug_ids", "cell_ids")


@torch.no_grad()
def predict_part(cfg: Config, shards: ShardSet, model, part: str, rank: int = 0, world: int = 1,
                 device: torch.device | str = "cpu", keep_samples: int = 0,
                 wordpiece: bool = False) -> dict:
    """This rank's share of `part`, in shard order: {"y", "p", "drug_ids", "cell_ids"} as numpy,
    plus "batches": the first keep_samples samples (as batches, on the CPU) for zero-shot.
    The model runs on `device` (the worker's GPU, or the CPU); it must run no collectives."""
    model.eval()
    ys, preds, drugs, cells, kept = [], [], [], [], []
    for batch in make_loader(eval_stream(cfg, shards, part, rank, world, wordpiece), 0):
        wanted = keep_samples - sum(len(b) for b in kept)
        if wanted > 0:
            kept.append(batch if wanted >= len(batch) else batch.select(torch.arange(wanted)))
        preds.append(model.drp(batch.to(device))[0].float().cpu().numpy())
        ys.append(batch.y.numpy())
        drugs.extend(batch.drug_ids)
        cells.extend(batch.cell_ids)
    empty = np.zeros(0, np.float32)
    return {"y": np.concatenate(ys) if ys else empty, "p": np.concatenate(preds) if preds else empty,
            "drug_ids": np.asarray(drugs, dtype=str), "cell_ids": np.asarray(cells, dtype=str),
            "batches": kept}


def save_predictions(url: str, predictions: dict) -> None:
    """An .npz of plain arrays (strings as unicode arrays: no pickle), written atomically."""
    buf = io.BytesIO()
    np.savez(buf, **{k: predictions[k] for k in PREDICTION_KEYS})
    storage.write_bytes(url, buf.getvalue())


def load_predictions(url: str) -> dict:
    with np.load(io.BytesIO(storage.read_bytes(url)), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}
