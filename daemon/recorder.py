"""Session recordings: what the player played and what improvd answered, as one MIDI file per session.

`SessionRecorder` collects note-on/note-off messages with their times (seconds on the daemon's clock,
`time.perf_counter`), pairs them into notes, and writes them with `daemon.midifile.write_notes` (atomically: a
temporary file, fsynced, then a rename, and the directory fsynced) on two tracks, "player" and "improvd".
`flush()` rewrites the whole file; the service calls it at least every `record.flush_seconds` (10 s) while running
and once at exit, so even `kill -9` or a power cut loses at most the last interval. A note still sounding at a
flush is written as ending at that moment. A write that fails (a full disk) is logged once and retried at the next
flush; the temporary file is removed, so a full disk does not fill up further.

Long runs: the whole file is rewritten at each flush, so memory and the cost of a flush grow with the file. With
`rotate_s` (`record.rotate_minutes`), once a file covers that long and has been written, the recorder goes on in a
new file (the finished notes are let go; notes still sounding continue in the new file from its start).

Threads: `add_player` (the MIDI input callback) and `add_improvd` (the scheduler's `on_sent` hook) only append to a
deque; everything else runs on the main thread. Apart from the file write, the class is pure (the clock and the
writer are injectable).
"""

from __future__ import annotations

import collections
import logging
import os
import time
from pathlib import Path
from typing import Callable

import mido
import numpy as np

from daemon import midifile
from daemon import notes as nt

log = logging.getLogger("improvd.record")

PLAYER, IMPROVD = "player", "improvd"
FLUSH_INTERVAL_S = 10.0
_NOTE_TYPES = ("note_on", "note_off")


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


class _NotePairer:
    """Pairs note-on and note-off messages (main thread) into finished notes [onset_s, pitch, duration_s, vel]."""

    def __init__(self) -> None:
        self.sounding: dict[tuple[int, int], list[tuple[float, int]]] = {}
        self.finished: list[tuple[float, int, float, int]] = []

    def add(self, t_s: float, msg: mido.Message) -> None:
        if msg.type not in ("note_on", "note_off"):
            return
        key = (msg.channel, msg.note)
        if msg.type == "note_on" and msg.velocity > 0:
            self.sounding.setdefault(key, []).append((t_s, msg.velocity))
            return
        held = self.sounding.get(key)
        if held:
            onset_s, velocity = held.pop(0)
            if not held:
                del self.sounding[key]
            self.finished.append((onset_s, msg.note, max(t_s - onset_s, 0.0), velocity))

    def snapshot(self, now_s: float) -> list[tuple[float, int, float, int]]:
        """Finished notes plus the sounding ones as if released at `now_s`."""
        open_notes = [(on, pitch, max(now_s - on, 0.0), vel)
                      for (_, pitch), held in self.sounding.items() for on, vel in held]
        return self.finished + open_notes


