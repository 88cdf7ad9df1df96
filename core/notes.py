"""The note format every part of improvd shares (docs/model-format.md).

A sequence of notes is a float64 array of shape [N, 4] with columns `PITCH` (MIDI 0..127), `STEP` (seconds from
the previous note's onset to this one's; 0 for the first note and for the notes of a chord), `DURATION`
(seconds) and `VELOCITY` (1..127). Onsets are the cumulative sum of steps. Notes are sorted by (onset, pitch).

Threads: pure functions on arrays, called on any thread.
"""

from __future__ import annotations

import numpy as np

PITCH, STEP, DURATION, VELOCITY = range(4)
COLUMNS = ("pitch", "step", "duration", "velocity")
NUM_PITCHES = 128


def empty() -> np.ndarray:
    """An empty note array, shape [0, 4]."""
    return np.zeros((0, 4), dtype=np.float64)


def from_onsets(pitch, onset_s, duration_s, velocity=None) -> np.ndarray:
    """Notes from absolute onsets, sorted by (onset, pitch), steps computed.

    Args:
        pitch: MIDI pitches, shape [N].
        onset_s: absolute onsets in seconds, shape [N].
        duration_s: durations in seconds, shape [N].
        velocity: MIDI velocities, shape [N]; 100 for every note when None.

    Returns:
        float64 [N, 4] notes.
    """
    pitch = np.asarray(pitch, dtype=np.float64).reshape(-1)
    onset_s = np.asarray(onset_s, dtype=np.float64).reshape(-1)
    duration_s = np.asarray(duration_s, dtype=np.float64).reshape(-1)
    velocity = (np.full_like(pitch, 100.0) if velocity is None
                else np.asarray(velocity, dtype=np.float64).reshape(-1))
    if not (len(pitch) == len(onset_s) == len(duration_s) == len(velocity)):
        raise ValueError(f"pitch, onset, duration and velocity must have the same length, got "
                         f"{len(pitch)}, {len(onset_s)}, {len(duration_s)}, {len(velocity)}")
    order = np.lexsort((pitch, onset_s))
    notes = np.stack([pitch[order], onset_s[order], duration_s[order], velocity[order]], axis=1)
    if len(notes):
        notes[:, STEP] = np.diff(notes[:, STEP], prepend=notes[0, STEP])
    return notes


def onsets(notes: np.ndarray, start_s: float = 0.0) -> np.ndarray:
    """Absolute onsets in seconds of `notes`, the first at `start_s`."""
    return start_s + np.cumsum(notes[:, STEP]) - (notes[0, STEP] if len(notes) else 0.0)


def validate(notes: np.ndarray) -> np.ndarray:
    """Check shape and ranges; returns the array as float64 [N, 4].

    Raises:
        ValueError: naming the first bad column and its allowed range.
    """
    notes = np.asarray(notes, dtype=np.float64)
    if notes.ndim != 2 or notes.shape[1] != 4:
        raise ValueError(f"notes must have shape [N, 4] (pitch, step, duration, velocity), got {notes.shape}")
    if not np.all(np.isfinite(notes)):
        raise ValueError("notes must be finite")
    checks = ((PITCH, 0, 127), (STEP, 0, np.inf), (DURATION, 0, np.inf), (VELOCITY, 0, 127))
    for col, lo, hi in checks:
        bad = (notes[:, col] < lo) | (notes[:, col] > hi)
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(f"note {i}: {COLUMNS[col]} = {notes[i, col]!r} is outside {lo}..{hi}")
    return notes
