"""Tests for the Kneser-Ney pitch model baseline (train/markov.py)."""

import itertools
import math
from collections import Counter, defaultdict

import numpy as np
import pytest

from improvd.train.markov import KneserNeyPitchModel, evaluate_orders, transpose_sequences

A, B, C, D = 60, 62, 64, 65


def random_walks(seed, count, length, low=50, high=70):
    """Random-walk pitch sequences, steps -2..2 semitones, reflected into low..high."""
    rng = np.random.default_rng(seed)
    seqs = []
    for _ in range(count):
        steps = rng.integers(-2, 3, size=length)
        pitch = int(rng.integers(low, high + 1))
        seq = np.empty(length, dtype=np.int64)
        for i, step in enumerate(steps):
            pitch = min(max(pitch + int(step), low), high)
            seq[i] = pitch
        seqs.append(seq)
    return seqs


def reference_distribution(sequences, order, context):
    """A slow, dict-based interpolated modified Kneser-Ney, written straight from the formulas."""
    raw = Counter()
    left = defaultdict(set)
    for seq in sequences:
        seq = [int(p) for p in seq]
        for m in range(1, order + 2):
            for i in range(len(seq) - m + 1):
                gram = tuple(seq[i : i + m])
                raw[gram] += 1
                left[gram].add(seq[i - 1] if i > 0 else "start")
    cont = {gram: len(ext) for gram, ext in left.items()}

    def discounts(counts):
        n = [sum(1 for c in counts if c == k) for k in range(5)]
        if n[1] == 0 or n[2] == 0 or n[3] == 0:
            return [0.0, 0.5, 1.0, 1.5]
        y = n[1] / (n[1] + 2 * n[2])
        d = [0.0] + [k - (k + 1) * y * n[k + 1] / n[k] for k in (1, 2, 3)]
        return d if all(0 < d[k] <= k for k in (1, 2, 3)) else [0.0, 0.5, 1.0, 1.5]

    def level_counts(m, use_raw):
        table = raw if use_raw else cont
        return {g: c for g, c in table.items() if len(g) == m}

    context = [int(p) for p in context][max(0, len(context) - order) :]
    dist = [1 / 128] * 128
    for m in range(1, len(context) + 2):
        table = level_counts(m, use_raw=(m == order + 1))
        disc = discounts(list(table.values()))
        h = tuple(context[len(context) - (m - 1) :]) if m > 1 else ()
        row = {g[-1]: c for g, c in table.items() if g[:-1] == h}
        total = sum(row.values())
        if total == 0:
            continue
        gamma = sum(disc[min(c, 3)] for c in row.values()) / total
        dist = [gamma * p + (row.get(w, 0) - disc[min(row.get(w, 0), 3)]) / total for w, p in enumerate(dist)]
    return np.array(dist)


@pytest.mark.parametrize("bad", [0, 9, -3, 2.5])
def test_invalid_order_raises_naming_value_and_range(bad):
    with pytest.raises(ValueError) as err:
        KneserNeyPitchModel(bad)
    assert str(bad) in str(err.value)
    assert "1..8" in str(err.value)


def test_bigram_matches_hand_computed_modified_kneser_ney():
    # Sequence a b a b a b a b c a c a d.
    # Bigram raw counts: ab 4, ba 3, ca 2, bc 1, ac 1, ad 1 -> n1=3 n2=1 n3=1 n4=1,
    #   Y = 3/5, D1 = 1 - 2Y/3 = 0.6, D2 = 2 - 3Y = 0.2, D3+ = 3 - 4Y = 0.6.
    # Unigram continuation counts (distinct left neighbours, sequence start counts as one):
    #   a {start, b, c} 3, b {a} 1, c {b, a} 2, d {a} 1 -> n1=2 n2=1 n3=1 n4=0,
    #   Y = 1/2, D1 = 0.5, D2 = 2 - 1.5 = 0.5, D3+ = 3 - 0 = 3; total 7, gamma = (3 + .5 + .5 + .5)/7 = 4.5/7.
    model = KneserNeyPitchModel(1).fit([np.array([A, B, A, B, A, B, A, B, C, A, C, A, D])])
    uniform_part = 4.5 / 7 / 128
    p1 = {A: 0.0 + uniform_part, B: 0.5 / 7 + uniform_part, C: 1.5 / 7 + uniform_part, D: 0.5 / 7 + uniform_part}
    p1_other = uniform_part
    # After a: b 4, c 1, d 1 (total 6), gamma = 3 * 0.6 / 6 = 0.3.
    assert model.prob([A], B) == pytest.approx((4 - 0.6) / 6 + 0.3 * p1[B], rel=1e-12)
    assert model.prob([A], C) == pytest.approx((1 - 0.6) / 6 + 0.3 * p1[C], rel=1e-12)
    assert model.prob([A], A) == pytest.approx(0.3 * p1[A], rel=1e-12)
    assert model.prob([A], 0) == pytest.approx(0.3 * p1_other, rel=1e-12)
    # After c: a 2 (total 2), gamma = 0.2 / 2 = 0.1.
    assert model.prob([C], A) == pytest.approx((2 - 0.2) / 2 + 0.1 * p1[A], rel=1e-12)
    # d is never followed, 100 never seen, and the empty context: all fall through to the unigram level.
    for context in ([D], [100], []):
        for pitch in (A, B, C, D, 0):
            assert model.prob(context, pitch) == pytest.approx(p1.get(pitch, p1_other), rel=1e-12)


