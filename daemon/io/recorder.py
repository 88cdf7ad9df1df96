"""Session recordings: what the player played and what improvd answered, as one MIDI file per session.

`SessionRecorder` collects note-on/note-off messages with their times (seconds on the daemon's clock,
`time.perf_counter`) and writes them as a type-1 MIDI file laid out as `daemon.midifile.write_notes` lays it out
(960 ticks per quarter, one tempo meta at 120 bpm in a first track, then a "player" and an "improvd" track).

Incremental encoding: a flush runs every `record.flush_seconds` (10 s) on the recorder's thread, so its cost must
not grow with the recording. Re-pairing every note and rewriting the file with mido cost 0.5 s of CPU at 20k notes
and 2.5 s at 100k (a 60-minute file at the shipped model's 47 notes/s holds about 170k). Instead each message is
encoded to MIDI bytes (delta time, status, data) once, when `drain()` takes it, into a `bytearray` per track: a few
bytes an event. A flush writes the header, those bytes and a short tail: the events of the latest tick (kept aside,
because more may come at that tick and note-offs go first), and a provisional note-off at the flush time for each
note still sounding. The provisional note-offs are not kept: the note goes on sounding and its real note-off comes
later. So a flush costs what is new since the last one plus a byte copy of the file.

Notes in the file, as the old pairing and `daemon.midifile.track_events` gave them: a note-off ends a note-on of the
same key (input channel, pitch), and one for a key that is not sounding is ignored; a note-on with velocity 0 is a
note-off. In the file a track is one channel, so its pitches are its keys: a note-on of a pitch that is sounding
ends the sounding note there (note-off, then note-on) and the pitch then ends at its last due note-off (the notes
are counted, as FIFO pairing did); a second note-on at the same tick as the sounding one (a unison) is no new
note-on, just one more note-off due. A note lasts at least one tick: a note-off at its note-on's tick is written a
tick later. Events are written in time order (an event stamped before the track's latest tick is written at that
tick), at one tick note-offs first.

Writes are atomic (`daemon.atomic.atomic_writer`: a temporary file, fsynced, then a rename, and the directory
fsynced). A recording file is `RECORDING_MODE` (0600) less the umask: readable by the user alone. The service
flushes at least every `record.flush_seconds` while running and once at exit, so even `kill -9` or a power cut
loses at most the last interval. A write that fails (a full disk) is logged once and retried at the next flush; the
temporary file is removed, so a full disk does not fill up further. While writes fail, what the file holds is kept
until it is due to rotate or holds `MAX_UNWRITTEN_BYTES`; then it is dropped (logged) and the recording goes on in
a new file, so memory stays bounded however long the disk stays full. With `rotate_s` (`record.rotate_minutes`),
once a file covers that long and has been written, the recorder goes on in a new file whose time 0 is that moment
(notes still sounding continue in it from time 0).

Threads: `add_player` (the MIDI input's poller thread) and `add_improvd` (the scheduler's `on_sent` hook) only
append to a deque; everything else runs on the recorder's thread (`daemon/io/recordwriter.py`), or on the main
thread once that has ended. Apart from the file write, the class is pure (the clock and the writer are
injectable).
"""

from __future__ import annotations

import collections
import errno
import io
import logging
import os
import struct
import time
from operator import itemgetter
from pathlib import Path
from typing import Callable

import mido

from improvd.core import midifile
from improvd.core import notes as nt
from improvd.core.atomic import atomic_writer
from improvd.core.errors import ConfigError

log = logging.getLogger("improvd.record")

PLAYER, IMPROVD = "player", "improvd"
FLUSH_INTERVAL_S = 10.0
_NOTE_OFF, _NOTE_ON = 0, 1  # event kinds; sorting by kind puts note-offs first at a tick
_SECONDS_PER_TICK = midifile.TEMPO_US / 1e6 / midifile.FILE_TICKS_PER_BEAT
_END_OF_TRACK = b"\x00\xff\x2f\x00"
# While writes fail, a file's encoded notes are kept (to be written once the disk takes them) up to this size
# (about 500,000 notes, three hours at the shipped model's 47 notes/s) or the rotation, whichever comes first;
# then they are dropped and the recording goes on in a new file, so that memory stays bounded.
MAX_UNWRITTEN_BYTES = 4 * 1024 * 1024
# A recording is what the player played: the user's own. Files are 0600 less the umask (never wider), and a
# record.dir improvd creates is 0700 less the umask.
RECORDING_MODE = 0o600
RECORDING_DIR_MODE = 0o700


