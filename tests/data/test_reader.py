"""The shard reader: exactly once per epoch across ranks x loader workers, equal batch counts on
every rank, per-epoch shuffling, exact mid-epoch resume, local disk and S3."""
import collections
import json
import re
from pathlib import Path

import pytest
import torch

from cldr_dist.config import load_config
from cldr_dist.data.reader import (ShardError, ShardStream, decoded_part_bound, epoch_plan, fits_in_memory,
                                   make_loader, open_shards, worker_blocks, worker_skip)
from cldr_dist.data.shards import build_shards

from tests.conftest import HELD_OUT, TINY


def read_epoch(shards, split, part, world, workers, batch, epoch=0, drop_last=True, start_batch=0, seed=3):
    """Keys per rank, as lists of batches of (cell_id, drug_id)."""
    per_rank = []
    for rank in range(world):
        stream = ShardStream(shards, split, part, batch_size=batch, rank=rank, world_size=world,
                             seed=seed, drop_last=drop_last, shuffle_buffer=50)
        stream.epoch, stream.start_batch = epoch, start_batch
        batches = [list(zip(b.cell_ids, b.drug_ids)) for b in make_loader(stream, workers)]
        assert len(batches) == len(stream) - start_batch
        per_rank.append(batches)
    return per_rank


@pytest.fixture(scope="module")
def s3_shards(s3_server):
    import boto3
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="reader-test")
    cfg = load_config(None, [f"data.data_dir={TINY}", f"data.held_out_drugs={HELD_OUT}",
                             "data.samples_per_shard=100", "data.splits=mixed,drug_blind"])
    url = "s3://reader-test/tiny"
    build_shards(cfg, out=url, progress=False, log=lambda *_: None)
    return url


def test_s3_every_sample_once_across_2_ranks_x_2_workers(s3_shards):
    shards = open_shards(s3_shards)
    # mixed/train: 960 samples in 10 shards; batch 16 divides 960 / 2 ranks, so nothing is dropped
    ranks = read_epoch(shards, "mixed", "train", world=2, workers=2, batch=16)
    assert len(ranks[0]) == len(ranks[1]) == 30
    keys = [k for r in ranks for b in r for k in b]
    assert len(keys) == len(set(keys)) == 960


def test_eval_mode_reads_every_sample_once_with_uneven_shards(tiny_shards):
    shards = open_shards(tiny_shards)
    part = shards.part("drug_blind", "test")
    keys = [k for r in read_epoch(shards, "drug_blind", "test", 3, 2, batch=7, drop_last=False)
            for b in r for k in b]
    assert len(keys) == len(set(keys)) == part["num_samples"]


def test_training_ranks_get_equal_batches_when_shards_do_not_divide(tiny_shards):
    """3 ranks over 9 shards of 100 (drug_blind/train): plain shard splitting is uneven."""
    shards = open_shards(tiny_shards)
    ranks = read_epoch(shards, "drug_blind", "train", world=3, workers=2, batch=32)
    counts = [len(r) for r in ranks]
    assert counts == [9, 9, 9]  # 900 // 3 = 300 per rank -> 9 full batches, 12 samples dropped each
    keys = [k for r in ranks for b in r for k in b]
    assert len(keys) == len(set(keys)) == 27 * 32


def test_epochs_shuffle_differently_and_deterministically(tiny_shards):
    shards = open_shards(tiny_shards)
    e0 = read_epoch(shards, "mixed", "train", 1, 1, 32, epoch=0)
    e0_again = read_epoch(shards, "mixed", "train", 1, 1, 32, epoch=0)
    e1 = read_epoch(shards, "mixed", "train", 1, 1, 32, epoch=1)
    assert e0 == e0_again
    assert e0 != e1
    assert sorted(k for b in e0[0] for k in b) == sorted(k for b in e1[0] for k in b)


@pytest.mark.parametrize("workers,start", [(1, 5), (2, 7), (3, 1), (3, 28)])
def test_resume_mid_epoch_reads_exactly_the_rest(tiny_shards, workers, start):
    shards = open_shards(tiny_shards)
    full = read_epoch(shards, "mixed", "train", 2, workers, 16, epoch=4)
    rest = read_epoch(shards, "mixed", "train", 2, workers, 16, epoch=4, start_batch=start)
    for rank in range(2):
        assert rest[rank] == full[rank][start:]


def test_worker_skip_matches_round_robin():
    blocks = worker_blocks(7, 3)  # sizes 2, 2, 3
    assert blocks == [(0, 2), (2, 4), (4, 7)]
    assert worker_skip(0, blocks) == ([0, 0, 0], 0)
    assert worker_skip(4, blocks) == ([2, 1, 1], 1)
    assert worker_skip(6, blocks) == ([2, 2, 2], 0)  # workers 0 and 1 are done: block 2 is next
    assert worker_skip(7, blocks) == ([2, 2, 3], 0)


