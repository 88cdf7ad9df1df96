"""The training cache (issue 17 item 9): bounded by `data.cache_max_mb` (least recently used out) and cleaned of
what interrupted runs left (`*.<pid>.tmp`)."""

from __future__ import annotations

import os
import time

import numpy as np

from improvd.train import data as td
from harness.trainfiles import harmonised, write


def _cache_bytes(cache):
    return sum(p.stat().st_size for p in cache.rglob("*") if p.is_file() and p.name != td.INDEX_NAME)


def test_an_interrupted_run_leaves_nothing_behind_for_long(tmp_path):
    paths = [write(tmp_path / f"f{i}.mid", harmonised(i)) for i in range(3)]
    cache = tmp_path / "cache" / td.CACHE_VERSION
    (cache / "packs").mkdir(parents=True)
    dead = 2 ** 22 + 12345  # above any pid_max: no such process
    junk = [cache / "packs" / f"0123abcd.{dead}.tmp", cache / "packs" / f"0123abcd.lengths.{dead}.tmp",
            cache / f"{'ab' * 32}.{dead}.tmp", cache / f"{'cd' * 32}.skip.{dead}.tmp"]
    for path in junk:
        path.write_bytes(b"\0" * 100_000)  # a killed packing run: the size of the data set
    old_live = cache / "packs" / f"4567.{os.getppid()}.tmp"  # a live pid, but untouched for a day
    old_live.write_bytes(b"x")
    os.utime(old_live, (time.time() - 86400, time.time() - 86400))
    busy = cache / "packs" / f"89ab.{os.getppid()}.tmp"  # another run packing right now
    busy.write_bytes(b"x")
    td.load_collection(paths, tmp_path / "cache", workers=1, progress=False)
    assert not any(p.exists() for p in junk + [old_live])
    assert busy.exists()


def test_the_cache_is_bounded_least_recently_used_out(tmp_path, monkeypatch):
    monkeypatch.setattr(td, "PRUNE_GRACE_S", 0.0)  # entries used seconds ago may go (other runs are not at work)
    first = [write(tmp_path / "a" / f"f{i}.mid", harmonised(i, n=200)) for i in range(8)]
    second = [write(tmp_path / "b" / f"f{i}.mid", harmonised(100 + i, n=200)) for i in range(8)]
    cache_dir = tmp_path / "cache"
    cache = cache_dir / td.CACHE_VERSION
    before = np.array(td.load_collection(first, cache_dir, workers=1, progress=False).files[0].notes)
    one_set = _cache_bytes(cache)  # 8 files' notes and their pack
    time.sleep(0.05)
    col = td.load_collection(second, cache_dir, workers=1, progress=False, max_bytes=int(one_set * 1.5))
    assert _cache_bytes(cache) <= one_set * 1.5
    assert col.notes.num_notes == 8 * 400  # this run's own data is never evicted
    for f in col.files:
        assert (cache / f"{f.sha256}.npy").exists()
    again = td.load_collection(first, cache_dir, workers=1, progress=False, max_bytes=int(one_set * 1.5))
    assert again.parsed == 8  # evicted: parsed again, and loads the same notes
    assert again.notes.num_notes == 8 * 400
    np.testing.assert_array_equal(again.files[0].notes, before)
