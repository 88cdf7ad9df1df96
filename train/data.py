"""Training data: find MIDI files, parse them in parallel with a per-file cache, pack them, split by file and melody.

Parsing uses the daemon's own reader (`daemon.midifile`), so the model learns from exactly the notes the daemon
will hear. Three layers of cache live under `cache_dir/notes-v2/`:

- per file, by the SHA-256 of its bytes: `<sha>.npy` (float32 [N, 4], loaded with `allow_pickle=False`) or
  `<sha>.skip.json` (why the file cannot be used), so a file is parsed once whatever its name;
- `index.sqlite`: path → (size, mtime, ctime, inode) → SHA-256, so an unchanged file is not even read again
  (a file changed less than two seconds before it was indexed is re-hashed next time, as git does);
- `packs/<key>.f32`: the notes of one ordered set of files in ONE contiguous float32 array, memory-mapped, with
  per-file lengths beside it. Training reads windows straight from the map: resident memory does not grow with
  the number of files (the kernel pages notes in and out), only a few bytes of bookkeeping per file do.

The cache is bounded by `data.cache_max_mb`: once a run's entries are in, the least recently used per-file entries
and packs go (an entry's mtime is set each time a run uses it), never the run's own nor any used in the last
`PRUNE_GRACE_S` (another run may be packing them). Temporary files of interrupted runs (`*.<pid>.tmp`, a pack's
the size of the data set) are removed at the next run once their process is gone or untouched for `STALE_TMP_S`.

Bad files never stop a run: they are counted and named with their reason, one line each.

Threads: the main thread of `improvd train`; files are parsed in worker processes (`data.workers`,
`ProcessPoolExecutor`). Why this module is over 500 lines: reading, caching, packing and splitting share the
cache's keys and index (`index.sqlite`, the per-file hashes), and a change to one must change the others; the
split by melody needs the parsed notes the cache returns.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import mmap
import os
import random
import re
import sqlite3
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from improvd.core import notes as nt
from improvd.core.errors import MidiFileError
from improvd.core.midifile import read_notes

log = logging.getLogger(__name__)

MIDI_SUFFIXES = (".mid", ".midi")
CACHE_VERSION = "notes-v2"  # bump when parsing or skip reasons change
INDEX_NAME = "index.sqlite"
PACKS_KEPT = 4              # packs (one per distinct set of files) kept in the cache, most recently used first
PRUNE_GRACE_S = 600.0       # cache entries used this recently are never evicted (another run may be packing them)
STALE_TMP_S = 3600.0        # a `*.<pid>.tmp` untouched this long is an interrupted run's, even if its pid lives
_TMP_PID = re.compile(r"\.(\d+)\.tmp$")
RACY_S = 2.0                # files modified this recently are not trusted to the index (mtime granularity)
MELODY_GRAM = 8            # intervals per melody n-gram used to find shared tunes
MELODY_SHARE = 0.3         # share of the smaller file's n-grams two files must share to be grouped
MELODY_COMMON = 50         # an n-gram found in more files than this is a stock figure, not a tune: ignored
GRAM_BLOCK = 4_000_000     # n-grams held in memory at once when grouping melodies or measuring leakage
LEAK_RUN = 16              # length of the pitch runs counted by `leakage`


class NoteSet(Sequence):
    """The notes of many files in one contiguous float32 array [N, 4] (often memory-mapped) plus per-file spans.

    `notes_set[i]` is file i's notes (a view, no copy); `len()` is the number of files; `lengths` the notes per
    file; `subset(indices)` a new `NoteSet` over the same array. Iterating yields each file's view, so code that
    takes a list of per-file arrays takes a `NoteSet` too.
    """

    def __init__(self, notes: np.ndarray, starts: np.ndarray, lengths: np.ndarray):
        self.notes = notes
        self.starts = np.asarray(starts, dtype=np.int64)
        self.lengths = np.asarray(lengths, dtype=np.int64)

    @classmethod
    def from_arrays(cls, arrays: list[np.ndarray]) -> "NoteSet":
        """A `NoteSet` holding a copy of `arrays` (per-file notes [n_i, 4]) in one float32 array."""
        lengths = np.array([len(a) for a in arrays], dtype=np.int64)
        notes = np.concatenate([np.asarray(a, np.float32).reshape(-1, 4) for a in arrays]) if arrays else \
            np.zeros((0, 4), np.float32)
        return cls(notes, np.concatenate([[0], np.cumsum(lengths)[:-1]]) if len(arrays) else lengths, lengths)

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.subset(np.arange(len(self))[i])
        s = self.starts[i]
        return self.notes[s:s + self.lengths[i]]

    def __iter__(self) -> Iterator[np.ndarray]:
        for i in range(len(self)):
            yield self[i]

    @property
    def num_notes(self) -> int:
        return int(self.lengths.sum())

    def subset(self, indices) -> "NoteSet":
        idx = np.asarray(indices, dtype=np.int64)
        return NoteSet(self.notes, self.starts[idx], self.lengths[idx])

    def release(self) -> None:
        """Drop the mapped pages this process has touched from its resident set (they stay in the page cache).

        Reading a memory-mapped pack touches pages that count towards this process's RSS until the kernel
        reclaims them; calling this now and then keeps RSS flat however large the pack is. No-op in memory.
        """
        mm = getattr(self.notes, "_mmap", None) or getattr(getattr(self.notes, "base", None), "_mmap", None)
        if mm is not None and hasattr(mm, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
            mm.madvise(mmap.MADV_DONTNEED)


def stream(files, every: int = 4096) -> Iterator[np.ndarray]:
    """Each file's notes in turn; for a `NoteSet`, its touched pages are released every `every` files, so a
    pass over a memory-mapped pack keeps resident memory flat."""
    for i, notes in enumerate(files):
        yield notes
        if isinstance(files, NoteSet) and i % every == every - 1:
            files.release()
    if isinstance(files, NoteSet):
        files.release()


def as_note_set(files) -> NoteSet:
    """`files` as a `NoteSet` (a `NoteSet` is returned as it is; a list of arrays is copied into one)."""
    return files if isinstance(files, NoteSet) else NoteSet.from_arrays(list(files))


@dataclass
class FileNotes:
    """One usable file: its path (as given), content hash and notes (float [N, 4]; a view into the pack)."""

    path: str
    sha256: str
    notes: np.ndarray


@dataclass
class Skipped:
    """One file that was not used, and why."""

    path: str
    reason: str


@dataclass
class Collection:
    """The result of parsing a folder: usable files, skipped files and how many came from the cache.

    `notes` holds the usable files' notes in `files` order as one `NoteSet` (memory-mapped from the pack);
    each `FileNotes.notes` is a view into it.
    """

    files: list[FileNotes] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    cached: int = 0
    notes: NoteSet | None = None
    parsed: int = 0       # files parsed in this call (neither in the index nor in the per-file cache)
    hashed: int = 0       # files read and hashed in this call (not in the index, or changed)

    def note_set(self) -> NoteSet:
        if self.notes is None:
            self.notes = NoteSet.from_arrays([f.notes for f in self.files])
        return self.notes

    def summary(self) -> dict:
        reasons: dict[str, int] = {}
        for s in self.skipped:
            key = s.reason.split(" (")[0].split(": ", 1)[-1]
            reasons[key] = reasons.get(key, 0) + 1
        notes = self.notes.num_notes if self.notes is not None else int(sum(len(f.notes) for f in self.files))
        return {"files": len(self.files), "notes": notes,
                "skipped": len(self.skipped), "skipped_by_reason": reasons,
                "skipped_files": [{"path": s.path, "reason": s.reason} for s in self.skipped],
                "from_cache": self.cached}


def find_midi_files(root: str | os.PathLike) -> list[Path]:
    """Every `.mid`/`.midi` file below `root`, sorted (case-insensitive suffixes).

    Walks with `os.scandir` (one `stat` per directory entry at most), fast on folders of 100,000 files.

    Raises:
        FileNotFoundError: `root` is not a folder.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {str(root)!r} does not exist or is not a folder")
    found: list[str] = []
    stack = [str(root)]
    while stack:
        with os.scandir(stack.pop()) as it:
            for entry in it:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                elif entry.name.lower().endswith(MIDI_SUFFIXES) and entry.is_file():
                    found.append(entry.path)
    return [Path(p) for p in sorted(found)]


