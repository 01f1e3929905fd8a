"""`cldr report RUN_DIR [RUN_DIR ...]`: the experiment's tables, the paper's claims checked against
them, and figures (PNG, matplotlib), as RUN_DIR/report.md with RUN_DIR/figures/.

Everything is computed from the run directories (results/*.json, predictions/*.npz,
curves/*.csv, number_texts/*.npy), so the report can be rebuilt at any time, also mid-run.
Several run directories make one report: the first is the main experiment, and the rows of the
others carry their experiment's name, e.g. "tcnn (cldr-gb1024) [gdsc_cpu_variants]", so a
variant or a control run separately sits in the same tables as the arms it is compared with.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from cldr_dist.eval.classical import BASELINES
from cldr_dist.eval import metrics
from cldr_dist.eval.metrics import spearman
from cldr_dist.eval.predict import load_predictions
from cldr_dist.experiment.runner import write_json
from cldr_dist.experiment.spec import TUNED_STAGES
from cldr_dist.train.runlog import epoch_values, metric_rows
from cldr_dist.train.schedule import select_metric

METRICS = ("pcc", "scc", "rmse", "mse", "r2", "rmse_ln_ic50")
PAPER_DRUG_BLIND_PCC = 0.536       # CLDR's headline GDSC figure
MIXED_GRAPHDRP_TARGET = 0.92       # GraphDRP's published mixed-split PCC is about 0.92-0.93
CONFIDENCE = 0.95                  # of the paired CLDR - MSE-only intervals
FEW_EPOCHS = (1, 3, 5)             # finetune epochs after pretraining, against MSE-only converged
FIGURE_DPI = 110
BAR_WIDTH_IN = 0.12                # inches per bar of the per-drug chart
MAX_FIGURE_WIDTH = 20              # inches
MAX_PANELS_PER_ROW = 4


class ReportError(Exception):
    pass


def load_meta(run_dir: Path) -> dict:
    if not (run_dir / "experiment.json").is_file():
        raise ReportError(f"{run_dir}: not an experiment run directory (no experiment.json)")
    return json.loads((run_dir / "experiment.json").read_text())


def shards_of(meta: dict) -> str:
    layers = meta["spec"].get("layers", {})
    data = {**layers.get("common", {}).get("data", {}), **layers.get("finetune", {}).get("data", {})}
    return str(data.get("shards", ""))


def load_results(run_dir: Path, experiment: str = "") -> list[dict]:
    """The finished arms of one run directory; `experiment` tags rows of a run directory that
    is not the report's first."""
    files = sorted((run_dir / "results").glob("*.json"))
    if not files:
        raise ReportError(f"{run_dir}: no finished arms under results/ (run `cldr experiment` first)")
    return [dict(json.loads(f.read_text()), key=f.stem, run_dir=str(run_dir), experiment=experiment)
            for f in files]


def without_repeated_baselines(results: list[dict]) -> list[dict]:
    """Drops a later run directory's classical arm that an earlier one already holds: the report's
    run directories read the same shards (checked), so the same baseline on the same split and
    seed is the same fit, and a second row would only repeat it."""
    seen, kept = set(), []
    for r in results:
        if r["kind"] == "classical":
            key = (r["split"], r["arm"], r["seed"])
            if key in seen:
                continue
            seen.add(key)
        kept.append(r)
    return kept


def row_label(r: dict) -> str:
    tag = f" [{r['experiment']}]" if r.get("experiment") else ""
    if r["kind"] == "classical":
        return f"classical: {r['arm']}{tag}"
    return f"{r['model']} ({'MSE only' if r['arm'] == 'base' else r['arm']}){tag}"


def row_order(r: dict) -> tuple:
    if r["kind"] == "classical":
        return (0, "", BASELINES.index(r["arm"]) if r["arm"] in BASELINES else 99, r["arm"], r.get("experiment", ""))
    return (1, r["model"], 0 if r["arm"] == "base" else 1, r["arm"], r.get("experiment", ""))


def file_of(r: dict, folder: str, suffix: str) -> Path:
    """One arm's file in its own run directory, e.g. predictions/{key}.npz."""
    return Path(r["run_dir"]) / folder / f"{r['key']}{suffix}"


def grouped(results: list[dict]) -> dict[str, dict[str, list[dict]]]:
    """split -> row label -> the results of its seeds, rows in table order."""
    out: dict[str, dict[str, list[dict]]] = defaultdict(dict)
    for r in sorted(results, key=row_order):
        out[r["split"]].setdefault(row_label(r), []).append(r)
    return out


def mean_std(values: list[float]) -> tuple[float, float]:
    a = np.asarray([v for v in values if v is not None], float)
    if not len(a):
        return float("nan"), float("nan")
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def fmt(values: list[float]) -> str:
    m, s = mean_std(values)
    if np.isnan(m):
        return "-"
    m = m + 0.0 if abs(m) >= 5e-5 else 0.0  # a constant predictor's PCC prints as 0.0000, not -0.0000
    return f"{m:.4f} ± {s:.4f}" if len([v for v in values if v is not None]) > 1 else f"{m:.4f}"