def _vlq(value: int) -> bytes:
    """A MIDI variable-length quantity: 7 bits a byte, most significant first, the high bit set on all but the last.

    Raises:
        ValueError: `value` is negative (a delta time going back: a bug, which must not loop forever).
    """
    if value < 0:
        raise ValueError(f"a MIDI delta time cannot be negative, got {value}")
    out = bytearray([value & 0x7F])
    value >>= 7
    while value:
        out.append(0x80 | (value & 0x7F))
        value >>= 7
    out.reverse()
    return bytes(out)


def _chunk_header(kind: bytes, length: int) -> bytes:
    return kind + struct.pack(">I", length)


_TRACKS_IN_FILE = 3  # the tempo track, the player's, improvd's
_HEADER = _chunk_header(b"MThd", 6) + struct.pack(">hhh", 1, _TRACKS_IN_FILE, midifile.FILE_TICKS_PER_BEAT)
_TEMPO_EVENTS = b"\x00\xff\x51\x03" + midifile.TEMPO_US.to_bytes(3, "big") + _END_OF_TRACK
_TEMPO_TRACK = _chunk_header(b"MTrk", len(_TEMPO_EVENTS)) + _TEMPO_EVENTS


def _encode(out: bytearray, events: list[tuple[int, int, int, int]], channel: int, tick: int,
            status: int | None) -> tuple[int, int | None]:
    """Append events to `out` as MIDI track bytes, with running status as mido writes it.

    Args:
        out: the track's bytes so far.
        events: (tick, kind, pitch, velocity), in time order, none before `tick`.
        channel: the 0-based MIDI channel of every event.
        tick: the tick of the last event in `out`.
        status: the running status byte at the end of `out` (None after a meta event).

    Returns:
        The tick and running status at the end of `out`.
    """
    for at, kind, pitch, velocity in events:
        out += _vlq(at - tick)
        byte = (0x90 if kind == _NOTE_ON else 0x80) | channel
        if byte != status:
            out.append(byte)
            status = byte
        out.append(pitch)
        out.append(velocity)
        tick = at
    return tick, status


def _write_file(path: Path, data: bytes) -> None:
    """Replace `path` by `data`, whole or not at all (`daemon.atomic.atomic_writer`), readable by its owner only."""
    with atomic_writer(path, mode=RECORDING_MODE) as fh:
        fh.write(data)