def _hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _stat_key(st: os.stat_result) -> tuple[int, int, int, int]:
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino


TRACK_CHOICES = ("all", "player", "improvd")  # `improvd train --tracks`: the track names `[record]` writes


def cache_key(digest: str, tracks: str = "all") -> str:
    """The cache's name for a file's notes: its SHA-256, with the track selection when it is not "all"."""
    return digest if tracks == "all" else f"{digest}.{tracks}"


def _parse_one(args: tuple) -> tuple[str, str, str | None, bool, tuple | None]:
    """Worker: hash and parse one file into the cache (only the tracks named `tracks`, unless "all").

    Returns (path, sha256, skip reason or None, from cache, stat key of the bytes read or None).
    """
    path, cache = args[0], args[1]
    tracks = args[2] if len(args) > 2 else "all"
    try:
        with open(path, "rb") as fh:
            key = _stat_key(os.fstat(fh.fileno()))
            data = fh.read()
    except OSError as err:
        return path, "", f"unreadable ({err.strerror or err})", False, None
    digest = _hash(data)
    known = _cached_outcome(Path(cache), cache_key(digest, tracks))
    if known is not False:
        return path, digest, known, True, key
    npy, bad = (Path(cache) / f"{cache_key(digest, tracks)}{ext}" for ext in (".npy", ".skip.json"))
    try:
        notes = read_notes(path, None if tracks == "all" else tracks)
        tmp = npy.with_suffix(f".{os.getpid()}.tmp")
        with open(tmp, "wb") as fh:
            np.save(fh, notes.astype(np.float32), allow_pickle=False)
        os.replace(tmp, npy)
        return path, digest, None, False, key
    except MidiFileError as err:
        reason = str(err).split(": ", 1)[-1]
    except Exception as err:  # any other failure of a third-party parser on odd bytes: skip, never crash
        reason = f"unreadable ({type(err).__name__}: {err})"
    tmp = bad.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"reason": reason}))
    os.replace(tmp, bad)
    return path, digest, reason, False, key