def table(rows: dict[str, list[dict]]) -> list[str]:
    head = ["model", "seeds", *(m.upper().replace("_", " ") for m in METRICS), "per-drug PCC", "zero-shot PCC",
            "epochs", "wall (min)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, rs in rows.items():
        cells = [label, str(len(rs))] + [fmt([r["metrics"][m] for r in rs]) for m in METRICS]
        cells.append(fmt([mean_per_drug_pcc(r) for r in rs]))
        cells.append(fmt([r.get("zeroshot_pcc") for r in rs]))
        epochs = [e for e in (epochs_reached(r) for r in rs) if e is not None]
        cells.append("/".join(map(str, epochs)) or "-")
        cells.append(f"{np.mean([r['wall_s'] for r in rs]) / 60:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def mean_metric(rows: dict[str, list[dict]], label: str, metric: str) -> float | None:
    if label not in rows:
        return None
    return mean_std([r["metrics"][metric] for r in rows[label]])[0]


def claims(groups: dict[str, dict[str, list[dict]]]) -> list[str]:
    """The issue's targets, each answered from the table with its numbers."""
    out = []
    db, mixed = groups.get("drug_blind", {}), groups.get("mixed", {})
    models = sorted({r["model"] for rows in groups.values() for rs in rows.values() for r in rs if r["model"]})
    # the paper's claim is drug-blind, listed first; the other splits for context
    for split in sorted(groups, key=lambda sp: sp != "drug_blind"):
        for model in models:
            base = mean_metric(groups[split], f"{model} (MSE only)", "pcc")
            cldr = mean_metric(groups[split], f"{model} (cldr)", "pcc")
            if base is None or cldr is None:
                continue
            gain = (cldr - base) / abs(base) * 100 if base else float("nan")
            if split == "drug_blind":
                out.append(f"- Drug-blind, {model}: CLDR PCC {cldr:.4f} vs MSE-only {base:.4f} "
                           f"({gain:+.1f}%; paper: +7.8% to +31.4%): "
                           + ("CLDR higher in the mean; the paired interval below says whether that is shown."
                              if cldr > base else "CLDR NOT higher in the mean: does NOT hold."))
            else:
                out.append(f"- {split}, {model}: CLDR PCC {cldr:.4f} vs MSE-only {base:.4f} "
                           f"({gain:+.1f}%): CLDR {'higher' if cldr > base else 'NOT higher'}.")
    out += drug_only_lines(groups)
    g = mean_metric(mixed, "graphdrp (MSE only)", "pcc")
    if g is not None:
        out.append(f"- Mixed, GraphDRP MSE-only PCC {g:.4f} (target ≥ {MIXED_GRAPHDRP_TARGET}): "
                   f"{'met' if g >= MIXED_GRAPHDRP_TARGET else 'NOT met'}.")
    # a new drug can only be placed from its structure, a known one from its own mean response
    for split, floor in (("drug_blind", "classical: train_mean"), ("mixed", "classical: drug_mean"),
                         ("cell_blind", "classical: drug_mean")):
        rows = groups.get(split, {})
        floor_rmse = mean_metric(rows, floor, "rmse")
        if floor_rmse is None:
            continue
        for label in rows:
            if label.startswith("classical"):
                continue
            rmse, pcc = mean_metric(rows, label, "rmse"), mean_metric(rows, label, "pcc")
            floor_pcc = mean_metric(rows, floor, "pcc")
            out.append(f"- {split}, {label}: RMSE {rmse:.4f} vs {floor.split(': ')[1]} {floor_rmse:.4f}, "
                       f"PCC {pcc:.4f} vs {floor_pcc:.4f}: "
                       f"{'beats it on both' if rmse < floor_rmse and pcc > floor_pcc else 'does NOT beat it on both'}.")
    for split, rows in groups.items():
        learned = [lbl for lbl in rows if lbl.startswith(("classical: ridge", "classical: gbm"))]
        if not learned:
            continue
        best = max(learned, key=lambda lbl: mean_metric(rows, lbl, "pcc"))
        best_pcc = mean_metric(rows, best, "pcc")
        for label in rows:
            if label.startswith("classical"):
                continue
            pcc = mean_metric(rows, label, "pcc")
            out.append(f"- {split}, {label}: PCC {pcc:.4f} vs best classical ({best.split(': ')[1]}) {best_pcc:.4f}: "
                       f"{'beats it' if pcc > best_pcc else 'does NOT beat it'}.")
    cldr_rows = [lbl for lbl in db if not lbl.startswith("classical") and "MSE only" not in lbl]
    if cldr_rows:
        best = max(cldr_rows, key=lambda lbl: mean_metric(db, lbl, "pcc"))
        pcc = mean_metric(db, best, "pcc")
        out.append(f"- Best CLDR drug-blind PCC: {pcc:.4f} ({best}); paper {PAPER_DRUG_BLIND_PCC}: "
                   f"{'reached' if pcc >= PAPER_DRUG_BLIND_PCC else 'NOT reached'}.")
    return out


def arm_pairs(rows: dict[str, list[dict]]) -> list[tuple[str, str, str]]:
    """(base model, its MSE-only row label, its CLDR row label) for every model with both rows;
    a later experiment's arms pair among themselves, named "model [experiment]"."""
    pairs = []
    for label in rows:
        model, sep, tag = label.partition(" (MSE only)")
        if sep and f"{model} (cldr){tag}" in rows:
            pairs.append((model + tag, label, f"{model} (cldr){tag}"))
    return pairs


def against_first(groups: dict[str, dict[str, list[dict]]]) -> dict:
    """Each later experiment's row against the first experiment's row of the same arm (e.g. the
    same arms rerun under another selection rule): the paired test PCC difference per shared seed."""
    out = {}
    for split, rows in groups.items():
        for label, rs in rows.items():
            first = label.rpartition(" [")[0] if rs[0].get("experiment") else ""
            if rs[0]["kind"] != "deep" or first not in rows:
                continue
            by_seed = {x["seed"]: x["metrics"]["pcc"] for x in rows[first]}
            later = {x["seed"]: x["metrics"]["pcc"] for x in rs if x["seed"] in by_seed}
            out.setdefault(split, {})[label] = {
                "against": first, "seeds": sorted(later), "metric": "test pcc, later minus first experiment",
                "pcc": float(np.mean(list(later.values()))) if later else None,
                "first_pcc": float(np.mean([by_seed[s] for s in later])) if later else None,
                **paired_difference([later[s] - by_seed[s] for s in sorted(later)])}
    return out


def interval_verdict(lo: float, hi: float) -> str:
    return f"95% interval [{lo:+.4f}, {hi:+.4f}]: " + ("shown" if lo > 0 or hi < 0 else "interval includes zero: NOT shown")


def against_first_lines(compared: dict) -> list[str]:
    lines = []
    for split, rows in compared.items():
        for label, d in rows.items():
            if not d["n"]:
                continue
            line = (f"- {split}, {label} vs {d['against']}, seed{'s' if d['n'] > 1 else ''} "
                    f"{', '.join(map(str, d['seeds']))}: test PCC {d['pcc']:.4f} vs {d['first_pcc']:.4f}, "
                    f"paired difference {d['mean']:+.4f}")
            if d["ci95"] is None:
                line += " (one seed: no interval)"
            else:
                line += ", " + interval_verdict(*d["ci95"])
            lines.append(line)
    return lines


def paired_difference(diffs: list[float], confidence: float = CONFIDENCE) -> dict:
    """Mean of per-seed differences with a two-sided Student-t interval (none from one seed)."""
    from scipy import stats
    d = np.asarray(diffs, float)
    out = {"per_seed": [float(x) for x in d], "n": int(len(d)), "mean": float(d.mean()) if len(d) else None,
           "ci95": None}
    if len(d) > 1:
        half = stats.t.ppf(0.5 + confidence / 2, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
        out["ci95"] = [float(d.mean() - half), float(d.mean() + half)]
    return out


def epochs_reached(r: dict) -> int | None:
    """The epochs the arm's last training run completed (its finetune; classical: none)."""
    return ((r.get("stages") or {}).get("finetune") or {}).get("epochs_run")


def arm_summary(rs: list[dict]) -> dict:
    """Mean and std over seeds of one (model, split, arm)."""
    def ms(values):
        m, sd = mean_std(values)
        return {"mean": None if np.isnan(m) else m, "std": None if np.isnan(sd) else sd}
    per_drug = [mean_per_drug_pcc(r) for r in rs]
    return {"seeds": sorted(r["seed"] for r in rs), "n_seeds": len(rs),
            "pcc": ms([r["metrics"]["pcc"] for r in rs]), "rmse": ms([r["metrics"]["rmse"] for r in rs]),
            "per_drug_pcc": ms(per_drug), "zeroshot_pcc": ms([r.get("zeroshot_pcc") for r in rs]),
            "epochs_reached": [epochs_reached(r) for r in rs]}


def summary(groups: dict[str, dict[str, list[dict]]]) -> dict:
    """summary.json: every row's mean and std over seeds, and per base model and split the
    paired CLDR - MSE-only test PCC difference per shared seed with its 95% interval."""
    arms = {split: {label: arm_summary(rs) for label, rs in rows.items()} for split, rows in groups.items()}
    paired = {}
    for split, rows in groups.items():
        for model, base_label, cldr_label in arm_pairs(rows):
            base = {r["seed"]: r["metrics"]["pcc"] for r in rows[base_label]}
            tuned = {r["seed"]: r["metrics"]["pcc"] for r in rows[cldr_label]}
            seeds = sorted(set(base) & set(tuned))
            paired.setdefault(split, {})[model] = {
                "seeds": seeds, "metric": "test pcc, cldr minus mse-only",
                **paired_difference([tuned[s] - base[s] for s in seeds])}
    return {"arms": arms, "paired_cldr_minus_mse": paired, "later_experiments_vs_first": against_first(groups)}


def paired_lines(paired: dict) -> list[str]:
    lines = []
    for split in sorted(paired, key=lambda sp: sp != "drug_blind"):
        for model, d in paired[split].items():
            if not d["n"]:
                lines.append(f"- {split}, {model}: the two arms share no seed yet: no paired difference.")
                continue
            if d["ci95"] is None:
                lines.append(f"- {split}, {model}: CLDR - MSE-only PCC {d['mean']:+.4f} from {d['n']} seed: "
                             f"no interval; NOT shown with a 95% interval.")
                continue
            lo, hi = d["ci95"]
            verdict = ("CLDR higher, interval excludes zero" if lo > 0 else
                       "MSE-only higher, interval excludes zero" if hi < 0 else "interval includes zero: NOT shown")
            lines.append(f"- {split}, {model}: CLDR - MSE-only PCC {d['mean']:+.4f}, 95% interval "
                         f"[{lo:+.4f}, {hi:+.4f}] over {d['n']} paired seeds: {verdict}.")
    return lines


def drug_only_lines(groups: dict[str, dict[str, list[dict]]]) -> list[str]:
    """Arms whose test predictions are one value per drug: their pooled PCC comes from drug
    differences alone, so it says nothing of what the model (or CLDR) learned of cell lines."""
    lines = []
    for split, rows in groups.items():
        for label, rs in rows.items():
            if label.startswith("classical"):
                continue
            preds = [load_predictions(str(file_of(r, "predictions", ".npz"))) for r in rs]
            ignoring = [r["seed"] for r, pr in zip(rs, preds)
                        if metrics.ignores_cell_line(metrics.within_drug_spread(pr["p"], pr["drug_ids"]))]
            if ignoring:
                lines.append(f"- {split}, {label}: predicts one value per drug (ignores the cell line) on seed(s) "
                             f"{', '.join(map(str, ignoring))} of {len(rs)}: its PCC comes from drug differences alone.")
    return lines


def mean_per_drug_pcc(r: dict) -> float | None:
    """The mean over test drugs of the PCC over each drug's cell lines (drugs with enough pairs)."""
    pred = load_predictions(str(file_of(r, "predictions", ".npz")))
    return metrics.mean_per_drug_pcc(pred["y"], pred["p"], pred["drug_ids"])


def per_drug_pcc(pred: dict) -> dict[str, float]:
    return metrics.per_drug_pcc(pred["y"], pred["p"], pred["drug_ids"])


def number_order_score(features: np.ndarray) -> tuple[np.ndarray, float]:
    """Cosine similarity matrix of the number texts, and the Spearman correlation of the
    similarity of each pair with minus its distance |i - j|: 1 when similarity falls with
    distance everywhere (the text side learned that numbers are ordered), about 0 when not."""
    f = features / np.linalg.norm(features, axis=1, keepdims=True)
    sim = f @ f.T
    i, j = np.triu_indices(len(f), k=1)
    return sim, spearman(sim[i, j], -np.abs(i - j).astype(float))


# ----------------------------------------------------------------------------- figures

def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def fig_pred_vs_true(dest: Path, rows: dict[str, list[dict]], split: str) -> str:
    plt = _plt()
    labels = [lbl for lbl in rows if lbl not in ("classical: train_mean",)]
    cols = min(4, len(labels))
    nrows = (len(labels) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 3.2 * nrows), squeeze=False)
    for ax, label in zip(axes.flat, labels):
        r = rows[label][0]
        pred = load_predictions(str(file_of(r, "predictions", ".npz")))
        ax.hexbin(pred["y"], pred["p"], gridsize=40, bins="log", cmap="viridis", extent=(0, 1, 0, 1))
        ax.plot([0, 1], [0, 1], "w--", lw=0.8)
        ax.set_title(f"{label}\nPCC {r['metrics']['pcc']:.3f}", fontsize=8)
        ax.set_xlabel("true y", fontsize=8)
        ax.set_ylabel("predicted y", fontsize=8)
    for ax in list(axes.flat)[len(labels):]:
        ax.axis("off")
    fig.suptitle(f"{split}: predicted against true (test set, first seed)", fontsize=10)
    return _save(fig, dest, f"pred_vs_true_{split}.png")


def read_curve(path: Path) -> dict[str, tuple[list[int], list[float]]]:
    series: dict[str, tuple[list[int], list[float]]] = defaultdict(lambda: ([], []))
    for row in metric_rows(path.read_text(), str(path)):
        steps, values = series[row["name"]]
        steps.append(int(row["step"]))
        values.append(float(row["value"]))
    return series


def fig_curves(run_dirs: dict[Path, str], dest: Path) -> str | None:
    """run_dirs: run directory -> the tag its curves carry in the legend ("" for the first)."""
    curves = [(path, tag) for run_dir, tag in run_dirs.items() for path in sorted((run_dir / "curves").glob("*.csv"))]
    if not curves:
        return None
    plt = _plt()
    fig, (ax_pre, ax_fine, ax_val) = plt.subplots(1, 3, figsize=(15, 4))
    for path, tag in curves:
        series = read_curve(path)
        name = path.stem.replace("-pretrain", "").replace("-finetune", "") + (f" [{tag}]" if tag else "")
        if path.stem.endswith("-pretrain") and "loss" in series:
            ax_pre.plot(*series["loss"], lw=0.8, label=name)
        elif "mse" in series:
            ax_fine.plot(*series["mse"], lw=0.8, label=name)
            if "val_pcc" in series:
                ax_val.plot(*series["val_pcc"], "o-", ms=3, lw=0.8, label=name)
    # an empty panel says why: step losses are logged every train.log_every steps, so a run of
    # fewer steps (a drug-blind pretrain epoch of 19) has none; validation comes at epoch ends
    no_steps = "no step logged: no such run, or runs shorter than train.log_every steps"
    for ax, title, empty in ((ax_pre, "pretraining loss (CLIP + TransE)", no_steps),
                             (ax_fine, "finetuning MSE (train)", no_steps),
                             (ax_val, "validation PCC (end of epoch)", "no epoch ended")):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("optimizer step", fontsize=8)
        if ax.lines:
            ax.legend(fontsize=5)
        else:
            ax.text(0.5, 0.5, empty, ha="center", va="center", fontsize=8, wrap=True, transform=ax.transAxes)
    return _save(fig, dest, "training_curves.png")


def fig_number_similarity(dest: Path, results: list[dict]) -> tuple[str | None, list[str]]:
    pretrained = [r for r in sorted(results, key=row_order) if file_of(r, "number_texts", ".npy").is_file()]
    firsts = {}
    for r in pretrained:
        firsts.setdefault((r["model"], r["arm"], r["split"], r["experiment"]), r)
    if not firsts:
        return None, []
    plt = _plt()
    items = list(firsts.values())
    cols = min(MAX_PANELS_PER_ROW, len(items))
    nrows = (len(items) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(3.8 * cols, 3.4 * nrows), squeeze=False, layout="constrained")
    for ax in list(axes.flat)[len(items):]:
        ax.axis("off")
    lines = []
    for ax, r in zip(axes.flat, items):
        sim, score = number_order_score(np.load(file_of(r, "number_texts", ".npy"), allow_pickle=False))
        im = ax.imshow(sim, cmap="RdBu_r", vmin=-1, vmax=1)
        ax.set_title(f"{r['model']} {r['arm']} ({r['split']})\norder score {score:.3f}", fontsize=8)
        ax.set_xlabel("number text index (y x 1000)", fontsize=7)
        lines.append(f"- {row_label(r)} ({r['split']}, seed {r['seed']}): order score {score:.3f}")
    fig.colorbar(im, ax=list(axes.flat), shrink=0.8)
    return _save(fig, dest, "number_text_similarity.png"), lines


def fig_per_drug(dest: Path, rows: dict[str, list[dict]]) -> str | None:
    deep = [lbl for lbl in rows if not lbl.startswith("classical") or rows[lbl][0]["arm"] in ("ridge", "gbm")]
    per = {lbl: per_drug_pcc(load_predictions(str(file_of(rows[lbl][0], "predictions", ".npz")))) for lbl in deep}
    drugs = sorted({d for v in per.values() for d in v})
    if not drugs:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(min(MAX_FIGURE_WIDTH, max(6, BAR_WIDTH_IN * len(drugs) * len(deep))), 4))
    width = 0.8 / len(deep)
    for k, lbl in enumerate(deep):
        ax.bar(np.arange(len(drugs)) + k * width, [per[lbl].get(d, np.nan) for d in drugs], width, label=lbl)
    ax.set_xticks(np.arange(len(drugs)) + 0.4 - width / 2)
    ax.set_xticklabels(drugs, rotation=90, fontsize=6)
    ax.axhline(0, color="k", lw=0.5)
    ax.set_ylabel("PCC over the drug's test cell lines")
    ax.set_title("drug-blind: per-drug PCC of the held-out drugs (first seed)", fontsize=9)
    ax.legend(fontsize=6)
    return _save(fig, dest, "per_drug_pcc_drug_blind.png")


def val_pcc_by_epoch(r: dict) -> dict[int, float]:
    """The finetune's validation PCC after each epoch, from the arm's training log."""
    path = Path(r["run_dir"]) / "curves" / f"{r['key']}-finetune.csv"
    return epoch_values(path.read_text(), "val_pcc", str(path)) if path.is_file() else {}


def few_epochs(groups: dict[str, dict[str, list[dict]]], dest: Path) -> tuple[list[str], str | None]:
    """The paper's "a few epochs of finetuning after pretraining": the CLDR arm's validation PCC
    after FEW_EPOCHS finetune epochs against the MSE-only arm's converged (best) validation PCC,
    means over seeds."""
    lines, panels = [], []
    for split, rows in groups.items():
        for model, base_label, cldr_label in arm_pairs(rows):
            base = [max(v.values()) for v in map(val_pcc_by_epoch, rows[base_label]) if v]
            curves = [v for v in map(val_pcc_by_epoch, rows[cldr_label]) if v]
            if not base or not curves:
                continue
            epochs = sorted(set.intersection(*(set(c) for c in curves)))
            mean_curve = {e: float(np.mean([c[e] for c in curves])) for e in epochs}
            few = ", ".join(f"{e}: {mean_curve[e]:.4f}" if e in mean_curve else f"{e}: -" for e in FEW_EPOCHS)
            target = float(np.mean(base))
            reached = [e for e in FEW_EPOCHS if mean_curve.get(e, -np.inf) >= target]
            lines.append(f"- {split}, {model}: CLDR finetune validation PCC after epochs {few}; "
                         f"MSE-only converged {target:.4f}: "
                         + (f"reached after {reached[0]} epoch(s)." if reached else f"NOT reached within {FEW_EPOCHS[-1]} epochs."))
            panels.append((f"{split}, {model}", mean_curve, target))
    if not panels:
        return lines, None
    plt = _plt()
    cols = min(MAX_PANELS_PER_ROW, len(panels))
    nrows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(3.6 * cols, 3.0 * nrows), squeeze=False)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    for ax, (title, curve, target) in zip(axes.flat, panels):
        ax.plot(list(curve), list(curve.values()), "o-", ms=3, label="CLDR finetune")
        ax.axhline(target, color="k", ls="--", lw=0.8, label="MSE-only, converged")
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("finetune epoch", fontsize=7)
        ax.set_ylabel("validation PCC", fontsize=7)
        ax.legend(fontsize=6)
    return lines, _save(fig, dest, "finetune_epochs.png")


