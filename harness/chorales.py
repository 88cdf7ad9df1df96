"""The musical calls the texture tests (tests/daemon/test_texture.py) and bench (bench/texture.py) play: the 8-note
C-major melody and two chorale-like calls in four voices, as note arrays (improvd.core.notes), and the most notes
of an array that sound at once (`sounding_max`). Pure; called from the test's or bench's thread.
"""

from __future__ import annotations

import numpy as np

from improvd.core import notes as nt
from improvd.daemon.music.texture import max_simultaneous

MELODY = nt.from_onsets([60, 62, 64, 65, 67, 65, 64, 62], np.arange(8) * 0.5, [0.45] * 8, [80] * 8)
# Two chorale-like calls: four-voice chords (soprano, alto, tenor, bass) in half notes at 120 bpm.
CHORALE_1 = [(48, 55, 64, 72), (53, 57, 65, 72), (55, 59, 62, 71), (48, 55, 64, 72)]  # I IV V I in C
CHORALE_2 = [(45, 57, 64, 72), (50, 57, 65, 69), (52, 56, 64, 71), (45, 57, 64, 69)]  # i iv V i in A minor


def chorale(chords, beat_s: float = 1.0) -> np.ndarray:
    """Chords (tuples of pitches) one a beat, each held 95% of the beat, velocity 80, as a note array."""
    pitches, onsets = [], []
    for i, chord in enumerate(chords):
        pitches += list(chord)
        onsets += [i * beat_s] * len(chord)
    return nt.from_onsets(pitches, onsets, [0.95 * beat_s] * len(pitches), [80] * len(pitches))


def sounding_max(notes: np.ndarray) -> int:
    """The most notes of a note array that sound at once."""
    onsets = nt.onsets(notes)
    return max_simultaneous(onsets, onsets + notes[:, nt.DURATION])
