"""The session recorder: notes, incremental encoding, flushing, rotation, failures; with a fake clock and writer."""

import io

import mido
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from improvd.core import midifile
from improvd.core import notes as nt
from improvd.daemon.io.recorder import IMPROVD, PLAYER, SessionRecorder
from harness.fakes import FakeClock, off, on

TICKS_PER_S = midifile.FILE_TICKS_PER_BEAT * 1e6 / midifile.TEMPO_US  # 1920


def _events(midi: mido.MidiFile) -> dict[str, list[tuple[int, str, int, int, int]]]:
    """(abs tick, type, channel, note, velocity) of each named track's notes; a velocity-0 note-on is a note-off."""
    out = {}
    for track in midi.tracks[1:]:
        tick, events = 0, []
        for msg in track:
            assert msg.time >= 0
            tick += msg.time
            if msg.type in ("note_on", "note_off"):
                ends = msg.type == "note_off" or msg.velocity == 0
                events.append((tick, "note_off" if ends else "note_on", msg.channel, msg.note,
                               0 if ends else msg.velocity))
        out[track.name] = events
    return out


def _file_events(path) -> dict[str, list[tuple[int, str, int, int, int]]]:
    return _events(mido.MidiFile(path))


def _canonical(events):
    """Events in time order, at a tick note-offs first, then by pitch: what order within a tick may differ in."""
    return sorted(events, key=lambda e: (e[0], e[1] == "note_on", e[3], e[4]))


def _check_well_formed(events, channel):
    """Every note-on has its note-off per pitch, one note of a pitch at a time; time order, note-offs first."""
    sounding = set()
    for i, (tick, kind, ch, pitch, velocity) in enumerate(events):
        assert ch == channel
        if i:
            prev_tick, prev_kind = events[i - 1][:2]
            assert prev_tick <= tick
            assert not (prev_tick == tick and prev_kind == "note_on" and kind == "note_off"), events
        if kind == "note_on":
            assert pitch not in sounding and 1 <= velocity <= 127, events
            sounding.add(pitch)
        else:
            assert pitch in sounding, events
            sounding.remove(pitch)
    assert not sounding, events


def _old_notes(stream, start_s, end_s):
    """The old recorder's FIFO pairing of a stream: {who: [(onset_s, pitch, duration_s, velocity)]} from
    `start_s`, the notes still sounding ending at `end_s`."""
    out = {}
    for who in (PLAYER, IMPROVD):
        sounding, done = {}, []
        for t, w, msg in stream:
            if w != who:
                continue
            key = (msg.channel, msg.note)
            if msg.type == "note_on" and msg.velocity > 0:
                sounding.setdefault(key, []).append((t, msg.velocity))
            elif sounding.get(key):
                onset, velocity = sounding[key].pop(0)
                done.append((onset - start_s, msg.note, t - onset, velocity))
        done += [(onset - start_s, pitch, end_s - onset, velocity)
                 for (_, pitch), held in sounding.items() for onset, velocity in held]
        out[who] = done
    return out


def _write_notes_events(notes, channel):
    """The events `midifile.write_notes` writes for these notes (its `track_events`), and whether two notes of
    one pitch overlap in it (one starts before the other's note-off, or both at one tick)."""
    if not notes:
        return [], False
    onset, pitch, duration, velocity = (np.array(c, dtype=np.float64) for c in zip(*notes))
    track = nt.from_onsets(pitch, onset, duration, velocity)
    ticks = sorted((midifile._seconds_to_ticks(a), max(midifile._seconds_to_ticks(a) + 1,
                                                       midifile._seconds_to_ticks(a + d)), p)
                   for a, p, d, _ in notes)
    overlap = any(b[2] == a[2] and b[0] < a[1] for i, a in enumerate(ticks) for b in ticks[i + 1:])
    events = [(tick, "note_on" if kind else "note_off", channel, p, v)
              for tick, kind, p, v in midifile.track_events(track, float(onset.min()))]
    return events, overlap


