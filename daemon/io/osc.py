"""OSC over UDP (`[osc]`, off by default): control messages in, state messages out. Uses python-osc (the `osc`
extra: pip install 'improvd[osc]') to parse and build packets; this module owns the one UDP socket.

- In: a thread (`improvd-osc`) receives datagrams on `osc.listen`:`osc.port` (loopback by default; any other
  address only with `osc.allow_network`, daemon/control/oscaddr.py), parses each (a message or a bundle of them), turns every
  message into a control action (daemon/control/oscmap.py) and hands it to the engine (`Engine.control`: the engine thread
  applies it as it applies a CC). Bad input (garbage datagrams, unknown addresses, wrong types, values out of
  range) is logged once per kind at warning level, with a message naming what was wrong; it is counted and
  dropped, nothing reaches the engine. More than `MAX_RATE` control messages in a second (a flood, not a hand on a
  fader) are dropped too, so the engine's queue and its share of the interpreter stay bounded.
- Out: with `osc.send_to` ("host:port"), `/improvd/state` messages: a string "idle", "listening" or "answering"
  on each change of state (from the engine thread, `state`) and "note" pitch velocity for each note improvd
  plays (from the scheduler thread as it is sent, `sent`). Both threads only put on a queue; a sender thread
  (`improvd-osc-out`) writes them, in the order they were put. With `midi.thru` and the player on improvd's output
  channel, the player's passed-through notes are reported too (they are on the same channel).

Bundles' time tags are ignored: everything acts at once.
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
import time

from improvd.core.config import OscConfig
from improvd.core.errors import ImprovdError
from improvd.daemon.control.oscaddr import parse_host_port
from improvd.daemon.control.oscmap import STATE_ADDRESS, OscInputError, parse

log = logging.getLogger("improvd.osc")

RECV_BYTES = 65536
POLL_S = 0.2  # the receive thread looks at its stop flag this often
OUT_QUEUE = 10000  # state messages waiting to be sent; beyond this they are dropped (and counted)
MAX_RATE = 1000  # control messages handed to the engine per second at most; a flood beyond it is dropped


def _pythonosc():
    try:
        from pythonosc import osc_message_builder, osc_packet
    except ModuleNotFoundError as err:
        raise ImprovdError("osc.enabled = true needs python-osc, which is not installed: pip install "
                           "'improvd[osc]' (or set osc.enabled = false)") from err
    return osc_packet, osc_message_builder


class OscServer:
    """The OSC endpoint of the daemon (see the module docstring).

    Args:
        config: the `[osc]` section (checked).
        control: called with each `control.Action` (`Engine.control`); any thread.
        output_channel: 0-based channel of improvd's notes (for the "note" state messages).
    """

    def __init__(self, config: OscConfig, control, *, output_channel: int = 0):
        self._packet, self._builder = _pythonosc()
        self.config = config
        self._control = control
        self._channel = output_channel
        self._seen_kinds: set[str] = set()
        self.bad = 0
        self.received = 0
        self.dropped_out = 0
        self._window_start = 0.0
        self._window_count = 0
        self._stop = threading.Event()
        self._out: queue.Queue = queue.Queue(OUT_QUEUE)
        self._dest = parse_host_port(config.send_to) if config.send_to else None
        family = socket.AF_INET6 if ":" in config.listen else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            self._sock.bind((config.listen, config.port))
        except OSError as err:
            self._sock.close()
            raise ImprovdError(f"OSC: cannot listen on {config.listen}:{config.port} ({err}); choose another "
                               f"osc.port") from err
        self._sock.settimeout(POLL_S)
        self.address = self._sock.getsockname()[:2]
        self._threads = [threading.Thread(target=self._receive, name="improvd-osc", daemon=True)]
        if self._dest is not None:
            self._threads.append(threading.Thread(target=self._send, name="improvd-osc-out", daemon=True))

    def start(self) -> None:
        for t in self._threads:
            t.start()
        log.info("OSC: listening on %s:%d%s", self.address[0], self.address[1],
                 f", state messages to {self._dest[0]}:{self._dest[1]}" if self._dest else "")

    def stop(self, timeout: float = 1.0) -> None:
        self._stop.set()
        try:
            self._out.put_nowait(None)
        except queue.Full:
            pass
        for t in self._threads:
            if t.is_alive():
                t.join(timeout)
        self._sock.close()
        if self.bad:
            log.info("OSC: %d messages received, %d bad ones dropped", self.received, self.bad)

    # ---- in ------------------------------------------------------------------------------------------------
    def _receive(self) -> None:
        while not self._stop.is_set():
            try:
                data, _ = self._sock.recvfrom(RECV_BYTES)
            except (socket.timeout, TimeoutError):
                continue
            except OSError:
                if self._stop.is_set():
                    return
                continue
            try:
                self.handle_datagram(data)
            except Exception:  # never take the receive thread down
                log.exception("OSC: a datagram could not be handled")

    def handle_datagram(self, data: bytes) -> int:
        """Parse one datagram and hand its actions to the engine; returns how many were handed."""
        self.received += 1
        try:
            messages = [m.message for m in self._packet.OscPacket(data).messages]
        except Exception as err:  # python-osc raises ParseError, and on some garbage other errors
            self._bad("garbage", f"OSC: a datagram of {len(data)} bytes is not an OSC packet ({type(err).__name__}: "
                                 f"{str(err)[:100]}); dropped")
            return 0
        handed = 0
        for msg in messages:
            try:
                action = parse(msg.address, list(msg.params))
            except OscInputError as err:
                self._bad(err.kind, f"{err}; dropped")
                continue
            except Exception as err:  # a message python-osc built but our checks choke on
                self._bad("garbage", f"OSC: a message could not be read ({type(err).__name__}); dropped")
                continue
            if action is not None:
                if not self._within_rate():
                    self._bad("flood", f"OSC: more than {MAX_RATE} control messages a second; the excess is dropped")
                    continue
                self._control(action)
                handed += 1
        return handed

    def _within_rate(self) -> bool:
        now = time.monotonic()
        if now - self._window_start >= 1.0:
            self._window_start, self._window_count = now, 0
        self._window_count += 1
        return self._window_count <= MAX_RATE

    def _bad(self, kind: str, message: str) -> None:
        self.bad += 1
        if kind not in self._seen_kinds:
            self._seen_kinds.add(kind)
            log.warning("%s (further input of this kind is dropped without a message)", message)

    # ---- out -----------------------------------------------------------------------------------------------
    def state(self, name: str) -> None:
        """Engine thread: improvd's state changed."""
        self._put((name,))

    def sent(self, _t_s: float, msg) -> None:
        """Scheduler thread, after a message was sent: note-ons on improvd's channel become "note" messages."""
        if msg.type == "note_on" and msg.velocity > 0 and msg.channel == self._channel:
            self._put(("note", int(msg.note), int(msg.velocity)))

    def _put(self, args: tuple) -> None:
        if self._dest is None:
            return
        try:
            self._out.put_nowait(args)
        except queue.Full:
            self.dropped_out += 1

    def _send(self) -> None:
        failed = False
        while True:
            args = self._out.get()
            if args is None or self._stop.is_set():
                return
            builder = self._builder.OscMessageBuilder(address=STATE_ADDRESS)
            for a in args:
                builder.add_arg(a)
            try:
                self._sock.sendto(builder.build().dgram, self._dest)
                failed = False
            except OSError as err:
                if not failed:
                    log.warning("OSC: sending state to %s:%d failed (%s); further failures are not logged until "
                                "one succeeds", self._dest[0], self._dest[1], err)
                failed = True
