"""Variable-order Markov model of pitch: the classical baseline beside the LSTM.

`improvd eval --baseline markov` reports this model next to the network. It is the Continuator's idea (predict the
next pitch from the longest matching run of previous pitches) made into a proper probability model with
interpolated modified Kneser-Ney smoothing (Chen & Goodman, 1998), over the 128 MIDI pitches.

Terms used below:

- "Order n" conditions on the previous n pitches (order 1 is a bigram model). The model of order n interpolates
  levels 1..n+1, where level m holds the m-grams (a context of m-1 pitches followed by the predicted pitch).
- The top level (m = n+1) uses raw counts c(h, w). Lower levels (m <= n) use continuation counts N1+(. h w): the
  number of distinct pitches seen just before the m-gram, where the start of a sequence counts as one more
  left neighbour (as the <s> padding of SRILM and KenLM does), so that an m-gram seen only at a sequence start
  still counts.
- Each level has three discounts D1, D2, D3+, estimated from that level's count-of-counts n1..n4 as
  Y = n1 / (n1 + 2 n2), Dk = k - (k + 1) Y n(k+1) / nk. When any of them is undefined or outside 0 < Dk <= k
  (tiny or degenerate data), the level uses KenLM's fallback discounts 0.5, 1.0, 1.5.
- p_m(w | h) = (c(h, w) - D(c(h, w))) / c(h, .) + gamma(h) p_(m-1)(w | h'), with
  gamma(h) = (D1 N1(h .) + D2 N2(h .) + D3+ N3+(h .)) / c(h, .) and h' the context without its oldest pitch;
  a context never seen at a level passes the lower level's distribution through unchanged. Level 0 is the
  uniform 1/128 distribution, so every pitch always has a non-zero probability.
- A context shorter than the order (the start of a sequence) uses the levels it can fill: with k < n pitches of
  context the model interpolates levels 1..k+1, all with continuation counts.

One fitted model keeps, for every level, both the raw and the continuation counts, so the model fitted at order
8 also answers exactly as models fitted at orders 1..7 would; `evaluate_orders` fits once and scores all orders.
n-grams are stored as integers (7 bits per pitch, oldest pitch most significant; a 9-gram takes 63 bits of an
int64) in sorted arrays, and scoring looks up whole batches of contexts with `np.searchsorted`.

Measured on a 2-core Xeon (numpy 2.4, Python 3.11): `evaluate_orders` with orders 1..8 and context 25, trained on
1.2 M random-walk notes (12 transpositions of 100 sequences of 1,000 notes; 1.19 M distinct 9-grams) and scoring
20 k notes, took 1.1-1.5 s over several runs, of which fitting took 0.6-1.0 s; the whole timing script peaked at
about 380 MB of memory.

Threads: pure; the main thread of `improvd eval` and of the benches that compare with it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from numbers import Integral

import numpy as np

from improvd.core.notes import NUM_PITCHES

"""Size of the pitch vocabulary: MIDI pitches 0..127."""

MAX_ORDER = 8
"""Highest supported order (previous pitches conditioned on)."""

_BITS = 7  # bits per pitch in an n-gram code
_FALLBACK_DISCOUNTS = np.array([0.0, 0.5, 1.0, 1.5])  # KenLM's --discount_fallback default, index = min(count, 3)
_SCORE_CHUNK_ROWS = 8192  # rows of [rows, 128] float64 distributions held at once while scoring (8 MiB)


class KneserNeyPitchModel:
    """Variable-order Markov model of MIDI pitch with interpolated modified Kneser-Ney smoothing.

    Args:
        order: Number of previous pitches the model conditions on, 1..8.

    Raises:
        ValueError: When `order` is not an integer in 1..8.
    """

    def __init__(self, order: int):
        if isinstance(order, bool) or not isinstance(order, Integral) or not 1 <= order <= MAX_ORDER:
            raise ValueError(f"order must be an integer in range 1..{MAX_ORDER}, got {order!r}")
        self.order = int(order)
        # Per level m (index m, 1..order+1): sorted unique m-gram codes, and their counts.
        self._codes: list[np.ndarray | None] = []
        self._raw_counts: list[np.ndarray | None] = []  # levels 2..order+1
        self._cont_counts: list[np.ndarray | None] = []  # levels 1..order
        self._raw_discounts: list[np.ndarray | None] = []  # [0, D1, D2, D3+] per level
        self._cont_discounts: list[np.ndarray | None] = []
        self._fitted = False

    # ------------------------------------------------------------------ fitting

    def fit(self, sequences: Iterable[np.ndarray]) -> KneserNeyPitchModel:
        """Counts n-grams of every level in one pass over the data, replacing any earlier fit.

        Args:
            sequences: Pitch sequences, each a 1-D integer array of MIDI pitches 0..127 (lists work too). No
                n-gram spans two sequences. Iterated once.

        Returns:
            The model itself.

        Raises:
            ValueError: When a sequence is not 1-D, not integers, has a pitch outside 0..127, or when there are
                no notes at all.
        """
        pitches, seq_ends = _concatenate(sequences, "fit")
        if pitches.size == 0:
            raise ValueError("fit needs at least one note; every sequence given was empty")
        top = self.order + 1
        # Notes from each position to the end of its sequence, inclusive: window [i, i+m) is valid iff >= m.
        remaining = _remaining_in_sequence(seq_ends)
        seq_starts = np.concatenate(([0], seq_ends[:-1]))
        seq_starts = seq_starts[seq_ends > seq_starts]  # non-empty sequences only

        codes: list[np.ndarray | None] = [None] * (top + 1)
        raw: list[np.ndarray | None] = [None] * (top + 1)
        start_codes: list[np.ndarray | None] = [None] * (top + 1)
        window = pitches.copy()  # window[i] = code of pitches[i : i+m] (crossing sequences; masked below)
        for m in range(1, top + 1):
            if m > 1:
                window = (window[:-1] << _BITS) | pitches[m - 1 :]
            valid = remaining[: window.size] >= m
            codes[m], counts = np.unique(window[valid], return_counts=True)
            raw[m] = counts.astype(np.int64)
            starts = seq_starts[remaining[seq_starts] >= m]
            start_codes[m] = np.unique(window[starts])

        cont: list[np.ndarray | None] = [None] * (top + 1)
        for m in range(1, top):
            # Distinct left extensions: each unique (m+1)-gram adds one to its m-gram suffix ...
            suffixes = codes[m + 1] & ((1 << (_BITS * m)) - 1)
            counts = np.bincount(np.searchsorted(codes[m], suffixes), minlength=codes[m].size)
            # ... and a sequence start counts as one more distinct left neighbour.
            counts[np.searchsorted(codes[m], start_codes[m])] += 1
            cont[m] = counts.astype(np.int64)

        self._codes = codes
        self._raw_counts = [None, None] + raw[2:]
        self._cont_counts = cont
        self._raw_discounts = [None, None] + [_modified_kn_discounts(raw[m]) for m in range(2, top + 1)]
        self._cont_discounts = [None] + [_modified_kn_discounts(cont[m]) for m in range(1, top)] + [None]
        self._fitted = True
        return self

    # ------------------------------------------------------------------ queries

    def prob(self, context: Sequence[int], pitch: int) -> float:
        """Probability of the next pitch given the pitches before it.

        Args:
            context: Previous pitches, oldest first, each 0..127; only the last `order` are used, and a shorter
                context (start of a sequence) uses what it has.
            pitch: The next pitch, 0..127.

        Returns:
            P(pitch | context), in (0, 1].

        Raises:
            ValueError: When `pitch` or a context pitch is outside 0..127.
            RuntimeError: When the model has not been fitted.
        """
        _check_pitch(pitch, "pitch")
        return float(self.distribution(context)[int(pitch)])

    def distribution(self, context: Sequence[int]) -> np.ndarray:
        """Distribution of the next pitch given the pitches before it.

        Args:
            context: Previous pitches, oldest first, each 0..127; only the last `order` are used, and a shorter
                context (start of a sequence) uses what it has.

        Returns:
            float64 array [128]: P(pitch | context) for pitches 0..127, every entry > 0, summing to 1.

        Raises:
            ValueError: When a context pitch is outside 0..127.
            RuntimeError: When the model has not been fitted.
        """
        self._check_fitted()
        ctx = [int(_check_pitch(p, "context pitch")) for p in context]
        k = min(self.order, len(ctx))
        ctx = ctx[len(ctx) - k :]
        # Context codes by length: length j is the last j pitches.
        ctx_codes = np.zeros((k + 1, 1), dtype=np.int64)
        for j in range(1, k + 1):
            ctx_codes[j, 0] = ctx_codes[j - 1, 0] | (ctx[-j] << (_BITS * (j - 1)))
        dist = np.full((1, NUM_PITCHES), 1.0 / NUM_PITCHES)
        for m in range(1, k + 2):
            raw_top = m == self.order + 1
            dist = self._interpolate_level(m, raw_top, ctx_codes[m - 1], dist)
        return dist[0]

    def log_loss(self, sequences, context: int = 25) -> tuple[float, float, int]:
        """Scores the model with the evaluation protocol shared with the LSTM.

        Every note that has at least `context` notes before it in its sequence is predicted from exactly those
        `context` notes (the model uses the last `order` of them).

        Args:
            sequences: Pitch sequences, each a 1-D integer array of MIDI pitches 0..127.
            context: Notes of context each prediction is given, >= 0.

        Returns:
            (mean cross-entropy in nats/note, top-1 accuracy as a fraction 0..1, number of notes predicted).

        Raises:
            ValueError: When `context` is negative, a sequence is invalid, or no note has `context` notes
                before it.
            RuntimeError: When the model has not been fitted.
        """
        return self._score(sequences, context, [self.order])[self.order]

    # ------------------------------------------------------------------ internals

    def _check_fitted(self) -> None:
        if not self._fitted:
            raise RuntimeError("KneserNeyPitchModel is not fitted; call fit() first")

    def _interpolate_level(self, m: int, raw_top: bool, ctx_codes: np.ndarray, lower: np.ndarray) -> np.ndarray:
        """Applies level m on top of the lower levels' distributions, for a batch of contexts.

        Args:
            m: Level, 1..order+1: the contexts hold m-1 pitches.
            raw_top: Use raw counts (the top level of the order scored) rather than continuation counts.
            ctx_codes: int64 [rows]: codes of the m-1 pitch contexts.
            lower: float64 [rows, 128]: distributions from levels 0..m-1; not modified.

        Returns:
            float64 [rows, 128]: distributions from levels 0..m.
        """
        codes = self._codes[m]
        counts = (self._raw_counts if raw_top else self._cont_counts)[m]
        discounts = (self._raw_discounts if raw_top else self._cont_discounts)[m]
        rows = ctx_codes.size
        first = np.searchsorted(codes, ctx_codes << _BITS)
        # (ctx << 7) | 127, not (ctx + 1) << 7: the latter overflows int64 for eight pitches of 127.
        last = np.searchsorted(codes, (ctx_codes << _BITS) | (NUM_PITCHES - 1), side="right")
        lengths = last - first
        total_entries = int(lengths.sum())
        if total_entries == 0:
            return lower
        row_of = np.repeat(np.arange(rows), lengths)
        offsets = np.cumsum(lengths) - lengths
        idx = np.arange(total_entries) - np.repeat(offsets - first, lengths)
        entry_counts = counts[idx]
        entry_discounts = discounts[np.minimum(entry_counts, 3)]
        row_total = np.bincount(row_of, weights=entry_counts, minlength=rows)
        row_discount = np.bincount(row_of, weights=entry_discounts, minlength=rows)
        seen = row_total > 0
        gamma = np.ones(rows)
        gamma[seen] = row_discount[seen] / row_total[seen]
        dist = lower * gamma[:, None]
        dist[row_of, codes[idx] & (NUM_PITCHES - 1)] += (entry_counts - entry_discounts) / row_total[row_of]
        return dist

    def _score(self, sequences, context: int, orders: Sequence[int]) -> dict[int, tuple[float, float, int]]:
        """Scores several orders (each <= self.order) in one pass; see `log_loss` for the protocol.

        Levels below the top use the same continuation counts for every order, so the distributions of levels
        0..m are computed once and each order adds only its raw top level.

        Returns:
            {order: (mean cross-entropy in nats/note, top-1 accuracy, notes predicted)}.
        """
        self._check_fitted()
        if isinstance(context, bool) or not isinstance(context, Integral) or context < 0:
            raise ValueError(f"context must be an integer >= 0 (notes), got {context!r}")
        for n in orders:
            if not 1 <= n <= self.order:
                raise ValueError(f"order to score must be in range 1..{self.order}, got {n!r}")
        pitches, seq_ends = _concatenate(sequences, "log_loss")
        first_of_seq = np.repeat(np.concatenate(([0], seq_ends[:-1])), np.diff(seq_ends, prepend=0))
        targets = np.flatnonzero(np.arange(pitches.size) - first_of_seq >= context)
        if targets.size == 0:
            raise ValueError(f"no note has at least {context} notes before it in its sequence; nothing to score")

        used = {n: min(n, context) for n in orders}  # pitches of context each order actually uses
        # Highest continuation level needed: n for a full context (raw level n+1 goes on top), used+1 otherwise.
        last_cont = max(n if used[n] == n else used[n] + 1 for n in orders)
        neg_log = dict.fromkeys(orders, 0.0)
        correct = dict.fromkeys(orders, 0)
        for chunk_start in range(0, targets.size, _SCORE_CHUNK_ROWS):
            pos = targets[chunk_start : chunk_start + _SCORE_CHUNK_ROWS]
            truth = pitches[pos]
            # ctx_codes[j]: codes of the last j pitches before each target.
            ctx_codes = np.zeros((max(used.values()) + 1, pos.size), dtype=np.int64)
            for j in range(1, ctx_codes.shape[0]):
                ctx_codes[j] = ctx_codes[j - 1] | (pitches[pos - j] << (_BITS * (j - 1)))
            dist = np.full((pos.size, NUM_PITCHES), 1.0 / NUM_PITCHES)  # levels 0..m, continuation counts
            for m in range(last_cont + 1):
                for n in orders:
                    if used[n] == n == m:
                        top = self._interpolate_level(m + 1, True, ctx_codes[m], dist)
                        self._tally(top, truth, n, neg_log, correct)
                    elif used[n] < n and used[n] + 1 == m:
                        self._tally(dist, truth, n, neg_log, correct)
                if m < last_cont:
                    dist = self._interpolate_level(m + 1, False, ctx_codes[m], dist)
        notes = int(targets.size)
        return {n: (neg_log[n] / notes, correct[n] / notes, notes) for n in orders}

    @staticmethod
    def _tally(dist: np.ndarray, truth: np.ndarray, n: int, neg_log: dict, correct: dict) -> None:
        neg_log[n] += float(-np.log(dist[np.arange(truth.size), truth]).sum())
        correct[n] += int((dist.argmax(axis=1) == truth).sum())


def transpose_sequences(sequences, shifts: Iterable[int]) -> list[np.ndarray]:
    """Every sequence transposed by every shift, dropping any copy that leaves the MIDI range.

    Args:
        sequences: Pitch sequences, each a 1-D integer array of MIDI pitches.
        shifts: Transpositions in semitones (0 keeps the original).

    Returns:
        For each sequence in order, its copies shifted by each shift in order, keeping only copies whose every
        pitch is in 0..127. Each copy has its sequence's dtype.

    Raises:
        ValueError: When a sequence is not a 1-D integer array or a shift is not an integer.
    """
    shift_list = list(shifts)
    for shift in shift_list:
        if isinstance(shift, bool) or not isinstance(shift, Integral):
            raise ValueError(f"shifts must be integers (semitones), got {shift!r}")
    out = []
    for i, seq in enumerate(sequences):
        arr = _as_pitch_array(seq, i, "transpose_sequences", check_range=False)
        if arr.size == 0:
            out.extend(arr.copy() for _ in shift_list)
            continue
        low, high = int(arr.min()), int(arr.max())
        wide = arr.astype(np.int64)
        for shift in shift_list:
            if 0 <= low + shift and high + shift < NUM_PITCHES:
                out.append((wide + int(shift)).astype(arr.dtype))
    return out


def evaluate_orders(train_seqs, eval_seqs, orders=range(1, MAX_ORDER + 1), context: int = 25) -> dict:
    """Fits one model at the highest order and scores it at every order asked for.

    Args:
        train_seqs: Training pitch sequences, each a 1-D integer array of MIDI pitches 0..127.
        eval_seqs: Evaluation pitch sequences, same format.
        orders: Orders to score, each 1..8.
        context: Notes of context each prediction is given (see `KneserNeyPitchModel.log_loss`).

    Returns:
        {"orders": {n: {"cross_entropy": nats/note, "accuracy": fraction 0..1, "notes": count}},
        "best_order": the order with the lowest cross-entropy (the lowest such order on a tie),
        "cross_entropy", "accuracy", "notes": those of the best order}.

    Raises:
        ValueError: When `orders` is empty or holds an order outside 1..8, or as `fit` and `log_loss` do.
    """
    order_list = sorted(set(orders))
    if not order_list:
        raise ValueError("orders must name at least one order in range 1..8, got none")
    for n in order_list:
        if isinstance(n, bool) or not isinstance(n, Integral) or not 1 <= n <= MAX_ORDER:
            raise ValueError(f"orders must be integers in range 1..{MAX_ORDER}, got {n!r}")
    model = KneserNeyPitchModel(max(order_list)).fit(train_seqs)
    scores = model._score(eval_seqs, context, order_list)
    per_order = {
        n: {"cross_entropy": ce, "accuracy": acc, "notes": notes} for n, (ce, acc, notes) in scores.items()
    }
    best = min(order_list, key=lambda n: (per_order[n]["cross_entropy"], n))
    return {"orders": per_order, "best_order": best, **per_order[best]}


# ---------------------------------------------------------------------- helpers


def _modified_kn_discounts(counts: np.ndarray) -> np.ndarray:
    """Modified Kneser-Ney discounts of one level from its count-of-counts (Chen & Goodman, 1998).

    Args:
        counts: int64 [entries]: the level's counts (raw or continuation), all >= 1.

    Returns:
        float64 [4]: [0, D1, D2, D3+], indexable by min(count, 3); KenLM's fallback [0, 0.5, 1.0, 1.5] when an
        estimate is undefined or outside 0 < Dk <= k.
    """
    n = np.bincount(np.minimum(counts, 5), minlength=6)[1:5].astype(np.float64)  # n1..n4
    if n[0] == 0 or n[1] == 0 or n[2] == 0:
        return _FALLBACK_DISCOUNTS.copy()
    y = n[0] / (n[0] + 2.0 * n[1])
    d = np.array([0.0] + [k - (k + 1) * y * n[k] / n[k - 1] for k in (1, 2, 3)])
    if not all(0.0 < d[k] <= k for k in (1, 2, 3)):
        return _FALLBACK_DISCOUNTS.copy()
    return d


def _check_pitch(pitch, what: str):
    if isinstance(pitch, bool) or not isinstance(pitch, Integral) or not 0 <= pitch < NUM_PITCHES:
        raise ValueError(f"{what} must be an integer in range 0..{NUM_PITCHES - 1}, got {pitch!r}")
    return pitch


def _as_pitch_array(seq, index: int, caller: str, check_range: bool = True) -> np.ndarray:
    arr = np.asarray(seq)
    if arr.ndim != 1:
        raise ValueError(f"{caller}: sequence {index} must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        return arr.astype(np.int64) if arr.dtype.kind not in "iu" else arr
    if arr.dtype.kind not in "iu":
        raise ValueError(f"{caller}: sequence {index} must hold integer pitches, got dtype {arr.dtype}")
    if check_range:
        low, high = int(arr.min()), int(arr.max())
        if low < 0 or high >= NUM_PITCHES:
            bad = low if low < 0 else high
            raise ValueError(f"{caller}: sequence {index} has pitch {bad}, outside range 0..{NUM_PITCHES - 1}")
    return arr


def _concatenate(sequences, caller: str) -> tuple[np.ndarray, np.ndarray]:
    """All sequences as one int64 array, and the end index (exclusive) of each sequence in it."""
    arrays = [_as_pitch_array(seq, i, caller) for i, seq in enumerate(sequences)]
    if not arrays:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    pitches = np.concatenate(arrays).astype(np.int64, copy=False)
    seq_ends = np.cumsum([a.size for a in arrays], dtype=np.int64)
    return pitches, seq_ends


def _remaining_in_sequence(seq_ends: np.ndarray) -> np.ndarray:
    """For each position of the concatenated sequences, the notes from it to its sequence's end, inclusive."""
    if seq_ends.size == 0:
        return np.zeros(0, dtype=np.int64)
    lengths = np.diff(seq_ends, prepend=0)
    ends = np.repeat(seq_ends, lengths)
    return ends - np.arange(int(seq_ends[-1]))