def test_plan_covers_each_rank_range_once():
    sizes = [100, 100, 37]
    seen = collections.Counter()
    for rank in range(2):
        for w in range(3):
            for shard, a, b in epoch_plan(sizes, epoch=1, seed=0, world_size=2, rank=rank, batch_size=10,
                                          num_workers=3, worker=w, drop_last=False, shuffle=True):
                seen.update((shard, i) for i in range(a, b))
    assert len(seen) == 237 and max(seen.values()) == 1


def test_corrupt_shard_is_named(tiny_shards, tmp_path):
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(tiny_shards, copy)
    victim = copy / "mixed" / "train-000003.tar.gz"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    shards = open_shards(str(copy))
    with pytest.raises(ShardError, match="checksum mismatch.*train-000003"):
        read_epoch(shards, "mixed", "train", 1, 0, 32)


def test_missing_manifest_or_shard(tiny_shards, tmp_path):
    with pytest.raises(ShardError, match="no complete shard set"):
        open_shards(str(tmp_path / "nowhere"))
    import shutil
    copy = tmp_path / "copy2"
    shutil.copytree(tiny_shards, copy)
    (copy / "mixed" / "val-000001.tar.gz").unlink()
    shards = open_shards(str(copy))
    with pytest.raises(ShardError, match="val-000001"):
        read_epoch(shards, "mixed", "val", 1, 0, 32, drop_last=False)


def test_manifest_records_what_training_needs(tiny_shards):
    m = json.loads((Path(tiny_shards) / "manifest.json").read_text())
    assert m["seed"] == 171 and m["tokenizer"]["sha256"] and m["features"]["sha256"]
    assert set(m["source"]) == {"responses", "drugs", "cell_lines"}
    for split in ("mixed", "cell_blind", "drug_blind"):
        parts = m["splits"][split]
        assert sum(p["num_samples"] for p in parts.values()) == 1200
        for p in parts.values():
            assert sum(s["num_samples"] for s in p["shards"]) == p["num_samples"]
            assert all(len(s["sha256"]) == 64 for s in p["shards"])


def test_interrupted_rebuild_leaves_no_manifest(tiny_shards, tmp_path, monkeypatch):
    """A rebuild that dies half way must not leave the old manifest vouching for new shards."""
    import shutil

    from cldr_dist.data import shards as shards_mod
    copy = tmp_path / "copy3"
    shutil.copytree(tiny_shards, copy)
    calls = {"n": 0}
    real = shards_mod.write_shard

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(shards_mod, "write_shard", dying)
    cfg = load_config(None, [f"data.data_dir={TINY}", f"data.held_out_drugs={HELD_OUT}", "data.samples_per_shard=100"])
    with pytest.raises(KeyboardInterrupt):
        build_shards(cfg, out=str(copy), progress=False, log=lambda *_: None)
    assert not (copy / "manifest.json").exists()
    assert not list(copy.rglob("*.tmp"))
    with pytest.raises(ShardError):
        open_shards(str(copy))


