"""An exported model directory: everything prediction needs, and nothing of training.

    model.safetensors   fp32 consolidated weights (the checkpoint's best validation epoch, else its last step)
    config.json         the run's settings (Config.to_dict): model, loss and data sections
    tokenizer.json      the BPE tokenizer of its shards (captions, for zero-shot)
    features.npz        its shards' feature tables: training drugs (graphs, SMILES), training
                        cell lines and their features, the number texts' token ids
    README.md           the model card
    model.json          written last, so its presence means the directory is complete: format,
                        featuriser version, ordered feature names, training data checksums and
                        split, test metrics, and the sha256 of every file above

Loading (`load_bundle`) needs torch, torch-geometric, tokenizers and safetensors: no Ray, no
DeepSpeed, on CPU or GPU.
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from cldr_dist import __version__
from cldr_dist.config import Config, ConfigError, config_from_dict
from cldr_dist.data import storage
from cldr_dist.data.features import FeatureTables
from cldr_dist.data.featurize import FEATURIZER_VERSION
from cldr_dist.data.shards import caption_prefix_lengths
from cldr_dist.data.tokenizer import load_tokenizer
from cldr_dist.models.cldr import CLDRModel, model_for_data

BUNDLE_FORMAT = 1
META_FILE = "model.json"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
FEATURES_FILE = "features.npz"
CARD_FILE = "README.md"
CONTENT_FILES = (WEIGHTS_FILE, CONFIG_FILE, TOKENIZER_FILE, FEATURES_FILE, CARD_FILE)
METRIC_PREFIXES = ("test_", "selected_epoch", "epochs_run", "stopped_early")


class BundleError(Exception):
    """A checkpoint that cannot be exported, or a model directory that cannot be loaded; one line."""


@dataclass
class Bundle:
    path: str
    meta: dict
    cfg: Config
    model: CLDRModel               # eval mode, on `device`
    tables: FeatureTables          # training drugs and cells, caption_prefix_len filled in
    tokenizer_json: str
    device: torch.device

    @property
    def feature_names(self) -> list[str]:
        return list(self.meta["feature_names"])

    @property
    def pretrained(self) -> bool:
        """Whether the text tower was trained (CLDR pretraining), so zero-shot means something."""
        return bool(self.meta["pretrained"])


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------- export

def export_model(checkpoint_url: str, out: str, shards_url: str | None = None) -> dict:
    """Writes the model directory of a training checkpoint to `out` (local or s3://); returns
    model.json. `shards_url` overrides the shard set the run read (moved since training)."""
    from safetensors.torch import save

    from cldr_dist.data.reader import ShardError, open_shards
    from cldr_dist.train.checkpoint import STATE_FILE, load_model_weights

    checkpoint_url = checkpoint_url.rstrip("/")
    if storage.exists(storage.join(out, META_FILE)):
        raise BundleError(f"{out} already holds an exported model; remove it or choose another --out")
    try:
        state = json.loads(storage.read_bytes(storage.join(checkpoint_url, STATE_FILE)))
    except storage.StorageError:
        raise BundleError(f"{checkpoint_url}: not a training checkpoint (no {STATE_FILE})") from None
    try:
        cfg = config_from_dict(state["config"])
    except (ConfigError, KeyError) as e:
        raise BundleError(f"{checkpoint_url}/{STATE_FILE}: unusable run config ({e})") from None
    try:
        shards = open_shards(shards_url or cfg.data.shards)
    except ShardError as e:
        raise BundleError(f"the run's shards: {e} (pass --shards URL if they moved)") from None
    model = model_for_data(cfg, shards.manifest["tokenizer"]["vocab_size"], shards.features.num_cell_features)
    weights_url = load_model_weights(model, checkpoint_url)
    weights = {k: v.detach().float().contiguous() if v.is_floating_point() else v.contiguous()
               for k, v in model.state_dict().items()}

    files = {
        WEIGHTS_FILE: save(weights),
        CONFIG_FILE: json.dumps(cfg.to_dict(), indent=1).encode(),
        TOKENIZER_FILE: shards.tokenizer_json.encode(),
        FEATURES_FILE: shards.features.to_bytes(),
    }
    metrics = {k: v for k, v in state.get("metrics", {}).items()
               if k.startswith(METRIC_PREFIXES) and isinstance(v, (int, float)) and math.isfinite(v)}
    meta = {
        "format": BUNDLE_FORMAT,
        "cldr_dist_version": __version__,
        "exported": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "checkpoint": checkpoint_url,
        "weights_from": Path(weights_url).name,
        "base_model": cfg.model.drp,
        "text_tower": cfg.model.text_tower,
        "mode": cfg.train.mode,
        "pretrained": cfg.train.mode == "pretrain" or bool(cfg.train.init_from),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "featurizer": FEATURIZER_VERSION,
        "feature_names": shards.features.feature_names.tolist(),
        "training_data": {
            "shards": shards.url, "split": cfg.data.split, "split_seed": shards.manifest["seed"],
            "fractions": shards.manifest["fractions"], "source": shards.manifest["source"],
            "counts": shards.manifest["counts"],
            "samples": {part: info["num_samples"]
                        for part, info in shards.manifest["splits"].get(cfg.data.split, {}).items()},
        },
        "test_metrics": metrics,
    }
    files[CARD_FILE] = model_card(meta).encode()
    meta["files"] = {name: _sha256(data) for name, data in files.items()}
    files[META_FILE] = json.dumps(meta, indent=1).encode()
    _publish(files, out)
    return meta


def _publish(files: dict[str, bytes], out: str) -> None:
    """All files or none: locally a directory renamed into place; on S3 model.json goes last."""
    if storage.is_s3(out):
        for name, data in files.items():
            if name != META_FILE:
                storage.write_bytes(storage.join(out, name), data)
        storage.write_bytes(storage.join(out, META_FILE), files[META_FILE])
        return
    target = Path(out)
    if target.exists() and any(target.iterdir()):
        raise BundleError(f"{out} exists and is not empty; choose another --out")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        if target.exists():
            target.rmdir()
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def model_card(meta: dict) -> str:
    data = meta["training_data"]
    metrics = meta["test_metrics"]
    rows = "\n".join(f"| {k} | {v:.4g} |" for k, v in sorted(metrics.items())) or "| (none recorded) | |"
    counts = data["counts"]
    return f"""# {meta['base_model']} drug-response model ({'CLDR-pretrained' if meta['pretrained'] else 'MSE only'})

Predicts ln(IC50) of a compound on a cancer cell line from the compound's structure (SMILES)
and the cell line's {len(meta['feature_names'])} binary genomic features, as a model of the
{meta['base_model']} family trained with cldr-dist {meta['cldr_dist_version']}
({meta['mode']}{', text tower ' + meta['text_tower'] if meta['pretrained'] else ''}).

## Training data
- shards `{data['shards']}`: {counts['drugs']} drugs, {counts['cells']} cell lines, {counts['pairs']} pairs
- split `{data['split']}` (seed {data['split_seed']}, fractions {data['fractions']}): {data['samples']}
- sources: {', '.join(f"{k} sha256 {v['sha256'][:12]}" for k, v in data['source'].items())}
- weights: `{meta['weights_from']}` of checkpoint `{meta['checkpoint']}`

## Test metrics (the split's test part, at the selected checkpoint)
| metric | value |
|---|---|
{rows}

## Intended use
Research: ranking compounds and cell lines for follow-up, on data like the training data
(GDSC-style cell-line screens, the same genomic feature set). Not for clinical decisions. A new
cell line's features are matched by name; missing ones must be filled explicitly and lower
confidence. Predictions for compounds far from the training drugs (drug-blind) are less
accurate than the mixed split's metrics suggest.

## Use
    cldr predict --model DIR --smiles 'CC(=O)Nc1ccc(O)cc1' --cells all --out predictions.csv

Featuriser `{meta['featurizer']}`; {meta['num_parameters']:,} parameters.
"""


# ----------------------------------------------------------------------------- load

def read_meta(path: str) -> dict:
    """An exported model's model.json, checked to be one this code can use (no weights read)."""
    path = str(path).rstrip("/")
    try:
        meta = json.loads(storage.read_bytes(storage.join(path, META_FILE)))
    except storage.StorageError:
        raise BundleError(f"{path}: not an exported model (no {META_FILE}; run `cldr export`)") from None
    except json.JSONDecodeError:
        raise BundleError(f"{storage.join(path, META_FILE)}: not valid JSON") from None
    if meta.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{path}: model format {meta.get('format')}, this code reads {BUNDLE_FORMAT}")
    if meta.get("featurizer") != FEATURIZER_VERSION:
        raise BundleError(f"{path}: exported with featuriser {meta.get('featurizer')}, this code has "
                          f"{FEATURIZER_VERSION}; predictions would use different drug features")
    return meta


def _read_checked(path: str, meta: dict, name: str) -> bytes:
    try:
        data = storage.read_bytes(storage.join(path, name))
    except storage.StorageError as e:
        raise BundleError(f"{path}: {e}") from None
    if _sha256(data) != meta["files"][name]:
        raise BundleError(f"{storage.join(path, name)}: checksum mismatch (truncated or altered)")
    return data


def read_training_tables(path: str) -> FeatureTables:
    """The model's training drugs and cell lines (its features.npz), without loading the model."""
    path = str(path).rstrip("/")
    return FeatureTables.from_bytes(_read_checked(path, read_meta(path), FEATURES_FILE))


def load_bundle(path: str, device: torch.device | str = "cpu") -> Bundle:
    """An exported model directory (local or s3://), checked file by file, ready to predict."""
    from safetensors.torch import load

    path = str(path).rstrip("/")
    meta = read_meta(path)
    blobs = {name: _read_checked(path, meta, name) for name in CONTENT_FILES}
    cfg = config_from_dict(json.loads(blobs[CONFIG_FILE]))
    tables = FeatureTables.from_bytes(blobs[FEATURES_FILE])
    tokenizer_json = blobs[TOKENIZER_FILE].decode()
    tokenizer = load_tokenizer(tokenizer_json)
    tables.caption_prefix_len = caption_prefix_lengths(tokenizer, tables.drug_smiles)
    model = model_for_data(cfg, tokenizer.get_vocab_size(), tables.num_cell_features)
    missing, unexpected = model.load_state_dict(load(blobs[WEIGHTS_FILE]), strict=False)
    if missing or unexpected:
        raise BundleError(f"{path}: weights do not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    device = torch.device(device)
    return Bundle(path, meta, cfg, model.to(device).eval(), tables, tokenizer_json, device)
