"""Stream one split/part of the shards as DRPBatches: exactly once per epoch across ranks and
loader workers, the same number of batches on every rank, resumable mid-epoch.

How an epoch is cut (pure arithmetic on the manifest's sample counts, see `epoch_plan`):
  1. The part's shards are put in a per-epoch order (seeded by seed and epoch) and read as one
     sequence of N samples.
  2. Training (drop_last=True): every rank takes N // world contiguous samples and
     (N // world) // batch full batches. The N mod (world * batch) samples past the last full
     batch are not read this epoch (as CLDR's drop_last); the per-epoch order changes which.
     Evaluation (drop_last=False): ranks take N split as evenly as possible and a short last
     batch, so every sample is read exactly once; batch counts may then differ by one, so
     evaluation must not run per-step collectives.
  3. A rank's batches are split into contiguous blocks, one per DataLoader worker. Each worker
     reads only its samples, shuffles them through a seeded buffer and batches them. DataLoader
     returns worker batches round-robin, so `worker_skip` can tell, for a rank resumed after
     start_batch batches, how many batches of each block were consumed and which block's
     batch comes next (the resumed loader's worker 0 plays that block).

A part that fits in memory (`fits_in_memory`) is decoded once into a `DecodedPart` and each
epoch reads its pieces from RAM instead of downloading and un-gzipping shards again; the plan
above is untouched, so the batches are the same, sample for sample, as when streaming.
"""
from __future__ import annotations

import ast
import ctypes
import ctypes.util
import gc
import gzip
import hashlib
import json
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from cldr_dist.data import storage
from cldr_dist.data.batch import DRPBatch, collate
from cldr_dist.data.features import FeatureTables
from cldr_dist.data.shards import FORMAT_VERSION, MANIFEST, caption_prefix_lengths
from cldr_dist.data.tokenizer import load_tokenizer
from cldr_dist.data.wordpiece import CaptionWordPieces


class ShardError(Exception):
    """Shards that are missing, corrupt, or do not match their manifest; the message names them."""


@dataclass
class ShardSet:
    url: str
    manifest: dict
    features: FeatureTables
    tokenizer_json: str

    def part(self, split: str, part: str) -> dict:
        try:
            return self.manifest["splits"][split][part]
        except KeyError:
            have = ", ".join(self.manifest.get("splits", {}))
            raise ShardError(f"{self.url}: no {split}/{part} in the manifest (splits: {have})") from None

    def shard_urls(self, split: str, part: str) -> list[str]:
        return [storage.join(self.url, s["url"]) for s in self.part(split, part)["shards"]]


def _checked(url: str, data: bytes, expected: str) -> bytes:
    if hashlib.sha256(data).hexdigest() != expected:
        raise ShardError(f"checksum mismatch: {url} (truncated or corrupted; rebuild with `cldr shards`)")
    return data


def open_shards(url: str) -> ShardSet:
    """Read and verify the manifest, the feature tables and the tokenizer of a shard set."""
    url = url.rstrip("/")
    try:
        manifest = json.loads(storage.read_bytes(storage.join(url, MANIFEST)))
    except storage.StorageError as e:
        raise ShardError(f"no complete shard set at {url}: {e} (run `cldr shards` first)") from None
    except json.JSONDecodeError:
        raise ShardError(f"{storage.join(url, MANIFEST)}: not valid JSON") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ShardError(f"{url}: shard format {manifest.get('format_version')}, this code reads {FORMAT_VERSION}")
    blobs = {}
    for key in ("features", "tokenizer"):
        u = storage.join(url, manifest[key]["file"])
        try:
            blobs[key] = _checked(u, storage.read_bytes(u), manifest[key]["sha256"])
        except storage.StorageError as e:
            raise ShardError(f"manifest lists a missing file: {e}") from None
    features, tokenizer_json = FeatureTables.from_bytes(blobs["features"]), blobs["tokenizer"].decode()
    features.caption_prefix_len = caption_prefix_lengths(load_tokenizer(tokenizer_json), features.drug_smiles)
    return ShardSet(url, manifest, features, tokenizer_json)


