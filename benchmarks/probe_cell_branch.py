"""Does a trained model still use the cell line? For each trial of `cldr tune` records, on the
tune split's validation part:

    spread     median over drugs of the std of the predictions across the drug's cell lines
               (0: one prediction per drug, the cell line ignored)
    drug_pcc   mean over drugs of the PCC across each drug's cell lines
    pcc        pooled PCC
    live dims  cell-branch output dims that vary across the shipped cell lines (std > 1e-6)

    python benchmarks/probe_cell_branch.py --config configs/experiments/gdsc_converged.yaml \
        docs/results/converged/gdsc_converged/tune/tcnn-cldr_finetune.json

A trial whose checkpoint is gone (not on this machine) is listed as such. An untrained model of
the record's base model is listed first, for the live dims at initialisation.

--runs: the live dims alone of training runs (Ray Train run directories, their latest checkpoint,
the model its config names), e.g. every drug-blind arm of the experiment:

    python benchmarks/probe_cell_branch.py --runs runs/experiments/gdsc_converged/ray/*drug_blind*
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from cldr_dist.config import config_from_dict
from cldr_dist.data.reader import ShardSet, open_shards
from cldr_dist.data.storage import StorageError
from cldr_dist.eval import metrics
from cldr_dist.eval.predict import predict_part
from cldr_dist.experiment.spec import load_experiment
from cldr_dist.experiment.tune import trial_config
from cldr_dist.models.cldr import model_for_data
from cldr_dist.train.checkpoint import STATE_FILE, load_model_weights

LIVE_STD = 1e-6


def live_cell_dims(model, cell_features: np.ndarray) -> tuple[int, int]:
    with torch.no_grad():
        feats = model.eval().drp.encode_cells(torch.tensor(cell_features, dtype=torch.float32))
    return int((feats.std(0) > LIVE_STD).sum()), int(feats.shape[1])


def probe_runs(run_dirs: list[str]) -> None:
    """Live cell dims of each run's latest checkpoint, beside an untrained model of its base model."""
    shard_sets: dict[str, ShardSet] = {}   # the runs of one experiment share their shards: read once
    untrained: set[str] = set()
    for run in sorted(run_dirs):
        checkpoints = sorted(Path(run).glob("checkpoint_*/" + STATE_FILE))
        if not checkpoints:
            print(f"{Path(run).name}: no checkpoint")
            continue
        cfg = config_from_dict(json.loads(checkpoints[-1].read_text())["config"])
        if cfg.data.shards not in shard_sets:
            shard_sets[cfg.data.shards] = open_shards(cfg.data.shards)
        shards = shard_sets[cfg.data.shards]

        def build():
            return model_for_data(cfg, shards.manifest["tokenizer"]["vocab_size"], shards.features.num_cell_features)
        if cfg.model.drp not in untrained:
            untrained.add(cfg.model.drp)
            torch.manual_seed(cfg.train.seed)
            print(f"{cfg.model.drp} untrained: live cell dims %d/%d" % live_cell_dims(build(), shards.features.cell_features))
        model = build()
        load_model_weights(model, str(checkpoints[-1].parent))
        print(f"{Path(run).name}: live cell dims %d/%d" % live_cell_dims(model, shards.features.cell_features),
              flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", help="the experiment file the records were tuned from")
    ap.add_argument("records", nargs="*", help="RUN_DIR/tune/MODEL-STAGE.json files")
    ap.add_argument("--runs", nargs="+", default=[], help="Ray Train run directories (live dims only)")
    args = ap.parse_args()
    if args.runs:
        probe_runs(args.runs)
    if not args.records:
        return
    if not args.config:
        ap.error("records need --config, the experiment file they were tuned from")
    spec = load_experiment(args.config, tuned=False)
    shards = None
    for path in args.records:
        rec = json.loads(open(path).read())
        cfg = trial_config(spec, rec["model"], rec["stage"])
        shards = shards or open_shards(cfg.data.shards)
        cells = shards.features.cell_features
        build = lambda: model_for_data(cfg, shards.manifest["tokenizer"]["vocab_size"],  # noqa: E731
                                       shards.features.num_cell_features)
        torch.manual_seed(cfg.train.seed)
        live, dims = live_cell_dims(build(), cells)
        print(f"{rec['model']} {rec['stage']}: untrained, live cell dims {live}/{dims}")
        for t in rec["trials"]:
            lr = t["params"].get("train.lr", float("nan"))
            chosen = " (chosen)" if t["checkpoint"] and t["checkpoint"] == rec["checkpoint"] else ""
            model = build()
            if not t["checkpoint"]:
                print(f"  lr {lr:.2e}: no checkpoint (the trial saved none)")
                continue
            try:
                load_model_weights(model, t["checkpoint"])
            except (StorageError, FileNotFoundError):
                print(f"  lr {lr:.2e}: checkpoint not on this machine{chosen}")
                continue
            pred = predict_part(cfg, shards, model, "val")
            live, dims = live_cell_dims(model, cells)
            # the checkpoint holds the trial's own best epoch by the metric alone, which may be one
            # the record set aside for ignoring the cell line
            print(f"  lr {lr:.2e} (record: {rec['metric']} {t['score']} at epoch {t['best_epoch']}), checkpoint: "
                  f"spread {metrics.within_drug_spread(pred['p'], pred['drug_ids']):.5f} "
                  f"drug_pcc {metrics.mean_per_drug_pcc(pred['y'], pred['p'], pred['drug_ids']):.3f} "
                  f"pcc {metrics.pearson(pred['y'], pred['p']):.3f} "
                  f"live cell dims {live}/{dims}{chosen}", flush=True)


if __name__ == "__main__":
    main()
