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
import itertools
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from tokenizers import Tokenizer
from tqdm import tqdm

from cldr_dist import __version__
from cldr_dist.config import Config
from cldr_dist.data import storage
from cldr_dist.data.features import FeatureTables
from cldr_dist.data.featurize import smiles_codes
from cldr_dist.data.labels import CAPTION_TEMPLATE, all_number_texts, number_index, y_from_ln_ic50
from cldr_dist.data.splits import PARTS, make_split, read_held_out_drugs
from cldr_dist.data.tables import GDSCTables, load_tables
from cldr_dist.data.tokenizer import EOS, SOS, encode_all, split_smiles, train_tokenizer

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
GZIP_LEVEL = 3
# ustar layout (tarfile.BLOCKSIZE, RECORDSIZE) and the member fields webdataset's TarWriter
# sets (mode 0o444, uid/gid 0, owner "bigdata", mtime 0 as the shards pass it): kept field for
# field, so the shards are byte-identical to the ones TarWriter wrote
TAR_BLOCK = 512
TAR_RECORD = 20 * TAR_BLOCK
TAR_END_BLOCKS = 2
TAR_NAME_BYTES = 100
TAR_MODE_IDS = b"0000444\0" + b"0000000\0" * 2
TAR_MTIME = b"%011o\0" % 0
TAR_CHKSUM_SPACES = 8 * ord(" ")
TAR_TAIL = (b"0" + b"\0" * 100 + b"ustar\x0000" + b"bigdata".ljust(32, b"\0") * 2).ljust(
    TAR_BLOCK - TAR_NAME_BYTES - len(TAR_MODE_IDS) - 12 - len(TAR_MTIME) - 8, b"\0")
TAR_TAIL_SUM = sum(TAR_TAIL)
ROW_DTYPE = np.int32    # drug/cell row per response row (at most): 4 bytes a row, not a Python int
ENCODE_BLOCK = 2000     # captions made per block: bounds the token arrays held at once
SMILES_FIELD = "{smiles}"  # where CAPTION_TEMPLATE's drug part ends and its cell part begins


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


_NPY_HEADERS: dict[tuple[str, int], bytes] = {}


def npy_vector_bytes(a: np.ndarray) -> bytes:
    """npy_bytes of a 1-d array, byte for byte, without np.save's per-call header formatting
    (~30 us, once per sample): captions come in a few dozen lengths, so the header of each
    (dtype, length) is made once by np.save itself and the raw data appended to it."""
    key = (a.dtype.str, len(a))
    if key not in _NPY_HEADERS:
        empty = np.zeros(len(a), dtype=a.dtype)
        _NPY_HEADERS[key] = npy_bytes(empty)[:-empty.nbytes or None]
    return _NPY_HEADERS[key] + np.ascontiguousarray(a).tobytes()


def drug_pieces(drug_words: list[str]) -> list[str]:
    """Each drug's part of its captions: the template up to and including the split SMILES.
    The template's space after {smiles} is the word boundary between drug and cell parts."""
    head = CAPTION_TEMPLATE.split(SMILES_FIELD)[0]
    return [head + w for w in drug_words]


def encode_pieces(tokenizer: Tokenizer, texts: list[str]) -> list[np.ndarray]:
    return [np.asarray(e.ids, dtype=np.int64) for start in range(0, len(texts), ENCODE_BLOCK)
            for e in tokenizer.encode_batch(texts[start:start + ENCODE_BLOCK], add_special_tokens=False)]


def caption_prefix_lengths(tokenizer: Tokenizer, drug_smiles) -> np.ndarray:
    """CaptionIds.prefix_lengths from a shard set's tokenizer and tables."""
    pieces = encode_pieces(tokenizer, drug_pieces([split_smiles(s) for s in drug_smiles]))
    return np.array([1 + len(ids) for ids in pieces], dtype=np.int32)   # 1: [SOS]


