"""Session adaptation: a cache of what the player played this session, mixed with the model's pitch distribution.

No gradient step and no TensorFlow: the model's weights never change. What adapts is a small, bounded memory of
the player's notes and the weights of a mixture:

- Experts. Besides the model itself, each expert is a chain of n-gram counts over the session's notes, blended
  from its lowest order up with the model's distribution as the base (Witten-Bell style): at order n, with the
  last n pitches as context, `p_n = (c(x) + u·p_{n-1}) / (C + u)` where c are the counts of what followed that
  context in the session, C their sum and u the number of distinct continuations; `p_{m-1}` (below the lowest
  order m) is the model's distribution, and an order whose context never occurred passes `p_{n-1}` through.
  So an expert equals the model until the player repeats something, and trusts the session more the longer
  and the more consistently a context was followed by the same note. The `pitch` experts count absolute pitches
  (a motif played again at the same pitch); the `interval` expert counts intervals (the same motif transposed).
  Contexts of 2, 4, 8 and 16 pitches are counted (`ORDERS`); the pitch experts' chains start at 2, 4 and 8
  pitches, the interval expert's at 3 intervals (4 pitches). These round values were chosen on sessions of
  the chorales' training split (files the model was trained on), never on evaluation files.
- Mixture. The played distribution is `Σ w_k p_k`. The weights are a Bayesian posterior updated after every
  player note from how well each expert predicted it (`w_k ← w_k · p_k(note)`, renormalised), with a small
  fixed share (`SHARE`) of weight redistributed each note so an expert that stopped fitting (the player moved
  on) can come back. There is one set of weights per length of the longest context the session has met
  (`BUCKETS`: none, 2, 4, 8, 16 pitches), because a 16-note repeat deserves more trust than a 2-note one; the
  model's prior weight falls from 0.9 (nothing matched) to 0.1 (16 pitches matched) (`MODEL_PRIOR`). A Bayesian
  mixture's total log-loss exceeds the best expert's by at most -log(its prior weight) plus the share's cost,
  so adaptation cannot do much worse than the model alone on a player who never repeats anything (measured:
  0.02 % worse on random notes, tests/daemon/test_adapt.py). When no context was met before, every expert is
  the model and the mixture is skipped.
- Memory. Only the last `memory` player notes are counted (older ones are subtracted as they leave); `forget`
  clears the counts, the context and resets the weights to the prior. Memory is O(memory) (about 2.6 kB a
  note for pitch, 3.6 kB with timing, measured with tracemalloc) and time per note O(orders), whatever the
  session's length: per note, one
  dictionary look-up per counted context length, a few Python operations per count met, and four array
  operations over the 128 pitches (`softmax` and `mix`). Improvd's own notes extend the context the experts
  look up, but are never counted.

- Timing (`TimingCache`, daemon/predict/timing.py, unless `timing=False`): step and duration are predicted by the model, by the timing
  of what followed the same pitches last time, and by what followed the same rhythm last time, mixed with
  weights learned from each one's recent absolute errors on the player's notes. Velocity comes from the model.

Threads: one at a time (the engine thread in the daemon; `improvd eval --adapt` in the main thread).
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np

from improvd.daemon.predict.timing import TimingCache

ORDERS = (2, 4, 8, 16)     # context lengths (in pitches) that are counted; 16 is the longest
MAX_ORDER = ORDERS[-1]
MIN_ORDERS = (2, 4, 8)     # the pitch experts: one chain starting at each of these context lengths
INTERVAL_SPANS = (4, 8, 16)  # contexts of intervals counted, by the pitches they span (n - 1 intervals)
INTERVAL_MIN = (4,)        # the interval expert: one chain, from 4 pitches (3 intervals) up
BUCKETS = (0, 2, 4, 8, 16)  # the mixture keeps one set of weights per matched context length (0 = none)
MODEL_PRIOR = (0.9, 0.8, 0.7, 0.5, 0.1)  # the model's prior weight per bucket; the experts split the rest
SHARE = 0.01               # fixed share: the part of the weight spread evenly after each note
ESCAPE = 1.0              # Witten-Bell escape weight: the base keeps ESCAPE·u / (C + ESCAPE·u)
SCALAR_ADDS = 8            # mix adds up to this many counts to the array one by one, more in one indexed add
FLOOR = 1e-12              # no expert's probability of a note counts as less than this (a log(0) guard)
_INTERVAL_ORDERS = tuple(n - 1 for n in INTERVAL_SPANS)  # the same contexts in intervals
# Timing (step and duration). The prior and the softness were chosen on sessions of 60 files of the chorales'
# training split (files the model was trained on), never on evaluation files (docs/training.md):


def _plan(spans: tuple[int, ...], lowest: tuple[int, ...], first: int) -> tuple[tuple, ...]:
    """The top-down walk of one kind of expert's chains: per counted context (longest first), its length in
    pitches, the experts whose chain includes it (those starting at or below it; experts `first`, `first` + 1,
    ... start at `lowest`), and the expert whose chain starts there (None when none does)."""
    return tuple((n, tuple(first + j for j, m in enumerate(lowest) if m <= n),
                  first + lowest.index(n) if n in lowest else None) for n in spans[::-1])


_PITCH_PLAN = _plan(ORDERS, MIN_ORDERS, 1)
_INTERVAL_PLAN = _plan(INTERVAL_SPANS, INTERVAL_MIN, 1 + len(MIN_ORDERS))
_PITCH_INDEX = {n: i for i, n in enumerate(ORDERS)}
_INTERVAL_INDEX = {n: i for i, n in enumerate(INTERVAL_SPANS)}
_BUCKET_OF = tuple(sum(matched >= edge for edge in BUCKETS) - 1 for matched in range(MAX_ORDER + 1))


def _add(table: dict, rows: list, context: tuple, spans: tuple[int, ...], symbol: int) -> tuple:
    """Count `symbol` after each suffix of `context` (a table's contexts of every length share one dict, keyed by
    their symbols). `rows` are the rows of those suffixes already looked up (None: not in the table yet).
    Returns the rows counted in, for `_drop`."""
    out = []
    for n, row in zip(spans, rows):
        if row is None:
            row = table[context[-n:]] = {symbol: 1}
        else:
            row[symbol] = row.get(symbol, 0) + 1
        out.append(row)
    return tuple(out)


def _drop(table: dict, rows: tuple, context: tuple, spans: tuple[int, ...], symbol: int) -> None:
    """Undo `_add` (given the rows it returned): a count that reaches 0 is removed, and a context left with
    nothing after it too (no note still counted refers to that row: each note counted in it added 1)."""
    for n, row in zip(spans, rows):
        c = row[symbol] - 1
        if c:
            row[symbol] = c
        else:
            del row[symbol]
            if not row:
                del table[context[-n:]]


def softmax(logits: np.ndarray) -> np.ndarray:
    """The model's pitch distribution from its logits [128] (float64, a new array). Per note, so three array
    operations: without subtracting the largest logit first, which only matters when exp overflows or every
    term underflows (then it is done the careful way)."""
    e = np.exp(logits, dtype=np.float64)
    total = float(np.add.reduce(e))  # (`e.sum()` without its Python layer)
    if not 0.0 < total < math.inf:
        x = np.asarray(logits, dtype=np.float64)
        e = np.exp(x - x.max())
        total = float(e.sum())
    e *= 1.0 / total
    return e


class SessionAdapter:
    """The session's pitch memory and mixture (see the module docstring).

    Use: `mix(model_probs)` gives the distribution to play from (after the notes `observe`d so far);
    `observe(pitch, model_probs, learn=True)` records a note that was played, with the model's distribution
    for it (what the model predicted just before it): a player's note (`learn=True`) updates the weights and
    the counts, improvd's own note (`learn=False`) only extends the context.

    Every expert is the model's distribution scaled plus a sparse part: at each order of a Witten-Bell chain
    `p_n = a_n·p_{n-1} + c/(C + u)` with `a_n = u/(C + u)`, so a chain is `α·model + Σ_n d_n`, α the product
    of its orders' `a_n` and `d_n` the counts of order n scaled (only the pitches met after that context). So
    `mix` is one dense multiply by `Σ_k w_k·α_k` plus, per matched order, its few counts times the weight of
    the experts that include it; `observe` needs each expert's probability of one pitch, a scalar
    `α_k·model[pitch] + Σ d_n[pitch]`. `_state` finds the matched orders once per context, for both.

    With `timing` (the default), a `TimingCache` adapts step and duration too: `timing(step, duration)` gives
    them for the next note from the model's, and `observe` takes the note's `timing` and the model's
    `model_timing` for it.

    Args:
        memory: how many player notes are counted at most (older ones are forgotten first).
        timing: adapt step and duration as well as pitch.
    """

    def __init__(self, memory: int = 2000, *, timing: bool = True):
        if memory < 1:
            raise ValueError(f"memory = {memory!r} is not valid: expected at least 1 note")
        self.memory = int(memory)
        self._timing = TimingCache(self.memory) if timing else None
        self._pitch_table: dict[tuple, dict[int, int]] = {}     # pitch context (2, 4, 8, 16) -> {pitch: count}
        self._interval_table: dict[tuple, dict[int, int]] = {}  # interval context (3, 7, 15) -> {interval: count}
        # per counted note, oldest first: the pitches before it, the intervals between those, its pitch, and the
        # pitch and interval count rows it was counted in
        self._added: deque = deque()
        self._rows: tuple = ([], [])  # the rows of the current context's suffixes (None: not met), by `_state`
        self._pitches: tuple = ()    # the context: the last MAX_ORDER + 1 pitches played by anyone, oldest first
        self._intervals: tuple = ()  # and the (up to MAX_ORDER) intervals between them
        self._experts = ["model"] + [f"pitch>={m}" for m in MIN_ORDERS] + [f"interval>={m}" for m in INTERVAL_MIN]
        k = len(self._experts) - 1
        self._prior = [[m] + [(1.0 - m) / k] * k for m in MODEL_PRIOR]
        self._weights = [list(row) for row in self._prior]  # one row per matched context length
        self.learned = 0  # player notes counted since the last forget
        self._cache: tuple | None | bool = False  # `_state()` for the current context (False: not computed)

    @property
    def experts(self) -> list[str]:
        return list(self._experts)

    @property
    def weights(self) -> np.ndarray:
        """The mixture weights now [len(BUCKETS), experts]: row b is used when the longest context of the last
        pitches met before in the session is at least BUCKETS[b] notes long (and less than the next edge)."""
        return np.array(self._weights)

    @property
    def counted(self) -> int:
        """Player notes in memory (at most `memory`)."""
        return len(self._added)

    def counts(self) -> dict[str, dict[tuple, dict[int, int]]]:
        """The session's counts (copies): "pitch" maps a context of pitches (2, 4, 8 or 16, oldest first) to
        {pitch: how often it followed}, "interval" a context of intervals (3, 7 or 15) to {interval: count}."""
        return {"pitch": {k: dict(v) for k, v in self._pitch_table.items()},
                "interval": {k: dict(v) for k, v in self._interval_table.items()}}

    @property
    def adapts_timing(self) -> bool:
        return self._timing is not None

    def context(self) -> tuple:
        """The last pitches played (what the experts look up); `set_context` puts it back (undo of fed notes)."""
        return self._pitches

    def save(self) -> tuple:
        """The context (pitches, and the last notes' timing): `restore` puts it back (undo of fed notes)."""
        return self._pitches, self._timing.rhythm if self._timing is not None else ()

    def restore(self, saved: tuple) -> None:
        pitches, rhythm = saved
        self.set_context(pitches)
        if self._timing is not None:
            self._timing.set_rhythm(rhythm)

    def set_context(self, pitches: tuple) -> None:
        self._pitches = tuple(int(p) for p in pitches)[-(MAX_ORDER + 1):]
        self._intervals = tuple(b - a for a, b in zip(self._pitches, self._pitches[1:]))
        self._cache = False
        if self._timing is not None:
            self._timing.set_rhythm(self._timing.rhythm)  # (its look-ups depend on the pitches too)

    def forget(self) -> None:
        """Clear the session memory and the context, and reset the weights to the prior."""
        self._pitch_table.clear()
        self._interval_table.clear()
        self._added.clear()
        self._pitches = ()
        self._intervals = ()
        self._weights = [list(row) for row in self._prior]
        self.learned = 0
        self._cache = False
        if self._timing is not None:
            self._timing.clear()

    def timing(self, step: float, duration: float) -> tuple[float, float]:
        """The (step, duration) to play next, given the model's (unchanged without timing adaptation)."""
        if self._timing is None:
            return step, duration
        return self._timing.predict(self._pitches, step, duration)

    def _state(self) -> tuple | None:
        """(the α of every expert, the levels, the weight row, the levels' entries) for the current context, or None when no
        context was met before (every expert is then the model). A level is one matched order's part of the
        chains that include it: (those experts, the scale c/(C + u) is c times, its counts {symbol: c}, the
        pitch a symbol 0 stands for), so expert k's distribution is α_k·model + Σ scale·c over the levels that
        include k. The weight row is chosen by the longest context of the last pitches met before in the
        session, as pitches or as intervals. Computed once per context: `mix` and the next `observe` share it."""
        if self._cache is not False:
            return self._cache
        history = self._pitches
        size = len(history)
        get = self._pitch_table.get
        prows = [get(history[-n:]) for n in ORDERS if n <= size]
        if size:
            get = self._interval_table.get
            intervals = self._intervals
            irows = [get(intervals[-n:]) for n in _INTERVAL_ORDERS if n < size]
        else:
            irows = []
        self._rows = (prows, irows)
        alphas = [1.0] * (1 + len(MIN_ORDERS) + len(INTERVAL_MIN))
        levels = []
        matched = 0
        alpha = 1.0
        for n, covers, starts in _PITCH_PLAN:
            row = prows[_PITCH_INDEX[n]] if n <= size else None
            if row:
                if not matched:
                    matched = n
                total = sum(row.values())
                escape = ESCAPE * len(row)
                levels.append((covers, alpha / (total + escape), row, 0))
                alpha *= escape / (total + escape)
            if starts is not None:
                alphas[starts] = alpha
        if any(irows):
            shift = history[-1]  # an interval s after the context leads to the pitch shift + s
            alpha = 1.0
            for n, covers, starts in _INTERVAL_PLAN:
                row = irows[_INTERVAL_INDEX[n]] if n <= size else None
                if row:
                    if n > matched:
                        matched = n
                    if shift + min(row) < 0 or shift + max(row) > 127:  # pitches outside 0..127 are left out
                        row = {s: c for s, c in row.items() if 0 <= shift + s < 128}
                    if row:
                        total = sum(row.values())
                        escape = ESCAPE * len(row)
                        levels.append((covers, alpha / (total + escape), row, shift))
                        alpha *= escape / (total + escape)
                if starts is not None:
                    alphas[starts] = alpha
        self._cache = (alphas, levels, _BUCKET_OF[matched], sum([len(level[2]) for level in levels])) if matched \
            else None
        return self._cache

    def expert_probs(self, model_probs: np.ndarray) -> list[np.ndarray]:
        """Each expert's distribution [128] now, in `experts` order (for inspection and tests)."""
        base = np.asarray(model_probs, dtype=np.float64)
        state = self._state()
        if state is None:
            return [base.copy() for _ in self._experts]
        alphas, levels, _, _ = state
        out = [base * a for a in alphas]
        for covers, scale, row, shift in levels:
            for k in covers:
                for symbol, c in row.items():
                    out[k][shift + symbol] += scale * c
        return out

    def mix(self, model_probs: np.ndarray) -> np.ndarray:
        """The adapted distribution [128] (float64, sums to 1) given the model's `model_probs` [128]."""
        state = self._state()
        if state is None:
            return np.asarray(model_probs, dtype=np.float64)
        alphas, levels, bucket, entries = state
        w = self._weights[bucket]
        out = np.multiply(model_probs, sum([wk * a for wk, a in zip(w, alphas)]), dtype=np.float64)
        if entries <= SCALAR_ADDS:  # (an array's item costs about as much as a dozen Python operations)
            for covers, scale, row, shift in levels:
                f = scale * sum([w[k] for k in covers])
                for symbol, c in row.items():
                    out[shift + symbol] += f * c
            return out
        acc: dict[int, float] = {}
        get = acc.get
        for covers, scale, row, shift in levels:
            f = scale * sum([w[k] for k in covers])
            for symbol, c in row.items():
                acc[shift + symbol] = get(shift + symbol, 0.0) + f * c
        out[np.fromiter(acc, np.intp, len(acc))] += np.fromiter(acc.values(), np.float64, len(acc))
        return out

    def observe(self, pitch: int, model_probs: np.ndarray | None, *, learn: bool = True,
                timing: tuple[float, float] | None = None, model_timing: tuple[float, float] | None = None) -> None:
        """Record a played note: `learn` updates weights and counts (a player's note); otherwise context only.

        `model_probs` is the model's distribution for this note (None: the weights are not updated, e.g. for
        the first note after a reset, when the model had nothing to predict from). `timing`: the note's (step,
        duration) in seconds, and `model_timing` the model's prediction of them (None: not updated), for the
        timing adaptation.
        """
        pitch = int(pitch)
        if not 0 <= pitch < 128:
            raise ValueError(f"pitch = {pitch} is not valid: expected a MIDI pitch 0..127")
        history = self._pitches
        intervals = self._intervals
        if self._timing is not None:
            if timing is not None:
                self._timing.observe(history, float(timing[0]), float(timing[1]), model_timing, learn)
            else:
                self._timing.set_rhythm(self._timing.rhythm)  # (the pitch context changes)
        if learn:
            state = self._state()
            if model_probs is not None and state is not None:  # (all experts equal: nothing to learn)
                alphas, levels, bucket, _ = state
                base = float(model_probs[pitch])
                likes = [a * base for a in alphas]
                for covers, scale, row, shift in levels:
                    c = row.get(pitch - shift)
                    if c:
                        m = scale * c
                        for k in covers:
                            likes[k] += m
                w = [wk * (like if like > FLOOR else FLOOR) for wk, like in zip(self._weights[bucket], likes)]
                keep, spread = (1.0 - SHARE) / sum(w), SHARE / len(w)
                self._weights[bucket] = [wk * keep + spread for wk in w]
            prows, irows = self._rows  # (looked up by `_state` for this context)
            counted_p = _add(self._pitch_table, prows, history, ORDERS, pitch)
            counted_i = _add(self._interval_table, irows, intervals, _INTERVAL_ORDERS, pitch - history[-1]) \
                if history else ()
            self._added.append((history, intervals, pitch, counted_p, counted_i))
            if len(self._added) > self.memory:
                old_history, old_intervals, old, old_p, old_i = self._added.popleft()
                _drop(self._pitch_table, old_p, old_history, ORDERS, old)
                if old_history:
                    _drop(self._interval_table, old_i, old_intervals, _INTERVAL_ORDERS, old - old_history[-1])
            self.learned += 1
        if history:
            intervals = (intervals + (pitch - history[-1],))[-MAX_ORDER:]
            self._intervals = intervals
        self._pitches = (history + (pitch,))[-(MAX_ORDER + 1):]
        self._cache = False
