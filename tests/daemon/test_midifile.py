"""Tests for MIDI files <-> notes (core/midifile.py). Every fixture is built in code."""

import struct

import mido
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.fakes import off, on
from improvd.core import notes as nt
from improvd.core.errors import MidiFileError
from improvd.core.midifile import FILE_TICKS_PER_BEAT, Track, read_notes, track_events, write_notes


def save(path, tracks, *, ticks_per_beat=480, midi_type=1):
    """Write a MIDI file from tracks given as lists of mido messages (delta times in ticks)."""
    midi = mido.MidiFile(type=midi_type, ticks_per_beat=ticks_per_beat)
    for messages in tracks:
        midi.tracks.append(mido.MidiTrack(messages))
    midi.save(str(path))
    return path


def random_notes(seed, n=60):
    rng = np.random.default_rng(seed)
    onset = np.round(np.sort(rng.uniform(0, 20, n)), 6)
    pitch = rng.choice(np.arange(30, 100), n, replace=False) if n <= 70 else rng.integers(30, 100, n)
    return nt.from_onsets(pitch, onset, rng.uniform(0.01, 0.3, n), rng.integers(1, 128, n))


def midi_events(path):
    """(absolute tick, channel, kind, pitch) of every note message of every track; kind 1 = on, 0 = off."""
    out = []
    for track in mido.MidiFile(str(path)).tracks:
        tick = 0
        for msg in track:
            tick += msg.time
            if msg.type in ("note_on", "note_off"):
                out.append((tick, msg.channel, int(msg.type == "note_on" and msg.velocity > 0), msg.note))
    return out


def assert_unambiguous(path):
    """No note-on of a pitch that is already sounding on its channel, and no note-off of a silent one."""
    sounding = set()
    for tick, channel, kind, pitch in sorted(midi_events(path), key=lambda e: (e[1], e[0], e[2])):
        key = (channel, pitch)
        if kind:
            assert key not in sounding, f"pitch {pitch} on channel {channel} starts again at tick {tick}"
            sounding.add(key)
        else:
            assert key in sounding, f"note-off of silent pitch {pitch} at tick {tick}"
            sounding.discard(key)
    assert not sounding


# --- round trip ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_round_trip_to_the_millisecond(tmp_path, seed):
    notes = random_notes(seed)
    path = tmp_path / "rt.mid"
    write_notes(path, [Track("t", notes)])
    assert mido.MidiFile(str(path)).ticks_per_beat == FILE_TICKS_PER_BEAT == 960
    back = read_notes(path)
    assert back.shape == notes.shape
    np.testing.assert_array_equal(back[:, nt.PITCH], notes[:, nt.PITCH])
    np.testing.assert_allclose(nt.onsets(back), nt.onsets(notes), atol=1e-3)
    np.testing.assert_allclose(back[:, nt.STEP], notes[:, nt.STEP], atol=1e-3)
    np.testing.assert_allclose(back[:, nt.DURATION], notes[:, nt.DURATION], atol=1e-3)
    np.testing.assert_array_equal(back[:, nt.VELOCITY], notes[:, nt.VELOCITY])


def test_track_start_offset_and_chords(tmp_path):
    chord = nt.from_onsets([60, 64, 67, 72], [0, 0, 0, 0.5], [1.0, 1.0, 1.0, 0.25])
    path = tmp_path / "c.mid"
    write_notes(path, [Track("chord", chord, start_s=1.25)])
    back = read_notes(path)
    np.testing.assert_array_equal(back[:, nt.PITCH], [60, 64, 67, 72])
    np.testing.assert_allclose(back[:, nt.STEP], [0, 0, 0, 0.5], atol=1e-3)
    midi = mido.MidiFile(str(path))
    first_on = next(t for t, _, kind, _ in midi_events(path) if kind)
    assert abs(mido.tick2second(first_on, midi.ticks_per_beat, 500_000) - 1.25) < 1e-3


def test_write_is_atomic_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "sub" / "a.mid"
    write_notes(path, [Track("t", random_notes(3, 10))])
    assert [p.name for p in path.parent.iterdir()] == ["a.mid"]
    with pytest.raises(Exception):
        write_notes(path, [Track("t", random_notes(3, 10), channel=99)])  # mido rejects channel 99
    assert [p.name for p in path.parent.iterdir()] == ["a.mid"]
    assert len(read_notes(path)) == 10


# --- merging and sorting ---------------------------------------------------------------------------------------