class SessionRecorder:
    """One session's recording.

    Args:
        directory: where the file goes (created when missing).
        start_s: the session's start on the daemon's clock; times in the file count from it.
        player_channels: 0-based channels of the player's notes to keep (empty = all).
        output_channel: 0-based channel improvd plays on (its track uses it; the player's track uses another).
        now: the daemon's clock.
        write: the writer, `midifile.write_notes` (tests inject one).
        name: the file name (default `improvd-YYYYmmdd-HHMMSS.mid`, made unique in `directory`).
        rotate_s: start a new file once the current one covers this many seconds (None: never).
    """

    def __init__(self, directory: str | os.PathLike, *, start_s: float | None = None,
                 player_channels: tuple[int, ...] = (), output_channel: int = 0,
                 now: Callable[[], float] = time.perf_counter,
                 write: Callable[[Path, list[midifile.Track]], None] = midifile.write_notes,
                 name: str | None = None, rotate_s: float | None = None) -> None:
        self.directory = Path(directory).expanduser()
        self._now = now
        self.start_s = now() if start_s is None else start_s
        self._write = write
        self._player_channels = frozenset(player_channels)
        self.output_channel = output_channel
        self.player_channel = 1 if output_channel == 0 else 0
        self._incoming: dict[str, collections.deque] = {PLAYER: collections.deque(), IMPROVD: collections.deque()}
        self._pairers = {PLAYER: _NotePairer(), IMPROVD: _NotePairer()}
        self._changed = False
        self._failing = False
        self.last_flush_s = self.start_s
        self.rotate_s = rotate_s
        self.path = self.directory / (name or self._unique_name())
        self.files: list[Path] = []  # files completed by rotation

    def _unique_name(self) -> str:
        stem = "improvd-" + time.strftime("%Y%m%d-%H%M%S")
        name, k = f"{stem}.mid", 1
        while (self.directory / name).exists():
            k += 1
            name = f"{stem}-{k}.mid"
        return name

    # ---- called from other threads: append only --------------------------------------------------------
    def add_player(self, t_s: float, msg: mido.Message) -> None:
        """A message the player sent (the MIDI input's poller thread); only notes are kept."""
        if msg.type in _NOTE_TYPES:
            self._incoming[PLAYER].append((t_s, msg))

    def add_improvd(self, t_s: float, msg: mido.Message) -> None:
        """A message improvd sent (scheduler thread, via its `on_sent` hook)."""
        self._incoming[IMPROVD].append((t_s, msg))

    # ---- main thread -----------------------------------------------------------------------------------
    def drain(self) -> None:
        """Move appended messages into the note pairers."""
        for who, incoming in self._incoming.items():
            pairer = self._pairers[who]
            while incoming:
                t_s, msg = incoming.popleft()
                if who == PLAYER and self._player_channels and getattr(msg, "channel", None) not in \
                        self._player_channels:
                    continue
                if msg.type in ("note_on", "note_off"):
                    pairer.add(t_s, msg)
                    self._changed = True

    def tracks(self, now_s: float | None = None) -> list[midifile.Track]:
        """The two tracks as they stand (notes still sounding end at `now_s`)."""
        self.drain()
        now_s = self._now() if now_s is None else now_s
        out = []
        for who, channel in ((PLAYER, self.player_channel), (IMPROVD, self.output_channel)):
            raw = self._pairers[who].snapshot(now_s)
            if raw:
                onset, pitch, duration, velocity = (np.array(col, dtype=np.float64) for col in zip(*raw))
                onset = onset - self.start_s
                notes = nt.from_onsets(pitch, onset, np.maximum(duration, midifile.MIN_DURATION_S), velocity)
                start = float(max(onset.min(), 0.0))
            else:
                notes, start = nt.empty(), 0.0
            out.append(midifile.Track(who, notes, channel=channel, start_s=start))
        return out

    @property
    def note_counts(self) -> dict[str, int]:
        """Notes recorded so far per track (finished or sounding)."""
        self.drain()
        return {who: len(p.finished) + sum(len(h) for h in p.sounding.values()) for who, p in self._pairers.items()}

    def flush(self, *, force: bool = False) -> bool:
        """Write the file if anything changed since the last write (or `force`). Returns True if written.

        A failed write (a full disk, a directory that went away) is logged, once until a write succeeds again,
        and does not raise: the music goes on.
        """
        self.drain()
        now_s = self._now()
        self.last_flush_s = now_s
        sounding = any(p.sounding for p in self._pairers.values())
        if not (self._changed or sounding or force):
            return False
        try:
            self._write(self.path, self.tracks(now_s))
            _sync_directory(self.path.parent)
        except OSError as err:
            if not self._failing:
                log.error("cannot write the recording %s: %s (improvd keeps playing and tries again)", self.path, err)
            self._failing = True
            return False
        if self._failing:
            log.warning("the recording %s is written again", self.path)
        self._failing = False
        self._changed = False
        if self.rotate_s is not None and now_s - self.start_s >= self.rotate_s:
            self._rotate(now_s)
        return True

    def _rotate(self, now_s: float) -> None:
        """Go on in a new file from `now_s`: the finished notes are in the file just written."""
        self.files.append(self.path)
        for pairer in self._pairers.values():
            pairer.finished.clear()
            for key, held in pairer.sounding.items():
                pairer.sounding[key] = [(max(onset, now_s), velocity) for onset, velocity in held]
        self.start_s = now_s
        self.path = self.directory / self._unique_name()
        self._changed = False
        log.info("recording %s complete (%.0f min); improvd goes on recording in %s", self.files[-1],
                 self.rotate_s / 60, self.path)

    def due(self, interval_s: float = FLUSH_INTERVAL_S) -> bool:
        """True when the last flush is `interval_s` or more ago."""
        return self._now() - self.last_flush_s >= interval_s
