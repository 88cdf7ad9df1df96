"""Note tracking: time-stamped MIDI input becomes completed notes and a rolling window of what the player played.

`NoteTracker` is pure (no threads, no clock of its own): it is given (t_s, message) pairs, `t_s` being the arrival
time on `time.perf_counter`'s clock. A note-on (velocity > 0) on a listened channel
starts a note; its note-off (or a note-on with velocity 0) completes it, with onset = the note-on's stamp and
duration = release stamp - onset (never negative). A repeated note-on of a key still held completes the held one
first, unless it has the same velocity and comes within `REPEAT_S` of the held one's: that is the same message read
twice (JACK's asynchronous mode lets a late client read its source's buffer again, docs/daemon.md "JACK clients";
no hand re-presses a held key that fast), and it is ignored (counted in `repeats`). A key held longer than `max_hold_s` counts as released at onset + max_hold_s (so a lost note-off cannot
keep a phrase open forever); its late note-off is then ignored. Note-offs are accepted on every channel for the keys
that are held, so a change of listened channels never strands a key. Other messages are ignored.

The tracker knows which keys are held and when the last one was released (the engine's silence detection), and
keeps the last `window` completed notes, sorted by (onset, pitch).

Threads: owned by the engine thread.
"""

from __future__ import annotations

import bisect
from typing import Iterable, NamedTuple

import mido
import numpy as np

from improvd.core import notes as nt
from improvd.core.config import ImproviseConfig, MidiConfig


class HeardNote(NamedTuple):
    """A completed note of the player: absolute onset and duration in seconds, 0-based channel."""

    onset_s: float
    pitch: int
    duration_s: float
    velocity: int
    channel: int


class Update(NamedTuple):
    """What one input message did: whether it started a note, and the notes it (or an expiry) completed."""

    note_on: bool
    completed: tuple[HeardNote, ...]


_NOTHING = Update(False, ())

# A note-on of a held key with the same velocity within this long of the held one's is the same message read twice
# (repeats seen: 0.006-3.4 ms apart, bench/starts.py; a period is 1.3 ms at 64 frames and 48 kHz).
REPEAT_S = 0.005


