import mido
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.fakes import off, on
from improvd.core.config import ImproviseConfig, MidiConfig
from improvd.daemon.music.tracker import REPEAT_S, HeardNote, NoteTracker


def test_note_on_off_completes_a_note():
    tr = NoteTracker()
    u = tr.handle(1.0, on(60, 90))
    assert u.note_on and u.completed == ()
    assert tr.held == 1 and tr.held_keys == {(0, 60)}
    assert tr.quiet_since_s() is None
    u = tr.handle(1.5, off(60))
    assert not u.note_on
    assert u.completed == (HeardNote(1.0, 60, 0.5, 90, 0),)
    assert tr.held == 0 and tr.last_release_s == 1.5 and tr.quiet_since_s() == 1.5


def test_note_on_velocity_zero_is_note_off():
    tr = NoteTracker()
    tr.handle(0.0, on(64, 100))
    u = tr.handle(0.25, on(64, velocity=0))
    assert not u.note_on and u.completed[0].duration_s == 0.25


def test_channels_filter_note_ons_but_release_any_held():
    tr = NoteTracker(channels=[1])
    assert tr.handle(0.0, on(60, 100, channel=0)) == (False, ())
    assert tr.handle(0.0, on(61, 100, channel=1)).note_on
    assert tr.handle(0.1, off(60, channel=0)).completed == ()
    tr.configure([], 64, 8.0)  # listening changed while a key is held: its release still counts
    tr.configure([2], 64, 8.0)
    assert tr.handle(0.2, off(61, channel=1)).completed[0].pitch == 61


def test_from_config_converts_channels_to_zero_based():
    tr = NoteTracker.from_config(ImproviseConfig(window=5, max_hold=3.0), MidiConfig(input_channels=(1, 16)))
    assert tr.channels == {0, 15} and tr.window_size == 5 and tr.max_hold_s == 3.0
    with pytest.raises(ValueError, match="channel must be in range 0..15"):
        NoteTracker(channels=[16])


def test_retrigger_closes_previous():
    tr = NoteTracker()
    tr.handle(0.0, on(60, 80))
    u = tr.handle(0.3, on(60, 70))
    assert u.note_on and u.completed == (HeardNote(0.0, 60, 0.3, 80, 0),)
    assert tr.held == 1
    assert tr.handle(0.5, off(60)).completed == (HeardNote(0.3, 60, 0.2, 70, 0),)


def test_a_note_on_read_twice_is_one_press():
    # an asynchronous JACK server can hand a late client the same message twice, 0.006-3.4 ms apart (docs/daemon.md)
    tr = NoteTracker()
    tr.handle(1.0, on(61, 90))
    u = tr.handle(1.0012, on(61, 90))
    assert not u.note_on and u.completed == () and tr.repeats == 1
    assert tr.handle(1.5, off(61)).completed == (HeardNote(1.0, 61, 0.5, 90, 0),)
    assert tr.handle(1.5012, off(61)).completed == ()  # its note-off read twice: no key held, nothing happens
    # a re-press, not a repeat: another velocity, or later than REPEAT_S
    tr.handle(2.0, on(62, 90))
    assert tr.handle(2.001, on(62, 91)).completed == (HeardNote(2.0, 62, pytest.approx(0.001), 90, 0),)
    tr.handle(3.0, on(63, 90))
    assert tr.handle(3.0 + REPEAT_S + 0.001, on(63, 90)).note_on
    assert tr.repeats == 1 and tr.notes_heard == 3


def test_max_hold_releases_and_ignores_late_off():
    tr = NoteTracker(max_hold_s=2.0)
    tr.handle(1.0, on(60, 100))
    assert tr.next_expiry_s() == 3.0
    assert tr.expire(2.9) == ()
    done = tr.expire(3.5)
    assert done == (HeardNote(1.0, 60, 2.0, 100, 0),)
    assert tr.held == 0 and tr.last_release_s == 3.0 and tr.next_expiry_s() is None
    assert tr.handle(5.0, off(60)).completed == ()
    # expiry also happens when any later message arrives
    tr.handle(10.0, on(62, 100))
    assert tr.handle(13.0, mido.Message("control_change", control=1, value=3)).completed[0].duration_s == 2.0


def test_other_messages_ignored():
    tr = NoteTracker()
    for msg in (mido.Message("pitchwheel", pitch=100), mido.Message("clock"), mido.Message("sysex", data=[1, 2])):
        assert tr.handle(0.0, msg) == (False, ())
    assert tr.held == 0 and tr.last_release_s is None


def test_window_sorted_rolling_with_steps():
    tr = NoteTracker(window=3)
    tr.handle(0.0, on(60, 50))
    tr.handle(0.1, on(64, 60))
    tr.handle(0.1, on(67, 70))
    tr.handle(0.5, off(67))
    tr.handle(0.6, off(64))
    tr.handle(0.9, off(60))  # released last, but first by onset
    w = tr.window_notes()
    np.testing.assert_allclose(w, [[60, 0.0, 0.9, 50], [64, 0.1, 0.5, 60], [67, 0.0, 0.4, 70]])
    np.testing.assert_allclose(tr.window_onsets_s(), [0.0, 0.1, 0.1])
    assert tr.recent_velocity(2) == 65
    tr.handle(1.0, on(70, 90))
    tr.handle(1.2, off(70))
    assert tr.window_notes()[:, 0].tolist() == [64, 67, 70]
    assert tr.notes_heard == 4
    assert NoteTracker().window_notes().shape == (0, 4)
    assert NoteTracker().recent_velocity() is None


events = st.lists(st.tuples(st.sampled_from(["on", "on0", "off", "cc", "tick"]), st.integers(0, 3),
                            st.integers(58, 61), st.floats(0, 3, allow_nan=False), st.integers(1, 127)),
                  max_size=60)


@settings(max_examples=300, deadline=None)
@given(events, st.floats(0.1, 5.0))
def test_property_no_negative_durations_no_lost_releases(seq, max_hold):
    """Any sequence of note-on/note-off/timing: every started note completes exactly once, never negatively."""
    tr = NoteTracker(channels=[0, 1, 2], max_hold_s=max_hold)
    t = 0.0
    started = completed = 0
    for kind, channel, pitch, dt, velocity in seq:
        t += dt
        if kind == "tick":
            done = tr.expire(t)
        else:
            msg = {"on": on(pitch, velocity, channel), "on0": on(pitch, 0, channel), "off": off(pitch, channel),
                   "cc": mido.Message("control_change", channel=channel, control=7, value=1)}[kind]
            held_before, repeats_before = tr.held_keys, tr.repeats
            u = tr.handle(t, msg)
            done = u.completed
            started += u.note_on
            repeated = tr.repeats > repeats_before  # the same press read twice (test_a_note_on_read_twice_...)
            assert not repeated or (kind == "on" and (channel, pitch) in held_before and (channel, pitch) in tr.held_keys)
            assert u.note_on == (kind == "on" and channel != 3 and not repeated)
        for note in done:
            assert 0.0 <= note.duration_s <= max_hold + 1e-9
            assert note.onset_s <= t
        completed += len(done)
        assert started - completed == tr.held
        if tr.held == 0 and completed:
            assert tr.quiet_since_s() is not None and tr.quiet_since_s() <= t + 1e-9
    final = tr.expire(t + max_hold)
    completed += len(final)
    assert tr.held == 0
    assert started == completed == tr.notes_heard
    w = tr.window_notes()
    assert (w[:, 1] >= 0).all() and (w[:, 2] >= 0).all()
