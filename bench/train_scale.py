"""Training at scale: parse, cache, memory and training speed on synthetic MIDI folders of growing size; prints JSON.

For each size (default 1k, 10k and 100k files of a few hundred notes each) it writes a synthetic folder once
(kept under --work, reused by later runs), then runs one child process that: indexes and parses it cold into an
empty cache, loads it again (the stat index: nothing re-read), splits it, and trains the `tiny` preset for a
fixed number of steps on batches cut on the fly from the memory-mapped pack. Reported per size: parse
throughput (files/s, notes/s), re-index throughput, cache size on disk, the child's peak RSS (VmHWM, and RSS
after each stage) and training steps per second. The summary checks the acceptance bars: peak memory at the
largest size within 1.5× of the one before, and parse throughput per note flat within 20%.

    .venv/bin/python bench/train_scale.py --sizes 1000            # a quick look (about a minute on 2 cores)
    .venv/bin/python bench/train_scale.py --sizes 1000,10000,100000 --work /var/tmp/improvd-scale
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from improvd.core import notes as nt  # noqa: E402
from improvd.core.midifile import Track, write_notes  # noqa: E402
from improvd.daemon.live.statslog import rss_mb  # noqa: E402


def synthetic_notes(seed: int, n: int) -> np.ndarray:
    """About `n` notes: a random-walk melody (leaps up to a fifth) with a three-note chord every fourth note."""
    rng = np.random.default_rng(seed)
    melody = max(2, n * 4 // 7)
    pitch = 64 + np.cumsum(rng.integers(-7, 8, melody)).clip(-20, 30)
    onset = np.concatenate([[0.0], np.cumsum(rng.choice([0.125, 0.25, 0.5], melody - 1))])
    at = np.arange(0, melody, 4)
    chord_pitch = np.concatenate([pitch[at] - 12, pitch[at] - 8, pitch[at] - 5])
    return nt.from_onsets(np.concatenate([pitch, chord_pitch]), np.concatenate([onset, np.tile(onset[at], 3)]),
                          rng.uniform(0.05, 0.8, melody + 3 * len(at)), rng.integers(30, 120, melody + 3 * len(at)))


def _write_range(args: tuple[str, int, int, int]) -> int:
    folder, first, last, notes = args
    for i in range(first, last):
        path = Path(folder) / f"{i // 1000:03d}" / f"song{i:06d}.mid"
        if not path.exists():
            write_notes(path, [Track("melody and chords", synthetic_notes(i, notes))])
    return last - first


def make_folder(folder: Path, files: int, notes: int, workers: int) -> float:
    """Write (or complete) a folder of `files` synthetic MIDI files; returns the seconds it took."""
    started = time.perf_counter()
    marker = folder / ".complete"
    if not marker.exists():
        step = 500
        jobs = [(str(folder), a, min(a + step, files), notes) for a in range(0, files, step)]
        with ProcessPoolExecutor(max_workers=workers) as pool:
            list(pool.map(_write_range, jobs))
        marker.write_text(str(files))
    return time.perf_counter() - started


def dir_bytes(path: Path) -> int:
    total = 0
    for root, _, names in os.walk(path):
        for name in names:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def child(args) -> dict:
    """One size, in its own process: parse cold, re-index, split, train `args.steps` steps."""
    from improvd.train import data as td

    result: dict = {"rss_mib": {}}
    started = time.perf_counter()
    paths = td.find_midi_files(args.data)
    result["find_s"] = time.perf_counter() - started
    time.sleep(td.RACY_S)  # files written in the last seconds are not trusted to the index (as in git)
    started = time.perf_counter()
    col = td.load_collection(paths, args.cache, workers=args.workers, progress=args.progress)
    cold_s = time.perf_counter() - started
    notes = col.note_set().num_notes
    result.update(files=len(paths), usable=len(col.files), skipped=len(col.skipped), notes=notes,
                  parse_cold_s=cold_s, parse_files_per_s=len(paths) / cold_s, parse_notes_per_s=notes / cold_s)
    result["rss_mib"]["after_parse"] = rss_mb()[0]
    del col
    started = time.perf_counter()
    col = td.load_collection(paths, args.cache, workers=args.workers, progress=False)
    warm_s = time.perf_counter() - started
    result.update(reindex_s=warm_s, reindex_files_per_s=len(paths) / warm_s, reindex_reparsed=col.parsed,
                  reindex_rehashed=col.hashed, cache_bytes=dir_bytes(Path(args.cache)),
                  cache_bytes_per_note=dir_bytes(Path(args.cache)) / max(1, notes))
    result["rss_mib"]["after_reindex"] = rss_mb()[0]
    started = time.perf_counter()
    split = td.split_files(col.files, 0.15, 1234, True, col.note_set())
    result.update(split_s=time.perf_counter() - started, melody_groups=split.groups)
    result["rss_mib"]["after_split"] = rss_mb()[0]

    import keras

    from improvd.train.batches import BatchSource, tf_dataset
    from improvd.core.presets import get_preset
    from improvd.train.model import build_model

    preset = get_preset("tiny")
    source = BatchSource(col.note_set().subset(split.train), preset.kind, preset.seq_length,
                         len(preset.features), preset.transpose, 1234, True)
    model = build_model(preset, 1234)
    times: list[float] = []

    class Clock(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            times.append(time.perf_counter())
            if len(times) >= args.warmup + args.steps:
                self.model.stop_training = True

    started = time.perf_counter()
    model.fit(tf_dataset(source, preset.batch_size), epochs=1, verbose=0, callbacks=[Clock()], shuffle=False)
    timed = times[args.warmup:]
    result.update(train_steps=len(timed) - 1, train_batch=preset.batch_size, train_seq_length=preset.seq_length,
                  train_steps_per_s=(len(timed) - 1) / (timed[-1] - timed[0]) if len(timed) > 1 else None,
                  train_wall_s=time.perf_counter() - started)
    result["rss_mib"]["after_train"], result["peak_rss_mib"] = rss_mb()
    result["peak_rss_mib_getrusage"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,100000", help="files per folder, comma-separated")
    parser.add_argument("--notes", type=int, default=300, help="about this many notes per file (default 300)")
    parser.add_argument("--steps", type=int, default=200, help="timed training steps per size (default 200)")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps first (default 20)")
    parser.add_argument("--workers", type=int, default=0, help="parsing processes; 0 = one per core")
    parser.add_argument("--work", default="/var/tmp/improvd-train-scale",
                        help="where the synthetic folders (kept) and the caches (fresh each run) go")
    parser.add_argument("--progress", action="store_true", help="progress bars (to stderr)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        print(json.dumps(child(args)))
        return 0

    work = Path(args.work)
    sizes = [int(s) for s in args.sizes.split(",")]
    report: dict = {"machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                                "platform": platform.platform()},
                    "notes_per_file": args.notes, "sizes": {}}
    for size in sizes:
        folder = work / f"midi-{size}-{args.notes}"
        build_s = make_folder(folder, size, args.notes, args.workers or os.cpu_count() or 1)
        cache = work / f"cache-{size}"
        subprocess.run(["rm", "-rf", str(cache)], check=True)
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "")}
        done = subprocess.run([sys.executable, __file__, "--child", "--data", str(folder), "--cache", str(cache),
                               "--steps", str(args.steps), "--warmup", str(args.warmup), "--workers",
                               str(args.workers)] + (["--progress"] if args.progress else []),
                              env=env, stdout=subprocess.PIPE, text=True, check=True)
        result = json.loads(done.stdout.strip().splitlines()[-1])
        result["folder_build_s"] = build_s
        report["sizes"][str(size)] = result
        print(json.dumps({size: result}), file=sys.stderr)
    ordered = [report["sizes"][str(s)] for s in sizes]
    if len(ordered) >= 2:
        per_note = [r["parse_notes_per_s"] for r in ordered]
        report["acceptance"] = {
            "peak_rss_ratio_last_to_previous": ordered[-1]["peak_rss_mib"] / ordered[-2]["peak_rss_mib"],
            "peak_rss_within_1_5x": ordered[-1]["peak_rss_mib"] <= 1.5 * ordered[-2]["peak_rss_mib"],
            "parse_notes_per_s_spread": (max(per_note) - min(per_note)) / max(per_note),
            "parse_per_note_flat_within_20pct": (max(per_note) - min(per_note)) / max(per_note) <= 0.2,
            "train_steps_per_s": [r["train_steps_per_s"] for r in ordered],
        }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