def test_all_non_drum_channels_and_tracks_are_merged_and_sorted(tmp_path):
    # Track 1: channel 0 plays 67 at beat 0 and 1; channel 3 plays 60 at beat 0. Track 2: 64 at beat 0 and
    # drums (channel 9) everywhere; track 3: 48 at beat 1, written with note_on velocity 0 as its note-off.
    path = save(tmp_path / "m.mid", [
        [mido.MetaMessage("set_tempo", tempo=500_000)],
        [on(67, 100), on(60, 100, channel=3), off(67, time=480), off(60, channel=3, time=0), on(67, 100),
         off(67, time=240)],
        [on(36, 100, channel=9), on(64, 100, channel=1), off(36, channel=9, time=120), off(64, channel=1, time=360),
         on(38, 100, channel=9, time=0), off(38, channel=9, time=60)],
        [on(48, 40, channel=5, time=480), off(48, channel=5, time=480, zero_velocity_on=True)],
    ])
    notes = read_notes(path)
    np.testing.assert_array_equal(notes[:, nt.PITCH], [60, 64, 67, 48, 67])
    np.testing.assert_allclose(nt.onsets(notes), [0, 0, 0, 0.5, 0.5])
    np.testing.assert_allclose(notes[:, nt.STEP], [0, 0, 0, 0.5, 0])
    np.testing.assert_allclose(notes[:, nt.DURATION], [0.5, 0.5, 0.5, 0.5, 0.25])
    np.testing.assert_array_equal(notes[:, nt.VELOCITY], [100, 100, 100, 40, 100])
    assert 36 not in notes[:, nt.PITCH] and 38 not in notes[:, nt.PITCH]


def test_type_0_file(tmp_path):
    path = save(tmp_path / "t0.mid", [[on(62, 100, channel=2), on(50, 100, channel=1), off(62, channel=2, time=240),
                                        off(50, channel=1, time=240)]], midi_type=0)
    notes = read_notes(path)
    np.testing.assert_array_equal(notes[:, nt.PITCH], [50, 62])
    np.testing.assert_allclose(notes[:, nt.DURATION], [0.5, 0.25])


def test_unison_duplicates_at_one_onset_are_all_read(tmp_path):
    # Two instruments double the same pitch: both notes are kept (step 0 between them).
    path = save(tmp_path / "u.mid", [[on(60, 100, channel=0), on(60, 100, channel=1), off(60, channel=0, time=480),
                                      off(60, channel=1, time=240), on(62, 100, time=0), off(62, time=480)]])
    notes = read_notes(path)
    np.testing.assert_array_equal(notes[:, nt.PITCH], [60, 60, 62])
    np.testing.assert_allclose(notes[:, nt.STEP], [0, 0, 0.75])  # 480 ticks per beat at 120 bpm
    np.testing.assert_allclose(sorted(notes[:2, nt.DURATION]), [0.5, 0.75])


def test_unison_duplicates_at_one_onset_are_written_as_one_note(tmp_path):
    notes = nt.from_onsets([60, 60, 64], [0.0, 0.0, 0.0], [0.3, 0.7, 0.5])
    path = tmp_path / "u.mid"
    write_notes(path, [Track("t", notes)])
    assert_unambiguous(path)
    back = read_notes(path)
    np.testing.assert_array_equal(back[:, nt.PITCH], [60, 64])
    np.testing.assert_allclose(back[:, nt.DURATION], [0.7, 0.5], atol=1e-3)  # the longer of the two


def test_same_pitch_overlap_ends_the_earlier_note(tmp_path):
    # 60 from 0 to 1.0 s, then 60 again from 0.4 s to 0.9 s: the first is cut at 0.4 s.
    notes = nt.from_onsets([60, 60, 62, 62, 62], [0.0, 0.4, 1.0, 1.2, 1.3], [1.0, 0.5, 1.0, 0.05, 0.5])
    path = tmp_path / "o.mid"
    write_notes(path, [Track("t", notes)])
    assert_unambiguous(path)
    back = read_notes(path)
    np.testing.assert_array_equal(back[:, nt.PITCH], [60, 60, 62, 62, 62])
    np.testing.assert_allclose(nt.onsets(back), [0.0, 0.4, 1.0, 1.2, 1.3], atol=1e-3)
    np.testing.assert_allclose(back[:, nt.DURATION], [0.4, 0.5, 0.2, 0.05, 0.5], atol=1e-3)


def test_track_events_cut_and_order():
    notes = nt.from_onsets([60, 60], [0.0, 0.5], [1.0, 0.25])
    events = track_events(notes)
    # 960 ticks per quarter at 120 bpm: 1920 ticks a second. Note-offs first at equal ticks.
    assert events == [(0, 1, 60, 100), (960, 0, 60, 0), (960, 1, 60, 100), (1440, 0, 60, 0)]


def test_overlap_across_tracks_is_not_cut(tmp_path):
    # Different tracks/channels never cut each other.
    a = nt.from_onsets([60], [0.0], [1.0])
    b = nt.from_onsets([60], [0.0], [0.5])
    path = tmp_path / "x.mid"
    write_notes(path, [Track("a", a, channel=0), Track("b", b, channel=1, start_s=0.25)])
    back = read_notes(path)
    np.testing.assert_allclose(nt.onsets(back), [0.0, 0.25], atol=1e-3)
    np.testing.assert_allclose(back[:, nt.DURATION], [1.0, 0.5], atol=1e-3)


# --- tempo ----------------------------------------------------------------------------------------------------