def _save(fig, dest: Path, name: str) -> str:
    (dest / "figures").mkdir(parents=True, exist_ok=True)
    tmp = dest / "figures" / f".{name}.tmp.png"
    if fig.get_layout_engine() is None:
        fig.tight_layout()
    fig.savefig(tmp, dpi=FIGURE_DPI)
    _plt().close(fig)
    tmp.replace(dest / "figures" / name)
    return f"figures/{name}"


# ----------------------------------------------------------------------------- the report

def ended_by(stage: dict) -> str:
    """What ended a training run: early stopping, its fixed budget (train.select=last), its
    epoch cap, or train.max_steps."""
    m, train = stage["metrics"], stage["config"]["train"]
    if m.get("stopped_early"):
        metric, _ = select_metric(stage["mode"], train.get("select_metric", ""))
        return f"early stopping on {metric} (best epoch {m.get('selected_epoch')})"
    if train.get("max_steps") and m.get("step") == train["max_steps"] and m.get("epochs_run", 0) < train["epochs"]:
        return "max_steps"
    return "fixed budget" if train.get("select") == "last" else "epoch cap"


def budget_lines(run_dirs: list[Path]) -> list[str]:
    """One row per training run; a later experiment that starts from an earlier one's stage
    (its record copied) lists that run once."""
    lines = ["| training run | mode | optimizer steps | global batch | samples seen | epochs (cap) | ended by | wall (min) |",
             "|---|---|---|---|---|---|---|---|"]
    listed = set()
    for path in (p for run_dir in run_dirs for p in sorted((run_dir / "stages").glob("*.json"))):
        s = json.loads(path.read_text())
        if s["run"] in listed:
            continue
        listed.add(s["run"])
        cfg = s["config"]
        gb = cfg["train"]["batch_size"] * cfg["ray"]["num_workers"] * cfg["train"]["grad_accum"]
        steps = s["metrics"].get("step")
        seen = f"{steps * gb:,}" if steps else "-"
        lines.append(f"| {s['run']} | {s['mode']} | {steps or '-'} | {gb} | {seen} | "
                     f"{s['metrics'].get('epochs_run', '-')} ({cfg['train']['epochs']}) | {ended_by(s)} | {s['wall_s'] / 60:.1f} |")
    return lines


