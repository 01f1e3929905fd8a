"""`make demo`: on the tiny data, 2 Ray workers with DeepSpeed ZeRO-2 on local storage,
train the base model with MSE only, pretrain it with CLDR then finetune it, and print the test
metrics side by side; then export the CLDR model and predict a new compound on every cell line.

    python -m cldr_dist.demo --config configs/demo.yaml --finetune-config configs/demo_finetune.yaml
"""
from __future__ import annotations

import argparse
import sys
import time

from cldr_dist.config import ConfigError, load_config

ROWS = ("test_pcc", "test_scc", "test_rmse", "test_r2", "test_rmse_ln_ic50", "test_zeroshot_pcc")


def table(results: dict[str, dict]) -> str:
    names = list(results)
    lines = [f"{'metric':<20}" + "".join(f"{n:>22}" for n in names)]
    for row in ROWS:
        cells = [results[n].get(row) for n in names]
        if all(c is None for c in cells):
            continue
        lines.append(f"{row:<20}" + "".join(f"{c:>22.4f}" if c is not None else f"{'-':>22}" for c in cells))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--finetune-config", default="configs/demo_finetune.yaml")
    p.add_argument("overrides", nargs="*", help="section.key=value, applied to both stages")
    args = p.parse_args(argv)
    from cldr_dist.data.reader import ShardError
    from cldr_dist.train import trainer
    try:
        pre = load_config(args.config, args.overrides)
        fine = load_config(args.finetune_config, args.overrides)
    except ConfigError as e:
        print(f"demo: error: {e}", file=sys.stderr)
        return 2
    stamp = time.strftime("%Y%m%d-%H%M%S")
    pre.train.mode, fine.train.mode = "pretrain", "finetune"
    base = load_config(args.finetune_config, args.overrides)
    base.ray.name = f"{fine.ray.name}-base-{stamp}"
    pre.ray.name = f"{pre.ray.name}-{stamp}"
    fine.ray.name = f"{fine.ray.name}-cldr-{stamp}"
    t0 = time.time()
    cfg = base
    try:
        print(f"== 1/3 base model, MSE only ({base.ray.name})", flush=True)
        r_base = trainer.run(base)
        cfg = pre
        print(f"== 2/3 CLDR pretraining ({pre.ray.name})", flush=True)
        r_pre = trainer.run(pre)
        fine.train.init_from = r_pre.checkpoint.path
        cfg = fine
        print(f"== 3/3 finetune from {fine.train.init_from}", flush=True)
        r_fine = trainer.run(fine)
    except (ShardError, ConfigError) as e:
        print(f"demo: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"demo: interrupted during {cfg.train.mode} run {cfg.ray.name}", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - a run failed: the worker's own error, in one line
        print(f"demo: {cfg.train.mode} run {cfg.ray.name} failed: {trainer.root_cause(e)}; "
              f"logs under {trainer.log_dir(cfg)}", file=sys.stderr)
        return 1
    for name, r in (("base", r_base), ("pretrain", r_pre), ("finetune", r_fine)):
        if r.error:
            print(f"demo: {name} run failed: {trainer.root_cause(r.error)}", file=sys.stderr)
            return 1
    results = {f"{base.model.drp} (MSE only)": r_base.metrics,
               f"{base.model.drp} + CLDR": {**r_fine.metrics, "test_zeroshot_pcc": r_pre.metrics.get("test_zeroshot_pcc")}}
    samples = r_fine.metrics.get("test_samples")
    print(f"\nTest metrics, {pre.data.split} split of {pre.data.data_dir} "
          f"({samples} test samples, {time.time() - t0:.0f}s in all):")
    print(table(results))
    print(f"A smoke test of the pipeline, not evidence about the method: {samples} test samples, "
          f"{pre.train.epochs} pretraining + {fine.train.epochs} finetuning epochs,\none seed; such numbers "
          f"(zero-shot PCC included) swing from run to run, even in sign. The experiment: docs/results/README.md")
    print(f"\nlogs and checkpoints under {pre.ray.storage_path}/ "
          f"({base.ray.name}, {pre.ray.name}, {fine.ray.name})")
    predict_example(r_fine.checkpoint.path, f"{fine.ray.storage_path}/models/{fine.ray.name}")
    return 0


EXAMPLE_SMILES = "CC(=O)Nc1ccc(O)cc1"   # paracetamol: a compound not in GDSC


def predict_example(checkpoint: str, model_dir: str) -> None:
    """`cldr export` of the finetuned checkpoint, then `cldr predict` of one new compound on
    every cell line, as a user would run them."""
    from cldr_dist.cli import main as cldr
    out = f"{model_dir}-paracetamol.csv"
    print(f"\n== export and predict: cldr export --checkpoint {checkpoint} --out {model_dir}")
    if cldr(["export", "--checkpoint", checkpoint, "--out", model_dir]) != 0:
        return
    print(f"cldr predict --model {model_dir} --smiles '{EXAMPLE_SMILES}' --cells all --out {out}")
    if cldr(["predict", "--model", model_dir, "--smiles", EXAMPLE_SMILES, "--cells", "all", "--out", out, "--quiet"]) != 0:
        return
    import pandas as pd
    rows = pd.read_csv(out).sort_values("rank").head(3)
    print("most sensitive cell lines (lowest predicted ln IC50):")
    print(rows[["cell_name", "pred_ln_ic50", "rank"]].to_string(index=False))


if __name__ == "__main__":
    sys.exit(main())