def test_tempo_changes_are_honoured(tmp_path):
    # 480 ticks per beat; 120 bpm for the first beat, then 60 bpm (in the tempo track, type 1).
    path = save(tmp_path / "tempo.mid", [
        [mido.MetaMessage("set_tempo", tempo=500_000), mido.MetaMessage("set_tempo", tempo=1_000_000, time=480)],
        [on(60, 100), off(60, time=240), on(62, 100, time=240), off(62, time=480), on(64, 100), off(64, time=960)],
    ])
    notes = read_notes(path)
    np.testing.assert_allclose(nt.onsets(notes), [0.0, 0.5, 1.5])
    np.testing.assert_allclose(notes[:, nt.DURATION], [0.25, 1.0, 2.0])


def test_tempo_change_in_the_middle_of_a_note(tmp_path):
    path = save(tmp_path / "tempo2.mid", [[on(60, 100), mido.MetaMessage("set_tempo", tempo=250_000, time=480),
                                            off(60, time=480)]])
    np.testing.assert_allclose(read_notes(path)[:, nt.DURATION], [0.5 + 0.25])


def test_smpte_time_division(tmp_path):
    # Division 0xE728: 25 frames a second, 40 ticks a frame = 1 ms a tick, whatever the tempo.
    trk = bytes([0x00, 0x90, 60, 100, 0x83, 0x60, 0x80, 60, 0, 0x00, 0xFF, 0x2F, 0x00])  # off after 480 ticks
    path = tmp_path / "smpte.mid"
    path.write_bytes(b"MThd" + struct.pack(">IHHH", 6, 0, 1, 0xE728) + b"MTrk" + struct.pack(">I", len(trk)) + trk)
    np.testing.assert_allclose(read_notes(path)[:, nt.DURATION], [0.48])


# --- files that hold nothing usable -----------------------------------------------------------------------------

def test_drums_only_file(tmp_path):
    path = save(tmp_path / "drums.mid", [[on(36, 100, channel=9), off(36, channel=9, time=240),
                                          on(38, 100, channel=9, time=0), off(38, channel=9, time=240)]])
    with pytest.raises(MidiFileError, match="drums only"):
        read_notes(path)


def test_file_without_notes(tmp_path):
    path = save(tmp_path / "empty.mid", [[mido.MetaMessage("set_tempo", tempo=500_000),
                                          mido.Message("program_change", program=3, time=10)]])
    with pytest.raises(MidiFileError, match="no notes") as info:
        read_notes(path)
    assert str(path) in str(info.value)


def test_zero_byte_file(tmp_path):
    path = tmp_path / "zero.mid"
    path.write_bytes(b"")
    with pytest.raises(MidiFileError, match="empty file"):
        read_notes(path)


def test_missing_file(tmp_path):
    with pytest.raises(MidiFileError, match="no such file"):
        read_notes(tmp_path / "nope.mid")


def test_text_is_not_midi(tmp_path):
    path = tmp_path / "text.mid"
    path.write_text("this is a shopping list, not a MIDI file\n" * 5)
    with pytest.raises(MidiFileError, match="not a readable MIDI file") as info:
        read_notes(path)
    assert "MThd" in str(info.value)


@pytest.mark.parametrize("keep", [0.2, 0.5, 0.9])
def test_truncated_file(tmp_path, keep):
    good = tmp_path / "good.mid"
    write_notes(good, [Track("t", random_notes(4, 40))])
    data = good.read_bytes()
    path = tmp_path / "cut.mid"
    path.write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(MidiFileError, match="truncated"):
        read_notes(path)


def test_zero_time_division(tmp_path):
    trk = bytes([0x00, 0x90, 60, 100, 0x10, 0x80, 60, 0, 0x00, 0xFF, 0x2F, 0x00])
    path = tmp_path / "div0.mid"
    path.write_bytes(b"MThd" + struct.pack(">IHHH", 6, 0, 1, 0) + b"MTrk" + struct.pack(">I", len(trk)) + trk)
    with pytest.raises(MidiFileError, match="time division"):
        read_notes(path)


# --- arbitrary bytes --------------------------------------------------------------------------------------------

def _header(fmt, tracks, division):
    return b"MThd" + struct.pack(">IHHH", 6, fmt, tracks, division)


midi_like = st.one_of(
    st.binary(max_size=200),
    st.builds(lambda fmt, n, div, body: _header(fmt, n, div) + body,
              st.integers(0, 3), st.integers(0, 3), st.integers(0, 0xFFFF), st.binary(max_size=200)),
    st.builds(lambda fmt, div, body, length: _header(fmt, 1, div) + b"MTrk" + struct.pack(">I", length) + body,
              st.integers(0, 2), st.sampled_from([0, 1, 96, 480, 0x7FFF, 0x8000, 0xE728, 0xFFFF]),
              st.binary(max_size=200), st.integers(0, 300)),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=midi_like)
def test_arbitrary_bytes_raise_only_midi_file_error(tmp_path, data):
    path = tmp_path / "fuzz.mid"
    path.write_bytes(data)
    try:
        notes = read_notes(path)
    except MidiFileError:
        return
    nt.validate(notes)
    assert len(notes) >= 1
