"""The player's pulse and the time scale (daemon/music/tempo.py)."""

import pytest

from improvd.daemon.music import tempo


def test_reference_ioi_from_config_card_or_default():
    assert tempo.reference_ioi_s({}, 0.0) == tempo.DEFAULT_REFERENCE_IOI_S == 0.5
    assert tempo.reference_ioi_s(None, 0.0) == 0.5
    assert tempo.reference_ioi_s({"data": {"median_ioi_s": 0.3}}, 0.0) == 0.3
    assert tempo.reference_ioi_s({"timing": {"median_ioi_s": 0.25}, "data": {"median_ioi_s": 0.3}}, 0.0) == 0.25
    assert tempo.reference_ioi_s({"data": {"median_ioi_s": 0.3}}, 0.4) == 0.4  # the config wins
    assert tempo.reference_ioi_s({"data": {"files": 3, "median_ioi_s": "x"}}, 0.0) == 0.5
    assert tempo.reference_ioi_s({"data": "random weights"}, 0.0) == 0.5


def test_median_ioi_leaves_out_chords_and_pauses():
    assert tempo.median_ioi_s([0.0, 0.25, 0.5, 0.75]) == pytest.approx(0.25)
    assert tempo.median_ioi_s([0.75, 0.0, 0.5, 0.25]) == pytest.approx(0.25)  # sorted first
    # a chord (0.01) and a pause (3 s) do not count
    assert tempo.median_ioi_s([0.0, 0.01, 0.3, 0.6, 3.6, 3.9]) == pytest.approx(0.3)
    assert tempo.median_ioi_s([1.0]) is None and tempo.median_ioi_s([0.0, 0.0]) is None


def test_time_scale():
    assert tempo.time_scale(0.25, 0.5) == 0.5
    assert tempo.time_scale(1.0, 0.5) == 2.0
    assert tempo.time_scale(10.0, 0.5, (0.25, 4.0)) == 4.0 and tempo.time_scale(0.01, 0.5) == 0.25
    assert tempo.time_scale(None, 0.5, previous=0.7) == 0.7


def test_beat_from_ioi():
    assert tempo.beat_from_ioi(0.5) == 0.5
    assert tempo.beat_from_ioi(0.25) == 0.5 and tempo.beat_from_ioi(0.15) == 0.6
    assert tempo.beat_from_ioi(1.2) == 0.6 and tempo.beat_from_ioi(0.8) == 0.4
    with pytest.raises(ValueError):
        tempo.beat_from_ioi(0.0)