def _record(stream, flush_after, end_s, **kwargs):
    """Feed a stream [(t_s, who, msg)] to a recorder, flushing after the marked messages; returns the recorder,
    the last file's bytes and every file written."""
    clock = FakeClock(100.0)
    written = []
    rec = SessionRecorder("/nonexistent", start_s=100.0, now=clock, name="s.mid",
                          write=lambda path, data: written.append(data), **kwargs)
    for (t, who, msg), flush in zip(stream, flush_after):
        (rec.add_player if who == PLAYER else rec.add_improvd)(t, msg)
        if flush:
            clock.t = t
            rec.flush()
    clock.t = end_s
    assert rec.flush(force=True)
    return rec, written


_step = st.tuples(
    st.one_of(st.just(0), st.integers(0, 2), st.integers(0, 40)),  # ms since the previous message
    st.sampled_from([PLAYER, IMPROVD]),
    st.booleans(),  # a note-on (else a note-off)
    st.sampled_from([0, 1, 64, 127]),  # its velocity (0: a note-off)
    st.integers(0, 1),  # channel
    st.integers(60, 61),  # pitch
    st.integers(0, 3).map(lambda k: k == 0),  # a flush after it
)


@settings(max_examples=200, deadline=None)
@given(st.lists(_step, max_size=40), st.integers(0, 5))
def test_random_streams_give_well_formed_files_and_the_old_notes_without_overlaps(steps, tail_ms):
    ms, stream = 0, []
    for dt, who, is_on, velocity, channel, pitch, _ in steps:
        ms += dt
        msg = (mido.Message("note_on", channel=channel, note=pitch, velocity=velocity) if is_on
               else mido.Message("note_off", channel=channel, note=pitch))
        stream.append((100.0 + ms / 1000, who, msg))
    end_s = 100.0 + (ms + tail_ms) / 1000
    rec, written = _record(stream, [s[-1] for s in steps], end_s)
    channels = {PLAYER: rec.player_channel, IMPROVD: rec.output_channel}
    for data in written:  # the files written on the way too
        for who, events in _events(mido.MidiFile(file=io.BytesIO(data))).items():
            _check_well_formed(events, channels[who])
    midi = mido.MidiFile(file=io.BytesIO(written[-1]))
    got = _events(midi)
    assert list(got) == [PLAYER, IMPROVD]
    old = _old_notes(stream, 100.0, end_s)
    for who in (PLAYER, IMPROVD):
        _check_well_formed(got[who], channels[who])
        assert sum(e[1] == "note_on" for e in got[who]) <= rec.note_counts[who] == len(old[who])
        expected, overlap = _write_notes_events(old[who], channels[who])
        if not overlap:
            assert _canonical(got[who]) == _canonical(expected)
    if any(got.values()):
        midifile.notes_from_midi(midi)  # readable by the reader


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([PLAYER, IMPROVD]), st.integers(60, 62), st.integers(0, 1),
                          st.integers(0, 30), st.integers(0, 30), st.integers(1, 127)), max_size=30),
       st.booleans(), st.lists(st.booleans(), min_size=60, max_size=60))
def test_notes_that_do_not_overlap_are_written_as_write_notes_writes_them(notes, offs_first, flushes):
    last_end, stream = {}, []  # (who, pitch) -> ms its last note ends; a note starts a ms or more after
    for who, pitch, channel, gap, dur, velocity in notes:
        start = last_end.get((who, pitch), 0) + gap
        last_end[(who, pitch)] = start + dur
        if dur == 0:  # a note 0 ms long must not touch the next (the file makes it a tick long)
            last_end[(who, pitch)] += 1
        rank_off = 0 if offs_first and dur else 2
        stream.append((start, 1, who, on(pitch, velocity, channel=channel)))
        stream.append((start + dur, rank_off, who, off(pitch, channel=channel)))
    stream.sort(key=lambda e: e[:2])
    stream = [(100.0 + ms / 1000, who, msg) for ms, _, who, msg in stream]
    end_s = (stream[-1][0] if stream else 100.0) + 0.01
    rec, written = _record(stream, flushes, end_s)
    got = _events(mido.MidiFile(file=io.BytesIO(written[-1])))
    old = _old_notes(stream, 100.0, end_s)
    for who, channel in ((PLAYER, rec.player_channel), (IMPROVD, rec.output_channel)):
        expected, overlap = _write_notes_events(old[who], channel)
        assert not overlap
        assert _canonical(got[who]) == _canonical(expected)
        assert rec.note_counts[who] == len(old[who])


