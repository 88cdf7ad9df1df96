"""A MIDI input: its poller thread reads rtmidi's queue, stamps each message with its arrival time and hands it to
a sink; on JACK, its EOX guard ends a SysEx that never ends.

Why polling and not rtmidi's callback: on JACK, rtmidi calls the callback from JACK's real-time process thread, and
a Python callback has to take the GIL there. While another thread holds it, the process cycle cannot finish, and
JACK counts an xrun for the whole server: every client's MIDI of that cycle is lost and a DAW's audio glitches.
Measured with `bench/flood.py --mode respond --seconds 5`: 67 xruns naming improvd's input client with the
callback. Polled, rtmidi's own C++ code queues the message in the process thread (no Python, no GIL), and the
arrival time still comes from rtmidi's timestamps (`daemon/music/arrival.py`), not from when the poll ran.

Why rtmidi ignores no message type: rtmidi computes each message's delta time from the previous message it
received, ignored ones included, so an ignored message takes its delta with it. Active sensing (many keyboards
send it every 300 ms) then shortened every stamped interval that spanned one: a 0.3 s note held across two was
stamped 0.1 s long. The poller drops those types itself (`ignored_status`), after their deltas are counted.

Threads: the poller thread (one per input, started by the constructor) runs `poll_once`, the SysEx recovery and
the EOX guard's sends, and calls the sink; the main thread opens the input, checks it (`Port.check`, which also
connects a new EOX guard after a reconnection) and closes it. The port's lock keeps the two apart: a batch is read
and delivered under it.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from typing import Callable

import mido
import rtmidi

from improvd.core.errors import PortError
from improvd.daemon.io.port import OpenClient, Port, open_rt_client
from improvd.daemon.live.watchdog import Heartbeat
from improvd.daemon.music.arrival import ArrivalClock

log = logging.getLogger("improvd.ports")

SYSEX, MTC_QUARTER_FRAME, EOX, CLOCK_TICK, ACTIVE_SENSING = 0xF0, 0xF1, 0xF7, 0xF8, 0xFE
# JACK: how often the EOX guard sends a lone EOX to improvd's own input (see `InputPort`), seconds.
EOX_GUARD_S = 0.25


def ignored_status(clock: bool) -> frozenset[int]:
    """Status bytes the poller drops: SysEx, a lone EOX (the EOX guard's) and active sensing; MIDI clock and MTC
    too unless the input takes the clock (what rtmidi's `ignore_types(sysex=True, timing=not clock,
    active_sense=True)` would drop)."""
    ignored = {SYSEX, EOX, ACTIVE_SENSING}
    if not clock:
        ignored |= {MTC_QUARTER_FRAME, CLOCK_TICK}
    return frozenset(ignored)


class InputPort(Port):
    """An input whose messages are stamped with their arrival time and handed to a sink as `(t_s, mido.Message)`.

    A poller thread reads rtmidi's queue every `poll_s` (see the module's docstring for why not a callback).

    Args:
        api: config name of the API ('jack', 'alsa', ...).
        spec: port name, unique part of one, or `virtual:NAME`.
        sink: receives `(arrival time on the clock now, message)` through `put_nowait`, on the poller thread. It
            must not block or raise: what to drop when the consumer falls behind is the sink's call (the
            service's `InputSink`, daemon/live/inputsink.py, drops new input in a flood and counts it, never the
            release of a key it let through), since the poller cannot tell which messages may go.
        client_name: the MIDI client name other programs see.
        now: the clock (tests inject one).
        clock: also take MIDI clock and transport messages (0xF8 ticks, Start, Continue, Stop, Song Position);
            otherwise the poller drops them.
        port_name: the name of improvd's own port (JACK shows it).
        poll_s: how often the poller reads rtmidi's queue while messages come, seconds.
        idle_poll_s: how often once nothing came for `IDLE_AFTER_S` (an idle daemon costs a third of the CPU;
            only the reaction to the next message waits up to this long, its arrival time stays exact).
        start: start the poller thread (tests drive `poll_once` themselves).
        open_client: makes the rtmidi clients, the input's own and its EOX guard's (`open_rt_client`; tests pass
            a fake).
        arrival: turns rtmidi's delta times into arrival times (an `ArrivalClock` by default).

    An unterminated SysEx: rtmidi appends every message that comes after one to it until an EOX (0xF7) arrives
    (python-rtmidi 1.5.8 on JACK: 4,000 notes sent after `F0 01 02 03` came as one 12,005-byte SysEx once an EOX
    came), so the input goes deaf and rtmidi's buffer grows in JACK's process thread. MIDI ends a SysEx at any
    status byte: the poller takes the messages out of such a SysEx (`recovered`), stamped with its arrival. On JACK,
    an EOX guard (a MidiOut client connected to improvd's own input) sends a lone EOX every `EOX_GUARD_S`, so a
    stuck SysEx ends within that; a lone EOX is otherwise dropped.
    """

    kind = "input"
    QUEUE_LIMIT = 8192  # rtmidi's own queue, in messages: 0.8 s of a 10,000-message-a-second flood unread
    BATCH = 1024  # messages read and delivered per lock hold, so that `check()` and `close()` never wait long
    IDLE_AFTER_S = 2.0  # no message for this long: poll every `idle_poll_s`

    def __init__(self, api: str, spec: str, sink, *, client_name: str = "improvd",
                 now: Callable[[], float] = time.perf_counter, clock: bool = False,
                 port_name: str = "improvd in", poll_s: float = 0.001, idle_poll_s: float = 0.003,
                 start: bool = True, open_client: OpenClient = open_rt_client,
                 arrival: ArrivalClock | None = None) -> None:
        self._sink = sink
        self._now = now
        self.poll_s = float(poll_s)
        self.idle_poll_s = float(idle_poll_s)
        self.invalid = 0  # messages whose bytes mido could not parse (dropped)
        self.recovered = 0  # messages taken out of an unterminated SysEx that had swallowed them
        self._arrival = ArrivalClock() if arrival is None else arrival
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.heartbeat = Heartbeat()  # the poller's loop went round (the service's watchdog reads it)
        self._open_client = open_client
        rt, self.jack_threads = open_client("in", api, client_name, queue_size_limit=self.QUEUE_LIMIT)
        rt.ignore_types(sysex=False, timing=False, active_sense=False)  # see the module's docstring
        self._ignored = ignored_status(clock)
        super().__init__(rt, api, spec, port_name)
        self._client_name = client_name
        self._eox_due_s = 0.0
        # Whether the JACK server stalls (the service's stall watch sets it; read by the poller thread).
        self.server_stalled: Callable[[], bool] = lambda: False
        self._eox_guard = self._make_eox_guard()
        if start:
            self._thread = threading.Thread(target=self._poll_loop, name=f"improvd-{port_name.replace(' ', '-')}",
                                            daemon=True)
            self._thread.start()

    def _own_port_name(self) -> str:
        return self._target if self.virtual else self._port_name

    def _make_eox_guard(self):
        """Main thread: on JACK, a MidiOut connected to this input, for the lone EOX (see the class docstring).
        Without one (another API, or improvd's own port cannot be told apart from another's) the input goes on
        without it."""
        if self.api != "jack":
            return None
        own = f":{self._own_port_name()}"
        try:
            guard = self._open_client("out", "jack", f"{self._client_name}-eox")[0]
        except PortError as err:
            log.debug("no EOX guard for the MIDI %s: %s", self.kind, err)
            return None
        try:
            # improvd's own client is named client_name, or client_name-NN when JACK renamed a second one
            client = re.compile(re.escape(self._client_name) + r"(-\d+)?")
            mine = [i for i, name in enumerate(guard.get_ports())
                    if name.endswith(own) and client.fullmatch(name[:-len(own)])]
            if len(mine) != 1:
                log.debug("no EOX guard for the MIDI %s: %d JACK ports end with %r", self.kind, len(mine), own)
                guard.delete()
                return None
            guard.open_port(mine[0], "eox")
        except (rtmidi.InvalidPortError, rtmidi.SystemError, RuntimeError) as err:
            log.debug("no EOX guard for the MIDI %s: %s", self.kind, err)
            guard.delete()
            return None
        return guard

    def _send_eox(self) -> None:
        """Poller thread: a lone EOX every `EOX_GUARD_S`, so that an unterminated SysEx ends."""
        now = time.monotonic()
        if now < self._eox_due_s:
            return
        self._eox_due_s = now + EOX_GUARD_S
        with self._lock:  # the main thread swaps the guard on a reconnection
            # nothing while the JACK server stalls: rtmidi's send spins holding the GIL once the guard's ring is full
            if self._eox_guard is None or self.lost or self.closed or self.server_stalled():
                return
            try:
                self._eox_guard.send_message([EOX])
            except (rtmidi.SystemError, RuntimeError, ValueError) as err:
                log.debug("the EOX guard could not send: %s", err)

    def _reopened(self) -> None:
        """The port is open again (a new JACK port): connect a new EOX guard to it."""
        self._close_eox_guard(new=self._make_eox_guard())

    def _close_eox_guard(self, *, server_gone: bool = False, new=None) -> None:
        with self._lock:
            guard, self._eox_guard = self._eox_guard, new
        if guard is not None and not server_gone:
            guard.close_port()
            guard.delete()

    def _poll_loop(self) -> None:
        last_s = time.monotonic()
        while not self._stopping.is_set():
            self.heartbeat.beat()
            self._send_eox()
            try:
                read = self.poll_once()
                while read >= self.BATCH:
                    read = self.poll_once()
            except Exception:  # the input must outlive one bad read; say so, go on
                log.exception("reading the MIDI %s failed", self.kind)
                read = 0
            now = time.monotonic()
            if read:
                last_s = now
            time.sleep(self.poll_s if now - last_s < self.IDLE_AFTER_S else self.idle_poll_s)

    def poll_once(self) -> int:
        """Poller thread: read what rtmidi has queued (at most `BATCH`), stamp, parse, hand to the sink; returns how
        many messages were read. Invalid bytes are dropped and counted."""
        batch = []
        # The batch is delivered under the lock it was read under: the watchdog (`check`) cannot mark the port lost
        # and the service release the held keys between the read and the delivery (a key-down delivered after its
        # release would be held until max_hold).
        with self._lock:
            if self.closed or self.lost:
                return 0
            while len(batch) < self.BATCH:
                item = self._rt.get_message()
                if item is None:
                    break
                batch.append(item)
            if not batch:
                return 0
            polled_s = self._now()  # after reading: every message read had arrived by now
            times = self._arrival.stamp([delta for _, delta in batch], polled_s)
            for t_s, (data, _) in zip(times, batch):
                if data and data[0] == SYSEX and len(data) > 2 and any(b >= 0x80 for b in data[1:-1]):
                    self._recover(t_s, data)
                    continue
                if data and data[0] in self._ignored:
                    continue
                try:
                    msg = mido.Message.from_bytes(data)
                except (ValueError, TypeError, IndexError):
                    self.invalid += 1
                    continue
                self._sink.put_nowait((t_s, msg))
        return len(batch)

    def _recover(self, t_s: float, data: list[int]) -> None:
        """A SysEx with status bytes inside: rtmidi appended what came after an unterminated SysEx to it (until an
        EOX). MIDI ends a SysEx at any status byte, so the messages after it are parsed and delivered, stamped with
        this message's arrival (their own times are lost with the SysEx), so that no note-off is lost."""
        for msg in mido.parse_all(data):
            status = msg.bytes()[0]
            if status in self._ignored:
                continue
            self.recovered += 1
            self._sink.put_nowait((t_s, msg))

    @property
    def thread(self) -> threading.Thread | None:
        """The poller thread (None when not started), for the service's watchdog."""
        return self._thread

    def close(self, *, server_gone: bool = False) -> None:
        """Main thread: stop the poller (waiting up to 1 s for it), close the EOX guard and the port."""
        self._stopping.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(1.0)
        self._close_eox_guard(server_gone=server_gone)
        super().close(server_gone=server_gone)