def test_shard_shorter_than_its_manifest_count_fails_on_the_first_pass(tiny_shards, tmp_path):
    """A manifest that promises more samples than a shard holds (a shard replaced by a shorter
    one): the stream must stop with the shard's name, not quietly deliver fewer batches (one
    rank would then replay its epoch while the others wait in a collective). The manifest
    itself carries no checksum, only the shards, features and tokenizer do."""
    import shutil
    copy = tmp_path / "short"
    shutil.copytree(tiny_shards, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    part = manifest["splits"]["mixed"]["train"]
    victim = part["shards"][2]
    assert victim["url"] == "mixed/train-000002.tar.gz" and victim["num_samples"] == 100
    victim["num_samples"] += 10
    part["num_samples"] += 10
    (copy / "manifest.json").write_text(json.dumps(manifest))
    shards = open_shards(str(copy))
    for workers in (0, 1):
        stream = ShardStream(shards, "mixed", "train", batch_size=16, shuffle=False, drop_last=True)
        batches = []
        with pytest.raises(ShardError, match=r"train-000002\.tar\.gz: holds 100 samples, the manifest says 110"):
            for b in make_loader(stream, workers):
                batches.append(b)
        # the first 300 samples came through (shards 0, 1 and all 100 of the short one); the
        # error stops the epoch before any sample that would have come from the next shard
        assert len(batches) == 300 // 16


def test_short_shard_is_caught_by_the_rank_that_reads_it(tiny_shards, tmp_path):
    """Training streams (shuffled, 2 ranks): the rank whose range covers the short shard fails."""
    import shutil
    copy = tmp_path / "short2"
    shutil.copytree(tiny_shards, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    for s in manifest["splits"]["mixed"]["train"]["shards"]:
        s["num_samples"] += 4   # every shard short by 4: whichever a rank reads first fails
    (copy / "manifest.json").write_text(json.dumps(manifest))
    shards = open_shards(str(copy))
    for rank in range(2):
        stream = ShardStream(shards, "mixed", "train", batch_size=16, rank=rank, world_size=2, seed=3,
                             shuffle_buffer=50)
        with pytest.raises(ShardError) as e:
            list(make_loader(stream, 0))
        m = re.search(r"/mixed/train-0000\d\d\.tar\.gz: holds (\d+) samples, the manifest says (\d+)", str(e.value))
        assert m and int(m.group(2)) == int(m.group(1)) + 4, str(e.value)


def batches_of(stream, workers: int) -> list:
    return list(make_loader(stream, workers))


def same_batch(a, b) -> bool:
    return (a.cell_ids == b.cell_ids and a.drug_ids == b.drug_ids and torch.equal(a.y, b.y)
            and torch.equal(a.ln_ic50, b.ln_ic50) and torch.equal(a.caption, b.caption)
            and torch.equal(a.caption_len, b.caption_len) and torch.equal(a.number_index, b.number_index)
            and torch.equal(a.cell, b.cell) and torch.equal(a.drug_index, b.drug_index)
            and torch.equal(a.drug.x, b.drug.x))


@pytest.mark.parametrize("workers,epoch,start", [(0, 0, 0), (1, 1, 0), (2, 2, 0), (2, 3, 7), (3, 1, 5)])
def test_in_memory_part_yields_the_streamed_batches(tiny_shards, workers, epoch, start):
    """Decoded once, a part gives every epoch the same batches, sample for sample, as reading the
    shards: the per-epoch shuffle, equal steps per rank and mid-epoch resume come with it."""
    shards = open_shards(tiny_shards)
    for rank in range(2):
        streamed, cached = (ShardStream(shards, "mixed", "train", batch_size=16, rank=rank, world_size=2,
                                        seed=3, shuffle_buffer=50) for _ in range(2))
        decoded = cached.load_in_memory()
        assert len(decoded.y) == shards.part("mixed", "train")["num_samples"]
        for s in (streamed, cached):
            s.epoch, s.start_batch = epoch, start
        a, b = batches_of(streamed, workers), batches_of(cached, workers)
        assert len(a) == len(b) == len(streamed) - start
        assert all(same_batch(x, y) for x, y in zip(a, b))


def test_in_memory_rule_and_cost(tiny_shards):
    """The rule is a bound from the manifest's sample count; the real part stays under it."""
    shards = open_shards(tiny_shards)
    n = shards.part("mixed", "train")["num_samples"]
    decoded = ShardStream(shards, "mixed", "train", batch_size=16).load_in_memory()
    assert decoded.nbytes <= decoded_part_bound(n, 300)
    assert fits_in_memory(n, 300, budget_mb=1) == (decoded_part_bound(n, 300) <= 2**20)
    assert not fits_in_memory(n, 300, budget_mb=0)
    # full GDSC's largest training part (mixed, 80% of ~200k pairs) fits the default budget
    assert fits_in_memory(160_000, 300, budget_mb=1024)


def test_in_memory_load_still_checks_shards(tiny_shards, tmp_path):
    import shutil
    copy = tmp_path / "tiny"
    shutil.copytree(tiny_shards, copy)
    shards = open_shards(str(copy))
    victim = Path(shards.shard_urls("mixed", "train")[0])
    victim.write_bytes(victim.read_bytes()[:-20])
    with pytest.raises(ShardError, match=victim.name):
        ShardStream(shards, "mixed", "train", batch_size=16).load_in_memory()


FREED_HEAP = """
import psutil
from cldr_dist.data.reader import release_free_heap
me = psutil.Process()
chunks = [bytes(4000) + bytes([i % 256]) for i in range(100_000)]  # ~400 MB in the malloc heap
sentinel = bytes(4000) + b"s"   # allocated above them: the heap's top cannot shrink by itself
del chunks
before = me.memory_info().rss
print(release_free_heap(), (before - me.memory_info().rss) / 2**20)
"""


def test_freed_heap_pages_go_back_before_loader_workers_fork():
    """What a forked loader worker would otherwise copy as its allocator writes into them
    (a fresh interpreter: this process's heap is whatever earlier tests left)."""
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c", FREED_HEAP], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2]).stdout.split()
    if out[0] == "False":
        pytest.skip("this C library has no malloc_trim")
    assert float(out[1]) > 300, f"only {out[1]} MiB of ~390 MiB freed heap went back to the OS"