class CaptionIds:
    """Caption token ids of the response rows, made on demand from per-drug and per-cell pieces.

    Holding every row's ids (lists of Python ints) was most of `cldr shards`' memory and grew
    with the dataset. The tokenizer splits on whitespace and BPE never merges across words, so
    a caption's ids are [SOS] + ids(its words up to the SMILES, drug's) + ids(the rest, cell's)
    + [EOS]: D + C short arrays encode every one of the D x C possible captions, and a row costs
    one concatenation instead of an encode. __init__ checks that identity against the full
    encode on one caption per drug and per cell, so a tokenizer for which it fails is an error
    instead of different ids."""

    def __init__(self, tokenizer: Tokenizer, drug_words: list[str], cell_names: list[str],
                 drows: np.ndarray, crows: np.ndarray):
        self.tokenizer, self.drows, self.crows = tokenizer, drows, crows
        # encoded ENCODE_BLOCK texts at a time: an Encoding (tokens, offsets, masks) is far larger
        # than its ids, and there are as many cell texts as cell lines
        tail = CAPTION_TEMPLATE.split(SMILES_FIELD)[1]
        self.drug_ids = encode_pieces(tokenizer, drug_pieces(drug_words))
        self.cell_ids = encode_pieces(tokenizer, [tail.format(cell=n) for n in cell_names])
        self.sos = np.asarray([tokenizer.token_to_id(SOS)], dtype=np.int64)
        self.eos = np.asarray([tokenizer.token_to_id(EOS)], dtype=np.int64)
        n = max(len(drug_words), len(cell_names))
        d, c = np.arange(n) % len(drug_words), np.arange(n) % len(cell_names)
        for start in range(0, n, ENCODE_BLOCK):
            bd, bc = d[start:start + ENCODE_BLOCK], c[start:start + ENCODE_BLOCK]
            full = encode_all(tokenizer, list(iter_captions(drug_words, cell_names, bd, bc)))
            if any(self.pair_ids(i, j).tolist() != ids for i, j, ids in zip(bd.tolist(), bc.tolist(), full)):
                raise RuntimeError("caption ids are not the concatenation of their drug and cell parts: "
                                   "the tokenizer no longer splits on whitespace alone")

    def prefix_lengths(self) -> np.ndarray:
        """Per drug, the tokens every caption of it begins with: [SOS] + its piece."""
        return np.array([len(self.sos) + len(ids) for ids in self.drug_ids], dtype=np.int32)

    def __len__(self) -> int:
        return len(self.drows)

    def pair_ids(self, drug: int, cell: int) -> np.ndarray:
        return np.concatenate([self.sos, self.drug_ids[drug], self.cell_ids[cell], self.eos])

    def __getitem__(self, row: int) -> np.ndarray:
        return self.pair_ids(self.drows[row], self.crows[row])

    def encode(self, rows) -> list[np.ndarray]:
        return [self.pair_ids(d, c) for d, c in zip(self.drows[rows].tolist(), self.crows[rows].tolist())]


def iter_captions(drug_words: list[str], cell_names: list[str], drows: np.ndarray, crows: np.ndarray):
    """The captions of these (drug row, cell row) pairs, one at a time: the text of
    tokenizer.caption_words, with each drug's SMILES split once (drug_words) instead of per row.
    Rows become Python ints ENCODE_BLOCK at a time (all at once, they were ~40 bytes a row)."""
    for start in range(0, len(drows), ENCODE_BLOCK):
        for d, c in zip(drows[start:start + ENCODE_BLOCK].tolist(), crows[start:start + ENCODE_BLOCK].tolist()):
            yield CAPTION_TEMPLATE.format(smiles=drug_words[d], cell=cell_names[c])


def _rows_in(column: pd.Series, ids: list[str]) -> np.ndarray:
    """Each value's position in ids: load_tables' categorical columns are already those
    positions (their codes, used as they are: no copy); other columns are looked up."""
    if isinstance(column.dtype, pd.CategoricalDtype) and column.array.categories.equals(pd.Index(ids)):
        return column.array.codes
    return pd.Index(ids).get_indexer(column).astype(ROW_DTYPE)


def table_rows(tables: GDSCTables) -> tuple[np.ndarray, np.ndarray]:
    """Each response row's drug row and cell row in the lookup tables (small ints: 2 bytes a row
    each below 32,768 drugs/cells, at most ROW_DTYPE's 4)."""
    resp = tables.responses
    return _rows_in(resp["drug_id"], [d.drug_id for d in tables.drugs]), _rows_in(resp["cosmic_id"], tables.cell_ids)


def prepare(tables: GDSCTables, vocab_size: int):
    """Everything sample-independent: tokenizer, lookup tables, per-row caption token ids
    (a CaptionIds: indexable by row, encoded on demand)."""
    drows, crows = table_rows(tables)
    # the SMILES split once per drug, not once per row: same text as caption_words
    drug_words = [split_smiles(d.smiles) for d in tables.drugs]
    numbers = all_number_texts()
    # streamed: the trainer keeps word counts, not the corpus, and sees the same texts in the
    # same order as the list this replaced, so the vocabulary and ids are unchanged
    tokenizer = train_tokenizer(itertools.chain(iter_captions(drug_words, tables.cell_names, drows, crows), numbers),
                                vocab_size)
    caption_ids = CaptionIds(tokenizer, drug_words, tables.cell_names, drows, crows)
    features = FeatureTables.build(
        drug_ids=[d.drug_id for d in tables.drugs], drug_smiles=[d.smiles for d in tables.drugs],
        graphs=[(d.atoms, d.edges) for d in tables.drugs],
        smiles_codes=[smiles_codes(d.smiles) for d in tables.drugs],
        cell_ids=tables.cell_ids, cell_names=tables.cell_names, cell_features=tables.cell_features,
        feature_names=tables.feature_names, number_tokens=encode_all(tokenizer, numbers),
        caption_prefix_len=caption_ids.prefix_lengths())
    return tokenizer, features, caption_ids, drows, crows


