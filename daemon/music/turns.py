"""Turn-taking: when the player's phrase is over, when the answer enters, and how long it lasts.

Pure functions and one small state class (`Sustain`); the engine thread calls them.

**Phrase end** (`improvise.silence`). A number is a fixed silence: the phrase ends that many seconds after the last
key was released. `"auto"` measures the silence in the player's own pulse:

    ioi  = the phrase's reference inter-onset interval (`reference_ioi_s`): the longest pulse IOI of the phrase, but
           at most `LONG_IOI_MEDIANS` times its median (a dotted rhythm's long notes count; one fermata does not)
    end  = max(last onset + AUTO_IOIS * ioi,            -- the next note would have come by now, with some slack
               last release + AUTO_RELEASE_IOIS * ioi)   -- and a moment of real silence after the last release
    the wait after the last release is kept within AUTO_BOUNDS_S

A phrase that has no pulse yet (one note, or only chords) waits `AUTO_NO_PULSE_S` after the release. Whatever the
setting, the phrase never ends while a key is held (the note tracker's `quiet_since_s` is None then) or while the
sustain pedal (CC 64) holds the sound (`Sustain`): a held chord or a slow phrase's long note keeps the turn with the
player. A pedal (like a key) held longer than `improvise.max_hold` counts as released, so a lost pedal-up cannot
keep the turn forever.

Why these numbers: a player inside a phrase plays the next note about one IOI after the last one; rubato of a
quarter to a third of an IOI is common, so 1.5 IOIs after the last onset is the earliest moment at which the next
note is clearly late. At 160 bpm eighths (IOI 0.1875 s) that is 0.28 s after the last onset, about 0.2 s after a
legato release; at 60 bpm quarters (IOI 1 s) 1.5 s after the onset, so a detached note released after 0.3 s is
not mistaken for the end (a fixed 0.6 s silence would answer 0.9 s after that onset, before the next note).

**Entry** (`entry_ticks`). With MIDI clock running, the answer's first note enters on the clock's grid: the next
beat, or, when `timing.quantize` is coarser than a beat (1/2, 1/1, 1/2d...), the next point of that grid (a half-bar,
a bar line). A beat is the shortest unit a listener hears as "coming in in time"; finer quantize steps (1/16) would
make the entry sound like a late reaction rather than an entry, and a coarser setting is the musician asking for
the longer grid. The wait is at most one grid step (a beat: 0.375 s at 160 bpm). Later notes follow the model's
steps from there (snapped to `timing.quantize` when it is on).

**Answer length** (`improvise.answer_length`, parsed by `parse_answer_length`):

- `"match"`: about as long as the call. With a pulse (the clock's beat while it runs, else the grid's when
  quantize is on, else the player's pulse folded into a beat, `tempo.beat_from_ioi`) the call's length, first onset
  to last release, is counted in beats, rounded to the nearest half beat (at least one), and the answer lasts that
  many beats at the tempo of the moment (a clock's tempo change is followed); without a pulse, the answer has as
  many notes as the call.
- `"N notes"` (e.g. "12 notes"): that many notes; `"N beats"`: that many beats (of the pulse as above; without one,
  of `tempo.DEFAULT_REFERENCE_IOI_S`).
- `"max"`: only the caps (the behaviour before `answer_length` existed).

Every answer is still capped by `improvise.max_notes` and `improvise.max_seconds`. An answer measured in beats takes
notes whose onsets fall within its span, and its note-offs are kept within the span too (a last note does not ring
past the length asked for). Continuous mode streams: `answer_length` does not apply there.
"""

from __future__ import annotations

import math
import re
from typing import NamedTuple

import mido
import numpy as np

from improvd.daemon.music import tempo

