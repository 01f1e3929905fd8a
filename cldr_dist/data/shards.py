"""`cldr shards`: a dataset directory -> WebDataset shards + features.npz + tokenizer.json +
manifest.json, on a local directory or an s3:// prefix.

Layout under the output URL:
    manifest.json          written last: its presence means every file it lists is complete
    features.npz           drug graphs, cell features, number-text token ids (FeatureTables)
    tokenizer.json         the BPE tokenizer the caption/number token ids came from
    bad_rows.csv           every dropped input row with file, line and reason
    {split}/{part}-{i:06d}.tar.gz   samples: {key}.json (metadata) + {key}.caption.npy (token ids)
"""
from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import webdataset as wds
from tqdm import tqdm

from cldr_dist import __version__
from cldr_dist.config import Config
from cldr_dist.data import storage
from cldr_dist.data.features import FeatureTables
from cldr_dist.data.featurize import smiles_codes
from cldr_dist.data.labels import all_number_texts, number_index, y_from_ln_ic50
from cldr_dist.data.splits import PARTS, make_split, read_held_out_drugs
from cldr_dist.data.tables import GDSCTables, load_tables
from cldr_dist.data.tokenizer import caption_words, encode_all, train_tokenizer

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
GZIP_LEVEL = 3


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def prepare(tables: GDSCTables, vocab_size: int):
    """Everything sample-independent: tokenizer, lookup tables, per-row caption token ids."""
    drug_row = {d.drug_id: i for i, d in enumerate(tables.drugs)}
    cell_row = {c: i for i, c in enumerate(tables.cell_ids)}
    resp = tables.responses
    drows = resp["drug_id"].map(drug_row).to_numpy()
    crows = resp["cosmic_id"].map(cell_row).to_numpy()
    captions = [caption_words(tables.drugs[d].smiles, tables.cell_names[c]) for d, c in zip(drows, crows)]
    numbers = all_number_texts()
    tokenizer = train_tokenizer(captions + numbers, vocab_size)
    caption_ids = encode_all(tokenizer, captions)
    features = FeatureTables.build(
        drug_ids=[d.drug_id for d in tables.drugs], drug_smiles=[d.smiles for d in tables.drugs],
        graphs=[(d.atoms, d.edges) for d in tables.drugs],
        smiles_codes=[smiles_codes(d.smiles) for d in tables.drugs],
        cell_ids=tables.cell_ids, cell_names=tables.cell_names, cell_features=tables.cell_features,
        feature_names=tables.feature_names, number_tokens=encode_all(tokenizer, numbers))
    return tokenizer, features, caption_ids, drows, crows


def decoded_samples(tables: GDSCTables, rows, caption_ids, drows, crows, split: str = "", part: str = ""):
    """Samples as the reader yields them ({"meta": dict, "caption": token ids}), straight from
    the tables: what the shards hold, and what tests and benchmarks batch without shards."""
    resp = tables.responses
    ln = resp["ln_ic50"].to_numpy()
    cell_ids, drug_ids = resp["cosmic_id"].to_numpy(), resp["drug_id"].to_numpy()
    for r in rows:
        y = y_from_ln_ic50(float(ln[r]))
        meta = {"cell_id": str(cell_ids[r]), "drug_id": str(drug_ids[r]), "cell": int(crows[r]),
                "drug": int(drows[r]), "y": y, "ln_ic50": float(ln[r]), "number": number_index(y),
                "split": split, "part": part}
        yield r, {"meta": meta, "caption": np.asarray(caption_ids[r], dtype=np.int64)}


def sample_records(tables: GDSCTables, rows: np.ndarray, caption_ids, drows, crows,
                   split: str, part: str, token_dtype):
    for r, s in decoded_samples(tables, rows, caption_ids, drows, crows, split, part):
        yield {"__key__": f"{r:09d}", "json": json.dumps(s["meta"]).encode(),
               "caption.npy": npy_bytes(s["caption"].astype(token_dtype))}


def write_shard(records: list[dict], url: str, tmpdir: str) -> dict:
    local = Path(tmpdir) / "shard.tar.gz"
    # integer mtime and ustar keep tarfile from writing a pax header per member (2x faster);
    # a light gzip level since tar padding, not entropy, is most of the bytes
    with open(local, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=GZIP_LEVEL, mtime=0) as gz:
        with wds.TarWriter(gz, mtime=0) as sink:
            sink.tarstream.format = tarfile.USTAR_FORMAT  # TarWriter does not pass `format` on
            for rec in records:
                sink.write(rec)
    info = {"url": url.rsplit("/", 2)[-2] + "/" + url.rsplit("/", 1)[-1] if storage.is_s3(url)
            else str(Path(url).relative_to(Path(url).parent.parent)),
            "num_samples": len(records), "bytes": local.stat().st_size, "sha256": sha256_file(local)}
    storage.put_file(local, url)
    return info


