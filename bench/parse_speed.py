"""MIDI parsing speed of `train.data.load_collection`, cold (empty cache) and cached (second run); prints JSON.

Builds N synthetic MIDI files (a melody over a bass line, with chords) in a temporary folder, then times two loads
into one fresh cache folder: the first parses every file, the second reads every file's notes from the cache.

    .venv/bin/python bench/parse_speed.py [--files 300] [--notes 400] [--workers 0]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from improvd.core import notes as nt  # noqa: E402
from improvd.core.midifile import Track, write_notes  # noqa: E402
from improvd.train.data import find_midi_files, load_collection  # noqa: E402


def synthetic_notes(seed: int, n: int) -> np.ndarray:
    """About `n` notes: a random-walk melody with a bass note and a chord every fourth note."""
    rng = np.random.default_rng(seed)
    melody = max(1, n * 4 // 7)  # plus a three-note chord every fourth melody note: about n in all
    pitch = 64 + np.cumsum(rng.integers(-3, 4, melody)).clip(-12, 20)
    onset = np.concatenate([[0.0], np.cumsum(rng.choice([0.125, 0.25, 0.5], melody - 1))])
    at = np.arange(0, melody, 4)
    chord_pitch = np.concatenate([pitch[at] - 12, pitch[at] - 8, pitch[at] - 5])
    chord_onset = np.tile(onset[at], 3)
    all_pitch = np.concatenate([pitch, chord_pitch])
    all_onset = np.concatenate([onset, chord_onset])
    return nt.from_onsets(all_pitch, all_onset, rng.uniform(0.05, 0.8, len(all_pitch)),
                          rng.integers(30, 120, len(all_pitch)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=300, help="synthetic MIDI files (default 300)")
    parser.add_argument("--notes", type=int, default=400, help="about this many notes per file (default 400)")
    parser.add_argument("--workers", type=int, default=0, help="parsing processes; 0 = one per core (default)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="improvd-parse-bench-") as tmp:
        folder, cache = Path(tmp) / "midi", Path(tmp) / "cache"
        started = time.perf_counter()
        total_bytes = 0
        for i in range(args.files):
            path = folder / f"{i // 100:03d}" / f"song{i:05d}.mid"
            write_notes(path, [Track("melody and chords", synthetic_notes(i, args.notes))])
            total_bytes += path.stat().st_size
        build_s = time.perf_counter() - started

        paths = find_midi_files(folder)
        runs = {}
        for label in ("cold", "cached"):
            started = time.perf_counter()
            collection = load_collection(paths, cache, workers=args.workers, progress=False)
            seconds = time.perf_counter() - started
            runs[label] = {"seconds": seconds, "files_per_s": len(paths) / seconds,
                           "notes_per_s": sum(len(f.notes) for f in collection.files) / seconds,
                           "from_cache": collection.cached, "skipped": len(collection.skipped)}
        notes = sum(len(f.notes) for f in collection.files)

    print(json.dumps({
        "benchmark": "parse_speed", "files": len(paths), "notes": notes, "mean_file_kb": total_bytes / len(paths) / 1e3,
        "workers": args.workers or os.cpu_count(), "cpus": os.cpu_count(), "python": platform.python_version(),
        "build_seconds": build_s, "cold": runs["cold"], "cached": runs["cached"],
        "cached_speedup": runs["cold"]["seconds"] / runs["cached"]["seconds"],
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