def test_degenerate_count_of_counts_use_fallback_discounts():
    # One bigram a->b (count 1, no count 2): discounts fall back to 0.5, 1, 1.5 at both levels.
    # Unigram continuation counts: a {start} 1, b {a} 1, total 2, gamma = 2 * 0.5 / 2 = 0.5.
    model = KneserNeyPitchModel(1).fit([np.array([A, B])])
    p1_b = 0.5 / 2 + 0.5 / 128
    assert model.prob([], B) == pytest.approx(p1_b, rel=1e-12)
    assert model.prob([A], B) == pytest.approx(0.5 + 0.5 * p1_b, rel=1e-12)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_matches_reference_implementation(order):
    train = random_walks(seed=order, count=3, length=80, low=58, high=66)
    model = KneserNeyPitchModel(order).fit(train)
    contexts = [[], [62], [0], [58, 66], [0, 62], [61, 62, 63], [66, 66, 66, 66], [70, 1, 62]]
    contexts += [list(train[0][i : i + order]) for i in range(0, 60, 7)]
    for context in contexts:
        np.testing.assert_allclose(
            model.distribution(context), reference_distribution(train, order, context), rtol=1e-10, atol=1e-15
        )


def test_distribution_sums_to_one_for_seen_and_unseen_contexts_at_every_order():
    train = random_walks(seed=1, count=5, length=200)
    for order in range(1, 9):
        model = KneserNeyPitchModel(order).fit(train)
        seen = [list(train[0][i : i + 10]) for i in (0, 50, 150)]
        unseen = [[0, 1, 2, 3, 4, 5, 6, 7, 8], [127], [], [50, 70, 50, 70, 50, 70, 50, 70]]
        shorter = [list(train[1][:k]) for k in range(order)]
        for context in seen + unseen + shorter:
            dist = model.distribution(context)
            assert dist.shape == (128,) and dist.dtype == np.float64
            assert dist.sum() == pytest.approx(1.0, abs=1e-12)
            assert (dist > 0).all()


def test_unseen_pitch_still_has_nonzero_probability():
    model = KneserNeyPitchModel(3).fit([np.array([A, B, C] * 50)])
    assert 0 < model.prob([C, A, B], 0) < 1e-3
    assert 0 < model.prob([127, 127, 127], 127)
    assert model.prob([C, A, B], C) > 0.9


def test_highest_pitches_at_order_8_do_not_overflow_codes():
    # Nine 127s make the largest 9-gram code, 2**63 - 1.
    model = KneserNeyPitchModel(8).fit([np.array([127] * 30 + [0])])
    assert model.prob([127] * 8, 127) > 0.9
    assert model.distribution([127] * 8).sum() == pytest.approx(1.0, abs=1e-12)
    ce, acc, notes = model.log_loss([np.array([127] * 20)], context=8)
    assert notes == 12 and acc == 1.0 and ce < 0.1


def test_repeated_pattern_is_learnt_at_order_at_least_its_period():
    # Period 4: after (60, 60) comes 60 or 62, so orders 1 and 2 cannot tell; order 3 and up can.
    pattern = [A, A, A, B]
    train = [np.array(pattern * 200)]
    held_out = [np.array(pattern * 20)]
    result = evaluate_orders(train, held_out, orders=range(1, 9), context=8)
    for order in range(4, 9):
        assert result["orders"][order]["cross_entropy"] < 0.02
        assert result["orders"][order]["accuracy"] == 1.0
    assert result["orders"][1]["cross_entropy"] > 0.4
    assert result["orders"][1]["accuracy"] < 0.8


def test_higher_orders_never_worse_than_unigram_on_the_training_set():
    train = random_walks(seed=2, count=10, length=300)
    notes = np.concatenate([seq[25:] for seq in train])
    freq = np.bincount(notes, minlength=128) / notes.size
    unigram_entropy = float(-np.log(freq[notes]).mean())
    result = evaluate_orders(train, train, orders=range(1, 9), context=25)
    for order in range(1, 9):
        assert result["orders"][order]["cross_entropy"] <= unigram_entropy
        assert result["orders"][order]["cross_entropy"] <= result["orders"][1]["cross_entropy"] + 1e-12


