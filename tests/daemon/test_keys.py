"""Keys: parsing, Krumhansl-Schmuckler estimation, scale masks, and the key in pitch decoding."""

import numpy as np
import pytest

from harness.band import C_MAJOR
from improvd.daemon.music.keys import KK_MAJOR, KK_MINOR, SCALES, Key, check_key_setting, estimate_key, parse_key, scale_mask
from improvd.daemon.predict.sampling import Decoding, choose_pitch, key_penalty
from improvd.core.config import ImproviseConfig



@pytest.mark.parametrize("text, key", [
    ("C major", Key(0, "major")), ("D minor", Key(2, "minor")), ("F# major", Key(6, "major")),
    ("Bb minor", Key(10, "minor")), ("bb minor", Key(10, "minor")), ("  eb   MAJOR ", Key(3, "major")),
    ("C♯ minor", Key(1, "minor")), ("E♭ major", Key(3, "major")), ("Cb major", Key(11, "major")),
    ("B# minor", Key(0, "minor")), ("d dorian", Key(2, "dorian")), ("A harmonic minor", Key(9, "harmonic minor")),
    ("G maj", Key(7, "major")), ("A aeolian", Key(9, "minor")), ("none", None), ("None", None),
])
def test_parse_key(text, key):
    assert parse_key(text) == key


@pytest.mark.parametrize("text", ["H major", "C", "C majr", "C# # major", "Cx major", "", "major", "auto", "7 minor"])
def test_parse_errors_name_the_value_and_list_the_forms(text):
    with pytest.raises(ValueError) as info:
        parse_key(text)
    message = str(info.value)
    assert repr(text) in message
    assert '"C major"' in message and '"none"' in message and '"auto"' in message and "dorian" in message


def test_check_key_setting_accepts_auto_and_none():
    for text in ("auto", "AUTO", "none", "D minor"):
        check_key_setting(text)
    with pytest.raises(ValueError, match="'Q minor'"):
        check_key_setting("Q minor")


def test_key_pitch_classes_and_names():
    assert set(Key(0, "major").pitch_classes) == C_MAJOR
    assert Key(2, "minor").pitch_classes == (0, 2, 4, 5, 7, 9, 10)  # D E F G A Bb C
    assert str(Key(10, "minor")) == "Bb minor" and str(Key(6, "major")) == "F# major"
    assert all(len(set(v)) == len(v) and v[0] == 0 for v in SCALES.values())


def test_scale_mask():
    mask = scale_mask(Key(0, "major").pitch_classes)
    assert mask.shape == (128,) and mask[60] and not mask[61] and mask[71] and not mask[70]
    assert mask.sum() == sum(1 for p in range(128) if p % 12 in C_MAJOR)


def _scale_notes(key: Key, rng, n=48):
    """A random melody in `key`: scale notes, the tonic triad more often (weights from the key's own profile)."""
    profile = np.roll(KK_MAJOR if key.scale == "major" else KK_MINOR, key.tonic)
    pcs = np.array(key.pitch_classes)
    weights = profile[pcs] ** 2
    chosen = rng.choice(pcs, size=n, p=weights / weights.sum())
    return 60 + chosen, np.full(n, 0.25)


@pytest.mark.parametrize("key", [Key(t, m) for t in range(12) for m in ("major", "minor")])
def test_krumhansl_schmuckler_finds_the_key_of_a_melody(key):
    # A melody of the scale's notes, each as often as the key's profile says (rounded): the tonic triad stands out.
    profile = np.roll(KK_MAJOR if key.scale == "major" else KK_MINOR, key.tonic)
    pitches = [55 + (pc - 7) % 12 for pc in key.pitch_classes for _ in range(int(round(profile[pc])))]
    assert estimate_key(pitches, np.full(len(pitches), 0.3)) == key
    assert estimate_key(pitches[::-1]) == key  # order does not matter; unweighted works too


