"""ArrivalClock: arrival times of polled MIDI input from rtmidi's delta times."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from improvd.daemon.music.arrival import ArrivalClock


def test_a_late_poll_keeps_the_spacing_of_the_messages():
    clock = ArrivalClock(drift=0.0)
    # three messages 10 ms apart, read together 50 ms after the last arrived: the first poll only bounds them
    assert clock.stamp([0.0, 0.010, 0.010], polled_s=100.070) == pytest.approx([100.050, 100.060, 100.070])
    # a prompt poll (0.2 ms after arrival) tightens the anchor: later messages are stamped close to the truth
    assert clock.stamp([0.5], polled_s=100.5202) == pytest.approx([100.5202])
    assert clock.stamp([0.1], polled_s=100.680) == pytest.approx([100.6202])  # arrived 100.62, read 60 ms later


def test_stamps_never_go_backwards_nor_past_the_poll():
    clock = ArrivalClock()
    assert clock.stamp([0.0], polled_s=10.0) == [10.0]
    # deltas that make no sense (rtmidi never gives them) count as 0: the stamps stay put rather than go back
    assert clock.stamp([float("nan"), -1.0], polled_s=11.0) == [pytest.approx(10.0, abs=2e-3)] * 2
    # a delta that would put the message after its poll is capped at the poll
    assert clock.stamp([5.0], polled_s=12.0) == [12.0]
    assert clock.stamp([], polled_s=13.0) == []


def test_the_anchor_follows_a_drifting_clock():
    # the input's clock runs 0.05% slow against ours: its deltas are short by 500 ppm
    clock = ArrivalClock(drift=1e-3)
    worst = 0.0
    for i in range(1, 600):
        true_s = i * 1.0
        (t,) = clock.stamp([0.0 if i == 1 else 1.0 * (1 - 5e-4)], polled_s=true_s + 0.0002)
        worst = max(worst, abs(t - true_s))
    assert worst < 0.002


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.floats(0.0, 0.5), st.floats(0.0, 0.05), st.integers(1, 6)), min_size=1, max_size=40))
def test_stamps_are_never_early_and_late_by_at_most_the_worst_poll_latency(batches):
    """Any arrivals, read in batches by polls of any lateness: each stamp lies between the true arrival and the
    true arrival plus the largest latency of a batch's last message so far."""
    clock = ArrivalClock(drift=0.0)
    previous, worst_latency = None, 0.0
    for gap_s, latency_s, count in batches:
        arrivals = [(previous if previous is not None else 5.0) + gap_s * (k + 1) / count for k in range(count)]
        deltas = [a - b for a, b in zip(arrivals, [previous if previous is not None else arrivals[0], *arrivals])]
        polled = arrivals[-1] + latency_s
        worst_latency = max(worst_latency, latency_s)
        for stamp, true_s in zip(clock.stamp(deltas, polled), arrivals):
            assert true_s - 1e-9 <= stamp <= polled + 1e-12
            assert stamp - true_s <= worst_latency + 1e-9
        previous = arrivals[-1]