def _touch(path: Path) -> bool:
    """Mark a cache entry used now (its mtime: the size limit evicts the least recently used); False if it is not
    there. A cache the user cannot write to is still read."""
    try:
        os.utime(path)
    except FileNotFoundError:
        return False
    except OSError:
        return path.exists()
    return True


def _cached_outcome(cache: Path, digest: str) -> str | None | bool:
    """None if the file's notes are cached, its skip reason if it is cached as bad, False if not cached; marks the
    entry used."""
    if _touch(cache / f"{digest}.npy"):
        return None
    bad = cache / f"{digest}.skip.json"
    if _touch(bad):
        return json.loads(bad.read_text())["reason"]
    return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return pid < 2 ** 22  # another user's process (or a pid beyond any pid_max: none)
    return True


def remove_interrupted(cache: Path) -> int:
    """Remove what interrupted runs left in the cache (`<sha>.<pid>.tmp`, `packs/<key>.<pid>.tmp`, the size of
    the data set): a temporary file whose process is gone, or untouched for `STALE_TMP_S`. Returns how many."""
    removed = 0
    now = time.time()
    for folder in (cache, cache / "packs"):
        if not folder.is_dir():
            continue
        for path in folder.glob("*.tmp"):
            m = _TMP_PID.search(path.name)
            if m is None:
                continue
            try:
                stale = now - path.stat().st_mtime > STALE_TMP_S
                if stale or not _pid_alive(int(m.group(1))):
                    path.unlink()
                    removed += 1
            except OSError:  # gone meanwhile (its run finished), or not ours to remove
                pass
    if removed:
        log.info("removed %d temporary file(s) left in the cache by interrupted runs", removed)
    return removed


def prune_cache(cache: Path, max_bytes: int, keep: set[str]) -> int:
    """Keep the cache within `max_bytes` (`data.cache_max_mb`): per-file entries and packs go, least recently used
    first, but never those in `keep` (this run's: digests and its pack key) nor any used within `PRUNE_GRACE_S`.
    The index stays (a row whose entry went is parsed again). Returns the bytes freed."""
    groups: dict[str, list[Path]] = {}
    for path in list(cache.glob("*.npy")) + list(cache.glob("*.skip.json")):
        groups.setdefault(path.name.split(".", 1)[0], []).append(path)
    for path in (cache / "packs").glob("*"):
        if not _TMP_PID.search(path.name):
            groups.setdefault("pack:" + path.name.split(".", 1)[0], []).append(path)
    entries = []
    total = 0
    for name, paths in groups.items():
        try:
            stats = [p.stat() for p in paths]
        except OSError:
            continue
        size = sum(st.st_size for st in stats)
        total += size
        entries.append((max(st.st_mtime for st in stats), size, name, paths))
    if total <= max_bytes:
        return 0
    freed = 0
    newest = time.time() - PRUNE_GRACE_S
    for mtime, size, name, paths in sorted(entries, key=lambda e: e[0]):
        if total - freed <= max_bytes:
            break
        if name.split(":")[-1] in keep or mtime > newest:
            continue
        for path in paths:
            try:
                path.unlink()
            except OSError:  # another run removed it first, or still maps it (fine on POSIX)
                pass
        freed += size
    if total - freed > max_bytes:
        log.warning("the cache %s holds %.0f MB, over data.cache_max_mb (%.0f MB): what this run uses (or runs "
                    "used in the last %.0f min) is kept", cache, (total - freed) / 2**20, max_bytes / 2**20,
                    PRUNE_GRACE_S / 60)
    return freed