def tuning_lines(run_dirs: list[Path]) -> list[str]:
    """Every `cldr tune` trial of each base model and stage (RUN_DIR/tune/MODEL-STAGE.json): its
    settings, epochs reached against the cap, best validation score (over the epochs whose model
    uses the cell line); the chosen one in bold."""
    records = [json.loads(p.read_text()) for d in run_dirs for p in sorted((d / "tune").glob("*.json"))]
    records.sort(key=lambda r: (r["model"], TUNED_STAGES.index(r["stage"]) if r["stage"] in TUNED_STAGES else 99))
    if not records:
        return []
    keys = list(dict.fromkeys(k for r in records for t in r["trials"] for k in t["params"]))
    lines = ["| model | stage | " + " | ".join(k.split(".")[-1] for k in keys) +
             " | epochs (cap) | best epoch | validation score |",
             "|---|---|" + "---|" * len(keys) + "---|---|---|"]
    for r in records:
        for t in r["trials"]:
            chosen = t["params"] == r["chosen"]["params"]
            values = [f"{t['params'][k]:.3g}" if isinstance(t["params"].get(k), float) else str(t["params"].get(k, "-"))
                      for k in keys]
            score = "-" if t["score"] is None else f"{r['metric']} {t['score']:.5g}"
            score = f"**{score}**" if chosen else score
            if t.get("ignores_cell_line"):   # never chosen there: see tune.trial_summary
                many = len(t["ignores_cell_line"]) > 1
                score += (f" (epoch{'s' if many else ''} {', '.join(map(str, t['ignores_cell_line']))} "
                          f"ignore{'' if many else 's'} the cell line)")
            lines.append(f"| {r['model']} | {r['stage']} | {' | '.join(values)} | {t['epochs']} ({r['max_epochs']}) | "
                         f"{t['best_epoch'] if t['score'] is not None else '-'} | {score} |")
    return lines