def _sync_directory(directory: Path) -> None:
    """fsync a directory, so that a rename in it survives a power cut (POSIX; a no-op where unsupported)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class _TrackEncoder:
    """One track's note events, encoded to MIDI bytes as they come (the recorder's thread).

    Events of the latest tick (`tick`) wait in `pending`, because more may come at that tick and note-offs are
    written first; a note-off deferred to keep a note one tick long waits in `deferred` (for `tick + 1`). Once a
    later tick comes, they are encoded into `data`, which then never changes until a rotation.

    Args:
        name: the track's name (its `track_name` meta event).
        channel: the 0-based MIDI channel the track is written on.
    """

    def __init__(self, name: str, channel: int) -> None:
        self.name = name
        self.channel = channel
        encoded = name.encode("latin-1")
        self._prefix = b"\x00\xff\x03" + _vlq(len(encoded)) + encoded
        self._start_file()
        self.held: dict[tuple[int, int], int] = {}  # (input channel, pitch) -> its note-offs due

    def _start_file(self) -> None:
        self.data = bytearray(self._prefix)
        self.written_tick = 0  # the tick of the last event in `data`
        self.status: int | None = None  # running status at the end of `data` (the name meta resets it)
        self.tick = 0  # the latest tick; `pending` holds its events
        self.pending: list[tuple[int, int, int]] = []  # (kind, pitch, velocity)
        self.deferred: dict[int, int] = {}  # pitch -> velocity of a note whose note-off falls at `tick + 1`
        self.due: dict[int, int] = {}  # pitch -> note-offs due before its sounding note ends (> 0)
        self.onset: dict[int, tuple[int, int]] = {}  # pitch -> (tick, velocity) of its sounding note's note-on
        self.notes = 0  # note-ons taken in this file (a unison counts twice, as it did when notes were paired)

    def add(self, tick: int, on: bool, channel: int, pitch: int, velocity: int) -> None:
        """Take one note message.

        Args:
            tick: its time in ticks from the file's start; one before the latest tick is taken at the latest tick.
            on: a note-on with velocity > 0 (else a note-off, or a note-on with velocity 0).
            channel: its 0-based input channel (with `pitch`, the key its note-off must match).
            pitch: its MIDI note number.
            velocity: its velocity, 1..127 for a note-on.
        """
        tick = max(tick, self.tick)
        self._advance(tick)
        key = (channel, pitch)
        if on:
            self.notes += 1
            self.held[key] = self.held.get(key, 0) + 1
            due = self.due.get(pitch, 0)
            if due and self.onset[pitch][0] == tick:  # a unison: one note in the file, ending at its last note-off
                self.due[pitch] = due + 1
            elif pitch in self.deferred:  # a unison with a note that ended at its own onset: it sounds on
                self.onset[pitch] = (tick, self.deferred.pop(pitch))
                self.due[pitch] = 1
            else:
                if due:  # re-triggered: the sounding note ends here; the pitch ends at its last note-off
                    self.pending.append((_NOTE_OFF, pitch, 0))
                self.pending.append((_NOTE_ON, pitch, velocity))
                self.onset[pitch] = (tick, velocity)
                self.due[pitch] = due + 1
            return
        held = self.held.get(key, 0)
        if not held:  # nothing of this key sounds
            return
        if held == 1:
            del self.held[key]
        else:
            self.held[key] = held - 1
        due = self.due[pitch] - 1  # the keys of a pitch hold together as many note-offs as the pitch has due
        if due:
            self.due[pitch] = due
            return
        del self.due[pitch]
        onset_tick, onset_velocity = self.onset.pop(pitch)
        if onset_tick == tick:
            self.deferred[pitch] = onset_velocity
        else:
            self.pending.append((_NOTE_OFF, pitch, 0))

    def _advance(self, tick: int) -> None:
        """Encode what waits for ticks before `tick` into `data`; `tick` becomes the latest tick."""
        if tick == self.tick:
            return
        self._store(self.tick, self.pending)
        self.pending = [(_NOTE_OFF, pitch, 0) for pitch in self.deferred]
        self.deferred = {}
        self.tick += 1
        if tick > self.tick:
            self._store(self.tick, self.pending)
            self.pending = []
            self.tick = tick

    def _store(self, tick: int, events: list[tuple[int, int, int]]) -> None:
        events.sort(key=itemgetter(0))  # stable: note-offs first, then in the order they came
        self.written_tick, self.status = _encode(self.data, [(tick, *e) for e in events], self.channel,
                                                 self.written_tick, self.status)

    def chunk(self, now_tick: int) -> list[bytes | bytearray]:
        """The track chunk as of `now_tick`, in parts: what is encoded, then what waits and provisional note-offs.

        The sounding notes end at `now_tick` (or a tick after their note-on, or at the latest tick) in the chunk
        only; nothing here changes the track.
        """
        events = [(self.tick, *e) for e in self.pending]
        events += [(self.tick + 1, _NOTE_OFF, pitch, 0) for pitch in self.deferred]
        end = max(now_tick, self.tick)
        events += [(max(end, on + 1), _NOTE_OFF, pitch, 0) for pitch, (on, _) in self.onset.items()]
        events.sort(key=itemgetter(0, 1))  # stable: at a tick, note-offs first
        tail = bytearray()
        _encode(tail, events, self.channel, self.written_tick, self.status)
        tail += _END_OF_TRACK
        return [_chunk_header(b"MTrk", len(self.data) + len(tail)), self.data, tail]

    def rotate(self) -> None:
        """Go on in a new file whose tick 0 is now: the sounding notes start again at tick 0."""
        sounding = {pitch: velocity for pitch, (_, velocity) in self.onset.items()}
        due = self.due
        self._start_file()
        for pitch, velocity in sounding.items():
            self.pending.append((_NOTE_ON, pitch, velocity))
            self.onset[pitch] = (0, velocity)
        self.due = due
        self.notes = sum(due.values())


def check_directory(directory: str | os.PathLike) -> Path:
    """Make `record.dir` (with its parents) and check that improvd can create files in it (start-up, main thread).

    Returns:
        The directory, `~` expanded.

    Raises:
        ConfigError: it cannot be made or written, naming it and why (a parent that is a file or unreadable, a
            read-only file system).
    """
    path = Path(directory).expanduser()
    try:
        path.mkdir(mode=RECORDING_DIR_MODE, parents=True, exist_ok=True)
        if not path.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        if not os.access(path, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES) + " (improvd cannot create files there)")
    except OSError as err:
        raise ConfigError(f"record.dir {str(path)!r} cannot be used: {err.strerror or err}; give a directory improvd "
                          f"can write to, or record.dir = \"\" for no recording") from err
    return path


class SessionRecorder:
    """One session's recording.

    Args:
        directory: where the file goes (created when missing).
        start_s: the session's start on the daemon's clock, seconds; times in the file count from it.
        player_channels: 0-based channels of the player's notes to keep (empty = all).
        output_channel: 0-based channel improvd plays on (its track uses it; the player's track uses another).
        now: the daemon's clock, seconds.
        write: the writer, called with the path and the whole file's bytes; it replaces the file atomically or
            raises OSError (tests inject one).
        name: the file name (default `improvd-YYYYmmdd-HHMMSS.mid`, made unique in `directory`).
        rotate_s: start a new file once the current one covers this many seconds (None: never).
    """

    def __init__(self, directory: str | os.PathLike, *, start_s: float | None = None,
                 player_channels: tuple[int, ...] = (), output_channel: int = 0,
                 now: Callable[[], float] = time.perf_counter,
                 write: Callable[[Path, bytes], None] = _write_file,
                 name: str | None = None, rotate_s: float | None = None) -> None:
        self.directory = Path(directory).expanduser()
        self._now = now
        self.start_s = now() if start_s is None else start_s
        self._write = write
        self._player_channels = frozenset(player_channels)
        self.output_channel = output_channel
        self.player_channel = 1 if output_channel == 0 else 0
        self._incoming: dict[str, collections.deque] = {PLAYER: collections.deque(), IMPROVD: collections.deque()}
        self._tracks = {PLAYER: _TrackEncoder(PLAYER, self.player_channel),
                        IMPROVD: _TrackEncoder(IMPROVD, self.output_channel)}
        self._changed = False
        self._failing = False
        self.last_flush_s = self.start_s
        self.rotate_s = rotate_s
        self.path = self.directory / (name or self._unique_name())
        self.files: list[Path] = []  # files completed by rotation

    def _unique_name(self) -> str:
        stem = "improvd-" + time.strftime("%Y%m%d-%H%M%S")
        name, k = f"{stem}.mid", 1
        while self._exists(self.directory / name):
            k += 1
            name = f"{stem}-{k}.mid"
        return name

    @staticmethod
    def _exists(path: Path) -> bool:
        try:
            return path.exists()
        except OSError:  # the directory became unreadable: the write will fail and say so
            return False

    # ---- called from other threads: append only --------------------------------------------------------
    def add_player(self, t_s: float, msg: mido.Message) -> None:
        """A message the player sent (the MIDI input's poller thread); only notes are kept."""
        if msg.type in midifile.NOTE_TYPES:
            self._incoming[PLAYER].append((t_s, msg))

    def add_improvd(self, t_s: float, msg: mido.Message) -> None:
        """A message improvd sent (scheduler thread, via its `on_sent` hook)."""
        self._incoming[IMPROVD].append((t_s, msg))

    # ---- the recorder's thread ---------------------------------------------------------------------------
    def drain(self) -> None:
        """Encode the appended note messages into their tracks."""
        for who, incoming in self._incoming.items():
            track = self._tracks[who]
            while incoming:
                t_s, msg = incoming.popleft()
                if msg.type not in midifile.NOTE_TYPES:
                    continue
                if who == PLAYER and self._player_channels and msg.channel not in self._player_channels:
                    continue
                track.add(midifile._seconds_to_ticks(t_s - self.start_s),
                          msg.type == "note_on" and msg.velocity > 0, msg.channel, msg.note, msg.velocity)
                self._changed = True

    def _file_bytes(self, now_s: float) -> bytes:
        """The whole file as of `now_s` (seconds on the daemon's clock): the sounding notes end then."""
        now_tick = max(midifile._seconds_to_ticks(now_s - self.start_s), 0)
        parts: list[bytes | bytearray] = [_HEADER, _TEMPO_TRACK]
        for track in self._tracks.values():
            parts += track.chunk(now_tick)
        return b"".join(parts)

    def tracks(self, now_s: float | None = None) -> list[midifile.Track]:
        """The two tracks as a flush at `now_s` would write them, read back (tick-exact; for tests and tools)."""
        self.drain()
        now_s = self._now() if now_s is None else now_s
        midi = mido.MidiFile(file=io.BytesIO(self._file_bytes(now_s)))
        out = []
        for track, mtrack in zip(self._tracks.values(), midi.tracks[1:]):
            tick, sounding, rows = 0, {}, []
            for msg in mtrack:
                tick += msg.time
                if msg.type == "note_on" and msg.velocity > 0:
                    sounding[msg.note] = (tick, msg.velocity)
                elif msg.type in midifile.NOTE_TYPES and msg.note in sounding:  # at most one note of a pitch sounds
                    on, velocity = sounding.pop(msg.note)
                    rows.append((msg.note, on * _SECONDS_PER_TICK, (tick - on) * _SECONDS_PER_TICK, velocity))
            if rows:
                pitch, onset, duration, velocity = zip(*rows)
                out.append(midifile.Track(track.name, nt.from_onsets(pitch, onset, duration, velocity),
                                          channel=track.channel, start_s=min(onset)))
            else:
                out.append(midifile.Track(track.name, nt.empty(), channel=track.channel))
        return out

    @property
    def note_counts(self) -> dict[str, int]:
        """Notes recorded in the current file so far per track (finished or sounding)."""
        self.drain()
        return {who: track.notes for who, track in self._tracks.items()}

    def flush(self, *, force: bool = False) -> bool:
        """Write the file if anything changed since the last write, a note sounds, or `force`. Returns True if written.

        A failed write (a full disk, a directory that went away) is logged, once until a write succeeds again,
        and does not raise: the music goes on, and the next flush writes everything.
        """
        self.drain()
        now_s = self._now()
        self.last_flush_s = now_s
        sounding = any(track.onset for track in self._tracks.values())
        if not (self._changed or sounding or force):
            return False
        try:
            self._write(self.path, self._file_bytes(now_s))
            _sync_directory(self.path.parent)
        except OSError as err:
            if not self._failing:
                log.error("cannot write the recording %s: %s (improvd keeps playing and tries again)", self.path, err)
            self._failing = True
            self._drop_unwritable(now_s)
            return False
        if self._failing:
            log.warning("the recording %s is written again", self.path)
        self._failing = False
        self._changed = False
        if self.rotate_s is not None and now_s - self.start_s >= self.rotate_s:
            self._rotate(now_s)
        return True

    @property
    def buffered_bytes(self) -> int:
        """The encoded notes of the current file held in memory, in bytes."""
        return sum(len(track.data) for track in self._tracks.values())

    def _drop_unwritable(self, now_s: float) -> None:
        """After a failed write: once the file is due to rotate or holds `MAX_UNWRITTEN_BYTES`, what it holds is
        dropped (said in the log) and the recording goes on in a new file from `now_s`; memory stays bounded."""
        rotate_due = self.rotate_s is not None and now_s - self.start_s >= self.rotate_s
        if not rotate_due and self.buffered_bytes < MAX_UNWRITTEN_BYTES:
            return
        counts = ", ".join(f"{who} {track.notes} notes" for who, track in self._tracks.items())
        minutes = (now_s - self.start_s) / 60
        for track in self._tracks.values():
            track.rotate()
        dropped, self.start_s = self.path, now_s
        self.path = self.directory / self._unique_name()
        self._changed = False
        log.error("the recording %s could not be written (%.0f min, %s): dropped to keep memory bounded; improvd "
                  "goes on recording in %s once the disk takes it", dropped, minutes, counts, self.path)

    def _rotate(self, now_s: float) -> None:
        """Go on in a new file from `now_s`: everything so far is in the file just written."""
        self.files.append(self.path)
        for track in self._tracks.values():
            track.rotate()
        self.start_s = now_s
        self.path = self.directory / self._unique_name()
        self._changed = False
        log.info("recording %s complete (%.0f min); improvd goes on recording in %s", self.files[-1],
                 self.rotate_s / 60, self.path)

    def due(self, interval_s: float = FLUSH_INTERVAL_S) -> bool:
        """True when the last flush is `interval_s` or more ago."""
        return self._now() - self.last_flush_s >= interval_s
