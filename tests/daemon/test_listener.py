"""Listening (daemon/music/listener.py) on its own: the pending phrase, when it ends, the pedal, the cap."""

import mido
import pytest

from improvd.core.config import ImproviseConfig, MidiConfig
from improvd.daemon.music.listener import Listener


def listener(**kw):
    return Listener(ImproviseConfig(**{"silence": 0.5, "max_hold": 4.0, **kw}), MidiConfig())


def play(lst, pitch, on_s, off_s):
    lst.handle(on_s, mido.Message("note_on", note=pitch, velocity=90))
    for note in lst.handle(off_s, mido.Message("note_off", note=pitch)).completed:
        lst.add(note, cap=100)


def test_the_phrase_ends_a_silence_after_the_last_release_and_is_taken_once():
    lst = listener()
    assert lst.phrase_end_s(0.5) is None and not lst.listening
    lst.handle(1.0, mido.Message("note_on", note=60, velocity=90))
    assert lst.listening and lst.phrase_end_s(0.5) is None  # nothing completed yet
    for note in lst.handle(1.2, mido.Message("note_off", note=60)).completed:
        lst.add(note, cap=100)
    play(lst, 62, 1.3, 1.4)
    assert lst.phrase_end_s(0.5) == pytest.approx(1.9)
    assert [n.pitch for n in lst.take_phrase()] == [60, 62]
    assert lst.phrase == [] and lst.phrase_end_s(0.5) is None and not lst.listening


def test_the_sustain_pedal_holds_the_phrase_open():
    lst = listener()
    play(lst, 60, 1.0, 1.1)
    lst.handle(1.05, mido.Message("control_change", control=64, value=127))
    assert lst.phrase_end_s(0.5) is None
    lst.handle(2.0, mido.Message("control_change", control=64, value=0))
    assert lst.phrase_end_s(0.5) == pytest.approx(2.5)


def test_a_held_key_and_pedal_expire_after_max_hold():
    lst = listener(max_hold=4.0)
    lst.handle(1.0, mido.Message("note_on", note=60, velocity=90))
    lst.handle(1.5, mido.Message("control_change", control=64, value=127))
    assert lst.next_expiry_s() == pytest.approx(5.0)
    completed = lst.expire(5.0)
    assert [n.pitch for n in completed] == [60] and completed[0].duration_s == pytest.approx(4.0)
    assert lst.next_expiry_s() == pytest.approx(5.5)  # the pedal, down at 1.5 s


def test_the_pending_phrase_keeps_its_last_notes_under_a_flood():
    lst = listener()
    for i in range(10):
        lst.handle(i * 0.1, mido.Message("note_on", note=60 + i, velocity=90))
        for note in lst.handle(i * 0.1 + 0.05, mido.Message("note_off", note=60 + i)).completed:
            lst.add(note, cap=4)
    assert [n.pitch for n in lst.phrase] == [66, 67, 68, 69]