def write_bad_rows(bad_rows, path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["file", "line", "reason"])
        for b in bad_rows:
            w.writerow([b.file, b.line, b.reason])


def build_shards(cfg: Config, data_dir: str | None = None, out: str | None = None,
                 progress: bool = True, log=print) -> dict:
    data_dir = data_dir or cfg.data.data_dir
    out = (out or cfg.data.shards).rstrip("/")
    t0 = time.time()
    # Everything that can fail on the user's input fails here, before anything is written.
    tables = load_tables(data_dir)
    held = read_held_out_drugs(cfg.data.held_out_drugs) if "drug_blind" in cfg.data.splits else None
    splits = {s: make_split(tables, s, cfg.data.seed, tuple(cfg.data.fractions), held)
              for s in cfg.data.splits}
    log(f"loaded {data_dir}: {len(tables.drugs)} drugs, {len(tables.cell_ids)} cell lines, "
        f"{tables.cell_features.shape[1]} genomic features, {len(tables.responses)} pairs, "
        f"{len(tables.bad_rows)} bad rows dropped")
    storage.check_writable(out)
    # An older manifest would vouch for shards this run is about to overwrite: drop it first.
    storage.remove(storage.join(out, MANIFEST))

    tokenizer, features, caption_ids, drows, crows = prepare(tables, cfg.data.vocab_size)
    token_dtype = np.uint16 if tokenizer.get_vocab_size() <= 65535 else np.int32
    manifest = {
        "format_version": FORMAT_VERSION, "cldr_dist_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seed": cfg.data.seed, "fractions": cfg.data.fractions,
        "samples_per_shard": cfg.data.samples_per_shard,
        "source": {name: {"file": p.name, "sha256": sha256_file(p)} for name, p in tables.source_files.items()},
        "bad_rows": len(tables.bad_rows),
        "counts": {"drugs": len(tables.drugs), "cells": len(tables.cell_ids),
                   "cell_features": int(tables.cell_features.shape[1]), "pairs": len(tables.responses)},
        "splits": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in (("features.npz", features.to_bytes()),
                           ("tokenizer.json", tokenizer.to_str().encode())):
            Path(tmp, name).write_bytes(data)
            manifest[name.split(".")[0]] = {"file": name, "sha256": sha256_file(Path(tmp, name)),
                                            "bytes": len(data)}
            storage.put_file(Path(tmp, name), storage.join(out, name))
        manifest["tokenizer"]["vocab_size"] = tokenizer.get_vocab_size()
        manifest["tokenizer"]["kind"] = "bpe, whitespace-split, trained on captions + number texts"
        write_bad_rows(tables.bad_rows, Path(tmp, "bad_rows.csv"))
        storage.put_file(Path(tmp, "bad_rows.csv"), storage.join(out, "bad_rows.csv"))

        total = sum(len(idx) for parts in splits.values() for idx in parts.values())
        bar = tqdm(total=total, unit="sample", desc="shards", disable=not progress)
        for split, parts in splits.items():
            manifest["splits"][split] = {}
            for part in PARTS:
                # shuffled once at write time, so each shard is a random sample of its part
                rows = np.random.default_rng([cfg.data.seed, PARTS.index(part)]).permutation(parts[part])
                shards = []
                for i in range(0, len(rows), cfg.data.samples_per_shard):
                    chunk = rows[i:i + cfg.data.samples_per_shard]
                    recs = list(sample_records(tables, chunk, caption_ids, drows, crows, split, part, token_dtype))
                    url = storage.join(out, split, f"{part}-{i // cfg.data.samples_per_shard:06d}.tar.gz")
                    shards.append(write_shard(recs, url, tmp))
                    bar.update(len(chunk))
                manifest["splits"][split][part] = {"num_samples": int(len(rows)), "shards": shards,
                                                   "drugs": int(tables.responses["drug_id"].iloc[rows].nunique()),
                                                   "cells": int(tables.responses["cosmic_id"].iloc[rows].nunique())}
        bar.close()
        Path(tmp, MANIFEST).write_text(json.dumps(manifest, indent=1))
        storage.put_file(Path(tmp, MANIFEST), storage.join(out, MANIFEST))
    log(f"wrote {total} samples in {sum(len(p['shards']) for s in manifest['splits'].values() for p in s.values())} "
        f"shards to {out} in {time.time() - t0:.1f}s")
    return manifest