AUTO = "auto"
AUTO_IOIS = 1.5  # phrase end: this many reference IOIs after the last onset...
AUTO_RELEASE_IOIS = 0.5  # ...and at least this many after the last release
AUTO_BOUNDS_S = (0.08, 2.0)  # the wait after the last release is kept within these
AUTO_NO_PULSE_S = 1.0  # no pulse measured yet (one note, or only chords): the wait after the release
LONG_IOI_MEDIANS = 2.0  # the reference IOI is the phrase's longest pulse IOI, at most this many medians
SUSTAIN_CC = 64
PEDAL_ON = 64  # CC 64 value >= 64: pedal down
BEAT_TICKS = 24  # a beat (quarter note) in MIDI clock ticks
HALF_BEAT = 0.5  # a call's length in beats is rounded to this
ANSWER_LENGTH_FORMS = "'match', 'max', 'N notes' (e.g. '12 notes') or 'N beats' (e.g. '8 beats'), N > 0"


# ---- phrase end ------------------------------------------------------------------------------------------------

def reference_ioi_s(onsets_s) -> float | None:
    """The IOI the phrase end is measured in: the longest pulse IOI (between `tempo.CHORD_S` and `tempo.MAX_IOI_S`)
    of the sorted onsets, at most `LONG_IOI_MEDIANS` times their median; None when there is no pulse IOI."""
    onsets = np.sort(np.asarray(onsets_s, dtype=np.float64).reshape(-1))
    iois = np.diff(onsets)
    iois = iois[(iois > tempo.CHORD_S) & (iois <= tempo.MAX_IOI_S)]
    if not len(iois):
        return None
    return float(min(iois.max(), LONG_IOI_MEDIANS * np.median(iois)))


def auto_wait_s(onsets_s, last_release_s: float) -> float:
    """Seconds after `last_release_s` at which a phrase with these onsets is over (`silence = "auto"`)."""
    ioi = reference_ioi_s(onsets_s)
    if ioi is None:
        return AUTO_NO_PULSE_S
    last_onset = float(np.max(np.asarray(onsets_s, dtype=np.float64)))
    wait = max(last_onset + AUTO_IOIS * ioi - last_release_s, AUTO_RELEASE_IOIS * ioi)
    return float(min(max(wait, AUTO_BOUNDS_S[0]), AUTO_BOUNDS_S[1]))


def phrase_end_s(silence, onsets_s, quiet_since_s: float | None) -> float | None:
    """When the phrase is over: `quiet_since_s` (the last release, or pedal-up) plus the silence, or None while
    something is held (`quiet_since_s` None) or no note was heard (`onsets_s` empty).

    Args:
        silence: `improvise.silence`: seconds, or "auto".
        onsets_s: onsets of the phrase's notes, seconds.
        quiet_since_s: since when nothing has been held.
    """
    if quiet_since_s is None or not len(onsets_s):
        return None
    if silence == AUTO:
        return quiet_since_s + auto_wait_s(onsets_s, quiet_since_s)
    return quiet_since_s + float(silence)


class Sustain:
    """The sustain pedal (CC 64) on the listened channels: whether it holds the sound, and since when it is up.

    Args:
        max_hold_s: a pedal held down longer than this counts as released then (like a key, `improvise.max_hold`).
    """

    def __init__(self, max_hold_s: float = 8.0):
        self.max_hold_s = float(max_hold_s)
        self._down: dict[int, float] = {}  # channel -> when the pedal went down
        self.last_up_s: float | None = None

    def handle(self, t_s: float, msg: mido.Message, channels: frozenset | set = frozenset()) -> bool:
        """Take a control change; returns True when it was the pedal on a listened channel (`channels`, 0-based;
        empty = all)."""
        if msg.type != "control_change" or msg.control != SUSTAIN_CC:
            return False
        if channels and msg.channel not in channels:
            return False
        if msg.value >= PEDAL_ON:
            self._down.setdefault(msg.channel, t_s)
        elif msg.channel in self._down:
            del self._down[msg.channel]
            self._mark_up(t_s)
        return True

    def _mark_up(self, t_s: float) -> None:
        if self.last_up_s is None or t_s > self.last_up_s:
            self.last_up_s = t_s

    def expire(self, now_s: float) -> None:
        """Count a pedal held `max_hold_s` or longer as released at down + max_hold_s."""
        for channel, since in list(self._down.items()):
            if since + self.max_hold_s <= now_s:
                del self._down[channel]
                self._mark_up(since + self.max_hold_s)

    def down(self) -> bool:
        """Whether the pedal is down on some listened channel."""
        return bool(self._down)

    def next_expiry_s(self) -> float | None:
        """When the oldest pedal-down will count as released, or None."""
        return min(self._down.values()) + self.max_hold_s if self._down else None

    def quiet_since_s(self, keys_quiet_since_s: float | None) -> float | None:
        """Since when nothing has held the sound: keys (the tracker's `quiet_since_s`) and pedal; None while either
        holds it."""
        if keys_quiet_since_s is None or self._down:
            return None
        if self.last_up_s is not None and self.last_up_s > keys_quiet_since_s:
            return self.last_up_s
        return keys_quiet_since_s


