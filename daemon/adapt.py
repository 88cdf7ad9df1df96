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
  (a motif played again at the same pitch); the `interval` experts count intervals (the same motif transposed).
  Each kind has chains starting at orders 1, 2, 3 and 4 (and going up to `MAX_ORDER`).
- Mixture. The played distribution is `Σ w_k p_k`. The weights are a Bayesian posterior updated after every
  player note from how well each expert predicted it (`w_k ← w_k · p_k(note)`, renormalised), with a small
  fixed share (`SHARE`) of weight redistributed each note so an expert that stopped fitting (the player moved
  on) can come back. The model starts with half the weight (`MODEL_PRIOR`). A Bayesian mixture's total log-loss
  exceeds the best expert's by at most -log(its prior weight) plus the share's cost, so adaptation cannot do much
  worse than the model alone on a player who never repeats anything. Nothing is tuned on evaluation files: the
  constants below are round values.
- Memory. Only the last `memory` player notes are counted (older ones are subtracted as they leave); `forget`
  clears the counts and resets the weights to the prior. Memory and time per note are O(memory) and
  O(orders) regardless of the session's length.

It adapts pitch only; step, duration and velocity come from the model unchanged.

Threads: one at a time (the engine thread in the daemon; `improvd eval --adapt` in the main thread).
"""

from __future__ import annotations

from collections import deque

import numpy as np

ADAPT_CHOICES = ("off", "cache")
MAX_ORDER = 16             # longest context (notes) an expert counts
MIN_ORDERS = (1, 2, 4, 8)  # each kind (pitch, interval) has one chain starting at each of these orders
BUCKETS = (0, 1, 3, 5, 9, 16)  # the mixture keeps one set of weights per range of matched context length
MODEL_PRIOR = (0.9, 0.8, 0.7, 0.5, 0.3, 0.1)  # the model's prior weight per bucket; the experts split the rest
SHARE = 0.01               # fixed share: the part of the weight spread evenly after each note
ESCAPE = 1.0              # Witten-Bell escape weight: the base keeps ESCAPE·u / (C + ESCAPE·u)
FLOOR = 1e-12              # no expert's probability of a note counts as less than this (a log(0) guard)


def _is_pitch(p: int) -> bool:
    return 0 <= p < 128


class _Counts:
    """n-gram counts over one symbol sequence (pitches or intervals), orders 1..MAX_ORDER, bounded in notes."""

    def __init__(self):
        self.tables: list[dict[tuple, dict[int, int]]] = [dict() for _ in range(MAX_ORDER + 1)]
        self.added: deque = deque()  # per counted note: the (order, context, symbol) keys it added

    def clear(self) -> None:
        for table in self.tables:
            table.clear()
        self.added.clear()

    def add(self, history: list[int], symbol: int) -> None:
        """Count `symbol` after each suffix of `history` (the symbols before it, oldest first)."""
        keys = []
        for n in range(1, min(MAX_ORDER, len(history)) + 1):
            ctx = tuple(history[-n:])
            row = self.tables[n].setdefault(ctx, {})
            row[symbol] = row.get(symbol, 0) + 1
            keys.append((n, ctx))
        self.added.append((keys, symbol))

    def drop_oldest(self) -> None:
        keys, symbol = self.added.popleft()
        for n, ctx in keys:
            row = self.tables[n][ctx]
            row[symbol] -= 1
            if not row[symbol]:
                del row[symbol]
                if not row:
                    del self.tables[n][ctx]

    def rows(self, history: list[int]) -> list[dict[int, int] | None]:
        """For n = 0..MAX_ORDER: what followed the last n symbols of `history` (None if never seen; n = 0 unused)."""
        out: list[dict[int, int] | None] = [None]
        for n in range(1, MAX_ORDER + 1):
            out.append(self.tables[n].get(tuple(history[-n:])) if n <= len(history) else None)
        return out


def _experts(base: np.ndarray, rows: list, shift: int, valid) -> list[np.ndarray]:
    """One Witten-Bell chain per lowest order in MIN_ORDERS, blended up to MAX_ORDER over `base`.

    The chain from order m is affine in its base: p = α_m·base + v_m. Accumulated from the top order down
    (sparse, in plain Python: a few continuations per order), each expert then costs one dense product. A row's
    symbol s stands for the pitch s + `shift` (0 for pitches, the last pitch for intervals); `valid` says which
    pitches exist.
    """
    alpha = 1.0
    v: dict[int, float] = {}
    marks: dict[int, tuple[float, dict[int, float]]] = {}
    lowest = min(MIN_ORDERS)
    for n in range(MAX_ORDER, lowest - 1, -1):
        row = rows[n]
        if row:
            kept = [(s + shift, c) for s, c in row.items() if valid(s + shift)]
            if kept:
                total = float(sum(c for _, c in kept))
                escape = ESCAPE * len(kept)
                scale = alpha / (total + escape)
                for pitch, c in kept:
                    v[pitch] = v.get(pitch, 0.0) + scale * c
                alpha *= escape / (total + escape)
        if n in MIN_ORDERS:
            marks[n] = (alpha, dict(v))
    out = []
    for m in MIN_ORDERS:
        a, vm = marks[m]
        if not vm:
            out.append(base)
            continue
        p = base * a
        idx = np.fromiter(vm.keys(), np.int64, len(vm))
        p[idx] += np.fromiter(vm.values(), np.float64, len(vm))
        out.append(p)
    return out


def _bucket(matched: int) -> int:
    """The weight row used when the last `matched` pitches (and no more) were met before in the session."""
    return sum(matched >= edge for edge in BUCKETS) - 1


class SessionAdapter:
    """The session's pitch memory and mixture (see the module docstring).

    Use: `mix(model_probs)` gives the distribution to play from (after the notes `observe`d so far);
    `observe(pitch, model_probs, learn=True)` records a note that was played, with the model's distribution
    for it (what the model predicted just before it): a player's note (`learn=True`) updates the weights and
    the counts, improvd's own note (`learn=False`) only extends the context.

    Args:
        memory: how many player notes are counted at most (older ones are forgotten first).
    """

    def __init__(self, memory: int = 2000):
        if memory < 1:
            raise ValueError(f"memory = {memory!r} is not valid: expected at least 1 note")
        self.memory = int(memory)
        self._pitch = _Counts()
        self._interval = _Counts()
        self._pitches: deque = deque(maxlen=MAX_ORDER + 1)  # the context: last pitches played by anyone
        self._experts = ["model"] + [f"{kind}>={m}" for kind in ("pitch", "interval") for m in MIN_ORDERS]
        k = len(self._experts) - 1
        self._prior = np.array([[m] + [(1.0 - m) / k] * k for m in MODEL_PRIOR])
        self._weights = self._prior.copy()  # one row per matched context length
        self.learned = 0  # player notes counted since the last forget

    @property
    def experts(self) -> list[str]:
        return list(self._experts)

    @property
    def weights(self) -> np.ndarray:
        """The mixture weights now [len(BUCKETS), experts]: row b is used when the longest context of the last
        pitches met before in the session is at least BUCKETS[b] notes long (and less than the next edge)."""
        return self._weights.copy()

    @property
    def counted(self) -> int:
        """Player notes in memory (at most `memory`)."""
        return len(self._pitch.added)

    def context(self) -> tuple:
        """The last pitches played (what the experts look up); `set_context` puts it back (undo of fed notes)."""
        return tuple(self._pitches)

    def set_context(self, pitches: tuple) -> None:
        self._pitches.clear()
        self._pitches.extend(int(p) for p in pitches)

    def forget(self) -> None:
        """Clear the session memory and the context, and reset the weights to the prior."""
        self._pitch.clear()
        self._interval.clear()
        self._pitches.clear()
        self._weights = self._prior.copy()
        self.learned = 0

    def _expert_probs(self, model_probs: np.ndarray) -> tuple[list[np.ndarray], int]:
        """Each expert's distribution, and the weight row (by the longest context of the last pitches that was
        met before in the session, as pitches or as intervals)."""
        history = list(self._pitches)
        base = np.asarray(model_probs, dtype=np.float64)
        prow = self._pitch.rows(history)
        matched = max((n for n in range(1, MAX_ORDER + 1) if prow[n]), default=0)
        out = [base] + _experts(base, prow, 0, _is_pitch)
        if history:
            intervals = [b - a for a, b in zip(history, history[1:])]
            irow = [None] + self._interval.rows(intervals)[:-1]  # index n: the n pitches the intervals span
            matched = max(matched, max((n for n in range(2, MAX_ORDER + 1) if irow[n]), default=0))
            out += _experts(base, irow, history[-1], _is_pitch)
        else:
            out += [base] * len(MIN_ORDERS)
        return out, _bucket(matched)

    def mix(self, model_probs: np.ndarray) -> np.ndarray:
        """The adapted distribution [128] (float64, sums to 1) given the model's `model_probs` [128]."""
        experts, matched = self._expert_probs(model_probs)
        return np.einsum("k,kp->p", self._weights[matched], np.stack(experts))

    def observe(self, pitch: int, model_probs: np.ndarray | None, *, learn: bool = True) -> None:
        """Record a played note: `learn` updates weights and counts (a player's note); otherwise context only.

        `model_probs` is the model's distribution for this note (None: the weights are not updated, e.g. for
        the first note after a reset, when the model had nothing to predict from).
        """
        pitch = int(pitch)
        if learn:
            if model_probs is not None:
                experts, matched = self._expert_probs(model_probs)
                likes = np.array([max(float(p[pitch]), FLOOR) for p in experts])
                w = self._weights[matched] * likes
                w /= w.sum()
                self._weights[matched] = (1.0 - SHARE) * w + SHARE / len(w)
            history = list(self._pitches)
            self._pitch.add(history, pitch)
            if history:
                intervals = [b - a for a, b in zip(history, history[1:])]
                self._interval.add(intervals, pitch - history[-1])
            else:
                self._interval.added.append(([], 0))  # keeps the two memories in step
            while len(self._pitch.added) > self.memory:
                self._pitch.drop_oldest()
                self._interval.drop_oldest()
            self.learned += 1
        self._pitches.append(pitch)
