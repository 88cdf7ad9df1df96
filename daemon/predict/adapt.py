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
  clears the counts and resets the weights to the prior. Memory is O(memory) (about 3.5 kB a note) and time
  per note O(orders), whatever the session's length. Improvd's own notes extend the context the experts look
  up, but are never counted.

It adapts pitch only; step, duration and velocity come from the model unchanged.

Threads: one at a time (the engine thread in the daemon; `improvd eval --adapt` in the main thread).
"""

from __future__ import annotations

from collections import deque

import numpy as np

ORDERS = (2, 4, 8, 16)     # context lengths (in pitches) that are counted; 16 is the longest
MAX_ORDER = ORDERS[-1]
MIN_ORDERS = (2, 4, 8)     # the pitch experts: one chain starting at each of these context lengths
INTERVAL_SPANS = (4, 8, 16)  # contexts of intervals counted, by the pitches they span (n - 1 intervals)
INTERVAL_MIN = (4,)        # the interval expert: one chain, from 4 pitches (3 intervals) up
BUCKETS = (0, 2, 4, 8, 16)  # the mixture keeps one set of weights per matched context length (0 = none)
MODEL_PRIOR = (0.9, 0.8, 0.7, 0.5, 0.1)  # the model's prior weight per bucket; the experts split the rest
SHARE = 0.01               # fixed share: the part of the weight spread evenly after each note
ESCAPE = 1.0              # Witten-Bell escape weight: the base keeps ESCAPE·u / (C + ESCAPE·u)
FLOOR = 1e-12              # no expert's probability of a note counts as less than this (a log(0) guard)


class _Counts:
    """n-gram counts over one symbol sequence (pitches or intervals) at the given orders, bounded in notes."""

    def __init__(self, orders: tuple[int, ...]):
        self.orders = orders
        self.tables: dict[int, dict[tuple, dict[int, int]]] = {n: {} for n in orders}
        self.added: deque = deque()  # per counted note: the (order, context) keys it added, and the symbol

    def clear(self) -> None:
        for table in self.tables.values():
            table.clear()
        self.added.clear()

    def add(self, history: tuple, symbol: int) -> None:
        """Count `symbol` after each suffix of `history` (the symbols before it, oldest first)."""
        keys = []
        for n in self.orders:
            if n > len(history):
                break
            ctx = history[-n:]
            row = self.tables[n].setdefault(ctx, {})
            row[symbol] = row.get(symbol, 0) + 1
            keys.append((n, ctx))
        self.added.append((keys, symbol))

    def drop_oldest(self) -> None:
        keys, symbol = self.added.popleft()
        for n, ctx in keys:
            table = self.tables[n]
            row = table[ctx]
            row[symbol] -= 1
            if not row[symbol]:
                del row[symbol]
                if not row:
                    del table[ctx]

    def rows(self, history: tuple, span: int = 0) -> dict[int, dict[int, int]]:
        """{order + span: what followed the last `order` symbols of `history`} for the orders met before."""
        out = {}
        for n in self.orders:
            if n > len(history):
                break
            row = self.tables[n].get(history[-n:])
            if row:
                out[n + span] = row
        return out


def _levels(rows: dict[int, dict[int, int]], shift: int, orders: tuple[int, ...], lowest: tuple[int, ...],
            first: int) -> tuple[list[float], list[tuple[list[int], dict[int, float]]]]:
    """The Witten-Bell chains of one kind of expert (one per lowest order in `lowest`, experts `first`,
    `first` + 1, ...), blended up to the longest of `orders`. `rows` maps a context length (in pitches) to the
    counts of what followed it.

    The chain from order m is affine in its base: p_m = α_m·base + Σ_{n >= m} d_n, where d_n is the (sparse)
    mass order n adds. So it is accumulated from the top order down in plain Python (a few continuations per
    order), each d_n once for all the chains that include it, and no dense array is touched. Returns the α of
    each chain and the levels (the experts that include d_n, d_n as pitch -> mass). A row's symbol s stands for
    the pitch s + `shift` (0 for pitches, the last pitch for intervals); pitches outside 0..127 are left out.
    """
    alpha = 1.0
    alphas: dict[int, float] = {}
    levels: list[tuple[list[int], dict[int, float]]] = []
    for n in orders[::-1]:
        row = rows.get(n)
        if row:
            kept = [(s + shift, c) for s, c in row.items() if 0 <= s + shift < 128]
            if kept:
                total = float(sum(c for _, c in kept))
                escape = ESCAPE * len(kept)
                scale = alpha / (total + escape)
                levels.append(([first + j for j, m in enumerate(lowest) if m <= n],
                               {pitch: scale * c for pitch, c in kept}))
                alpha *= escape / (total + escape)
        if n in lowest:
            alphas[n] = alpha
    return [alphas[m] for m in lowest], levels


def _bucket(matched: int) -> int:
    """The weight row used when the last `matched` pitches (and no more) were met before in the session."""
    return sum(matched >= edge for edge in BUCKETS) - 1


def softmax(logits: np.ndarray) -> np.ndarray:
    """The model's pitch distribution from its logits [128] (float64; three array operations, per note)."""
    x = np.asarray(logits, dtype=np.float64)
    e = np.exp(x - x.max())
    e /= e.sum()
    return e


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
        self._pitch = _Counts(ORDERS)
        self._interval = _Counts(tuple(n - 1 for n in INTERVAL_SPANS))
        self._pitches: deque = deque(maxlen=MAX_ORDER + 1)  # the context: last pitches played by anyone
        self._intervals: deque = deque(maxlen=MAX_ORDER)     # and the intervals between them
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
        return len(self._pitch.added)

    def context(self) -> tuple:
        """The last pitches played (what the experts look up); `set_context` puts it back (undo of fed notes)."""
        return tuple(self._pitches)

    def set_context(self, pitches: tuple) -> None:
        self._pitches.clear()
        self._pitches.extend(int(p) for p in pitches)
        self._intervals.clear()
        self._intervals.extend(b - a for a, b in zip(self._pitches, list(self._pitches)[1:]))
        self._cache = False

    def forget(self) -> None:
        """Clear the session memory and the context, and reset the weights to the prior."""
        self._pitch.clear()
        self._interval.clear()
        self._pitches.clear()
        self._weights = [list(row) for row in self._prior]
        self.learned = 0
        self._cache = False

    def _state(self) -> tuple | None:
        """(the α of every expert, the levels, the weight row) for the current context, or None when no
        context was met before (every expert is then the model). Expert k's distribution is
        α_k·model + Σ d over the levels that include k. The weight row is chosen by the longest context of the
        last pitches met before in the session, as pitches or as intervals. Computed once per context: `mix`
        and the next `observe` share it."""
        if self._cache is not False:
            return self._cache
        history = tuple(self._pitches)
        prow = self._pitch.rows(history)
        irow = self._interval.rows(tuple(self._intervals), span=1) if history else {}  # keyed by pitches spanned
        if not prow and not irow:
            self._cache = None
            return None
        pa, plevels = _levels(prow, 0, ORDERS, MIN_ORDERS, 1)
        ia, ilevels = _levels(irow, history[-1] if history else 0, INTERVAL_SPANS, INTERVAL_MIN,
                              1 + len(MIN_ORDERS))
        matched = max(max(prow, default=0), max(irow, default=0))
        self._cache = ([1.0] + pa + ia, plevels + ilevels, _bucket(matched))
        return self._cache

    def expert_probs(self, model_probs: np.ndarray) -> list[np.ndarray]:
        """Each expert's distribution [128] now, in `experts` order (for inspection and tests)."""
        base = np.asarray(model_probs, dtype=np.float64)
        state = self._state()
        if state is None:
            return [base.copy() for _ in self._experts]
        alphas, levels, _ = state
        out = [base * a for a in alphas]
        for covers, mass in levels:
            for k in covers:
                for pitch, m in mass.items():
                    out[k][pitch] += m
        return out

    def mix(self, model_probs: np.ndarray) -> np.ndarray:
        """The adapted distribution [128] (float64, sums to 1) given the model's `model_probs` [128]."""
        state = self._state()
        if state is None:
            return np.asarray(model_probs, dtype=np.float64)
        alphas, levels, bucket = state
        w = self._weights[bucket]
        out = np.asarray(model_probs, dtype=np.float64) * sum(wk * a for wk, a in zip(w, alphas))
        for covers, mass in levels:
            weight = sum(w[k] for k in covers)
            for pitch, m in mass.items():
                out[pitch] += weight * m
        return out

    def observe(self, pitch: int, model_probs: np.ndarray | None, *, learn: bool = True) -> None:
        """Record a played note: `learn` updates weights and counts (a player's note); otherwise context only.

        `model_probs` is the model's distribution for this note (None: the weights are not updated, e.g. for
        the first note after a reset, when the model had nothing to predict from).
        """
        pitch = int(pitch)
        if learn:
            state = self._state()
            if model_probs is not None and state is not None:  # (all experts equal: nothing to learn)
                alphas, levels, bucket = state
                base = float(model_probs[pitch])
                likes = [a * base for a in alphas]
                for covers, mass in levels:
                    m = mass.get(pitch)
                    if m:
                        for k in covers:
                            likes[k] += m
                w = [wk * max(like, FLOOR) for wk, like in zip(self._weights[bucket], likes)]
                keep, spread = (1.0 - SHARE) / sum(w), SHARE / len(w)
                self._weights[bucket] = [wk * keep + spread for wk in w]
            history = tuple(self._pitches)
            self._pitch.add(history, pitch)
            if history:
                self._interval.add(tuple(self._intervals), pitch - history[-1])
            else:
                self._interval.added.append(([], 0))  # keeps the two memories in step
            while len(self._pitch.added) > self.memory:
                self._pitch.drop_oldest()
                self._interval.drop_oldest()
            self.learned += 1
        if self._pitches:
            self._intervals.append(pitch - self._pitches[-1])
        self._pitches.append(pitch)
        self._cache = False
