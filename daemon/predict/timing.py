"""Session adaptation of timing: step and duration predicted from what the player's recent notes did.

The timing half of `SessionAdapter` (daemon/predict/adapt.py, whose docstring describes the whole method): the
model's (step, duration) is mixed with the timing of what followed the same pitches, and the same rhythm, the
last time the player played them, with weights learned online from each one's recent errors.

Threads: one at a time, through its `SessionAdapter` (the engine thread in the daemon; `improvd eval --adapt` in
the main thread).
"""

from __future__ import annotations

import math
from collections import deque

TIMING_PITCH_ORDERS = (8, 4, 2)   # the pitch contexts whose latest follower's timing is an expert (longest first)
TIMING_RHYTHM_ORDERS = (4, 2)     # the same with the last notes' steps and durations (longest first)
TIMING_QUANTUM_S = 0.01           # steps and durations are compared in rhythm contexts to this resolution
TIMING_DISCOUNT = 0.98            # the experts' past errors fade by this factor per note (about 50 notes)
TIMING_SCALE_FLOOR_S = 0.001      # the error scale never counts as less than this
TIMING_SOFTNESS = 8.0             # weights exp(-L / (TIMING_SOFTNESS · the model's mean absolute error))
TIMING_PRIOR = (0.8, 0.1, 0.1)    # the experts' prior weights (model, pitch context, rhythm context)
TIMING_EXPERTS = ("model", "pitch context", "rhythm context")
_P0, _P1, _P2 = TIMING_PRIOR
_RHYTHM_SPANS = tuple(2 * n for n in TIMING_RHYTHM_ORDERS)  # a note is two symbols in a rhythm context
_PER_QUANTUM = 1.0 / TIMING_QUANTUM_S
_LONGEST_RHYTHM = max(_RHYTHM_SPANS)


def _suffixes(sequence: tuple, spans: tuple[int, ...]) -> tuple:
    """`sequence`'s last `n` symbols for each of `spans` it is long enough for: the keys a note is stored under."""
    size = len(sequence)
    return tuple([sequence[-n:] for n in spans if n <= size])


def _latest_after(table: dict, sequence: tuple, spans: tuple[int, ...]):
    """The entry of `table` for the longest of `sequence`'s last `spans` symbols that has one (spans longest
    first); None when none has."""
    size = len(sequence)
    for n in spans:
        if n <= size:
            hit = table.get(sequence[-n:])
            if hit is not None:
                return hit
    return None


