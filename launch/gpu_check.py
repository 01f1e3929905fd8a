"""`make gpu-check`: the GPU path end to end on the tiny data, in a few minutes.

    python launch/gpu_check.py [--out DIR] [--cpu]

tiny shards -> CLDR pretraining -> finetuning from it -> `cldr evaluate`-style test metrics,
with ray.use_gpu=true: NCCL for CUDA tensors (gloo for CPU ones), DeepSpeed bf16, one Ray
worker per visible GPU (at most 2). Fails (exit 1) unless every logged loss is finite and each
stage's loss falls (mean of its last logged steps below the mean of its first). --cpu runs the
same script on the CPU in fp32 (to check the script itself where no GPU is lent).
Writes DIR/gpu_check.json (what ran, on which machine, every number) and prints it.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "data" / "gdsc_v17" / "tiny"
HELD_OUT = REPO / "data" / "gdsc_v17" / "drug_blind_test_drugs.txt"
EPOCHS = 4            # tiny mixed split: ~30 steps per stage at batch 32 per worker
WINDOW = 5            # logged steps averaged at each end of a loss curve


def loss_curve(cfg, mode: str) -> list[float]:
    from cldr_dist.data import storage
    from cldr_dist.train import trainer
    url = storage.join(trainer.log_dir(cfg), f"{mode}_metrics.csv")
    rows = csv.DictReader(io.StringIO(storage.read_bytes(url).decode()))
    return [float(r["value"]) for r in rows if r["name"] == "loss"]


def check_curve(name: str, losses: list[float]) -> dict:
    finite = all(math.isfinite(v) for v in losses)
    first = sum(losses[:WINDOW]) / max(1, len(losses[:WINDOW]))
    last = sum(losses[-WINDOW:]) / max(1, len(losses[-WINDOW:]))
    ok = finite and len(losses) >= 2 * WINDOW and last < first
    return {"stage": name, "steps_logged": len(losses), "loss_first": first, "loss_last": last,
            "finite": finite, "falls": last < first, "ok": ok}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(REPO / "runs" / "gpu_check"))
    p.add_argument("--cpu", action="store_true", help="run on the CPU in fp32 (checks the script, not the GPU)")
    args = p.parse_args(argv)
    import torch
    use_gpu = not args.cpu
    if use_gpu and not torch.cuda.is_available():
        print("gpu-check: no CUDA device visible; nothing was checked (use --cpu to run the script on the CPU)",
              file=sys.stderr)
        return 2
    from cldr_dist.config import load_config
    from cldr_dist.data.reader import open_shards
    from cldr_dist.data.shards import build_shards
    from cldr_dist.eval.metrics import all_metrics
    from cldr_dist.eval.predict import predict_part
    from cldr_dist.train import trainer
    from cldr_dist.train.checkpoint import load_model_weights
    from cldr_dist.train.loop import make_model

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    workers = min(2, torch.cuda.device_count()) if use_gpu else 2
    device = "cuda" if use_gpu else "cpu"
    t0 = time.time()
    summary = {"machine": {"host": platform.node(), "python": platform.python_version(), "torch": torch.__version__,
                           "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
                           if use_gpu else []},
               "use_gpu": use_gpu, "workers": workers, "stages": []}
    with tempfile.TemporaryDirectory(prefix="cldr-gpu-check-") as tmp:
        shards = f"{tmp}/shards"
        base = [f"data.data_dir={TINY}", f"data.held_out_drugs={HELD_OUT}", "data.samples_per_shard=100",
                f"data.shards={shards}", "data.split=mixed", f"ray.storage_path={tmp}/runs",
                f"ray.use_gpu={str(use_gpu).lower()}", f"ray.num_workers={workers}", "ray.cpus_per_worker=1",
                "train.batch_size=32", f"train.epochs={EPOCHS}", "train.log_every=1", "train.zeroshot_samples=64",
                f"train.deepspeed_config={REPO / 'configs' / 'deepspeed' / 'zero2.json'}"]
        build_shards(load_config(None, base), out=shards, progress=False, log=lambda *_: None)
        pre = load_config(REPO / "configs" / "demo.yaml", base + ["train.mode=pretrain", "ray.name=pretrain"])
        fine = load_config(REPO / "configs" / "demo_finetune.yaml",
                           base + ["train.mode=finetune", "ray.name=finetune"])
        for cfg in (pre, fine):
            print(f"gpu-check: {cfg.train.mode} on {workers} worker(s), {device}", flush=True)
            result = trainer.run(cfg)
            if result.error:
                raise SystemExit(f"gpu-check: {cfg.train.mode} failed: {trainer.root_cause(result.error)}")
            if cfg is pre:
                fine.train.init_from = result.checkpoint.path
            stage = check_curve(cfg.train.mode, loss_curve(cfg, cfg.train.mode))
            stage["test_metrics_in_run"] = {k: v for k, v in result.metrics.items() if k.startswith("test_")}
            summary["stages"].append(stage)
        model = make_model(fine, open_shards(shards))
        load_model_weights(model, result.checkpoint.path)   # the finetuned model
        pred = predict_part(fine, open_shards(shards), model.to(device), "test", device=device)
        summary["evaluate"] = {"device": device, "samples": int(len(pred["y"])), **all_metrics(pred["y"], pred["p"])}
    summary["evaluate_finite"] = all(math.isfinite(v) for v in summary["evaluate"].values())
    summary["wall_s"] = round(time.time() - t0, 1)
    summary["ok"] = all(s["ok"] for s in summary["stages"]) and summary["evaluate_finite"]
    text = json.dumps(summary, indent=1, default=float)
    (out / "gpu_check.json").write_text(text)
    print(text)
    print(f"gpu-check: {'PASSED' if summary['ok'] else 'FAILED'} in {summary['wall_s']}s -> {out / 'gpu_check.json'}")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
