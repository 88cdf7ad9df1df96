"""MIDI files <-> notes, with mido only (the daemon's light runtime; training imports this too).

Reading merges the notes of every non-drum channel (channel 10, index 9, is drums in General MIDI) of every
track, honouring tempo changes, and sorts them by (onset, pitch). With `track=NAME` only the tracks of that name
(their `track_name` meta event, as `[record]` writes "player" and "improvd") are read; every track's tempo
changes still count. Writing uses 960 ticks per quarter at
120 bpm (about 0.5 ms a tick), so times survive a round trip to the millisecond.

Threads: no threads of its own; it runs on its caller's: the main thread of `improvd generate`, the
parsing worker processes of `improvd train` (train/data.py); the recorder (daemon/io/recorder.py) uses its
constants and writes its own files.
"""

from __future__ import annotations

import os
from collections import defaultdict, deque
from dataclasses import dataclass

import mido
import numpy as np

from improvd.core import notes as nt
from improvd.core.atomic import atomic_writer
from improvd.core.errors import MidiFileError

DRUM_CHANNEL = 9
FILE_TICKS_PER_BEAT = 960  # the resolution of the MIDI files improvd writes (ticks per quarter note)
TEMPO_US = 500_000  # 120 bpm
MIN_DURATION_S = 0.001
# The mido message types that carry notes (a note-on with velocity 0 is a note-off): the recorder, the input sink
# and the log lines take these and leave every other message alone.
NOTE_TYPES = frozenset({"note_on", "note_off"})


def read_notes(path: str | os.PathLike, track: str | None = None) -> np.ndarray:
    """Read a MIDI file into notes (see `daemon.notes`).

    Args:
        path: a Standard MIDI File (type 0, 1 or 2).
        track: read only the tracks named so (case and surrounding spaces ignored); None = every track.

    Returns:
        float64 [N, 4] notes, N >= 1.

    Raises:
        MidiFileError: the file is unreadable, not MIDI, truncated, or holds no pitched notes (the message
            says which; with `track`, also when no track has that name).
    """
    try:
        if os.path.getsize(path) == 0:
            raise MidiFileError(f"{path}: empty file (0 bytes)")
        midi = mido.MidiFile(path, clip=True)
    except FileNotFoundError as err:
        raise MidiFileError(f"{path}: no such file") from err
    except EOFError as err:
        raise MidiFileError(f"{path}: truncated (the file ends before the data its header announces)") from err
    except (OSError, ValueError, KeyError, IndexError, TypeError) as err:
        raise MidiFileError(f"{path}: not a readable MIDI file ({type(err).__name__}: {err})") from err
    try:
        if track is not None:
            midi = select_tracks(midi, track)
        return notes_from_midi(midi)
    except MidiFileError as err:
        raise MidiFileError(f"{path}: {err}") from err


def _smpte_tick_seconds(division: int) -> float | None:
    """Seconds per tick of an SMPTE-timed file (a negative division: -frames/s high, ticks/frame low), else None.

    Raises:
        MidiFileError: the division is 0 or names no SMPTE frame rate (24, 25, 29.97, 30) with ticks per frame.
    """
    if division > 0:
        return None
    fps, per_frame = -(division >> 8), division & 0xFF
    if division == 0 or fps not in (24, 25, 29, 30) or per_frame == 0:
        raise MidiFileError(f"time division {division} in the header is not valid: expected ticks per beat >= 1 "
                            f"or SMPTE frames (24, 25, 29, 30) and ticks per frame >= 1")
    return 1.0 / ((30000 / 1001 if fps == 29 else fps) * per_frame)


def track_name(track: mido.MidiTrack) -> str | None:
    """The name of a track (its first `track_name` meta event), or None."""
    for msg in track:
        if msg.type == "track_name":
            return msg.name
    return None


def select_tracks(midi: mido.MidiFile, name: str) -> mido.MidiFile:
    """A copy of `midi` whose notes are those of the tracks named `name` only; the other tracks keep just their
    tempo changes (so times stay right). MidiFileError when no track has that name."""
    want = name.strip().lower()
    names = [track_name(t) for t in midi.tracks]
    if not any(n is not None and n.strip().lower() == want for n in names):
        found = ", ".join(repr(n) for n in names if n is not None) or "none named"
        raise MidiFileError(f"no track named {name!r} (tracks: {found})")
    out = mido.MidiFile(type=midi.type, ticks_per_beat=midi.ticks_per_beat)
    for track, n in zip(midi.tracks, names):
        if n is not None and n.strip().lower() == want:
            out.tracks.append(track)
            continue
        kept, carried = mido.MidiTrack(), 0
        for msg in track:
            carried += msg.time
            if msg.type == "set_tempo":
                kept.append(msg.copy(time=carried))
                carried = 0
        out.tracks.append(kept)
    return out