def test_log_loss_scores_exactly_the_notes_with_enough_context():
    train = random_walks(seed=3, count=4, length=100)
    model = KneserNeyPitchModel(3).fit(train)
    lengths = (30, 25, 10, 26, 0)
    eval_seqs = [s[:n] for s, n in zip(random_walks(seed=4, count=5, length=40), lengths)]
    ce, acc, notes = model.log_loss(eval_seqs, context=25)
    assert notes == 5 + 0 + 0 + 1 + 0
    # Batch scoring agrees with one-at-a-time queries, each given exactly the 25 preceding notes.
    losses, hits = [], []
    for seq in eval_seqs:
        for i in range(25, len(seq)):
            dist = model.distribution(list(seq[i - 25 : i]))
            losses.append(-math.log(dist[seq[i]]))
            hits.append(int(np.argmax(dist)) == seq[i])
    assert ce == pytest.approx(np.mean(losses), rel=1e-12)
    assert acc == pytest.approx(np.mean(hits))
    with pytest.raises(ValueError, match="25"):
        model.log_loss([s[:25] for s in eval_seqs], context=25)


def test_context_shorter_than_order_uses_only_that_context():
    train = random_walks(seed=5, count=4, length=100)
    model = KneserNeyPitchModel(5).fit(train)
    eval_seqs = random_walks(seed=6, count=2, length=12)
    ce, _, notes = model.log_loss(eval_seqs, context=2)
    assert notes == 2 * 10
    expected = [-math.log(model.prob(list(s[i - 2 : i]), s[i])) for s in eval_seqs for i in range(2, 12)]
    assert ce == pytest.approx(np.mean(expected), rel=1e-12)


def test_evaluate_orders_matches_separately_fitted_models():
    train = random_walks(seed=7, count=6, length=150)
    held_out = random_walks(seed=8, count=3, length=60)
    result = evaluate_orders(train, held_out, orders=[1, 2, 4, 8], context=10)
    assert set(result["orders"]) == {1, 2, 4, 8}
    for order, scores in result["orders"].items():
        ce, acc, notes = KneserNeyPitchModel(order).fit(train).log_loss(held_out, context=10)
        assert scores["cross_entropy"] == pytest.approx(ce, rel=1e-12)
        assert scores["accuracy"] == pytest.approx(acc)
        assert scores["notes"] == notes == 3 * 50
    best = min(result["orders"], key=lambda n: result["orders"][n]["cross_entropy"])
    assert result["best_order"] == best
    assert result["cross_entropy"] == result["orders"][best]["cross_entropy"]
    assert result["accuracy"] == result["orders"][best]["accuracy"]
    assert result["notes"] == 150


def test_evaluate_orders_rejects_bad_orders():
    train = random_walks(seed=9, count=1, length=50)
    with pytest.raises(ValueError, match="9"):
        evaluate_orders(train, train, orders=[1, 9])
    with pytest.raises(ValueError):
        evaluate_orders(train, train, orders=[])


def test_transpose_sequences_drops_out_of_range_copies():
    low = np.array([0, 5, 10], dtype=np.int16)
    high = np.array([120, 127], dtype=np.int16)
    out = transpose_sequences([low, high], shifts=range(-2, 3))
    expected = [[0, 5, 10], [1, 6, 11], [2, 7, 12], [118, 125], [119, 126], [120, 127]]
    assert [list(s) for s in out] == expected
    assert all(s.dtype == np.int16 for s in out)
    # An unsigned input is shifted down without wrapping around.
    assert [list(s) for s in transpose_sequences([np.array([1, 3], dtype=np.uint8)], [-2, -1])] == [[0, 2]]


def test_fit_rejects_bad_pitches():
    with pytest.raises(ValueError, match="128"):
        KneserNeyPitchModel(2).fit([np.array([60, 128])])
    with pytest.raises(ValueError, match="-1"):
        KneserNeyPitchModel(2).fit([np.array([60]), np.array([-1, 60])])
    with pytest.raises(ValueError, match="integer"):
        KneserNeyPitchModel(2).fit([np.array([60.0, 61.0])])
    with pytest.raises(ValueError):
        KneserNeyPitchModel(2).fit([np.array([], dtype=np.int64)])


def test_queries_check_pitches_and_fit():
    with pytest.raises(RuntimeError, match="fit"):
        KneserNeyPitchModel(2).distribution([60])
    model = KneserNeyPitchModel(2).fit([np.array([60, 62, 64])])
    with pytest.raises(ValueError, match="128"):
        model.prob([60], 128)
    with pytest.raises(ValueError, match="-5"):
        model.distribution([-5, 60])


def test_longer_context_than_order_uses_last_order_pitches():
    model = KneserNeyPitchModel(2).fit(random_walks(seed=10, count=3, length=100))
    for prefix in itertools.product([50, 70, 0], repeat=2):
        np.testing.assert_array_equal(model.distribution([*prefix, 60, 61]), model.distribution([60, 61]))