class NoteTracker:
    """Turns note-on/note-off messages into completed notes and a rolling window.

    Args:
        channels: 0-based channels listened to; empty = all.
        window: completed notes kept in the rolling window.
        max_hold_s: seconds after which a held key counts as released.
    """

    def __init__(self, channels: Iterable[int] = (), window: int = 64, max_hold_s: float = 8.0):
        self._held: dict[tuple[int, int], tuple[float, int]] = {}  # (channel, pitch) -> (onset_s, velocity)
        self._window: list[tuple[float, int, HeardNote]] = []
        self._last_release_s: float | None = None
        self.notes_heard = 0
        self.repeats = 0  # note-ons ignored as the same message read twice (see REPEAT_S)
        self.configure(channels, window, max_hold_s)

    @classmethod
    def from_config(cls, improvise: ImproviseConfig, midi: MidiConfig) -> "NoteTracker":
        """A tracker for `[improvise]` (window, max_hold) and `[midi]` (1-based input_channels)."""
        return cls([c - 1 for c in midi.input_channels], improvise.window, improvise.max_hold)

    def configure(self, channels: Iterable[int], window: int, max_hold_s: float) -> None:
        """Change the settings, keeping the held keys and the window (trimmed to `window`)."""
        channels = frozenset(int(c) for c in channels)
        bad = [c for c in channels if not 0 <= c <= 15]
        if bad:
            raise ValueError(f"channel must be in range 0..15, got {bad[0]}")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if max_hold_s <= 0:
            raise ValueError(f"max_hold_s must be > 0, got {max_hold_s}")
        self.channels = channels
        self.window_size = int(window)
        self.max_hold_s = float(max_hold_s)
        del self._window[:max(0, len(self._window) - self.window_size)]

    # ---- input -------------------------------------------------------------------------------------------
    def handle(self, t_s: float, msg: mido.Message) -> Update:
        """Take one stamped message (t_s: arrival time in seconds); returns what it started and completed."""
        completed = list(self.expire(t_s))
        kind = msg.type
        if kind not in ("note_on", "note_off"):
            return Update(False, tuple(completed)) if completed else _NOTHING
        key = (msg.channel, msg.note)
        if kind == "note_on" and msg.velocity > 0:
            if self.channels and msg.channel not in self.channels:
                return Update(False, tuple(completed))
            held = self._held.get(key)
            if held is not None:
                if held[1] == msg.velocity and 0.0 <= t_s - held[0] <= REPEAT_S:  # the same press, read twice
                    self.repeats += 1
                    return Update(False, tuple(completed))
                completed.append(self._release(key, t_s))  # a re-trigger ends the note that was sounding
            self._held[key] = (t_s, msg.velocity)
            return Update(True, tuple(completed))
        if key in self._held:
            completed.append(self._release(key, t_s))
        return Update(False, tuple(completed))

    def expire(self, t_s: float) -> tuple[HeardNote, ...]:
        """Complete the keys held for `max_hold_s` or longer by `t_s`; each is released at onset + max_hold_s."""
        if not self._held:
            return ()
        # onset + max_hold (not t - max_hold) so that expiry at `next_expiry_s()` is exact in floating point
        stale = sorted((onset, key) for key, (onset, _) in self._held.items() if onset + self.max_hold_s <= t_s)
        return tuple(self._release(key, onset + self.max_hold_s) for onset, key in stale)

    def _release(self, key: tuple[int, int], t_s: float) -> HeardNote:
        onset_s, velocity = self._held.pop(key)
        note = HeardNote(onset_s, key[1], max(0.0, t_s - onset_s), velocity, key[0])
        release_s = max(t_s, onset_s)
        if self._last_release_s is None or release_s > self._last_release_s:
            self._last_release_s = release_s
        bisect.insort(self._window, (onset_s, note.pitch, note))
        if len(self._window) > self.window_size:
            del self._window[0]
        self.notes_heard += 1
        return note

    # ---- state -------------------------------------------------------------------------------------------
    @property
    def held(self) -> int:
        """Number of keys held now."""
        return len(self._held)

    @property
    def held_keys(self) -> frozenset[tuple[int, int]]:
        """(channel, pitch) of the keys held now, channels 0-based."""
        return frozenset(self._held)

    @property
    def last_release_s(self) -> float | None:
        """When a key was last released (or expired), in seconds; None before the first release."""
        return self._last_release_s

    def quiet_since_s(self) -> float | None:
        """Since when no key has been held (the last release), or None while a key is held or before any."""
        return None if self._held else self._last_release_s

    def next_expiry_s(self) -> float | None:
        """When the oldest held key will count as released, or None when none is held."""
        if not self._held:
            return None
        return min(onset for onset, _ in self._held.values()) + self.max_hold_s

    def window_notes(self) -> np.ndarray:
        """The rolling window: float64 [K, 4] notes sorted by (onset, pitch), steps from onsets, first step 0."""
        if not self._window:
            return nt.empty()
        notes = [n for _, _, n in self._window]
        return nt.from_onsets([n.pitch for n in notes], [n.onset_s for n in notes], [n.duration_s for n in notes],
                              [n.velocity for n in notes])

    def window_heard(self) -> list[HeardNote]:
        """The window's notes as `HeardNote`s, sorted by (onset, pitch)."""
        return [n for _, _, n in self._window]

    def window_onsets_s(self) -> np.ndarray:
        """Absolute onsets in seconds of the window's notes, in window order."""
        return np.array([onset for onset, _, _ in self._window], dtype=np.float64)

    def recent_velocity(self, n: int = 8) -> float | None:
        """Mean velocity of the last `n` notes by onset in the window, or None when it is empty."""
        if not self._window:
            return None
        return float(np.mean([note.velocity for _, _, note in self._window[-n:]]))
