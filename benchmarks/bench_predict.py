"""`cldr predict` throughput and memory on full GDSC (988 cell lines), GraphDRP, on this machine.

    python benchmarks/bench_predict.py            # 10k-compound library (~10M pairs), RSS at 1k/10k/100k
    python benchmarks/bench_predict.py --quick    # 1k-compound library, RSS at 1k/3k/10k

Measures, each run a `cldr predict` command in its own process:
  - one compound x all cell lines: as a command (model load and cell encoding included), and
    warm (the model loaded once, 20 requests in this process): latency and pairs/s;
  - a library x all cell lines, on one process and as a Ray Data screen of 2 workers (Ray start
    included): pairs/s;
  - peak RSS of one process against library size, the cell lines cut to 10 so that the largest
    library stays ~1M pairs: memory should be flat in the number of compounds.
The model has freshly initialised weights (speed does not depend on their values). The library
holds randomised SMILES of the 248 GDSC drugs: distinct strings, molecules of realistic size.
Results: docs/results/bench_predict.json (--quick: bench_predict_quick.json), docs/benchmarks_predict.md.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data" / "gdsc_v17"
sys.path.insert(0, str(REPO))

TARGET_PAIRS_PER_S = 50_000
RSS_CELLS = 10

# a child process: run the CLI, then print its own peak RSS (MiB) as the last line
MEASURED = """
import resource, sys
from cldr_dist.cli import main
code = main(sys.argv[1:])
print(json.dumps({"exit": code, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run_predict(argv: list[str]) -> dict:
    """One `cldr predict` in a fresh process: its summary line, wall time and peak RSS."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", "import json\n" + MEASURED, "predict", *argv, "--quiet"],
                          capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - t0
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or len(lines) < 2:
        raise SystemExit(f"cldr predict {' '.join(argv)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    summary, own = json.loads(lines[-2]), json.loads(lines[-1])
    return {"wall_s": round(wall, 2), "pairs": summary["pairs"], "compounds": summary["compounds"],
            "predict_s": summary["seconds"], "pairs_per_s": round(summary["pairs"] / summary["seconds"]),
            "peak_rss_mib": round(own["peak_rss_mib"], 1)}


def warm_latency(model: str, smiles: str, repeats: int = 20) -> dict:
    """One compound x all cell lines with the model already loaded (a service answering one
    request): median milliseconds and pairs/s over `repeats` requests, in this process."""
    import statistics

    from cldr_dist.inference.bundle import read_training_tables
    from cldr_dist.inference.inputs import command_line_compounds, training_cells
    from cldr_dist.inference.predict import Screen, ScreenSpec, plan_screen
    spec = ScreenSpec([model], training_cells(read_training_tables(model)), zeroshot="off")
    screen = Screen(spec, plan_screen(spec))
    seconds = []
    for _ in range(repeats + 1):   # the first request warms up
        t0 = time.perf_counter()
        frames, _ = screen.predict(command_line_compounds([smiles], []))
        pairs = sum(len(f) for f in frames)
        seconds.append(time.perf_counter() - t0)
    median = statistics.median(seconds[1:])
    return {"pairs": pairs, "median_ms": round(1000 * median, 1), "pairs_per_s": round(pairs / median)}


def make_library(path: Path, n: int, smiles: list[str], seed: int = 0) -> None:
    """n randomised SMILES of the given molecules, as a compounds CSV (id, smiles)."""
    import numpy as np
    from rdkit import Chem
    rng = np.random.default_rng(seed)
    mols = [Chem.MolFromSmiles(s) for s in smiles]
    with open(path, "w") as f:
        f.write("id,smiles\n")
        for i, j in enumerate(rng.integers(0, len(mols), n)):
            Chem.rdBase.SeedRandomNumberGenerator(int(i))
            f.write(f"lib{i:06d},{Chem.MolToSmiles(mols[j], doRandom=True)}\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1k-compound library; RSS at 1k, 3k, 10k")
    p.add_argument("--shards", default="", help="full-GDSC shards (built into a temp dir if empty)")
    p.add_argument("--out", default="", help="default: docs/results/bench_predict[_quick].json")
    args = p.parse_args(argv)
    args.out = args.out or str(REPO / "docs" / "results" / f"bench_predict{'_quick' if args.quick else ''}.json")

    import torch

    from cldr_dist.config import load_config
    from cldr_dist.data.reader import open_shards
    from cldr_dist.data.shards import build_shards
    from cldr_dist.inference.bundle import export_model
    from cldr_dist.train.checkpoint import save_model_checkpoint
    from cldr_dist.train.loop import make_model

    library_size = 1_000 if args.quick else 10_000
    rss_sizes = [1_000, 3_000, 10_000] if args.quick else [1_000, 10_000, 100_000]
    work = Path(tempfile.mkdtemp(prefix="bench-predict-"))
    shards = args.shards or str(work / "shards")
    if not args.shards:
        t0 = time.perf_counter()
        build_shards(load_config(None, [f"data.data_dir={DATA}", "data.splits=mixed"]), out=shards,
                     progress=False, log=lambda *_: None)
        print(f"[bench] built full-GDSC shards in {time.perf_counter() - t0:.0f}s", flush=True)
    cfg = load_config(REPO / "configs" / "demo.yaml", [f"data.shards={shards}", "train.mode=finetune",
                                                       "model.drp=graphdrp"])
    torch.manual_seed(0)
    set_ = open_shards(shards)
    checkpoint = save_model_checkpoint(work / "checkpoint", cfg.to_dict(), make_model(cfg, set_))
    model = str(work / "model")
    export_model(checkpoint, model)
    smiles = set_.features.drug_smiles.tolist()
    cells = set_.features.cell_ids.tolist()

    report = {"machine": f"{torch.get_num_threads()} torch threads, this 2-core CPU VM", "model": "graphdrp",
              "cells": len(cells), "quick": args.quick, "runs": {}}

    def record(name: str, result: dict) -> None:
        report["runs"][name] = result
        print(f"[bench] {name}: {json.dumps(result)}", flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))

    one = run_predict(["--model", model, "--smiles", smiles[0], "--cells", "all", "--zeroshot", "off",
                       "--out", str(work / "one.csv")])
    record("one_compound_all_cells", one)

    record("one_compound_all_cells_warm", warm_latency(model, smiles[0]))

    lib = work / f"library_{library_size}.csv"
    make_library(lib, library_size, smiles)
    record(f"library_{library_size}_single_process",
           run_predict(["--model", model, "--compounds", str(lib), "--cells", "all",
                        "--out", str(work / "single.parquet")]))
    record(f"library_{library_size}_ray_2_workers",
           run_predict(["--model", model, "--compounds", str(lib), "--cells", "all", "--ray", "--workers", "2",
                        "--out", str(work / "ray_out")]))

    for n in rss_sizes:
        path = work / f"library_{n}.csv"
        if not path.exists():
            make_library(path, n, smiles)
        record(f"rss_library_{n}_x_{RSS_CELLS}_cells",
               run_predict(["--model", model, "--compounds", str(path), "--cells", ",".join(cells[:RSS_CELLS]),
                            "--out", str(work / f"rss_{n}.parquet")]))

    single = report["runs"][f"library_{library_size}_single_process"]["pairs_per_s"]
    rss = [report["runs"][f"rss_library_{n}_x_{RSS_CELLS}_cells"]["peak_rss_mib"] for n in rss_sizes]
    report["summary"] = {
        "pairs_per_s_single_process": single,
        "target_pairs_per_s": TARGET_PAIRS_PER_S,
        "target_met": single >= TARGET_PAIRS_PER_S,
        "peak_rss_mib_by_library": dict(zip(map(str, rss_sizes), rss)),
        "rss_ratio_largest_to_smallest": round(rss[-1] / rss[0], 3),
    }
    record("done", {})
    report["runs"].pop("done")
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps(report["summary"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
