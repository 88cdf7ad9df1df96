"""Training data: find MIDI files, parse them in parallel with a per-file cache, split by file and melody.

Parsing uses the daemon's own reader (`daemon.midifile`), so the model learns from exactly the notes the daemon
will hear. Each file's notes are cached under `cache_dir/notes/` by the SHA-256 of its bytes (as `.npy`, loaded
with `allow_pickle=False`); files that cannot be used are cached too, with the reason, so a second run over the
same files parses nothing. Bad files never stop a run: they are counted and named with their reason.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from daemon import notes as nt
from daemon.errors import MidiFileError
from daemon.midifile import read_notes

log = logging.getLogger(__name__)

MIDI_SUFFIXES = (".mid", ".midi")
CACHE_VERSION = "notes-v2"  # bump when parsing or skip reasons change
MELODY_GRAM = 8            # intervals per melody n-gram used to find shared tunes
MELODY_SHARE = 0.3         # share of the smaller file's n-grams two files must share to be grouped
LEAK_RUN = 16              # length of the pitch runs counted by `leakage`


@dataclass
class FileNotes:
    """One usable file: its path (as given), content hash and notes (float64 [N, 4])."""

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
    """The result of parsing a folder: usable files, skipped files and how many came from the cache."""

    files: list[FileNotes] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    cached: int = 0

    def summary(self) -> dict:
        reasons: dict[str, int] = {}
        for s in self.skipped:
            key = s.reason.split(" (")[0].split(": ", 1)[-1]
            reasons[key] = reasons.get(key, 0) + 1
        return {"files": len(self.files), "notes": int(sum(len(f.notes) for f in self.files)),
                "skipped": len(self.skipped), "skipped_by_reason": reasons,
                "skipped_files": [{"path": s.path, "reason": s.reason} for s in self.skipped],
                "from_cache": self.cached}


def find_midi_files(root: str | os.PathLike) -> list[Path]:
    """Every `.mid`/`.midi` file below `root`, sorted (case-insensitive suffixes).

    Raises:
        FileNotFoundError: `root` is not a folder.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {str(root)!r} does not exist or is not a folder")
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in MIDI_SUFFIXES)


def _hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _parse_one(args: tuple[str, str]) -> tuple[str, str, str | None, bool]:
    """Worker: parse one file into the cache. Returns (path, sha256, skip reason or None, from cache)."""
    path, cache = args
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        return path, "", f"unreadable ({err.strerror or err})", False
    digest = _hash(data)
    npy = Path(cache) / f"{digest}.npy"
    bad = Path(cache) / f"{digest}.skip.json"
    if npy.exists():
        return path, digest, None, True
    if bad.exists():
        return path, digest, json.loads(bad.read_text())["reason"], True
    try:
        notes = read_notes(path)
        tmp = npy.with_suffix(f".{os.getpid()}.tmp")
        with open(tmp, "wb") as fh:
            np.save(fh, notes.astype(np.float32), allow_pickle=False)
        os.replace(tmp, npy)
        return path, digest, None, False
    except MidiFileError as err:
        reason = str(err).split(": ", 1)[-1]
    except Exception as err:  # any other failure of a third-party parser on odd bytes: skip, never crash
        reason = f"unreadable ({type(err).__name__}: {err})"
    bad.write_text(json.dumps({"reason": reason}))
    return path, digest, reason, False


def load_collection(paths: list[Path], cache_dir: str | os.PathLike, workers: int = 0,
                    progress: bool = True) -> Collection:
    """Parse `paths` (in worker processes, cached by content) into a `Collection`.

    Args:
        paths: MIDI files.
        cache_dir: improvd's cache folder; notes go to `cache_dir/notes-v2/`.
        workers: worker processes; 0 = one per core; 1 = in this process.
        progress: show a progress bar.
    """
    from tqdm import tqdm

    cache = Path(cache_dir).expanduser() / CACHE_VERSION
    cache.mkdir(parents=True, exist_ok=True)
    jobs = [(str(p), str(cache)) for p in paths]
    workers = workers or os.cpu_count() or 1
    out = Collection()
    if workers == 1 or len(jobs) < 8:
        results = map(_parse_one, jobs)
        pool = None
    else:
        pool = ProcessPoolExecutor(max_workers=workers)
        results = pool.map(_parse_one, jobs, chunksize=max(1, min(64, len(jobs) // (workers * 8))))
    try:
        for path, digest, reason, cached in tqdm(results, total=len(jobs), desc="parsing MIDI", unit="file",
                                                 disable=not progress):
            out.cached += cached
            if reason is not None:
                out.skipped.append(Skipped(path, reason))
                continue
            notes = np.load(cache / f"{digest}.npy", allow_pickle=False).astype(np.float64)
            out.files.append(FileNotes(path, digest, notes))
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    for s in out.skipped:
        log.warning("skipped %s: %s", s.path, s.reason)
    return out


# --- the split ---------------------------------------------------------------------------------------------

def melody_intervals(notes: np.ndarray) -> np.ndarray:
    """The top line (highest pitch at each onset) as intervals in semitones: transposition-invariant."""
    if len(notes) == 0:
        return np.zeros(0, dtype=np.int64)
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


def melody_groups(files: list[FileNotes]) -> list[int]:
    """A group id per file: files whose top lines share a tune (in any key) get the same id.

    Two files are linked when at least `MELODY_SHARE` of the smaller one's `MELODY_GRAM`-interval n-grams occur
    in the other (several harmonisations of one chorale melody, for example); groups are the connected
    components of those links.
    """
    grams = [_grams(melody_intervals(f.notes), MELODY_GRAM) for f in files]
    parent = list(range(len(files)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    index: dict[bytes, list[int]] = {}
    for i, g in enumerate(grams):
        for gram in g:
            index.setdefault(gram, []).append(i)
    for i, g in enumerate(grams):
        shared: dict[int, int] = {}
        for gram in g:
            for j in index[gram]:
                if j > i:
                    shared[j] = shared.get(j, 0) + 1
        for j, count in shared.items():
            if count >= MELODY_SHARE * max(1, min(len(g), len(grams[j]))):
                parent[find(i)] = find(j)
    return [find(i) for i in range(len(files))]


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


def split_files(files: list[FileNotes], val_fraction: float, seed: int, group_melodies: bool = True) -> Split:
    """A deterministic split by file: groups of files that share a melody stay on one side.

    Args:
        files: the usable files.
        val_fraction: target share of files in validation.
        seed: the order in which groups are drawn for validation.
        group_melodies: group files sharing a melody (else each file is its own group).
    """
    ids = melody_groups(files) if group_melodies else list(range(len(files)))
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


def leakage(train: list[np.ndarray], val: list[np.ndarray], run: int = LEAK_RUN) -> float:
    """Share of the validation files' `run`-note pitch runs that also occur in a training file."""
    seen: set[bytes] = set()
    for notes in train:
        seen |= _grams(notes[:, nt.PITCH].astype(np.int64), run)
    total = hits = 0
    for notes in val:
        g = _grams(notes[:, nt.PITCH].astype(np.int64), run)
        total += len(g)
        hits += len(g & seen)
    return hits / total if total else 0.0