def test_the_file_is_byte_for_byte_what_write_notes_writes(tmp_path):
    clock = FakeClock(100.0)
    rec = SessionRecorder(tmp_path, now=clock, name="new.mid", output_channel=2)
    rec.add_player(100.5, on(60, 70))
    rec.add_player(100.7, off(60))
    rec.add_player(100.7, on(64, 80))  # same tick as the note-off before: the note-off first
    rec.add_player(101.5, off(64))
    rec.add_improvd(102.0, on(67, 100))
    rec.add_improvd(102.25, off(67))
    rec.add_improvd(102.25, on(69, 100))  # same status as the one before: running status
    rec.add_improvd(102.5, on(71, 100))
    clock.t = 102.4
    assert rec.flush()
    rec.add_improvd(103.0, off(69))
    rec.add_improvd(103.0, off(71))
    clock.t = 104.0
    assert rec.flush()
    player = nt.from_onsets([60, 64], [0.5, 0.7], [0.2, 0.8], [70, 80])
    improvd = nt.from_onsets([67, 69, 71], [2.0, 2.25, 2.5], [0.25, 0.75, 0.5], [100, 100, 100])
    midifile.write_notes(tmp_path / "old.mid", [midifile.Track("player", player, channel=0, start_s=0.5),
                                                 midifile.Track("improvd", improvd, channel=2, start_s=2.0)])
    assert rec.path.read_bytes() == (tmp_path / "old.mid").read_bytes()


def test_tracks_pair_notes_and_keep_times(tmp_path):
    clock = FakeClock()
    rec = SessionRecorder(tmp_path, now=clock, output_channel=0, start_s=100.0)
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
    rec = SessionRecorder(tmp_path, now=FakeClock(), player_channels=(0,), output_channel=3)
    rec.add_player(100.0, on(60))
    rec.add_player(100.1, on(50, channel=5))  # not a listened channel
    player, improvd = rec.tracks(101.0)
    np.testing.assert_allclose(player.notes, [[60, 0, 1.0, 90]])
    assert len(improvd.notes) == 0 and player.channel == 0 and improvd.channel == 3


def test_flush_writes_a_readable_file_and_only_when_something_changed(tmp_path):
    clock = FakeClock()
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


def test_a_retriggered_note_ends_at_its_last_note_off(tmp_path):
    clock = FakeClock(100.0)
    rec = SessionRecorder(tmp_path, now=clock, name="s.mid")
    rec.add_improvd(100.0, on(60))
    rec.add_improvd(100.1, on(60, 70))  # still sounding: the first ends here
    rec.add_improvd(100.2, off(60))  # one of two note-offs: it goes on sounding
    clock.t = 100.25
    assert rec.flush()
    assert _file_events(rec.path)[IMPROVD] == [(0, "note_on", 0, 60, 90), (192, "note_off", 0, 60, 0),
                                                (192, "note_on", 0, 60, 70), (480, "note_off", 0, 60, 0)]
    rec.add_improvd(100.3, off(60))
    rec.add_improvd(100.4, off(60))  # nothing sounds: ignored
    clock.t = 101.0
    assert rec.flush()
    assert _file_events(rec.path)[IMPROVD] == [(0, "note_on", 0, 60, 90), (192, "note_off", 0, 60, 0),
                                                (192, "note_on", 0, 60, 70), (576, "note_off", 0, 60, 0)]
    assert rec.note_counts[IMPROVD] == 2


