"""Small MIDI data sets for the training tests, built in the test (no download), and `improvd` run in-process.

- `song`, `tune`, `harmonised`, `melody`: synthetic pieces (note arrays, core/notes.py) of known shape;
  `write` saves one as a MIDI file; `make_bad_files` writes the broken files a data set must survive.
- `improvd(work, ...)`: the CLI's `main` with the repository's config and the test's cache; `read_history` reads a
  run's history.csv.

Called from the test's thread.
"""

from __future__ import annotations

import csv
import struct
from pathlib import Path

import mido
import numpy as np

from improvd.core import notes as nt
from improvd.core.midifile import Track, write_notes
from improvd.daemon.cli import main

REPO = Path(__file__).resolve().parents[1]
GOOD_FILES = 8  # the good files of the train CLI tests' data set (tests/train/conftest.py, `work`)


def song(seed, n=70):
    """A two-voice piece: a melody that moves by small steps over a bass; durations and velocities vary."""
    rng = np.random.default_rng(seed)
    pitch = 62 + np.cumsum(rng.integers(-3, 4, n)).clip(-10, 15)
    onset = np.concatenate([[0.0], np.cumsum(rng.choice([0.25, 0.5, 0.75], n - 1))])
    bass_at = np.arange(0, n, 4)
    return nt.from_onsets(np.concatenate([pitch, pitch[bass_at] - 12 - rng.integers(0, 5, len(bass_at))]),
                          np.concatenate([onset, onset[bass_at]]),
                          np.concatenate([rng.uniform(0.1, 0.6, n), np.full(len(bass_at), 0.9)]),
                          rng.integers(40, 120, n + len(bass_at)))


def tune(seed, n=40):
    """A random melody: pitches 55..80 and steps of 0.25 or 0.5 s."""
    rng = np.random.default_rng(seed)
    pitch = 60 + np.cumsum(rng.integers(-4, 5, n)).clip(-5, 20)
    onset = np.concatenate([[0.0], np.cumsum(rng.choice([0.25, 0.5], n - 1))])
    return pitch, onset


def harmonised(seed, transpose=0, voices_seed=None, n=40):
    """A melody on top and a bass line below it (the bass differs per `voices_seed`): a chorale-like file."""
    pitch, onset = tune(seed, n)
    rng = np.random.default_rng(voices_seed if voices_seed is not None else seed + 1000)
    bass = pitch - rng.integers(12, 20, n)
    all_pitch = np.concatenate([pitch, bass]) + transpose
    all_onset = np.concatenate([onset, onset])
    return nt.from_onsets(all_pitch, all_onset, np.full(2 * n, 0.2), np.full(2 * n, 80))


def write(path: Path, notes: np.ndarray) -> Path:
    write_notes(path, [Track("t", notes)])
    return path


def make_bad_files(folder: Path) -> dict[str, str]:
    """Bad files in `folder`; returns {file name: a word its skip reason must contain}."""
    good = write(folder / "good_for_cutting.tmp", harmonised(99))
    data = good.read_bytes()
    good.unlink()
    (folder / "truncated.mid").write_bytes(data[:len(data) // 2])
    (folder / "empty.mid").write_bytes(b"")
    (folder / "text.mid").write_text("These are my notes for Tuesday's rehearsal.\n" * 20)
    # A header and a track chunk whose first event is a data byte with no status before it.
    body = bytes([0x00, 0x40, 0x40, 0x00, 0xFF, 0x2F, 0x00])
    (folder / "corrupt.mid").write_bytes(b"MThd" + struct.pack(">IHHH", 6, 1, 1, 480) + b"MTrk"
                                         + struct.pack(">I", len(body)) + body)
    drums = mido.MidiFile()
    drums.tracks.append(mido.MidiTrack([mido.Message("note_on", channel=9, note=36, velocity=100),
                                        mido.Message("note_off", channel=9, note=36, time=120)]))
    drums.save(str(folder / "drums.mid"))
    return {"truncated.mid": "truncated", "empty.mid": "empty", "text.mid": "not a readable MIDI file",
            "corrupt.mid": "running status", "drums.mid": "drums only"}


def melody(seed, n=60):
    rng = np.random.default_rng(seed)
    pitch = 60 + np.cumsum(rng.integers(-5, 6, n)).clip(-12, 20)
    onset = np.concatenate([[0.0], np.cumsum(rng.choice([0.25, 0.5], n - 1))])
    return nt.from_onsets(pitch, onset, rng.uniform(0.1, 0.5, n), rng.integers(50, 110, n))


def improvd(work, *args):
    return main([args[0], "--config", str(REPO / "config.toml"), "--set", f"data.cache_dir={work['cache']}",
                 "--set", "data.workers=1", "--set", "eval.batch_size=256", *map(str, args[1:])])


def read_history(run_dir):
    with open(run_dir / "history.csv", newline="") as fh:
        return list(csv.DictReader(fh))
