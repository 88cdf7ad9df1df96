"""MIDI clock: tempo and grid from stamped ticks (with jitter and outliers), tempo changes, transport; quantizing."""

import math

import mido
import numpy as np
import pytest

from improvd.daemon.music.clock import ClockTracker
from improvd.daemon.music.quantize import DIVISION_TICKS, Grid, division_ticks, snap

TICK = mido.Message("clock")


def tick_times(bpm, beats, start_s=100.0, jitter_s=0.0, rng=None):
    tick_s = 60.0 / (bpm * 24)
    t = start_s + tick_s * np.arange(int(round(beats * 24)))
    if jitter_s:
        t = t + rng.uniform(-jitter_s, jitter_s, len(t))
    return t, tick_s


def feed(tracker, times):
    for t in times:
        tracker.handle(float(t), TICK)


def grid_error_s(tracker, true_time_of_position, positions):
    grid = tracker.grid()
    return max(abs(grid.time_of(p) - true_time_of_position(p)) for p in positions)


def test_tempo_from_100_bpm_with_jitter():
    rng = np.random.default_rng(1)
    times, tick_s = tick_times(100, 8, jitter_s=0.001, rng=rng)  # +-1 ms, a USB MIDI interface
    tracker = ClockTracker()
    feed(tracker, times)
    assert tracker.bpm == pytest.approx(100, rel=0.003)
    # The grid predicts the next beat's sixteenths (song positions from the first tick) within a millisecond.
    last = len(times) - 1
    err = grid_error_s(tracker, lambda p: 100.0 + p * tick_s, range(last + 1, last + 25, 6))
    assert err < 0.001, err


def test_outliers_are_ignored():
    times, tick_s = tick_times(100, 4)
    times = times.copy()
    times[-10] += 0.012  # a tick stamped 12 ms late (a thread held up)
    times[-20] -= 0.009
    tracker = ClockTracker()
    feed(tracker, times)
    assert tracker.bpm == pytest.approx(100, rel=0.001)
    last = len(times) - 1
    assert grid_error_s(tracker, lambda p: 100.0 + p * tick_s, [last + 6, last + 12]) < 0.0002


@pytest.mark.parametrize("jitter_s", [0.0, 0.001])
def test_follows_100_to_140_bpm_within_two_beats(jitter_s):
    rng = np.random.default_rng(2)
    before, tick_100 = tick_times(100, 4, jitter_s=jitter_s, rng=rng)
    t_change = 100.0 + len(before) * tick_100
    tick_140 = 60.0 / (140 * 24)
    after = t_change + tick_140 * np.arange(48) + (rng.uniform(-jitter_s, jitter_s, 48) if jitter_s else 0)
    tracker = ClockTracker()
    feed(tracker, before)
    n0 = len(before)

    def true_time(p):
        return t_change + (p - n0) * tick_140

    errors = []
    for i, t in enumerate(after):
        tracker.handle(float(t), TICK)
        count = n0 + i + 1
        errors.append((i + 1, tracker.bpm, grid_error_s(tracker, true_time, [count + 2, count + 6])))
    # within one beat (24 ticks) the tempo is right and the grid's next sixteenths are within a millisecond
    for n, bpm, err in errors[23:]:
        assert bpm == pytest.approx(140, rel=0.01), (n, bpm)
        assert err < 0.001, (n, err)
    settled = next(n for n, bpm, err in errors if all(abs(b - 140) < 1.4 and e < 0.001 for _, b, e in
                                                         errors[n - 1:]))
    assert settled <= 16, errors[:20]


def test_transport_start_resets_the_bar_stop_freezes_continue_resumes():
    tracker = ClockTracker()
    assert tracker.state == "none"
    times, tick_s = tick_times(120, 2)
    feed(tracker, times[:10])
    assert tracker.position_of_next_tick() == 10  # without Start, from the first tick
    tracker.handle(0, mido.Message("start"))
    assert tracker.state == "playing" and tracker.position_of_next_tick() == 0
    feed(tracker, times[10:20])
    grid = tracker.grid()
    assert grid.time_of(0) == pytest.approx(times[10], abs=1e-9)  # the first tick after Start is position 0
    assert grid.time_of(9) == pytest.approx(times[19], abs=1e-9)
    tracker.handle(0, mido.Message("stop"))
    assert tracker.state == "stopped"
    feed(tracker, times[20:30])  # clock keeps running while stopped: tempo yes, position no
    assert tracker.position_of_next_tick() == 10
    tracker.handle(0, mido.Message("continue"))
    assert tracker.position_of_next_tick() == 10
    feed(tracker, times[30:33])
    assert tracker.grid().time_of(12) == pytest.approx(times[32], abs=1e-9)
    tracker.handle(0, mido.Message("stop"))
    tracker.handle(0, mido.Message("songpos", pos=8))  # 8 sixteenths = 48 ticks
    tracker.handle(0, mido.Message("continue"))
    feed(tracker, times[33:35])
    assert tracker.grid().time_of(49) == pytest.approx(times[34], abs=1e-9)
    assert tracker.handle(0, mido.Message("note_on")) is None


