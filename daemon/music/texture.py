"""Texture bounds of an answer: how many of improvd's notes sound at once (`improvise.polyphony`) and which pitches
it may use (`improvise.register`). Pure logic; the engine thread and `improvd generate` call it.

Both bounds are applied while decoding, before the pitch is sampled, so timing and pitch remain the model's choices
within them:

- **Polyphony** N (1 = a melodic answer; 0 = no bound; "match" = the call's most notes sounding at once,
  `max_simultaneous`, where a note released less than `LEGATO_OVERLAP_S` after the next one started counts as legato
  playing, not as a second voice): before a note is placed, the answer's own notes sounding at its predicted onset
  are counted (`Voices`); if N already sound, the onset waits for the release that brings the count below N (the
  earliest one that does; on a quantize grid, the first grid point at or after it). A chord the model predicts is
  thus played as far as N allows and its other notes come as the earlier ones end. The model is fed the real gap of
  a delayed note, as of any note moved from its predicted time. The player's notes are not counted (they are the
  player's).
- **Register** "match": the pitch is sampled only among the pitches within the call's lowest and highest note
  widened by `REGISTER_WIDEN` semitones on each side, intersected with `improvise.pitch_range` (if the two do not
  meet, `pitch_range` alone applies). "free" = `pitch_range` only.

Why a perfect fourth (5 semitones): an answer to a call that spans C4-G4 may then go down to the G3 below (the
dominant under the tonic, where answers like to cadence) and up to C5 (the tonic's octave), the two notes a
musician most often adds beyond a short call's span, while a three-voice chorale answer to a whistled tune
(an octave or more beyond it) is excluded. A whole octave would let that in; a major second or third would forbid
the octave of the tonic in the common call that ends a fifth above it.

Counting what the bounds changed (`TextureCounts`): a note is "delayed" when its onset was moved later for the
polyphony bound, "re-chosen" when the pitch sampled within the register differs from the one the same draw picks
without it (see `Improviser.predict`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

REGISTER_WIDEN = 5  # semitones added below the call's lowest and above its highest note (a perfect fourth)
LEGATO_OVERLAP_S = 0.1  # in a call, a note that ends this soon after the next one starts is legato, not a voice
MATCH = "match"
FREE = "free"
REGISTER_CHOICES = (FREE, MATCH)
POLYPHONY_FORMS = "0 (no bound), a number of notes 1..16, or 'match'"
MAX_POLYPHONY = 16


def max_simultaneous(onsets_s, ends_s) -> int:
    """The most notes sounding at once among notes [onset, end): a note ending when another starts does not
    overlap it. 0 for no notes."""
    onsets = np.asarray(onsets_s, dtype=np.float64).reshape(-1)
    ends = np.maximum(np.asarray(ends_s, dtype=np.float64).reshape(-1), onsets)
    if not len(onsets):
        return 0
    # at equal times, releases (-1) come before onsets (+1)
    events = sorted([(t, 1) for t in onsets] + [(t, -1) for t in ends])
    count = best = 0
    for _, d in events:
        count += d
        best = max(best, count)
    return max(best, 1)


def call_register(pitches, pitch_range: tuple[int, int] = (0, 127), widen: int = REGISTER_WIDEN
                  ) -> tuple[int, int] | None:
    """The pitches an answer to a call with `pitches` may use: the call's span widened by `widen` semitones each
    side, within `pitch_range`; None when there is no pitch or the two do not meet (then `pitch_range` applies)."""
    pitches = np.asarray(pitches, dtype=np.float64).reshape(-1)
    if not len(pitches):
        return None
    lo = max(int(pitches.min()) - widen, int(pitch_range[0]))
    hi = min(int(pitches.max()) + widen, int(pitch_range[1]))
    return (lo, hi) if lo <= hi else None


def check_polyphony(value) -> None:
    """Raise ValueError naming `value` unless it is a valid `improvise.polyphony`."""
    if value == MATCH:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_POLYPHONY:
        raise ValueError(f"polyphony = {value!r} is not valid: expected {POLYPHONY_FORMS}")


def check_register(value) -> None:
    """Raise ValueError naming `value` unless it is a valid `improvise.register`."""
    if value not in REGISTER_CHOICES:
        raise ValueError(f"register = {value!r} is not valid: allowed values are "
                         f"{', '.join(repr(c) for c in REGISTER_CHOICES)}")


class Texture(NamedTuple):
    """The bounds for one answer: `polyphony` (None = no bound) and `register` ((low, high) or None = free)."""

    polyphony: int | None = None
    register: tuple[int, int] | None = None


def texture_for_call(polyphony, register: str, *, pitches, onsets_s, ends_s,
                     pitch_range: tuple[int, int]) -> Texture:
    """The bounds of an answer to a call (its notes' pitches, onsets and ends), for the settings
    `improvise.polyphony` and `improvise.register`."""
    check_polyphony(polyphony)
    check_register(register)
    if polyphony == MATCH:
        onsets = np.asarray(onsets_s, dtype=np.float64).reshape(-1)
        ends = np.maximum(np.asarray(ends_s, dtype=np.float64).reshape(-1) - LEGATO_OVERLAP_S, onsets)
        most = max_simultaneous(onsets, ends)
        limit = most if most > 0 else None
    else:
        limit = int(polyphony) if polyphony else None
    span = call_register(pitches, pitch_range) if register == MATCH else None
    return Texture(limit, span)


class Voices:
    """improvd's own notes of the answer, (onset, end) in seconds, to place the next onset under a polyphony bound.

    Onsets are placed in non-decreasing order (as the engine and `generate` do)."""

    def __init__(self) -> None:
        self._notes: list[tuple[float, float]] = []

    def add(self, onset_s: float, end_s: float) -> None:
        self._notes.append((float(onset_s), max(float(end_s), float(onset_s))))

    def clear(self) -> None:
        self._notes.clear()

    def prune(self, before_s: float) -> None:
        """Forget the notes that ended at or before `before_s`."""
        self._notes = [n for n in self._notes if n[1] > before_s]

    def cut(self, at_s: float) -> None:
        """Notes still sounding (or not started) at `at_s` end there (an interruption released them)."""
        self._notes = [(o, min(e, at_s)) for o, e in self._notes if o < at_s]

    def sounding_at(self, t_s: float) -> int:
        return sum(1 for o, e in self._notes if o <= t_s < e)

    def earliest_onset(self, t_s: float, limit: int) -> float:
        """The earliest time at or after `t_s` at which fewer than `limit` of these notes sound."""
        t = float(t_s)
        while True:
            ends = sorted(e for o, e in self._notes if o <= t < e)
            if len(ends) < limit:
                return t
            t = ends[len(ends) - limit]


@dataclass
class TextureCounts:
    """How often the bounds overrode the model: notes placed, onsets delayed (and by how much), pitches re-chosen."""

    notes: int = 0
    delayed: int = 0
    rechosen: int = 0
    overridden: int = 0  # delayed or re-chosen (or both)
    delays_s: list = field(default_factory=list)

    def add(self, *, delay_s: float, rechosen: bool) -> None:
        """One note placed, its onset moved `delay_s` seconds later (0 = not delayed)."""
        self.notes += 1
        self.delayed += int(delay_s > 0)
        self.rechosen += bool(rechosen)
        self.overridden += bool(delay_s > 0 or rechosen)
        if delay_s > 0:
            self.delays_s.append(float(delay_s))

    def as_dict(self) -> dict:
        share = (lambda k: round(k / self.notes, 4) if self.notes else 0.0)
        delays = np.asarray(self.delays_s) * 1000.0
        return {"notes": self.notes, "delayed": self.delayed, "rechosen": self.rechosen,
                "delay_ms_median": round(float(np.median(delays)), 1) if len(delays) else 0.0,
                "delayed_over_50ms": int(np.sum(delays > 50.0)),
                "delayed_share": share(self.delayed), "rechosen_share": share(self.rechosen),
                "overridden": self.overridden, "overridden_share": share(self.overridden)}