# ---- entry on the clock's grid ---------------------------------------------------------------------------------

def entry_ticks(quantize_ticks: int | None) -> int:
    """The grid step, in clock ticks, the answer's first note enters on while a MIDI clock runs: one beat, or the
    quantize step when it is coarser (see the module docstring)."""
    return max(BEAT_TICKS, quantize_ticks or 0)


# ---- answer length ---------------------------------------------------------------------------------------------

class AnswerLength(NamedTuple):
    """A parsed `improvise.answer_length`: kind "match", "notes", "beats" or "max", and the count of notes/beats."""

    kind: str
    count: float = 0.0


_LENGTH = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(notes?|beats?)\s*$", re.IGNORECASE)


def parse_answer_length(text: str) -> AnswerLength:
    """Parse `improvise.answer_length`.

    Raises:
        ValueError: not one of `ANSWER_LENGTH_FORMS` (the message names the value).
    """
    if not isinstance(text, str):
        raise ValueError(f"answer_length = {text!r} is not valid: expected {ANSWER_LENGTH_FORMS}")
    word = text.strip().lower()
    if word in ("match", "max"):
        return AnswerLength(word)
    m = _LENGTH.match(word)
    if m:
        count = float(m.group(1))
        unit = "notes" if m.group(2).startswith("note") else "beats"
        if count > 0 and (unit == "beats" or count == int(count)):
            return AnswerLength(unit, count)
    raise ValueError(f"answer_length = {text!r} is not valid: expected {ANSWER_LENGTH_FORMS}")


class Budget(NamedTuple):
    """How long one answer lasts: at most `notes` notes (None = no such limit), and, when `beats` is set, onsets
    and note-offs within `beats` beats of the first onset."""

    notes: int | None = None
    beats: float | None = None

    def span_s(self, beat_s: float | None) -> float | None:
        """The answer's length in seconds at `beat_s` (None = no span limit)."""
        if self.beats is None:
            return None
        return self.beats * (beat_s if beat_s else tempo.DEFAULT_REFERENCE_IOI_S)


def call_length_beats(first_onset_s: float, last_release_s: float, beat_s: float) -> float:
    """The call's length (first onset to last release) in beats, rounded to the nearest half beat, at least 1."""
    beats = max(0.0, last_release_s - first_onset_s) / beat_s
    return max(1.0, math.floor(beats / HALF_BEAT + 0.5) * HALF_BEAT)


def answer_budget(setting: AnswerLength, *, call_notes: int, first_onset_s: float | None,
                  last_release_s: float | None, beat_s: float | None) -> Budget:
    """The budget of an answer to a call of `call_notes` notes from `first_onset_s` to `last_release_s`, with the
    pulse `beat_s` (seconds per beat; None = no pulse known)."""
    if setting.kind == "max":
        return Budget()
    if setting.kind == "notes":
        return Budget(notes=int(setting.count))
    if setting.kind == "beats":
        return Budget(beats=float(setting.count))
    if beat_s and first_onset_s is not None and last_release_s is not None:
        return Budget(beats=call_length_beats(first_onset_s, last_release_s, beat_s))
    return Budget(notes=max(1, int(call_notes)))
