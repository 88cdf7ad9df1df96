"""Keys and scales: parse "D minor", estimate a key from notes (Krumhansl-Schmuckler), and the scale's pitch classes.

`improvise.key` is `"none"`, `"auto"` or a key written as a tonic and a scale, e.g. `"C major"`, `"F# major"`,
`"Bb minor"`, `"d dorian"`. The tonic is a letter A..G with an optional `#` or `b` (also `♯`, `♭`); the scale is one
of `SCALES` (`minor` is the natural minor; `harmonic minor` and `melodic minor` raise the 7th, and the 6th and 7th).
Case does not matter. `parse_key` raises `ValueError` naming the value and listing the valid forms.

`estimate_key` correlates the duration-weighted pitch-class histogram of some notes with the 24 rotated
Krumhansl-Kessler major and minor profiles and returns the best (the Krumhansl-Schmuckler algorithm).

Pure functions; the engine thread and the config check call them.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from improvd.core.notes import NUM_PITCHES

NOTE_NAMES = ("C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B")
_LETTERS = {"c": 0, "d": 2, "e": 4, "f": 5, "g": 7, "a": 9, "b": 11}
# Semitones above the tonic of each scale.
SCALES: dict[str, tuple[int, ...]] = {
    "major": (0, 2, 4, 5, 7, 9, 11),
    "minor": (0, 2, 3, 5, 7, 8, 10),
    "harmonic minor": (0, 2, 3, 5, 7, 8, 11),
    "melodic minor": (0, 2, 3, 5, 7, 9, 11),
    "dorian": (0, 2, 3, 5, 7, 9, 10),
    "phrygian": (0, 1, 3, 5, 7, 8, 10),
    "lydian": (0, 2, 4, 6, 7, 9, 11),
    "mixolydian": (0, 2, 4, 5, 7, 9, 10),
    "locrian": (0, 1, 3, 5, 6, 8, 10),
    "major pentatonic": (0, 2, 4, 7, 9),
    "minor pentatonic": (0, 3, 5, 7, 10),
    "blues": (0, 3, 5, 6, 7, 10),
    "chromatic": tuple(range(12)),
}
_ALIASES = {"maj": "major", "ionian": "major", "min": "minor", "aeolian": "minor", "natural minor": "minor"}
SPECIAL = ("none", "auto")
VALID_FORMS = ('"none", "auto", or a tonic A..G with an optional # or b followed by a scale, e.g. "C major", '
               '"F# major", "Bb minor", "D dorian"; scales: ' + ", ".join(SCALES))

# Krumhansl & Kessler (1982) probe-tone profiles, tonic first.
KK_MAJOR = np.array([6.35, 2.23, 3.48, 2.33, 4.38, 4.09, 2.52, 5.19, 2.39, 3.66, 2.29, 2.88])
KK_MINOR = np.array([6.33, 2.68, 3.52, 5.38, 2.60, 3.53, 2.54, 4.75, 3.98, 2.69, 3.34, 3.17])


class Key(NamedTuple):
    """A key: tonic pitch class 0..11 (C = 0) and a scale name of `SCALES`."""

    tonic: int
    scale: str

    @property
    def pitch_classes(self) -> tuple[int, ...]:
        """The pitch classes (0..11) of the key's scale, sorted."""
        return tuple(sorted((self.tonic + i) % 12 for i in SCALES[self.scale]))

    def __str__(self) -> str:
        return f"{NOTE_NAMES[self.tonic]} {self.scale}"


def parse_key(text: str) -> Key | None:
    """A `Key` from text like "D minor"; None for "none". ("auto" is not a key: the caller handles it.)

    Raises:
        ValueError: the text is not a key; the message names it and lists the valid forms.
    """
    raw = text
    if not isinstance(text, str):
        raise ValueError(f"key {raw!r} is not valid: expected {VALID_FORMS}")
    text = " ".join(text.strip().replace("♯", "#").replace("♭", "b").split())
    if text.lower() == "none":
        return None
    tonic_text, _, scale_text = text.partition(" ")
    scale = _ALIASES.get(scale_text.lower(), scale_text.lower())
    if not tonic_text or tonic_text[0].lower() not in _LETTERS or len(tonic_text) > 2 or scale not in SCALES:
        raise ValueError(f"key {raw!r} is not valid: expected {VALID_FORMS}")
    tonic = _LETTERS[tonic_text[0].lower()]
    if len(tonic_text) == 2:
        if tonic_text[1] not in "#b":
            raise ValueError(f"key {raw!r} is not valid: expected {VALID_FORMS}")
        tonic += 1 if tonic_text[1] == "#" else -1
    return Key(tonic % 12, scale)


def check_key_setting(text: str) -> None:
    """Raise ValueError unless `text` is a valid `improvise.key` ("none", "auto" or a key)."""
    if isinstance(text, str) and text.strip().lower() in SPECIAL:
        return
    parse_key(text)


def pitch_class_histogram(pitches, weights=None) -> np.ndarray:
    """float64 [12]: the summed `weights` (durations, seconds; 1 each when None) of each pitch class."""
    pitches = np.asarray(pitches, dtype=np.int64).reshape(-1)
    w = np.ones(len(pitches)) if weights is None else np.asarray(weights, dtype=np.float64).reshape(-1)
    return np.bincount(pitches % 12, weights=np.maximum(w, 0.0), minlength=12).astype(np.float64)


def estimate_key(pitches, durations_s=None, *, min_notes: int = 3) -> Key | None:
    """The major or minor key whose Krumhansl-Kessler profile correlates best with the notes' pitch classes.

    Args:
        pitches: MIDI pitches.
        durations_s: the notes' durations in seconds (the histogram's weights); each note counts 1 when None.
            A duration is floored at 50 ms so that staccato notes still count.
        min_notes: below this many notes (or with a single pitch class) there is no estimate.

    Returns:
        The best key, or None when there is too little to go on.
    """
    pitches = np.asarray(pitches, dtype=np.int64).reshape(-1)
    if len(pitches) < min_notes:
        return None
    weights = None if durations_s is None else np.maximum(np.asarray(durations_s, dtype=np.float64), 0.05)
    hist = pitch_class_histogram(pitches, weights)
    if np.count_nonzero(hist) < 2:
        return None
    h = (hist - hist.mean()) / hist.std()
    r = _PROFILES @ h  # Pearson correlation with each of the 24 keys, times 12
    best = int(np.argmax(r))  # ties: the first, C major before the others
    return Key(best % 12, "major" if best < 12 else "minor")


def _standardised_profiles() -> np.ndarray:
    rows = [np.roll(profile, tonic) for profile in (KK_MAJOR, KK_MINOR) for tonic in range(12)]
    m = np.array(rows)
    return (m - m.mean(axis=1, keepdims=True)) / m.std(axis=1, keepdims=True)


_PROFILES = _standardised_profiles()  # [24, 12]: C..B major, then C..B minor


def scale_mask(pitch_classes) -> np.ndarray:
    """bool [128]: True for the MIDI pitches whose pitch class is in `pitch_classes`."""
    pcs = np.zeros(12, dtype=bool)
    pcs[list(pitch_classes)] = True
    return pcs[np.arange(NUM_PITCHES) % 12]