class FileIndex:
    """path → (size, mtime_ns, ctime_ns, inode) → SHA-256, in SQLite (safe for several processes at once)."""

    def __init__(self, path: Path):
        self.db = sqlite3.connect(str(path), timeout=60)
        self.db.execute("CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER,"
                        " ctime_ns INTEGER, inode INTEGER, sha256 TEXT)")

    def lookup(self, paths: list[str]) -> dict[str, tuple]:
        """{path: (size, mtime_ns, ctime_ns, inode, sha256)} for the indexed ones among `paths`."""
        wanted = set(paths)
        out = {}
        for row in self.db.execute("SELECT path, size, mtime_ns, ctime_ns, inode, sha256 FROM files"):
            if row[0] in wanted:
                out[row[0]] = row[1:]
        return out

    def store(self, rows: list[tuple]) -> None:
        """Rows (path, size, mtime_ns, ctime_ns, inode, sha256); racy ones (modified just now) are left out."""
        limit = time.time_ns() - int(RACY_S * 1e9)
        rows = [r for r in rows if r[2] < limit and r[3] < limit]
        with self.db:
            self.db.executemany("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?)", rows)

    def close(self) -> None:
        self.db.close()


def load_collection(paths: list[Path], cache_dir: str | os.PathLike, workers: int = 0,
                    progress: bool = True, tracks: str = "all", max_bytes: int | None = None) -> Collection:
    """Parse `paths` (in worker processes, cached by content, indexed by stat) into a `Collection`.

    Only new or changed files are read: an indexed file whose size, mtime, ctime and inode are unchanged is
    taken from the cache without opening it. The usable files' notes are then packed into one memory-mapped
    array (`Collection.notes`), built once per distinct set of files.

    Args:
        paths: MIDI files.
        cache_dir: improvd's cache folder; notes go to `cache_dir/notes-v2/`.
        workers: worker processes; 0 = one per core; 1 = in this process.
        progress: show progress bars (with rate and ETA).
        tracks: "all", or the name of the tracks to read ("player", "improvd": `[record]`'s); a file without
            such a track is skipped with the reason.
        max_bytes: the cache's size limit (`data.cache_max_mb`); None = no limit. The least recently used
            entries go once this run's are in (`prune_cache`).
    """
    from tqdm import tqdm

    if tracks not in TRACK_CHOICES:
        raise ValueError(f"tracks = {tracks!r} is not valid: expected one of {', '.join(TRACK_CHOICES)}")

    cache = Path(cache_dir).expanduser() / CACHE_VERSION
    cache.mkdir(parents=True, exist_ok=True)
    remove_interrupted(cache)
    index = FileIndex(cache / INDEX_NAME)
    out = Collection()
    names = [str(p) for p in paths]
    known = index.lookup(names)
    results: dict[str, tuple[str, str | None]] = {}   # path -> (sha256, reason)
    todo: list[str] = []
    for path in tqdm(names, desc="indexing", unit="file", disable=not progress or len(names) < 1000):
        entry = known.get(path)
        if entry is not None:
            try:
                st = os.stat(path)
            except OSError:
                entry = None
            else:
                if _stat_key(st) == tuple(entry[:4]):
                    outcome = _cached_outcome(cache, cache_key(entry[4], tracks))
                    if outcome is not False:
                        results[path] = (entry[4], outcome)
                        continue
        todo.append(path)
    del known
    out.cached = len(results)
    jobs = [(p, str(cache), tracks) for p in todo]
    workers = workers or os.cpu_count() or 1
    if workers == 1 or len(jobs) < 8:
        parsed = map(_parse_one, jobs)
        pool = None
    else:
        pool = ProcessPoolExecutor(max_workers=workers)
        parsed = pool.map(_parse_one, jobs, chunksize=max(1, min(64, len(jobs) // (workers * 8))))
    rows = []
    try:
        for path, digest, reason, cached, key in tqdm(parsed, total=len(jobs), desc="parsing MIDI", unit="file",
                                                      disable=not progress or not jobs):
            out.cached += cached
            out.hashed += key is not None
            out.parsed += not cached and key is not None
            results[path] = (digest, reason)
            if key is not None:
                rows.append((path, *key, digest))
            if len(rows) >= 5000:
                index.store(rows)
                rows = []
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        index.store(rows)
        index.close()
    digests = []
    for path in names:
        digest, reason = results[path]
        if reason is not None:
            out.skipped.append(Skipped(path, reason))
        else:
            out.files.append(FileNotes(path, digest, None))
            digests.append(cache_key(digest, tracks))
    out.notes = load_pack(cache, digests, progress)
    if max_bytes is not None:
        keep = {digest for digest, _ in results.values() if digest} | {pack_key(digests)}
        prune_cache(cache, max_bytes, keep)
    for i, f in enumerate(out.files):
        f.notes = out.notes[i]
    for s in out.skipped:
        log.warning("skipped %s: %s", s.path, s.reason)
    return out


def pack_key(digests: list[str]) -> str:
    """The name of the pack of the files `digests` (in order)."""
    return hashlib.sha256("\n".join(digests).encode()).hexdigest()[:32]


def load_pack(cache: Path, digests: list[str], progress: bool = False) -> NoteSet:
    """The notes of the cached files `digests` (in order) as one memory-mapped `NoteSet`.

    The pack is keyed by the ordered list of hashes and built once, streaming: one file's notes in memory at a
    time. Only the `PACKS_KEPT` most recently used packs are kept.
    """
    from tqdm import tqdm

    packs = cache / "packs"
    packs.mkdir(exist_ok=True)
    key = pack_key(digests)
    data, meta = packs / f"{key}.f32", packs / f"{key}.lengths.npy"
    if not (data.exists() and meta.exists()):
        lengths = np.zeros(len(digests), dtype=np.int64)
        tmp = data.with_suffix(f".{os.getpid()}.tmp")
        with open(tmp, "wb") as fh:
            for i, digest in enumerate(tqdm(digests, desc="packing notes", unit="file",
                                            disable=not progress or len(digests) < 1000)):
                notes = np.load(cache / f"{digest}.npy", allow_pickle=False).astype(np.float32, copy=False)
                lengths[i] = len(notes)
                fh.write(np.ascontiguousarray(notes.reshape(-1, 4)).tobytes())
        tmp_meta = meta.with_suffix(f".{os.getpid()}.tmp")
        with open(tmp_meta, "wb") as fh:
            np.save(fh, lengths, allow_pickle=False)
        os.replace(tmp, data)
        os.replace(tmp_meta, meta)
    else:
        os.utime(data)  # most recently used
        lengths = np.load(meta, allow_pickle=False)
    rows = int(lengths.sum())
    notes = np.memmap(data, dtype=np.float32, mode="r", shape=(rows, 4)) if rows else np.zeros((0, 4), np.float32)
    _prune_packs(packs)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if len(lengths) else lengths
    return NoteSet(notes, starts, lengths)


def _prune_packs(packs: Path) -> None:
    found = sorted(packs.glob("*.f32"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in found[PACKS_KEPT:]:
        for path in (old, old.with_suffix(".lengths.npy")):
            try:
                path.unlink()
            except OSError:  # another process pruned it first, or still maps it (fine on POSIX)
                pass


# --- the split ---------------------------------------------------------------------------------------------

def melody_intervals(notes: np.ndarray) -> np.ndarray:
    """The top line (highest pitch at each onset) as intervals in semitones: transposition-invariant."""
    if len(notes) == 0:
        return np.zeros(0, dtype=np.int64)
    notes = np.asarray(notes, dtype=np.float64)
    onset = np.round(nt.onsets(notes), 3)
    pitch = notes[:, nt.PITCH].astype(np.int64)
    _, first = np.unique(onset, return_index=True)
    tops = np.maximum.reduceat(pitch, first) if len(first) else pitch
    return np.diff(tops)


def _grams(seq: np.ndarray, n: int) -> set[bytes]:
    if len(seq) < n:
        return set()
    view = np.lib.stride_tricks.sliding_window_view(seq.astype(np.int8), n)
    return {row.tobytes() for row in view}


def _gram_codes(seq: np.ndarray, n: int) -> np.ndarray:
    """The distinct n-grams (n ≤ 8) of `seq` (as int8) packed exactly into uint64 codes, sorted."""
    if len(seq) < n:
        return np.zeros(0, dtype=np.uint64)
    rows = np.zeros((len(seq) - n + 1, 8), dtype=np.int8)
    rows[:, :n] = np.lib.stride_tricks.sliding_window_view(seq.astype(np.int8), n)
    return np.unique(rows.view(np.uint64).ravel())


def _run_codes(pitches: np.ndarray, n: int) -> np.ndarray:
    """The distinct runs of n pitches (0..127) as 64-bit hashes (polynomial, wrapping), sorted."""
    if len(pitches) < n:
        return np.zeros(0, dtype=np.uint64)
    view = np.lib.stride_tricks.sliding_window_view(pitches.astype(np.uint64), n)
    powers = np.uint64(0x100000001B3) ** np.arange(n, dtype=np.uint64)
    with np.errstate(over="ignore"):
        codes = (view * powers).sum(axis=1, dtype=np.uint64) + np.uint64(n)
    return np.unique(codes)


def _mix(codes: np.ndarray) -> np.ndarray:
    """A well-spread 64-bit hash of codes (to draw partitions and samples from)."""
    with np.errstate(over="ignore"):
        x = codes * np.uint64(0x9E3779B97F4A7C15)
        return x ^ (x >> np.uint64(29))


def melody_groups(files) -> list[int]:
    """A group id per file: files whose top lines share a tune (in any key) get the same id.

    Two files are linked when at least `MELODY_SHARE` of the smaller one's distinct `MELODY_GRAM`-interval
    n-grams occur in the other (several harmonisations of one chorale melody, for example); groups are the
    connected components of those links. N-grams found in more than `MELODY_COMMON` files are stock figures
    (scales, repeated notes) and link nothing.

    Memory stays bounded however many files there are: the n-grams are spilled to a temporary file and counted
    in partitions of at most `GRAM_BLOCK` n-grams.

    Args:
        files: `FileNotes` objects, or per-file note arrays (a list or a `NoteSet`).
    """
    notes_of = [f.notes if isinstance(f, FileNotes) else f for f in files] if not isinstance(files, NoteSet) \
        else files
    n_files = len(notes_of)
    counts = np.zeros(n_files, dtype=np.int64)
    parent = list(range(n_files))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    with tempfile.TemporaryFile(prefix="improvd-grams-") as spill:
        for i, notes in enumerate(stream(notes_of)):
            codes = _gram_codes(melody_intervals(notes), MELODY_GRAM)
            counts[i] = len(codes)
            spill.write(codes.tobytes())
        total = int(counts.sum())
        parts = max(1, math.ceil(total / GRAM_BLOCK))
        ends = np.cumsum(counts)
        pairs = np.zeros(0, dtype=np.int64)    # distinct linked-candidate pairs (i * n_files + j) ...
        shared = np.zeros(0, dtype=np.int64)   # ... and the n-grams they share, merged partition by partition
        for part in range(parts):
            spill.seek(0)
            codes_in, owners_in = [], []
            first = 0
            while first < n_files:  # read the spill in blocks of whole files
                last = int(np.searchsorted(ends, ends[first - 1] + GRAM_BLOCK if first else GRAM_BLOCK, "right"))
                last = max(last, first + 1)
                block_len = int(ends[last - 1] - (ends[first - 1] if first else 0))
                block = np.frombuffer(spill.read(block_len * 8), dtype=np.uint64)
                owner = np.repeat(np.arange(first, last, dtype=np.int64), counts[first:last])
                keep = (_mix(block) % np.uint64(parts)) == np.uint64(part) if parts > 1 else slice(None)
                codes_in.append(block[keep])
                owners_in.append(owner[keep])
                first = last
            codes = np.concatenate(codes_in) if codes_in else np.zeros(0, np.uint64)
            owners = np.concatenate(owners_in) if owners_in else np.zeros(0, np.int64)
            del codes_in, owners_in
            order = np.lexsort((owners, codes))
            codes, owners = codes[order], owners[order]
            starts = np.flatnonzero(np.concatenate([[True], codes[1:] != codes[:-1]])) if len(codes) else \
                np.zeros(0, np.int64)
            sizes = np.diff(np.concatenate([starts, [len(codes)]]))
            found = [pairs]
            for size in np.unique(sizes):
                if size < 2 or size > MELODY_COMMON:
                    continue
                members = owners[starts[sizes == size][:, None] + np.arange(size)]  # [runs, size], ascending
                a, b = np.triu_indices(size, 1)
                found.append(members[:, a].ravel() * n_files + members[:, b].ravel())
            del codes, owners, order
            merged, where = np.unique(np.concatenate(found), return_inverse=True)
            shared = np.bincount(where[len(pairs):], minlength=len(merged)) + \
                np.bincount(where[:len(pairs)], weights=shared, minlength=len(merged)).astype(np.int64)
            pairs = merged
        if len(pairs):
            i, j = pairs // n_files, pairs % n_files
            linked = shared >= MELODY_SHARE * np.maximum(1, np.minimum(counts[i], counts[j]))
            for a, b in zip(i[linked].tolist(), j[linked].tolist()):
                parent[find(a)] = find(b)
    return [find(i) for i in range(n_files)]


@dataclass
class Split:
    """Files on each side of the split (as indices into the collection) and how they were grouped."""

    train: list[int]
    val: list[int]
    groups: int
    grouped_files: int

    def to_json(self, files: list[FileNotes]) -> dict:
        return {"train": [files[i].path for i in self.train], "val": [files[i].path for i in self.val],
                "melody_groups": self.groups, "files_sharing_a_melody": self.grouped_files}


def split_files(files: list[FileNotes], val_fraction: float, seed: int, group_melodies: bool = True,
                notes: NoteSet | None = None) -> Split:
    """A deterministic split by file: groups of files that share a melody stay on one side.

    Args:
        files: the usable files.
        val_fraction: target share of files in validation.
        seed: the order in which groups are drawn for validation.
        group_melodies: group files sharing a melody (else each file is its own group).
        notes: the files' notes as a `NoteSet` (a memory-mapped pack), if there is one: read in order and
            released as it goes, so the split does not make the whole pack resident.
    """
    ids = melody_groups(notes if notes is not None else files) if group_melodies else list(range(len(files)))
    members: dict[int, list[int]] = {}
    for i, g in enumerate(ids):
        members.setdefault(g, []).append(i)
    keys = sorted(members, key=lambda g: files[members[g][0]].sha256)
    random.Random(seed).shuffle(keys)
    target = max(1, round(val_fraction * len(files))) if len(files) > 1 else 0
    val: list[int] = []
    for g in keys:
        if len(val) >= target:
            break
        if len(val) + len(members[g]) <= max(target, 1) * 1.5 or not val:
            val.extend(members[g])
    val_set = set(val)
    train = [i for i in range(len(files)) if i not in val_set]
    grouped = sum(len(m) for m in members.values() if len(m) > 1)
    return Split(train=sorted(train), val=sorted(val), groups=len(members), grouped_files=grouped)


def leakage(train, val, run: int = LEAK_RUN) -> float:
    """Share of the validation files' distinct `run`-note pitch runs that also occur in a training file.

    Exact up to `GRAM_BLOCK` training notes; above that, estimated on the runs whose hash falls in a
    deterministic 1-in-k sample (the same runs on both sides, so the estimate is unbiased) to bound memory.
    """
    train_notes = train.num_notes if isinstance(train, NoteSet) else sum(len(n) for n in train)
    k = np.uint64(max(1, math.ceil(train_notes / GRAM_BLOCK)))

    def sampled(notes: np.ndarray) -> np.ndarray:
        codes = _run_codes(np.asarray(notes[:, nt.PITCH]).astype(np.int64), run)
        return codes[_mix(codes) % k == 0] if k > 1 else codes

    seen = np.unique(np.concatenate([sampled(n) for n in stream(train)] or [np.zeros(0, np.uint64)]))
    total = hits = 0
    for notes in stream(val):
        g = sampled(notes)
        total += len(g)
        if len(g) and len(seen):
            pos = np.minimum(np.searchsorted(seen, g), len(seen) - 1)
            hits += int((seen[pos] == g).sum())
    return hits / total if total else 0.0
