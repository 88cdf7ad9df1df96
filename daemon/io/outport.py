"""The MIDI output: writes one message at a time, never blocking on a JACK server that stopped running its cycles,
and owing the note-offs it could not write.

Threads: `OutputPort.send` is called through the scheduler (`daemon/live/scheduler.py`), always with the scheduler's
lock held, so by one thread at a time: the scheduler thread plays everything at its deadline; the main thread
writes releases through `Scheduler.release_all` (when the output is lost, through `on_lost`; at stop; from the
watchdog), and `cancel`/`end_note` write from their caller once the scheduler thread has stopped. The main thread
also opens, checks (`Port.check`, which calls `on_lost`), suspends, resumes and closes the output. The port's lock
keeps the writes apart from the main thread's changes.
"""

from __future__ import annotations

import logging
from typing import Callable

import mido

from improvd.core.errors import PortError
from improvd.daemon.io.port import OpenClient, Port, open_rt_client

log = logging.getLogger("improvd.ports")


class OutputSuspended(PortError):
    """A message was not written: the output is suspended (the JACK server stalled), or writing it could fill
    rtmidi's ring buffer (see `OutputPort`)."""


class OutputPort(Port):
    """An output. While the port it is connected to is gone, messages are dropped.

    `on_lost`, when set, is called (main thread) when the port it is connected to goes away, before improvd's own
    port is closed: the service releases the sounding notes there, so that whatever else is connected to
    improvd's port (a DAW recording it) gets their note-offs.

    Never blocking on JACK: rtmidi's JACK `send_message` copies the message into a ring buffer
    (`RING_BYTES`, 4 bytes of length + the message each) that the output client's process callback empties every
    cycle; when the ring is full it waits, yielding, holding the GIL, until a cycle makes room (RtMidi.cpp,
    `MidiOutJack::sendMessage`). If the server stops running cycles, that wait never ends and no Python thread of
    improvd runs again, not even the signal handlers. So `send` never writes more than `CYCLE_BUDGET_BYTES`
    between two cycles of the server (`frame_source`, e.g. `JackMonitor.frame`, says when the server ran one), and
    while the output is `suspend`ed (the service's stall watch) it writes nothing: the message is refused with
    `OutputSuspended` (the scheduler counts it as failed, and a refused note-on does not sound). A refused
    note-off of a note that did sound is owed, and written before anything else once writing is possible again
    (`resume`, or the next send): every note-on that left improvd gets its note-off.

    Two ways of not writing, on purpose. A message for a port that is gone (`lost`, `closed`) or going (`losing`:
    a note-on while `on_lost` releases what sounds) is dropped silently: nothing improvd writes can reach that
    port, the port watch has already logged the loss, and the scheduler goes on as if the message was played (it
    keeps its bookkeeping of what sounds, so a note-on dropped while `losing` still gets its note-off from
    `release_all`). A message refused while the port is there (`OutputSuspended`: suspended, or the cycle's budget
    spent) is one the scheduler must know it lost: it counts and logs a failed send, a refused note-on is not kept
    as sounding, and a refused note-off is owed here.
    One path for both would change what the scheduler counts and logs, which notes it keeps as sounding, and
    what it hands to `on_sent` (the session recording).

    Args:
        api: config name of the API ('jack', 'alsa', ...).
        spec: port name, unique part of one, or `virtual:NAME`.
        client_name: the MIDI client name other programs see.
        open_client: makes the rtmidi client (`open_rt_client`; tests pass a fake).
    """

    kind = "output"
    RING_BYTES = 16384  # rtmidi's JACK ring buffer (RtMidi.cpp, JACK_RINGBUFFER_SIZE)
    CYCLE_BUDGET_BYTES = RING_BYTES // 2  # written at most between two of the server's cycles

    def __init__(self, api: str, spec: str, *, client_name: str = "improvd",
                 open_client: OpenClient = open_rt_client) -> None:
        rt, self.jack_threads = open_client("out", api, client_name)
        super().__init__(rt, api, spec, "improvd out")
        self.sent = 0
        self.refused = 0  # messages refused (suspended, or the budget of a cycle spent)
        self.on_lost: Callable[[], None] | None = None
        self.frame_source: Callable[[], int | None] | None = None
        self.suspended = False
        self._cycle_frame: int | None = None
        self._cycle_bytes = 0
        self._sounding: set[tuple[int, int]] = set()  # (channel, pitch) whose note-on was written, no note-off yet
        self._owed: list[tuple[int, int]] = []  # of those, whose note-off was refused

    def _losing(self) -> None:
        if self.on_lost is None:
            return
        try:
            self.on_lost()
        except Exception:
            log.exception("releasing the notes of a lost output failed")

    def send(self, msg: mido.Message) -> None:
        """Write one message now (scheduler's lock held, see the module's docstring); `OutputSuspended` when it
        cannot be written safely. While the port is being lost (`on_lost` releasing what sounds), a note-on is
        dropped: it would reach improvd's other connections, and its note-off would be dropped once the port is
        lost."""
        with self._lock:
            if self.lost or self.closed or (self.losing and msg.type == "note_on" and msg.velocity > 0):
                return
            if self._owed and not self._write_owed():
                self._refuse(msg, "the JACK server has not run a cycle since improvd's last writes")
            if self.suspended:
                self._refuse(msg, "the output is suspended while the JACK server stalls")
            data = msg.bytes()
            if not self._room(len(data)):
                self._refuse(msg, f"the JACK server has not run a cycle while improvd wrote "
                                  f"{self._cycle_bytes} bytes (rtmidi's ring buffer could fill and block)")
            self._write(data)
            if msg.type == "note_on" and msg.velocity > 0:
                self._sounding.add((msg.channel, msg.note))
            elif msg.type in ("note_on", "note_off"):
                self._sounding.discard((msg.channel, msg.note))

    def _room(self, size: int) -> bool:
        """Lock held: whether `size` more bytes may be written before the server's next cycle."""
        if self.frame_source is None:
            return True
        frame = self.frame_source()
        if frame is None:  # no server to ask (it went away): the port is about to close
            return True
        if frame != self._cycle_frame:
            self._cycle_frame, self._cycle_bytes = frame, 0
        return self._cycle_bytes + size + 4 <= self.CYCLE_BUDGET_BYTES

    def _write(self, data: list[int]) -> None:
        self._rt.send_message(data)
        self._cycle_bytes += len(data) + 4
        self.sent += 1

    def _refuse(self, msg: mido.Message, why: str):
        self.refused += 1
        if msg.type in ("note_on", "note_off") and (msg.type == "note_off" or msg.velocity == 0):
            key = (msg.channel, msg.note)
            if key in self._sounding:
                self._sounding.discard(key)
                self._owed.append(key)
        raise OutputSuspended(why)

    def _write_owed(self) -> bool:
        """Lock held: write the owed note-offs (as many as fit); True when none is left."""
        while self._owed and not self.suspended and self._room(3):
            channel, pitch = self._owed.pop(0)
            self._write(mido.Message("note_off", channel=channel, note=pitch, velocity=0).bytes())
        return not self._owed

    def suspend(self) -> None:
        """Main thread: stop writing (the JACK server stalled, or the output's own client is stuck)."""
        with self._lock:
            self.suspended = True

    def resume(self) -> int:
        """Main thread: write again (the server moves); the owed note-offs go first. Returns how many were owed."""
        with self._lock:
            self.suspended = False
            owed = len(self._owed)
            if not self.lost and not self.closed:
                self._write_owed()
            return owed

    @property
    def owed(self) -> int:
        """Note-offs refused and not yet written."""
        return len(self._owed)