def test_a_note_off_ends_only_its_own_channel_s_note(tmp_path):
    clock = FakeClock(100.0)
    rec = SessionRecorder(tmp_path, now=clock, name="s.mid")  # the player's track is on channel 1
    rec.add_player(100.0, on(60, channel=0))
    rec.add_player(100.1, off(60, channel=3))  # channel 3's 60 does not sound: ignored
    rec.add_player(100.2, on(60, channel=3))  # another channel's 60: one pitch in the track, re-triggered
    rec.add_player(100.3, off(60, channel=0))
    rec.add_player(100.4, off(60, channel=3))
    clock.t = 101.0
    assert rec.flush()
    assert _file_events(rec.path)[PLAYER] == [(0, "note_on", 1, 60, 90), (384, "note_off", 1, 60, 0),
                                              (384, "note_on", 1, 60, 90), (768, "note_off", 1, 60, 0)]


def test_a_unison_is_one_note_that_ends_at_the_later_note_off(tmp_path):
    clock = FakeClock(100.0)
    rec = SessionRecorder(tmp_path, now=clock, name="s.mid")
    rec.add_improvd(100.0, on(60, 80))
    rec.add_improvd(100.0001, on(60, 100))  # the same tick
    rec.add_improvd(100.1, off(60))
    rec.add_improvd(100.2, off(60))
    clock.t = 101.0
    assert rec.flush()
    assert _file_events(rec.path)[IMPROVD] == [(0, "note_on", 0, 60, 80), (384, "note_off", 0, 60, 0)]
    assert rec.note_counts[IMPROVD] == 2


def test_a_note_lasts_at_least_a_tick(tmp_path):
    clock = FakeClock(100.0)
    rec = SessionRecorder(tmp_path, now=clock, name="s.mid")
    rec.add_improvd(100.5, on(60))
    rec.add_improvd(100.5, off(60))  # at its note-on's tick: a tick later
    rec.add_improvd(100.5, on(62))
    rec.add_improvd(100.5, on(64))
    rec.add_improvd(100.5, off(64))
    rec.add_improvd(100.5, on(64))  # the 64 that ended at its onset sounds on: a unison
    clock.t = 100.5
    assert rec.flush()  # the sounding ones end a tick after their note-on too
    assert _file_events(rec.path)[IMPROVD] == [
        (960, "note_on", 0, 60, 90), (960, "note_on", 0, 62, 90), (960, "note_on", 0, 64, 90),
        (961, "note_off", 0, 60, 0), (961, "note_off", 0, 62, 0), (961, "note_off", 0, 64, 0)]
    t_next = 100.0 + 961 / TICKS_PER_S  # the next tick
    rec.add_improvd(t_next, on(60, 50))  # after the deferred note-off
    rec.add_improvd(t_next, off(62))
    rec.add_improvd(100.6, off(60))
    rec.add_improvd(100.6, off(64))
    clock.t = 101.0
    assert rec.flush()
    assert _file_events(rec.path)[IMPROVD] == [
        (960, "note_on", 0, 60, 90), (960, "note_on", 0, 62, 90), (960, "note_on", 0, 64, 90),
        (961, "note_off", 0, 60, 0), (961, "note_off", 0, 62, 0), (961, "note_on", 0, 60, 50),
        (1152, "note_off", 0, 60, 0), (1152, "note_off", 0, 64, 0)]


def test_provisional_note_offs_are_not_kept(tmp_path):
    clock = FakeClock(100.0)
    rec = SessionRecorder(tmp_path, now=clock, name="s.mid")
    rec.add_player(100.0, on(60))
    rec.add_player(100.2, on(62))
    rec.add_player(100.3, off(62))
    clock.t = 101.0
    assert rec.flush()
    assert _file_events(rec.path)[PLAYER] == [(0, "note_on", 1, 60, 90), (384, "note_on", 1, 62, 90),
                                              (576, "note_off", 1, 62, 0), (1920, "note_off", 1, 60, 0)]
    clock.t = 102.0
    assert rec.flush()  # a note sounds: written again, ending later
    assert _file_events(rec.path)[PLAYER][-1] == (3840, "note_off", 1, 60, 0)
    rec.add_player(102.5, off(60))
    rec.add_player(102.5, on(64))
    clock.t = 103.0
    assert rec.flush()
    assert _file_events(rec.path)[PLAYER] == [(0, "note_on", 1, 60, 90), (384, "note_on", 1, 62, 90),
                                              (576, "note_off", 1, 62, 0), (4800, "note_off", 1, 60, 0),
                                              (4800, "note_on", 1, 64, 90), (5760, "note_off", 1, 64, 0)]