def per_drug_lines(rows: dict[str, list[dict]]) -> list[str]:
    """For each base model with both arms: on how many held-out drugs CLDR's PCC is higher."""
    lines = []
    for model, base_label, cldr_label in arm_pairs(rows):
        base, cldr = (per_drug_pcc(load_predictions(str(file_of(rows[lbl][0], "predictions", ".npz"))))
                      for lbl in (base_label, cldr_label))
        drugs = sorted(set(base) & set(cldr))
        if drugs:
            wins = sum(cldr[d] > base[d] for d in drugs)
            lines.append(f"- {model}: CLDR's per-drug PCC is higher on {wins} of {len(drugs)} drugs; median "
                         f"{np.median([base[d] for d in drugs]):.3f} (MSE only) vs {np.median([cldr[d] for d in drugs]):.3f} (CLDR)")
    return lines


def variant_lines(groups: dict[str, dict[str, list[dict]]]) -> list[str]:
    """Each CLDR variant (e.g. a larger negative set, a pretrained text tower) against the plain
    CLDR arm of the same model and split: test PCC, zero-shot PCC and the number-text order score."""
    lines = []
    for split, rows in groups.items():
        for label, rs in rows.items():
            r = rs[0]
            if r["kind"] != "deep" or not r["arm"].startswith("cldr-"):
                continue
            own, main = row_label({**r, "arm": "cldr"}), row_label({**r, "arm": "cldr", "experiment": ""})
            ref = next((lbl for lbl in (own, main) if lbl in rows), None)
            if ref is None:
                continue
            seeds = {x["seed"] for x in rs}
            pair = {label: rs, ref: [x for x in rows[ref] if x["seed"] in seeds]}  # the same seeds on both sides
            if not pair[ref]:
                continue
            pcc, ref_pcc = mean_metric(pair, label, "pcc"), mean_metric(pair, ref, "pcc")
            zs = [mean_std([x.get("zeroshot_pcc") for x in pair[lbl]])[0] for lbl in (label, ref)]
            order = [order_score_of(pair[lbl][0]) for lbl in (label, ref)]
            line = (f"- {split}, {label} vs {ref}, seed{'s' if len(seeds) > 1 else ''} "
                    f"{', '.join(map(str, sorted(seeds)))}: test PCC {pcc:.4f} vs {ref_pcc:.4f} "
                    f"({(pcc - ref_pcc) / abs(ref_pcc) * 100:+.1f}%), zero-shot PCC {zs[0]:.4f} vs {zs[1]:.4f}, "
                    f"number-text order score {order[0]:.3f} vs {order[1]:.3f}")
            by_seed = {x["seed"]: x["metrics"]["pcc"] for x in pair[ref]}
            paired = paired_difference([x["metrics"]["pcc"] - by_seed[x["seed"]] for x in rs if x["seed"] in by_seed])
            if paired["ci95"]:
                line += f"; paired test PCC difference {paired['mean']:+.4f}, " + interval_verdict(*paired["ci95"])
            lines.append(line)
    return lines