def test_gap_restarts_the_fit_and_running():
    tracker = ClockTracker()
    assert tracker.grid() is None and tracker.bpm is None and not tracker.running(0.0)
    times, tick_s = tick_times(120, 1)
    feed(tracker, times)
    assert tracker.running(times[-1] + 0.1) and not tracker.running(times[-1] + 0.5)
    later = times[-1] + 2.0 + np.arange(3) * (60 / (90 * 24))  # the clock comes back at 90 bpm
    tracker.handle(float(later[0]), TICK)
    assert tracker.bpm == pytest.approx(120, rel=1e-6)  # one tick: the last tempo as a prior
    feed(tracker, later[1:])
    assert tracker.bpm == pytest.approx(90, rel=1e-6) and tracker.restarts >= 1


# ---- quantize ----------------------------------------------------------------------------------------------

def test_divisions():
    assert division_ticks("off") is None
    assert division_ticks("1/16") == 6 and division_ticks("1/8t") == 8 and division_ticks("1/4") == 24
    assert division_ticks("1/8d") == 18
    with pytest.raises(ValueError, match="'1/7'.*'1/16'"):
        division_ticks("1/7")
    from improvd.core.config import QUANTIZE_CHOICES
    assert set(QUANTIZE_CHOICES) == {"off", *DIVISION_TICKS}


def test_grid_and_snap():
    grid = Grid.from_bpm(100, 10.0)  # a 1/16 is 0.15 s
    assert grid.bpm == pytest.approx(100) and grid.time_of(6) == pytest.approx(10.15)
    assert Grid.from_beat(0.6, 10.0).tick_s == pytest.approx(grid.tick_s)
    assert snap(grid, 10.20, 6, 0.0) == 6  # 10.20 is nearest to 10.15
    assert snap(grid, 10.23, 6, 0.0) == 12  # nearest to 10.30
    assert snap(grid, 10.20, 6, 10.16) == 12  # nearest is too early: the first at or after 10.16
    assert snap(grid, 10.20, 6, 10.30) == 12
    assert snap(grid, 9.0, 6, 0.0) == -6 * 7  # before the anchor
    for t in np.linspace(9.0, 12.0, 301):
        for earliest in (0.0, t, t + 0.07):
            p = snap(grid, t, 8, earliest)
            assert p % 8 == 0 and grid.time_of(p) >= earliest - 1e-12
            assert grid.time_of(p) >= earliest - 1e-12
            if earliest == 0.0:
                assert abs(grid.time_of(p) - t) <= 0.5 * 8 * grid.tick_s + 1e-9
    with pytest.raises(ValueError):
        snap(grid, 1.0, 0, 0.0)
    with pytest.raises(ValueError):
        Grid.from_bpm(0, 0.0)
    assert math.isclose(Grid.from_bpm(140, 0).tick_s * 24, 60 / 140)


def test_ticks_held_up_and_delivered_in_bunches_do_not_move_the_grid():
    """A busy machine holds the MIDI callback up: ticks then arrive late, several with one stamp. They must not
    look like a tempo change or a gap."""
    rng = np.random.default_rng(4)
    times, tick_s = tick_times(100, 24, jitter_s=0.0006, rng=rng)
    stamps = times.copy()
    i = 30
    while i < len(stamps) - 10:
        held = int(rng.integers(2, 9))  # up to 8 ticks (200 ms) held up, then delivered at once
        stamps[i:i + held] = times[i + held - 1] + rng.uniform(0, 0.003)
        i += held + int(rng.integers(10, 40))
    tracker = ClockTracker()
    worst = 0.0
    for k, t in enumerate(stamps):
        tracker.handle(float(t), TICK)
        if k > 30:
            worst = max(worst, grid_error_s(tracker, lambda p: 100.0 + p * tick_s, [k + 3, k + 6]))
    assert tracker.bunched > 20 and tracker.restarts == 0
    assert tracker.bpm == pytest.approx(100, rel=0.002)
    assert worst < 0.001, worst


def test_a_pause_of_the_clock_restarts_the_fit():
    times, tick_s = tick_times(120, 2)
    tracker = ClockTracker()
    feed(tracker, times)
    resumed = times[-1] + 1.5 + np.arange(30) * tick_s  # 1.5 s without ticks, then the clock goes on
    feed(tracker, resumed)
    assert tracker.restarts == 1
    last = len(times) + len(resumed) - 1
    err = grid_error_s(tracker, lambda p: resumed[0] + (p - len(times)) * tick_s, [last + 6])
    assert err < 1e-6