def test_an_event_stamped_before_the_latest_tick_is_written_at_it(tmp_path):
    clock = FakeClock(100.0)
    rec = SessionRecorder(tmp_path, now=clock, name="s.mid")
    rec.add_player(100.2, on(60))
    rec.add_player(100.1, on(62))  # earlier than the last one: at its tick
    rec.add_player(99.0, off(62))  # before the file's start too
    rec.add_player(100.3, off(60))
    clock.t = 101.0
    assert rec.flush()
    assert _file_events(rec.path)[PLAYER] == [(384, "note_on", 1, 60, 90), (384, "note_on", 1, 62, 90),
                                              (385, "note_off", 1, 62, 0), (576, "note_off", 1, 60, 0)]


def test_rotation_goes_on_with_the_sounding_notes_at_the_new_file_s_start(tmp_path):
    clock = FakeClock(100.0)
    rec = SessionRecorder(tmp_path, now=clock, name="first.mid", rotate_s=60.0)
    rec.add_player(100.5, on(60))
    rec.add_player(101.0, off(60))
    rec.add_improvd(159.0, on(64, 70))  # still sounding at the rotation
    rec.add_improvd(159.0, on(64, 70))  # a unison: two note-offs due
    clock.t = 160.5
    assert rec.flush()
    assert rec.files == [tmp_path / "first.mid"] and rec.start_s == 160.5
    first = _file_events(tmp_path / "first.mid")
    assert first[IMPROVD] == [(113280, "note_on", 0, 64, 70), (116160, "note_off", 0, 64, 0)]
    assert rec.note_counts == {"player": 0, "improvd": 2}
    rec.add_improvd(161.0, off(64))
    rec.add_improvd(161.2, off(64))
    clock.t = 162.0
    assert rec.flush()
    second = _file_events(rec.path)
    assert second == {PLAYER: [], IMPROVD: [(0, "note_on", 0, 64, 70), (1344, "note_off", 0, 64, 0)]}
    assert _file_events(tmp_path / "first.mid") == first


def test_due_every_interval(tmp_path):
    clock = FakeClock()
    rec = SessionRecorder(tmp_path, now=clock)
    assert not rec.due(10.0)
    clock.t += 10.0
    assert rec.due(10.0)
    rec.flush()
    assert not rec.due(10.0)


def test_a_failing_write_is_logged_once_does_not_raise_and_is_retried(tmp_path, caplog):
    calls, disk_full = [], [True]

    def write(path, data):
        calls.append(path)
        if disk_full[0]:
            raise OSError(28, "No space left on device")
        path.write_bytes(data)
    clock = FakeClock(100.0)
    rec = SessionRecorder(tmp_path, now=clock, write=write, name="s.mid")
    rec.add_player(100.0, on(60))
    clock.t = 100.5
    assert not rec.flush()
    rec.add_player(100.1, off(60))
    clock.t = 101.0
    assert not rec.flush()
    assert len(calls) == 2
    assert sum("No space left" in r.message for r in caplog.records) == 1
    disk_full[0] = False
    assert rec.flush()  # nothing new, but what failed is written now
    assert sum("is written again" in r.message for r in caplog.records) == 1
    assert _file_events(rec.path)[PLAYER] == [(0, "note_on", 1, 60, 90), (192, "note_off", 1, 60, 0)]
    assert not rec.flush()


def test_unique_names(tmp_path):
    a = SessionRecorder(tmp_path, now=FakeClock())
    a.add_player(100.0, on(60))
    a.flush()
    b = SessionRecorder(tmp_path, now=FakeClock())
    assert a.path != b.path