def order_score_of(r: dict) -> float:
    path = file_of(r, "number_texts", ".npy")
    return number_order_score(np.load(path, allow_pickle=False))[1] if path.is_file() else float("nan")


def write_report(run_dirs: str | Path | list, out: str | Path | None = None) -> Path:
    """One report of one or more run directories: RUN_DIR/report.md of the first (or OUT/report.md,
    e.g. under docs/results/) with its figures beside it."""
    run_dirs = [Path(d) for d in ([run_dirs] if isinstance(run_dirs, (str, Path)) else run_dirs)]
    dest = Path(out) if out else run_dirs[0]
    metas = [load_meta(d) for d in run_dirs]
    names = [m["spec"]["name"] for m in metas]
    if len(set(names)) < len(names):
        raise ReportError(f"two run directories hold the same experiment name ({', '.join(names)})")
    shards = {shards_of(m) for m in metas}
    if len(shards) > 1:
        raise ReportError(f"the run directories read different shards ({', '.join(sorted(shards))}); "
                          f"one report compares arms on the same data")
    tags = {d: (name if i else "") for i, (d, name) in enumerate(zip(run_dirs, names))}
    results = without_repeated_baselines([r for d in run_dirs for r in load_results(d, tags[d])])
    groups = grouped(results)
    lines = [f"# Experiment {' + '.join(names)}", ""]
    for meta, run_dir in zip(metas, run_dirs):
        m = meta["machine"]
        commands = meta.get("commands") or [meta["spec"].get("command") or "cldr experiment"]
        lines += [f"- `{meta['spec']['name']}`{' (rows tagged [' + tags[run_dir] + '])' if tags[run_dir] else ''}: "
                  + " then ".join(f"`{c}`" for c in commands) + f" on {m['host']}, {m['cpus']} CPUs, "
                  f"{'GPU ' + m['gpu'] if m['gpu'] else 'no GPU'}, torch {m['torch']}."]
    lines += ["", f"Report: `cldr report {' '.join(str(d) for d in run_dirs)}`.", "",
              "Test-set metrics on y = 1/(1+exp(-0.1 ln IC50)) (RMSE LN IC50 on the ln IC50 scale); "
              "mean ± std over seeds where there are several. Zero-shot PCC: the pretrained model with "
              "no regression head, predicting the number text nearest to the sample.", ""]
    for split, rows in groups.items():
        lines += [f"## {split}", "", *table(rows), "", f"![predicted vs true]({fig_pred_vs_true(dest, rows, split)})", ""]
    summ = summary(groups)
    lines += ["## The claims, checked", "", *(claims(groups) or ["- (not enough arms yet)"]),
              *paired_lines(summ["paired_cldr_minus_mse"]), ""]
    if later := against_first_lines(summ["later_experiments_vs_first"]):
        lines += ["## Later experiments against the first, arm by arm", "", *later, ""]
    if variants := variant_lines(groups):
        lines += ["## CLDR variants against plain CLDR", "", *variants, ""]
    if "drug_blind" in groups and (fig := fig_per_drug(dest, groups["drug_blind"])):
        lines += ["## Per-drug PCC, drug-blind", "", *per_drug_lines(groups["drug_blind"]), "",
                  f"![per-drug PCC]({fig})", ""]
    fig, order_lines = fig_number_similarity(dest, results)
    if fig:
        lines += ["## Do the number texts learn that numbers are ordered?", "",
                  "Cosine similarity of the pretrained number-tower features of the 1000 number texts "
                  "(\"zero point zero zero zero\" ... \"zero point nine nine nine\"). Order score: Spearman "
                  "correlation of pair similarity with minus the pair's distance |i - j|.", "",
                  *order_lines, "", f"![number-text similarity]({fig})", ""]
    few_lines, fig = few_epochs(groups, dest)
    if few_lines:
        lines += ["## A few epochs of finetuning after pretraining", "", *few_lines, ""]
        lines += [f"![finetune epochs]({fig})", ""] if fig else []
    if fig := fig_curves(tags, dest):
        lines += ["## Training curves", "", f"![training curves]({fig})", ""]
    if tuning := tuning_lines(run_dirs):
        lines += ["## Tuning (`cldr tune`, validation only)", "",
                  "Each stage's trials on the validation part of their split; the chosen trial in bold.", "",
                  *tuning, ""]
    lines += ["## Budget", "", *budget_lines(run_dirs), ""]
    dest.mkdir(parents=True, exist_ok=True)
    report = dest / "report.md"
    tmp = dest / ".report.md.tmp"
    tmp.write_text("\n".join(lines))
    tmp.replace(report)
    write_json(dest / "summary.json", summ)
    return report