def test_krumhansl_schmuckler_on_random_melodies():
    hits = 0
    for seed in range(10):
        for key in [Key(t, m) for t in range(12) for m in ("major", "minor")]:
            pitches, durations = _scale_notes(key, np.random.default_rng(seed))
            hits += estimate_key(pitches, durations) == key
    assert hits / 240 >= 0.93  # the rest are mostly the relative or a neighbouring key, as with any listener


def test_estimate_needs_enough_notes():
    assert estimate_key([60, 62]) is None
    assert estimate_key([60, 60, 72, 48]) is None  # one pitch class
    assert estimate_key([60, 64, 67, 72, 76]) == Key(0, "major")
    # C major scale up and down: C major, not A minor or G major
    assert estimate_key([60, 62, 64, 65, 67, 69, 71, 72, 71, 69, 67, 65, 64, 62, 60]) == Key(0, "major")


def test_key_penalty():
    assert key_penalty(None, 1.0) is None and key_penalty(C_MAJOR, 0.0) is None
    full = key_penalty(C_MAJOR, 1.0)
    assert full[60] == 0 and full[61] == -np.inf
    half = key_penalty(C_MAJOR, 0.5)
    assert half[61] == pytest.approx(np.log(0.5)) and half[62] == 0


def test_strength_1_never_leaves_the_scale_sampled_or_greedy():
    rng = np.random.default_rng(0)
    for _ in range(200):
        logits = rng.normal(0, 3, 128)
        logits[61] = 50.0  # the model wants C#4 above all
        assert choose_pitch(logits, 0.0, 1.0, (21, 108), None, scale_pcs=C_MAJOR, key_strength=1.0) % 12 in C_MAJOR
        p = choose_pitch(logits, 1.0, 1.0, (21, 108), rng, scale_pcs=C_MAJOR, key_strength=1.0)
        assert p % 12 in C_MAJOR and 21 <= p <= 108
    logits = np.zeros(128)
    logits[61] = 50.0
    assert choose_pitch(logits, 0.0, 1.0, (0, 127), None, scale_pcs=C_MAJOR, key_strength=0.99) == 61
    assert choose_pitch(logits, 0.0, 1.0, (0, 127), None, scale_pcs=C_MAJOR, key_strength=1.0) != 61


def test_strength_in_between_multiplies_out_of_scale_probability():
    logits = np.full(128, -np.inf)
    logits[60] = logits[61] = 0.0  # C and C#: equally likely without a key
    rng = np.random.default_rng(1)
    n = 4000
    c_sharp = sum(choose_pitch(logits, 1.0, 1.0, (0, 127), rng, scale_pcs=C_MAJOR, key_strength=0.75) == 61
                  for _ in range(n)) / n
    assert c_sharp == pytest.approx(0.25 / 1.25, abs=0.03)  # 1 : (1 - 0.75)


def test_key_outside_the_range_falls_back_to_the_range():
    logits = np.zeros(128)
    assert choose_pitch(logits, 0.0, 1.0, (61, 61), None, scale_pcs=C_MAJOR, key_strength=1.0) == 61
    logits = np.full(128, -np.inf)
    logits[61] = 1.0  # the model gives every scale pitch -inf: the scale pitches in range, uniformly
    assert choose_pitch(logits, 1.0, 1.0, (60, 62), np.random.default_rng(0), scale_pcs=C_MAJOR,
                        key_strength=1.0) in (60, 62)


def test_decoding_from_config_reads_the_key():
    d = Decoding.from_config(ImproviseConfig(key="D minor", key_strength=0.6))
    assert d.scale_pcs == (0, 2, 4, 5, 7, 9, 10) and d.key_strength == 0.6
    d = Decoding.from_config(ImproviseConfig(key="auto"), scale_pcs=(0, 2, 4, 5, 7, 9, 11))
    assert d.scale_pcs == (0, 2, 4, 5, 7, 9, 11) and d.key_strength == 1.0
    assert Decoding.from_config(ImproviseConfig(key="auto")).scale_pcs is None
    assert Decoding.from_config(ImproviseConfig()).scale_pcs is None
    with pytest.raises(ValueError, match="key_strength"):
        Decoding(key_strength=1.5)
