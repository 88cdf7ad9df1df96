"""Placement in time (daemon/music/placement.py) on its own: pure, with `now` passed in."""

import pytest

from improvd.daemon.music.placement import REGRID_STEPS, Placed, Placement
from improvd.daemon.music.quantize import Grid
from improvd.daemon.music.tempo import CHORD_S

P = Placement(lead_s=0.002, catch_up_s=0.1)
GRID = Grid.from_bpm(120.0, 10.0)  # a beat is 0.5 s, 24 ticks; origin at t = 10 s
SIXTEENTH = 6


def test_without_a_grid_a_note_keeps_its_predicted_onset():
    assert P.place(None, 0, 0.25, 10.0, now=10.1, chained=False) == Placed(10.25, False, None)


def test_a_chained_note_keeps_its_deadline_through_a_short_stall_only():
    # 50 ms late: still its absolute deadline (the scheduler sends it at once).
    assert P.place(None, 0, 0.25, 10.0, now=10.30, chained=True) == Placed(10.25, False, None)
    # Later than catch_up_s: it moves to now + lead_s.
    placed = P.place(None, 0, 0.25, 10.0, now=10.40, chained=True)
    assert placed.moved and placed.onset_s == pytest.approx(10.402)


def test_a_note_after_the_players_moves_to_now_once_its_onset_passed():
    placed = P.place(None, 0, 0.25, 10.0, now=10.26, chained=False)
    assert placed == Placed(pytest.approx(10.262), True, None)


def test_nothing_fed_yet_means_now():
    assert P.place(GRID, SIXTEENTH, 0.25, None, now=11.0, chained=False) == Placed(pytest.approx(11.002), True, None)


def test_quantized_onsets_snap_to_the_grid_and_a_step_never_becomes_a_chord():
    # 0.26 s after the onset at 10.0 s: the nearest sixteenth is 10.25 s (position 12).
    assert P.place(GRID, SIXTEENTH, 0.26, 10.0, now=10.0, chained=True) == Placed(10.25, True, 12)
    # A short step that is not a chord (> CHORD_S) would round back onto the last onset; it takes a grid step.
    step = CHORD_S + 0.01
    placed = P.place(GRID, SIXTEENTH, step, 10.0, now=10.0, chained=True)
    assert placed.position == SIXTEENTH and placed.onset_s == pytest.approx(10.125)
    # A chord stays a chord.
    assert P.place(GRID, SIXTEENTH, 0.0, 10.0, now=9.9, chained=True).position == 0


def test_a_quantized_onset_is_never_before_now_plus_lead():
    placed = P.place(GRID, SIXTEENTH, 0.25, 10.0, now=10.3, chained=True)
    assert placed.onset_s >= 10.302 and placed.position % SIXTEENTH == 0


def test_the_entry_on_a_running_clock_waits_for_the_next_beat():
    # Predicted at 10.1 s: the next beat (24 ticks) at or after it is 10.5 s.
    assert P.entry(GRID, SIXTEENTH, 0.1, 10.0, now=10.0) == Placed(10.5, True, 24)
    # A quantize step coarser than a beat (a half note, 48 ticks) is the entry's step.
    assert P.entry(GRID, 48, 0.1, 10.0, now=10.0) == Placed(11.0, True, 48)


def test_a_delayed_note_goes_to_the_first_grid_point_at_or_after_its_time():
    assert P.delay_to(GRID, SIXTEENTH, 10.13) == Placed(10.25, True, 12)
    assert P.delay_to(None, 0, 10.13) == Placed(10.13, True, None)


def test_refresh_follows_the_grid_and_regrids_a_position_from_another_grid():
    faster = Grid.from_bpm(125.0, 10.0)
    onset, position = P.refresh(faster, SIXTEENTH, 10.25, 12, now=10.0)
    assert position == 12 and onset == pytest.approx(faster.time_of(12))  # the same position, the new tempo
    # A position that would move the note more than REGRID_STEPS grid steps is snapped again from its time.
    shifted = Grid.from_bpm(120.0, 10.0 - (REGRID_STEPS + 2) * SIXTEENTH * GRID.tick_s)
    onset, position = P.refresh(shifted, SIXTEENTH, 10.25, 12, now=10.0)
    assert onset == pytest.approx(10.25) and position == 12 + (REGRID_STEPS + 2) * SIXTEENTH
    # A position whose time has passed moves to the next grid point.
    onset, position = P.refresh(GRID, SIXTEENTH, 10.25, 12, now=10.3)
    assert position == 18 and onset == pytest.approx(10.375)
