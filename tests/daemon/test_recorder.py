"""The session recorder: pairing, tracks, flushing, failures; with a fake clock and a fake writer."""

import mido
import numpy as np
import pytest

from daemon import midifile
from daemon.recorder import SessionRecorder
from tests.daemon.fakes import Clock, off, on


def test_tracks_pair_notes_and_keep_times(tmp_path):
    clock = Clock()
    rec = SessionRecorder(tmp_path, now=clock, output_channel=0)
    rec.add_player(100.5, on(60))
    rec.add_player(100.7, off(60))
    rec.add_player(101.0, on(62, 80))
    rec.add_player(101.1, mido.Message("note_on", note=62, velocity=0))  # note-on with velocity 0 = off
    rec.add_improvd(102.0, on(67, 70))
    rec.add_improvd(102.25, off(67))
    rec.add_player(101.5, mido.Message("control_change", control=1, value=3))  # ignored
    player, improvd = rec.tracks(103.0)
    assert player.name == "player" and improvd.name == "improvd"
    assert player.channel == 1 and improvd.channel == 0
    assert player.start_s == pytest.approx(0.5)
    np.testing.assert_allclose(player.notes, [[60, 0, 0.2, 90], [62, 0.5, 0.1, 80]], atol=1e-9)
    np.testing.assert_allclose(improvd.notes, [[67, 0, 0.25, 70]], atol=1e-9)
    assert improvd.start_s == pytest.approx(2.0)


def test_sounding_notes_end_at_the_flush_and_channels_filter(tmp_path):
    rec = SessionRecorder(tmp_path, now=Clock(), player_channels=(0,), output_channel=3)
    rec.add_player(100.0, on(60))
    rec.add_player(100.1, on(50, ch=5))  # not a listened channel
    player, improvd = rec.tracks(101.0)
    np.testing.assert_allclose(player.notes, [[60, 0, 1.0, 90]])
    assert len(improvd.notes) == 0 and player.channel == 0 and improvd.channel == 3


def test_flush_writes_a_readable_file_and_only_when_something_changed(tmp_path):
    clock = Clock()
    rec = SessionRecorder(tmp_path / "rec", now=clock, name="s.mid")
    assert not rec.flush()  # nothing yet: no file
    assert not rec.path.exists()
    rec.add_player(100.5, on(60))
    rec.add_player(101.0, off(60))
    rec.add_improvd(101.5, on(64))
    rec.add_improvd(102.0, off(64))
    clock.t = 103.0
    assert rec.flush()
    assert not rec.flush()
    midi = mido.MidiFile(rec.path)
    names = [m.name for t in midi.tracks for m in t if m.type == "track_name"]
    assert names == ["player", "improvd"]
    notes = midifile.read_notes(rec.path)
    np.testing.assert_allclose(notes[:, 0], [60, 64])
    np.testing.assert_allclose(np.cumsum(notes[:, 1]), [0, 1.0], atol=1e-3)
    assert rec.note_counts == {"player": 1, "improvd": 1}
    assert not list(rec.path.parent.glob(".*.tmp"))


def test_due_every_interval(tmp_path):
    clock = Clock()
    rec = SessionRecorder(tmp_path, now=clock)
    assert not rec.due(10.0)
    clock.t += 10.0
    assert rec.due(10.0)
    rec.flush()
    assert not rec.due(10.0)


def test_a_failing_write_is_logged_once_and_does_not_raise(tmp_path, caplog):
    calls = []

    def full_disk(path, tracks):
        calls.append(path)
        raise OSError(28, "No space left on device")
    rec = SessionRecorder(tmp_path, now=Clock(), write=full_disk)
    rec.add_player(100.0, on(60))
    assert not rec.flush()
    rec.add_player(100.1, off(60))
    assert not rec.flush()
    assert len(calls) == 2
    assert sum("No space left" in r.message for r in caplog.records) == 1


def test_unique_names(tmp_path):
    a = SessionRecorder(tmp_path, now=Clock())
    a.add_player(100.0, on(60))
    a.flush()
    b = SessionRecorder(tmp_path, now=Clock())
    assert a.path != b.path
