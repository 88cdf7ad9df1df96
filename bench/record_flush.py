"""Cost of one recording flush as the recording grows, incremental (`SessionRecorder`) against the old full rewrite.

For each size it records an improvd-like stream (one note every 20 ms, 10 ms long, random pitches and velocities)
into a fresh `daemon.recorder.SessionRecorder`, then times:

- `flush`: one `flush(force=True)` with nothing new (the header, the encoded bytes and the tail, written atomically);
- `flush_10s`: what the service does every 10 s: 500 new notes drained, then a flush;
- `old_flush`: `daemon.midifile.write_notes` of the same notes as `Track`s, which the old recorder ran at every
  flush (its pairing and array building before it not counted).

Each time is the median of `--repeat` runs, wall and CPU seconds (the atomic write fsyncs, so wall includes the
disk). `same_bytes_as_old`: the first flush's file is byte for byte the old one. The recorder's memory is
measured with tracemalloc while it records: `recorder_bytes_per_note` is what the second half of the notes added
(so fixed costs do not count). Prints JSON, with the process's VmRSS and VmHWM at the end.

    .venv/bin/python bench/record_flush.py [--sizes 20000,50000,100000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import mido
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from improvd.daemon.live.statslog import rss_mb  # noqa: E402
from harness.fakes import FakeClock  # noqa: E402
from improvd.core import midifile  # noqa: E402
from improvd.core import notes as nt  # noqa: E402
from improvd.daemon.io.recorder import SessionRecorder  # noqa: E402

STEP_S, DURATION_S = 0.020, 0.010
NEW_PER_FLUSH = 500  # notes in 10 s at one every 20 ms


def _stream(rng: np.random.Generator, first: int, count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Onsets (s), pitches and velocities of notes `first` .. `first + count - 1`."""
    onset = (first + np.arange(count)) * STEP_S
    return onset, rng.integers(36, 97, count), rng.integers(30, 121, count)


def _feed(rec: SessionRecorder, onset, pitch, velocity) -> None:
    """Record the notes as the scheduler's `on_sent` hook would, draining as the service's loop does."""
    for i, (t, p, v) in enumerate(zip(onset.tolist(), pitch.tolist(), velocity.tolist())):
        rec.add_improvd(t, mido.Message("note_on", note=p, velocity=v))
        rec.add_improvd(t + DURATION_S, mido.Message("note_off", note=p))
        if i % 256 == 255:
            rec.drain()
    rec.drain()


def _timed(fn, repeat: int) -> tuple[float, float]:
    """Median wall and CPU seconds of `fn()`."""
    wall, cpu = [], []
    for _ in range(repeat):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu)


def measure(n: int, repeat: int, folder: Path) -> dict:
    """One size: the new recorder's flushes and memory, and the old full rewrite of the same notes."""
    rng = np.random.default_rng(n)
    onset, pitch, velocity = _stream(rng, 0, n)
    clock = FakeClock(0.0)
    rec = SessionRecorder(folder, start_s=0.0, now=clock, name=f"new-{n}.mid")
    half = n // 2
    tracemalloc.start()
    _feed(rec, onset[:half], pitch[:half], velocity[:half])
    before = tracemalloc.get_traced_memory()[0]
    _feed(rec, onset[half:], pitch[half:], velocity[half:])
    kept = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    clock.t = n * STEP_S
    flush = _timed(lambda: rec.flush(force=True), repeat)
    written = rec.path.read_bytes()

    batches = []  # the messages of 10 s each, built beforehand: the scheduler thread makes them, not the flush
    for k in range(repeat):
        first = n + k * NEW_PER_FLUSH
        more = _stream(rng, first, NEW_PER_FLUSH)
        batch = [(t + dt, mido.Message(kind, note=p, velocity=v if kind == "note_on" else 0))
                 for t, p, v in zip(*(a.tolist() for a in more))
                 for dt, kind in ((0.0, "note_on"), (DURATION_S, "note_off"))]
        batches.append(((first + NEW_PER_FLUSH) * STEP_S, batch))
    batches.reverse()

    def flush_10s() -> None:
        clock.t, batch = batches.pop()
        for t, msg in batch:
            rec.add_improvd(t, msg)
        rec.flush()

    flush_10s_times = _timed(flush_10s, repeat)

    tracks = [midifile.Track("player", nt.empty(), channel=1),
              midifile.Track("improvd", nt.from_onsets(pitch, onset, np.full(n, DURATION_S), velocity),
                             channel=0, start_s=0.0)]
    old_path = folder / f"old-{n}.mid"
    old = _timed(lambda: midifile.write_notes(old_path, tracks), repeat)
    return {
        "notes": n,
        "flush_wall_s": round(flush[0], 5), "flush_cpu_s": round(flush[1], 5),
        "flush_10s_wall_s": round(flush_10s_times[0], 5), "flush_10s_cpu_s": round(flush_10s_times[1], 5),
        "old_flush_wall_s": round(old[0], 4), "old_flush_cpu_s": round(old[1], 4),
        "cpu_ratio_old_over_new": round(old[1] / max(flush[1], 1e-6), 1),
        "cpu_ratio_old_over_new_10s": round(old[1] / max(flush_10s_times[1], 1e-6), 1),
        "file_bytes": len(written), "same_bytes_as_old": written == old_path.read_bytes(),
        "recorder_bytes_per_note": round(kept / (n - half), 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="20000,50000,100000", help="notes per recording, comma-separated")
    parser.add_argument("--repeat", type=int, default=3, help="runs per timing; the median is reported (default 3)")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory(prefix="improvd-record-bench-") as tmp:
        results = [measure(n, args.repeat, Path(tmp)) for n in sizes]
    rss, hwm = rss_mb()
    print(json.dumps({
        "bench": "record_flush", "python": platform.python_version(), "machine": platform.machine(),
        "step_s": STEP_S, "duration_s": DURATION_S, "repeat": args.repeat, "sizes": results,
        "vm_rss_mb": round(rss, 1), "vm_hwm_mb": round(hwm, 1),
    }, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