def notes_from_midi(midi: mido.MidiFile) -> np.ndarray:
    """Notes of a parsed `mido.MidiFile` (see `read_notes`)."""
    tick_s = _smpte_tick_seconds(midi.ticks_per_beat)
    tracks = [mido.merge_tracks(midi.tracks)] if midi.type != 2 else list(midi.tracks)
    pitch, onset, duration, velocity = [], [], [], []
    drum_notes = 0
    for track in tracks:
        now_s = 0.0
        tempo = TEMPO_US
        sounding: dict[tuple[int, int], deque] = defaultdict(deque)
        for msg in track:
            if msg.time:
                now_s += msg.time * tick_s if tick_s else mido.tick2second(msg.time, midi.ticks_per_beat, tempo)
            if msg.type == "set_tempo":
                tempo = msg.tempo
            elif msg.type == "note_on" and msg.velocity > 0:
                if msg.channel == DRUM_CHANNEL:
                    drum_notes += 1
                else:
                    sounding[(msg.channel, msg.note)].append((now_s, msg.velocity))
            elif msg.type in NOTE_TYPES:
                held = sounding.get((msg.channel, msg.note))
                if held:
                    start_s, vel = held.popleft()
                    pitch.append(msg.note)
                    onset.append(start_s)
                    duration.append(now_s - start_s)
                    velocity.append(vel)
        for (_, note), held in sounding.items():  # never released: end them with the track
            for start_s, vel in held:
                pitch.append(note)
                onset.append(start_s)
                duration.append(now_s - start_s)
                velocity.append(vel)
    if not pitch:
        raise MidiFileError("drums only, no pitched notes" if drum_notes else "no notes")
    duration_s = np.maximum(np.asarray(duration, dtype=np.float64), MIN_DURATION_S)
    return nt.from_onsets(pitch, onset, duration_s, velocity)


@dataclass(frozen=True)
class Track:
    """One track to write: a name, its notes, the MIDI channel (0-based) and an optional GM program."""

    name: str
    notes: np.ndarray
    channel: int = 0
    program: int | None = None
    start_s: float = 0.0


def _seconds_to_ticks(t_s: float) -> int:
    return int(round(t_s * FILE_TICKS_PER_BEAT * 1e6 / TEMPO_US))


def track_events(notes: np.ndarray, start_s: float = 0.0) -> list[tuple[int, int, int, int]]:
    """Absolute-tick events (tick, kind, pitch, velocity) of one track, kind 0 = note-off, 1 = note-on.

    A note that starts while the same pitch still sounds ends the earlier one at that moment, so every
    note-off is unambiguous. At equal ticks note-offs come first.
    """
    starts = nt.onsets(notes, start_s) if len(notes) else np.zeros(0)
    events = []
    last_on: dict[int, tuple[int, int]] = {}  # pitch -> (on tick, index in events of its off)
    for (pitch, _, dur, vel), t0 in sorted(zip(notes.tolist(), starts.tolist()), key=lambda x: (x[1], x[0][0])):
        p = int(pitch)
        on = _seconds_to_ticks(t0)
        off = max(on + 1, _seconds_to_ticks(t0 + dur))
        if p in last_on:
            prev_on, idx = last_on[p]
            if prev_on == on:  # the same pitch twice at one onset (a unison): one note, the longer
                events[idx] = (max(events[idx][0], off), 0, p, 0)
                continue
            if events[idx][0] > on:  # still sounding: cut it where the new one starts
                events[idx] = (on, 0, p, 0)
        events.append((on, 1, p, int(np.clip(round(vel), 1, 127))))
        events.append((off, 0, p, 0))
        last_on[p] = (on, len(events) - 1)
    events.sort(key=lambda e: (e[0], e[1]))
    return events


def write_notes(path: str | os.PathLike, tracks: list[Track]) -> None:
    """Write tracks of notes to a type-1 MIDI file, atomically (a temporary file, then a rename).

    Args:
        path: the output file; it is either written whole or left as it was.
        tracks: the tracks, each with notes as in `daemon.notes`.
    """
    midi = mido.MidiFile(type=1, ticks_per_beat=FILE_TICKS_PER_BEAT)
    meta = mido.MidiTrack([mido.MetaMessage("set_tempo", tempo=TEMPO_US, time=0)])
    midi.tracks.append(meta)
    for track in tracks:
        mtrack = mido.MidiTrack([mido.MetaMessage("track_name", name=track.name, time=0)])
        if track.program is not None:
            mtrack.append(mido.Message("program_change", channel=track.channel, program=track.program, time=0))
        now = 0
        for tick, kind, pitch, vel in track_events(np.asarray(track.notes, dtype=np.float64), track.start_s):
            msg_type = "note_on" if kind else "note_off"
            mtrack.append(mido.Message(msg_type, channel=track.channel, note=pitch, velocity=vel, time=tick - now))
            now = tick
        midi.tracks.append(mtrack)
    with atomic_writer(path) as fh:
        midi.save(file=fh)