# ----------------------------------------------------------------------------- epoch arithmetic

def shard_order(num_shards: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    if not shuffle:
        return np.arange(num_shards)
    return np.random.default_rng([seed, epoch]).permutation(num_shards)


def rank_range(total: int, world_size: int, rank: int, batch_size: int, drop_last: bool) -> tuple[int, int]:
    """[start, stop) of this rank's samples in the epoch's concatenated shard sequence."""
    if drop_last:
        per_rank = (total // world_size) // batch_size * batch_size
        start = rank * (total // world_size)
        return start, start + per_rank
    bounds = [r * total // world_size for r in range(world_size + 1)]
    return bounds[rank], bounds[rank + 1]


def batches_per_epoch(total: int, world_size: int, rank: int, batch_size: int, drop_last: bool) -> int:
    start, stop = rank_range(total, world_size, rank, batch_size, drop_last)
    return -(-(stop - start) // batch_size)


def worker_blocks(num_batches: int, num_workers: int) -> list[tuple[int, int]]:
    """Contiguous [first, last) batch indices of each loader worker."""
    bounds = [w * num_batches // num_workers for w in range(num_workers + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def worker_skip(start_batch: int, blocks: list[tuple[int, int]]) -> tuple[list[int], int]:
    """Replays DataLoader's round-robin over workers (skipping exhausted ones) for the first
    start_batch batches. Returns how many batches each worker block had delivered, and the
    block whose batch comes next: a resumed loader's worker 0 must play that block."""
    remaining = [b - a for a, b in blocks]
    taken = [0] * len(blocks)
    w = 0
    for _ in range(start_batch):
        while remaining[w] == 0:
            w = (w + 1) % len(blocks)
        remaining[w] -= 1
        taken[w] += 1
        w = (w + 1) % len(blocks)
    return taken, w


def sample_pieces(sizes: list[int], order: np.ndarray, start: int, stop: int) -> list[tuple[int, int, int]]:
    """(shard index, first sample, end sample) pieces covering [start, stop) of the sequence."""
    pieces, pos = [], 0
    for s in order:
        n = sizes[s]
        lo, hi = max(start, pos), min(stop, pos + n)
        if lo < hi:
            pieces.append((int(s), lo - pos, hi - pos))
        pos += n
        if pos >= stop:
            break
    return pieces


def epoch_plan(sizes: list[int], *, epoch: int, seed: int, world_size: int, rank: int, batch_size: int,
               num_workers: int, worker: int, drop_last: bool, shuffle: bool) -> list[tuple[int, int, int]]:
    """The shard pieces one loader worker of one rank reads in one epoch."""
    order = shard_order(len(sizes), seed, epoch, shuffle)
    start, stop = rank_range(sum(sizes), world_size, rank, batch_size, drop_last)
    num_batches = -(-(stop - start) // batch_size)
    first, last = worker_blocks(num_batches, num_workers)[worker]
    lo, hi = start + first * batch_size, min(start + last * batch_size, stop)
    return sample_pieces(sizes, order, lo, hi)


# ----------------------------------------------------------------------------- reading

TAR_BLOCK = 512


def tar_members(data: bytes):
    """(name, payload) of each regular file in an uncompressed ustar archive. Our shards are
    written as plain ustar (no pax/GNU long names), so a header is 512 bytes with the name at
    0:100 and the octal size at 124:136; parsing that directly is ~10x faster than tarfile."""
    view, pos, n = memoryview(data), 0, len(data)
    while pos + TAR_BLOCK <= n:
        header = data[pos:pos + TAR_BLOCK]
        if header[0] == 0:  # end-of-archive blocks
            return
        try:
            size = int(header[124:136].rstrip(b"\0 ") or b"0", 8)
        except ValueError:
            raise ShardError(f"corrupt tar header at byte {pos}") from None
        name = header[:100].rstrip(b"\0").decode()
        start = pos + TAR_BLOCK
        if start + size > n:
            raise ShardError(f"truncated tar member {name!r}")
        if header[156:157] in (b"0", b"\0"):
            yield name, view[start:start + size]
        pos = start + (size + TAR_BLOCK - 1) // TAR_BLOCK * TAR_BLOCK


def iter_shard_samples(data: bytes, first: int, end: int):
    """Decoded samples first..end-1 of one shard (a .tar.gz of {key}.json + {key}.caption.npy)."""
    try:
        raw = gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as e:
        raise ShardError(f"not a readable gzip stream ({e})") from None
    index, current, parts = -1, None, {}
    for name, payload in tar_members(raw):
        key, _, ext = name.partition(".")
        if key != current:
            if parts and first <= index < end:
                yield _decode(parts)
            index, current, parts = index + 1, key, {}
            if index >= end:
                return
        if first <= index < end:
            parts[ext] = payload
    if parts and first <= index < end:
        yield _decode(parts)


_NPY_HEADERS: dict[bytes, tuple[np.dtype, tuple]] = {}


def npy_array(buf) -> np.ndarray:
    """An .npy payload as an array, without np.load's per-call header parsing: the few distinct
    headers (one per caption length) are parsed once and cached."""
    b = bytes(buf[:12])
    if b[:6] != b"\x93NUMPY":
        raise ValueError("not an .npy payload")
    hlen, start = (struct.unpack("<H", b[8:10])[0], 10) if b[6] == 1 else (struct.unpack("<I", b[8:12])[0], 12)
    header = bytes(buf[start:start + hlen])
    if header not in _NPY_HEADERS:
        d = ast.literal_eval(header.decode("latin1"))
        if d["fortran_order"] or np.dtype(d["descr"]).hasobject:
            raise ValueError("unsupported .npy payload (object or Fortran order)")
        _NPY_HEADERS[header] = (np.dtype(d["descr"]), tuple(d["shape"]))
    dtype, shape = _NPY_HEADERS[header]
    return np.frombuffer(buf, dtype=dtype, offset=start + hlen, count=int(np.prod(shape))).reshape(shape)


# A decoded part's cost per sample: drug, cell and number-text rows (int32), y and ln IC50
# (float64), 28 bytes, plus 4 bytes per caption token; the bound takes every caption at the
# model's full context, so the manifest's sample count alone decides (captions average far less).
DECODED_FIXED_BYTES = 28
DECODED_TOKEN_BYTES = 4


def decoded_part_bound(num_samples: int, caption_context: int) -> int:
    """Bytes a DecodedPart of num_samples can take at most."""
    return num_samples * (DECODED_FIXED_BYTES + DECODED_TOKEN_BYTES * caption_context)


def fits_in_memory(num_samples: int, caption_context: int, budget_mb: int) -> bool:
    return budget_mb > 0 and decoded_part_bound(num_samples, caption_context) <= budget_mb * 2**20


@dataclass
class DecodedPart:
    """Every sample of one split/part, columnar in numpy arrays: no per-sample Python objects,
    so forked loader workers share these pages instead of copying them as refcounts change."""
    drug: np.ndarray            # (N,) int32 table rows
    cell: np.ndarray            # (N,) int32
    number: np.ndarray          # (N,) int32 number-text index
    y: np.ndarray               # (N,) float64
    ln_ic50: np.ndarray         # (N,) float64
    tokens: np.ndarray          # (total tokens,) int32: the captions, concatenated
    token_offsets: np.ndarray   # (N + 1,) int64
    shard_offsets: np.ndarray   # (shards + 1,) int64: each shard's first sample

    @classmethod
    def from_samples(cls, per_shard: list[list[dict]]) -> "DecodedPart":
        flat = [s for shard in per_shard for s in shard]

        def column(key: str, dtype) -> np.ndarray:
            return np.array([s["meta"][key] for s in flat], dtype=dtype)

        lengths = [len(s["caption"]) for s in flat]
        return cls(column("drug", np.int32), column("cell", np.int32), column("number", np.int32),
                   column("y", np.float64), column("ln_ic50", np.float64),
                   np.concatenate([s["caption"] for s in flat] or [np.zeros(0)]).astype(np.int32),
                   np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                   np.concatenate([[0], np.cumsum([len(x) for x in per_shard])]).astype(np.int64))

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, f.name).nbytes for f in fields(self))

    def samples(self, shard: int, first: int, end: int, features: FeatureTables, split: str, part: str):
        """Samples first..end-1 of one shard, as iter_shard_samples decodes them from the tar."""
        base = int(self.shard_offsets[shard])
        for i in range(base + first, base + end):
            d, c = int(self.drug[i]), int(self.cell[i])
            meta = {"cell_id": str(features.cell_ids[c]), "drug_id": str(features.drug_ids[d]), "cell": c,
                    "drug": d, "y": float(self.y[i]), "ln_ic50": float(self.ln_ic50[i]),
                    "number": int(self.number[i]), "split": split, "part": part}
            caption = self.tokens[self.token_offsets[i]:self.token_offsets[i + 1]].astype(np.int64)
            yield {"meta": meta, "caption": caption}


def _decode(parts: dict) -> dict:
    return {"meta": json.loads(bytes(parts["json"])), "caption": npy_array(parts["caption.npy"]).astype(np.int64)}


def buffered_shuffle(samples, buffer_size: int, rng: np.random.Generator):
    buf = []
    for s in samples:
        if len(buf) < buffer_size:
            buf.append(s)
            continue
        i = rng.integers(len(buf))
        buf[i], s = s, buf[i]
        yield s
    rng.shuffle(buf)
    yield from buf


class ShardStream(IterableDataset):
    """One rank's stream of DRPBatches for one epoch. Set `epoch` and `start_batch` before
    iterating (the loader re-reads them at each `iter`)."""

    def __init__(self, shards: ShardSet, split: str, part: str, *, batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, shuffle: bool = True, drop_last: bool = True,
                 shuffle_buffer: int = 2000, verify_checksums: bool = True,
                 caption_pad_to: int | None = None, number_pad_to: int | None = None,
                 wordpiece: bool = False):
        self.shards, self.split, self.part = shards, split, part
        entries = shards.part(split, part)["shards"]
        self.urls = shards.shard_urls(split, part)
        self.sizes = [s["num_samples"] for s in entries]
        self.sha256 = [s["sha256"] for s in entries]
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.shuffle_buffer, self.verify = shuffle_buffer, verify_checksums
        self.caption_pad_to, self.number_pad_to = caption_pad_to, number_pad_to
        # model.text_tower=minilm: batches also carry the captions' MiniLM WordPiece ids
        self.wordpieces = CaptionWordPieces(shards.features) if wordpiece else None
        self.epoch, self.start_batch = 0, 0
        self.decoded: DecodedPart | None = None   # set by load_in_memory

    def load_in_memory(self) -> DecodedPart:
        """Decodes every shard of the part once (checksums and lengths checked as when
        streaming); later epochs read from RAM. Call before the loader forks its workers."""
        per_shard = [list(self._shard_samples(i, self._fetch(i), 0, n)) for i, n in enumerate(self.sizes)]
        self.decoded = DecodedPart.from_samples(per_shard)
        return self.decoded

    def __len__(self) -> int:
        return batches_per_epoch(sum(self.sizes), self.world_size, self.rank, self.batch_size, self.drop_last)

    def _fetch(self, shard: int) -> bytes:
        try:
            return storage.read_bytes(self.urls[shard])
        except storage.StorageError as e:
            raise ShardError(f"manifest lists a shard that cannot be read: {e}") from None

    def _samples(self, pieces):
        if self.decoded is not None:
            for shard, first, end in pieces:
                yield from self.decoded.samples(shard, first, end, self.shards.features, self.split, self.part)
            return
        # the next shard downloads in a thread while this one is decoded: object-store latency
        # hides behind CPU work instead of adding to it
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(self._fetch, pieces[0][0]) if pieces else None
            for i, (shard, first, end) in enumerate(pieces):
                data = pending.result()
                if i + 1 < len(pieces):
                    pending = pool.submit(self._fetch, pieces[i + 1][0])
                yield from self._shard_samples(shard, data, first, end)

    def _shard_samples(self, shard: int, data: bytes, first: int, end: int):
        if self.verify:
            _checked(self.urls[shard], data, self.sha256[shard])
        read = 0
        try:
            for sample in iter_shard_samples(data, first, end):
                read += 1
                yield sample
        except (ShardError, EOFError, OSError, KeyError, ValueError, UnicodeDecodeError) as e:
            raise ShardError(f"{self.urls[shard]}: unreadable sample ({type(e).__name__}: {e})") from None
        if read < end - first:
            # a rank that ran short would replay its epoch while the others wait in a collective
            raise ShardError(f"{self.urls[shard]}: holds {first + read} samples, the manifest says "
                             f"{self.sizes[shard]}; rebuild with `cldr shards`")

    def __iter__(self):
        info = get_worker_info()
        loader_worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        blocks = worker_blocks(len(self), num_workers)
        taken, first_block = worker_skip(self.start_batch, blocks)
        worker = (loader_worker + first_block) % num_workers
        skip = taken[worker]
        plan = epoch_plan(self.sizes, epoch=self.epoch, seed=self.seed, world_size=self.world_size,
                          rank=self.rank, batch_size=self.batch_size, num_workers=num_workers,
                          worker=worker, drop_last=self.drop_last, shuffle=self.shuffle)
        samples = self._samples(plan)
        if self.shuffle:
            rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker])
            samples = buffered_shuffle(samples, self.shuffle_buffer, rng)
        batch, done = [], 0
        for s in samples:
            batch.append(s)
            if len(batch) == self.batch_size:
                if done >= skip:
                    yield self._collate(batch)
                batch, done = [], done + 1
        if batch and not self.drop_last and done >= skip:
            yield self._collate(batch)

    def _collate(self, samples) -> DRPBatch:
        return collate(samples, self.shards.features, self.caption_pad_to, self.number_pad_to,
                       self.wordpieces)


def part_meta(shards: ShardSet, split: str, part: str):
    """Every sample's metadata (drug and cell table rows, y, ids) of one part, in shard order:
    what the classical baselines and the report need, without collating batches."""
    stream = ShardStream(shards, split, part, batch_size=1, shuffle=False, drop_last=False)
    for shard, size in enumerate(stream.sizes):
        for sample in stream._shard_samples(shard, stream._fetch(shard), 0, size):
            yield sample["meta"]


def release_free_heap() -> bool:
    """Hands the heap pages that freed tensors left behind back to the OS (glibc's malloc_trim);
    False where the C library has no such call. On CPU a training step's activations live in
    this heap: a loader worker forked over gigabytes of freed but resident pages copies them as
    its own allocator writes there (a DeepCDR pretrain worker at batch 8,192 forked a loader
    worker of 3 GiB private memory, 0.15 GiB after this call; two such trials ran a 24 GiB node
    out of memory)."""
    libc = ctypes.util.find_library("c")
    trim = getattr(ctypes.CDLL(libc), "malloc_trim", None) if libc else None
    if trim is None:
        return False
    gc.collect()
    trim(0)
    return True


def make_loader(stream: ShardStream, num_workers: int) -> DataLoader:
    """batch_size=None: the stream batches itself, so DataLoader only moves batches across.
    The loader draws its worker seeds from its own generator: drawing from the global one would
    shift every later dropout mask, and a resumed run would no longer match an unbroken one."""
    if num_workers:
        release_free_heap()   # before the workers fork: each epoch forks them anew
    return DataLoader(stream, batch_size=None, num_workers=num_workers,
                      multiprocessing_context="fork" if num_workers else None,
                      persistent_workers=False, generator=torch.Generator().manual_seed(stream.seed))