class TimingCache:
    """The session's timing memory: step and duration predicted from the player's recent notes (see the module
    docstring). Owned by a `SessionAdapter`, which gives it the pitch context and keeps it in step.

    Experts, per quantity (step, duration): the model's prediction; the timing of the latest counted note that
    followed the longest of the last 8, 4 or 2 pitches (a motif played again tends to keep its rhythm); the
    timing of the latest counted note that followed the last 4 or 2 (step, duration) pairs (a rhythm played
    again). An expert with nothing matched is the model. The prediction is the experts' weighted mean, weights
    `exp(-L_k / (8·s))` with L_k the expert's discounted sum of absolute errors on the player's notes so far and
    s the model's discounted mean absolute error (the exponentially weighted forecaster, with its learning rate
    set by the scale of the errors met), times the prior `TIMING_PRIOR`: whichever expert has been right
    lately dominates.
    """

    def __init__(self, memory: int):
        self.memory = memory
        self._by_pitch: dict[tuple, tuple] = {}   # pitch context -> (step, duration, serial) of its latest follower
        self._by_rhythm: dict[tuple, tuple] = {}  # rhythm context (quantised step, duration, ...) -> the same
        self._rhythm: tuple = ()  # the last notes' quantised (step, duration), flattened, oldest first
        self._added: deque = deque()  # per counted note: (serial, its keys in _by_pitch, in _by_rhythm)
        self._serial = 0
        self._loss = [(0.0, 0.0, 0.0), (0.0, 0.0, 0.0)]  # per quantity (step, duration), per expert
        self._scale: list[float | None] = [None, None]
        self._cache: tuple | None = None  # the matched followers for the current context

    def clear(self) -> None:
        self._by_pitch.clear()
        self._by_rhythm.clear()
        self._added.clear()
        self._rhythm = ()
        self._loss = [(0.0, 0.0, 0.0), (0.0, 0.0, 0.0)]
        self._scale = [None, None]
        self._cache = None

    @property
    def rhythm(self) -> tuple:
        return self._rhythm

    def set_rhythm(self, rhythm: tuple) -> None:
        self._rhythm = tuple(rhythm)
        self._cache = None

    def _followers(self, pitches: tuple) -> tuple:
        """(the timing after the longest matched pitch context, the same for rhythm), None where none matched."""
        cache = self._cache
        if cache is None:
            cache = self._cache = (_latest_after(self._by_pitch, pitches, TIMING_PITCH_ORDERS),
                                   _latest_after(self._by_rhythm, self._rhythm, _RHYTHM_SPANS))
        return cache

    def experts(self, pitches: tuple, step: float, duration: float) -> list[tuple[float, float]]:
        """Each expert's (step, duration) for the next note, given the model's, in `TIMING_EXPERTS` order."""
        out = [(step, duration)]
        for hit in self._followers(pitches):
            out.append((hit[0], hit[1]) if hit is not None else (step, duration))
        return out

    def predict(self, pitches: tuple, step: float, duration: float) -> tuple[float, float]:
        """The adapted (step, duration) for the next note, given the model's (after the notes observed so far)."""
        after_pitch, after_rhythm = self._followers(pitches)
        if after_pitch is None and after_rhythm is None:
            return step, duration  # every expert is the model
        p = after_pitch or (step, duration)
        r = after_rhythm or (step, duration)
        out = [step, duration]
        for q in (0, 1):
            l0, l1, l2 = self._loss[q]
            least = min(l0, l1, l2)
            rate = -1.0 / (TIMING_SOFTNESS * max(self._scale[q] or 0.0, TIMING_SCALE_FLOOR_S))
            w0 = _P0 * math.exp(rate * (l0 - least))
            w1 = _P1 * math.exp(rate * (l1 - least))
            w2 = _P2 * math.exp(rate * (l2 - least))
            out[q] = (w0 * out[q] + w1 * p[q] + w2 * r[q]) / (w0 + w1 + w2)
        return out[0], out[1]

    def observe(self, pitches: tuple, step: float, duration: float, model: tuple | None, learn: bool) -> None:
        """A note was played with this (step, duration), after `pitches`; `model` is the model's (step,
        duration) for it (None: the weights are not updated). `learn`: the player's note (remembered)."""
        rhythm = self._rhythm
        if learn:
            if model is not None:
                after_pitch, after_rhythm = self._followers(pitches)
                p = after_pitch or model
                r = after_rhythm or model
                g = TIMING_DISCOUNT
                # (step and duration written out: the same update for each, without a loop's tuples)
                (s0, s1, s2), (d0, d1, d2) = self._loss
                scale_s, scale_d = self._scale
                es, ed = abs(model[0] - step), abs(model[1] - duration)
                self._loss = [(g * s0 + es, g * s1 + abs(p[0] - step), g * s2 + abs(r[0] - step)),
                              (g * d0 + ed, g * d1 + abs(p[1] - duration), g * d2 + abs(r[1] - duration))]
                self._scale = [es if scale_s is None else g * scale_s + (1.0 - g) * es,
                               ed if scale_d is None else g * scale_d + (1.0 - g) * ed]
            self._serial += 1
            serial = self._serial
            timing = (step, duration, serial)
            by_pitch = self._by_pitch
            pkeys = _suffixes(pitches, TIMING_PITCH_ORDERS)
            for key in pkeys:
                by_pitch[key] = timing
            by_rhythm = self._by_rhythm
            rkeys = _suffixes(rhythm, _RHYTHM_SPANS)
            for key in rkeys:
                by_rhythm[key] = timing
            added = self._added
            added.append((serial, pkeys, rkeys))
            if len(added) > self.memory:
                serial, pkeys, rkeys = added.popleft()
                for key in pkeys:
                    if by_pitch[key][2] == serial:  # its latest follower leaves: nothing newer followed it
                        del by_pitch[key]
                for key in rkeys:
                    if by_rhythm[key][2] == serial:
                        del by_rhythm[key]
        self._rhythm = (rhythm + (round(step * _PER_QUANTUM), round(duration * _PER_QUANTUM)))[-_LONGEST_RHYTHM:]
        self._cache = None
