import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from improvd.core.config import ImproviseConfig
from improvd.daemon.predict.sampling import Decoding, choose_pitch, choose_velocity, clamp, decode, log_softmax


def test_log_softmax_matches_definition():
    x = np.array([[1.0, 2.0, 3.0], [1000.0, 1000.0, -np.inf]])
    out = log_softmax(x)
    np.testing.assert_allclose(np.exp(out).sum(axis=1), [1.0, 1.0])
    np.testing.assert_allclose(out[0], x[0] - np.log(np.exp(x[0]).sum()))
    np.testing.assert_allclose(out[1, :2], np.log([0.5, 0.5]))
    assert out[1, 2] == -np.inf


def test_greedy_is_argmax_within_range():
    logits = np.zeros(128)
    logits[10] = 9.0  # outside the range: never chosen
    logits[60] = 5.0
    logits[61] = 4.0
    assert choose_pitch(logits, 0.0, 0.9, (0, 127), None) == 10
    assert choose_pitch(logits, 0.0, 0.9, (21, 108), None) == 60
    assert choose_pitch(logits, 0.0, 0.9, (61, 61), None) == 61


def test_greedy_tie_takes_lowest_and_all_masked_is_uniform_in_range():
    assert choose_pitch(np.zeros(128), 0, 1.0, (40, 50), None) == 40
    logits = np.full(128, -np.inf)
    logits[5] = 1.0
    assert choose_pitch(logits, 0, 1.0, (40, 50), None) == 40


def test_sampling_is_deterministic_with_seed_and_respects_range():
    logits = np.random.default_rng(0).normal(0, 2, 128)
    a = [choose_pitch(logits, 1.0, 0.95, (30, 90), np.random.default_rng(7)) for _ in range(5)]
    rng1, rng2 = np.random.default_rng(11), np.random.default_rng(11)
    seq1 = [choose_pitch(logits, 1.0, 0.95, (30, 90), rng1) for _ in range(200)]
    seq2 = [choose_pitch(logits, 1.0, 0.95, (30, 90), rng2) for _ in range(200)]
    assert seq1 == seq2
    assert len(set(a)) == 1
    assert all(30 <= p <= 90 for p in seq1)
    assert len(set(seq1)) > 3


def test_top_p_keeps_the_nucleus():
    logits = np.full(128, -np.inf)
    logits[[60, 62, 64, 65]] = np.log([0.5, 0.3, 0.15, 0.05])
    rng = np.random.default_rng(0)
    drawn = {choose_pitch(logits, 1.0, 0.8, (0, 127), rng) for _ in range(500)}
    assert drawn == {60, 62}  # 0.5 + 0.3 reaches 0.8
    drawn = {choose_pitch(logits, 1.0, 0.81, (0, 127), rng) for _ in range(500)}
    assert drawn == {60, 62, 64}
    drawn = {choose_pitch(logits, 1.0, 0.01, (0, 127), rng) for _ in range(50)}
    assert drawn == {60}


def test_sampling_frequencies_follow_temperature():
    logits = np.full(128, -np.inf)
    logits[[60, 61]] = [np.log(0.75), np.log(0.25)]
    rng = np.random.default_rng(1)
    n = 4000
    hits = sum(choose_pitch(logits, 1.0, 1.0, (0, 127), rng) == 60 for _ in range(n)) / n
    assert abs(hits - 0.75) < 0.03
    hot = sum(choose_pitch(logits, 100.0, 1.0, (0, 127), rng) == 60 for _ in range(n)) / n
    assert abs(hot - 0.5) < 0.04


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-50, 50), min_size=128, max_size=128), st.floats(0.05, 5), st.floats(0.01, 1.0),
       st.integers(0, 127), st.integers(0, 127), st.integers(0, 2**32 - 1))
def test_pitch_always_in_range(logits, temperature, top_p, a, b, seed):
    lo, hi = min(a, b), max(a, b)
    p = choose_pitch(np.array(logits), temperature, top_p, (lo, hi), np.random.default_rng(seed))
    assert lo <= p <= hi


def test_clamp():
    assert clamp(-0.5, (0.0, 2.0)) == 0.0
    assert clamp(3.0, (0.0, 2.0)) == 2.0
    assert clamp(np.float32(0.25), (0.0, 2.0)) == pytest.approx(0.25)
    assert clamp(float("nan"), (0.03, 4.0)) == 0.03


def test_velocity_policies():
    assert choose_velocity("fixed", model_velocity=10, player_velocity=20, fixed_velocity=90) == 90
    assert choose_velocity("follow", model_velocity=10, player_velocity=20.4, fixed_velocity=90) == 20
    assert choose_velocity("follow", model_velocity=10, player_velocity=None, fixed_velocity=90) == 90
    assert choose_velocity("model", model_velocity=130.0, player_velocity=20, fixed_velocity=90) == 127
    assert choose_velocity("model", model_velocity=None, player_velocity=20, fixed_velocity=90) == 20
    assert choose_velocity("model", model_velocity=0.1, player_velocity=None, fixed_velocity=90) == 1
    with pytest.raises(ValueError, match="velocity policy"):
        choose_velocity("loud", model_velocity=None, player_velocity=None, fixed_velocity=90)


def test_decoding_from_config_and_checks():
    cfg = ImproviseConfig(temperature=0.0, top_p=0.5, pitch_range=(40, 80), step_range=(0.05, 1.0),
                          duration_range=(0.1, 2.0), velocity="fixed", fixed_velocity=70)
    d = Decoding.from_config(cfg)
    assert d == Decoding(0.0, 0.5, (40, 80), (0.05, 1.0), (0.1, 2.0), "fixed", 70)
    assert Decoding.from_config(cfg, temperature=1.5).temperature == 1.5
    with pytest.raises(ValueError, match="top_p"):
        Decoding(top_p=0.0)
    with pytest.raises(ValueError, match="pitch_range"):
        Decoding(pitch_range=(90, 10))


def test_decode_greedy_row():
    logits = np.zeros(128)
    logits[100] = 3
    logits[70] = 2
    d = Decoding(temperature=0, pitch_range=(21, 90), step_range=(0.0, 0.5), duration_range=(0.05, 1.0),
                 velocity="model")
    row = decode(logits, np.float32(0.7), np.float32(0.01), 33.4, d, None)
    np.testing.assert_array_equal(row, [70, 0.5, 0.05, 33])