def decoded_samples(tables: GDSCTables, rows, caption_ids: CaptionIds, drows, crows, split: str = "", part: str = ""):
    """Samples as the reader yields them ({"meta": dict, "caption": token ids}), straight from
    the tables: what the shards hold, and what tests and benchmarks batch without shards.
    Captions are encoded ENCODE_BLOCK rows at a time, so any number of rows streams."""
    resp = tables.responses
    ln = resp["ln_ic50"].to_numpy()
    cell_ids, drug_ids = tables.cell_ids, [d.drug_id for d in tables.drugs]
    rows = np.asarray(rows)
    for start in range(0, len(rows), ENCODE_BLOCK):
        block = rows[start:start + ENCODE_BLOCK]
        for r, ids in zip(block.tolist(), caption_ids.encode(block)):
            y = y_from_ln_ic50(float(ln[r]))
            d, c = int(drows[r]), int(crows[r])
            meta = {"cell_id": cell_ids[c], "drug_id": drug_ids[d], "cell": c,
                    "drug": d, "y": y, "ln_ic50": float(ln[r]), "number": number_index(y),
                    "split": split, "part": part}
            yield r, {"meta": meta, "caption": np.asarray(ids, dtype=np.int64)}


def sample_records(tables: GDSCTables, rows: np.ndarray, caption_ids: CaptionIds, drows, crows,
                   split: str, part: str, token_dtype):
    for r, s in decoded_samples(tables, rows, caption_ids, drows, crows, split, part):
        yield {"__key__": f"{r:09d}", "json": json.dumps(s["meta"]).encode(),
               "caption.npy": npy_vector_bytes(s["caption"].astype(token_dtype))}


def ustar_header(name: bytes, size: int) -> bytes:
    """The 512-byte header tarfile writes (USTAR_FORMAT) for a member as webdataset's TarWriter
    makes it: a tenth of the cost of going through TarInfo, which was most of the writer's time."""
    if len(name) > TAR_NAME_BYTES:
        raise ValueError(f"tar member name over {TAR_NAME_BYTES} bytes: {name!r}")
    head = name.ljust(TAR_NAME_BYTES, b"\0") + TAR_MODE_IDS + b"%011o\0" % size + TAR_MTIME
    # tarfile's checksum: the byte sum with the checksum field as spaces, then "%06o\0" and the
    # last of those spaces left in place
    chksum = sum(head) + TAR_CHKSUM_SPACES + TAR_TAIL_SUM
    return head + b"%06o\0 " % chksum + TAR_TAIL


def tar_bytes(records: list[dict]) -> bytes:
    """The uncompressed tar webdataset's TarWriter writes for these records (members sorted by
    extension within a sample, 512-byte padding, two zero blocks, then padding to a record)."""
    parts = []
    for rec in records:
        for ext in sorted(k for k in rec if k != "__key__"):
            data = rec[ext]
            parts += [ustar_header(f"{rec['__key__']}.{ext}".encode(), len(data)), data,
                      b"\0" * (-len(data) % TAR_BLOCK)]
    parts.append(b"\0" * (TAR_END_BLOCKS * TAR_BLOCK))
    parts.append(b"\0" * (-sum(map(len, parts)) % TAR_RECORD))
    return b"".join(parts)


def write_shard(records: list[dict], url: str, tmpdir: str) -> dict:
    local = Path(tmpdir) / "shard.tar.gz"
    # a light gzip level since tar padding, not entropy, is most of the bytes; GzipFile (not
    # gzip.compress) because its header records the file name, as the shards always have
    with open(local, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=GZIP_LEVEL, mtime=0) as gz:
        gz.write(tar_bytes(records))
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
    manifest = write_shards(cfg, tables, splits, out, progress)
    total = sum(len(idx) for parts in splits.values() for idx in parts.values())
    log(f"wrote {total} samples in {sum(len(p['shards']) for s in manifest['splits'].values() for p in s.values())} "
        f"shards to {out} in {time.time() - t0:.1f}s")
    return manifest


def write_shards(cfg: Config, tables: GDSCTables, splits: dict[str, dict[str, np.ndarray]], out: str,
                 progress: bool = True) -> dict:
    """Tokenizer, features and every split's shards under `out`, manifest last. Memory stays
    flat in the number of rows: beyond the tables, a row costs a few bytes of index arrays, and
    samples exist only one shard at a time."""
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
                                                   "drugs": int(np.unique(drows[rows]).size),
                                                   "cells": int(np.unique(crows[rows]).size)}
        bar.close()
        Path(tmp, MANIFEST).write_text(json.dumps(manifest, indent=1))
        storage.put_file(Path(tmp, MANIFEST), storage.join(out, MANIFEST))
    return manifest
