"""What an input and an output share: opening an rtmidi client, opening a port by its config name, the port watch
that notices the port it is connected to going away and coming back, closing.

Every rtmidi object improvd uses is made by `open_rt_client` (or whatever a caller hands the ports in its place:
tests pass a fake, `harness/fakes.py`); on JACK it first waits until the new client cannot inherit a removed
client's synchro (`daemon/io/libjack.py` `settle_jack_synchros`) and learns which threads the client started
(`jack_threads`, for the stall watch, `daemon/io/jackwatch.py` `ClientWatch`).

Threads: the main thread opens, checks (`Port.check`, every ~0.5 s) and closes ports, and lists them
(`list_ports`, `improvd ports`); the port's lock keeps that apart from the input's poller thread
(`daemon/io/inport.py`) and from whichever thread writes the output (`daemon/io/outport.py`).
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable

import rtmidi

from improvd.core.errors import PortError
from improvd.daemon.io.jackwatch import thread_ids
from improvd.daemon.io.libjack import settle_jack_synchros
from improvd.daemon.io.portnames import API_BY_NAME, DISPLAY_NAME, LOOPBACK_HINT, match_port, parse_spec

log = logging.getLogger("improvd.ports")

API_HINTS = {
    "alsa": " (no ALSA sequencer: load it with 'sudo modprobe snd-seq', or start a JACK server, e.g. "
            "'jackd -d alsa' or 'jackd -d dummy', and set midi.api = \"jack\" or \"auto\")",
    "jack": " (is a JACK server running? start one, e.g. 'jackd -d alsa', or choose midi.api = \"alsa\")",
}
_RT_CLASS = {"in": rtmidi.MidiIn, "out": rtmidi.MidiOut}

# (direction 'in' or 'out', api, client_name, **rtmidi keyword arguments) -> (rtmidi object, its JACK threads)
OpenClient = Callable[..., "tuple[Any, frozenset[int]]"]


def open_rt_client(direction: str, api: str, client_name: str, **kwargs) -> tuple[Any, frozenset[int]]:
    """A new rtmidi client (`rtmidi.MidiIn` for direction 'in', `rtmidi.MidiOut` for 'out'), and the threads its
    JACK client started (its notification thread and the one that runs its cycle; Linux, else none), for
    `ClientWatch`.

    Raises:
        PortError: the API cannot be used (the message says how to make it usable).
    """
    if api == "jack":
        settle_jack_synchros()
    before = thread_ids()
    try:
        rt = _RT_CLASS[direction](API_BY_NAME[api], client_name, **kwargs)
    except (rtmidi.SystemError, RuntimeError) as err:
        hint = API_HINTS.get(api, "")
        raise PortError(f"cannot use the {DISPLAY_NAME[api]} MIDI API: {err}{hint}") from err
    return rt, (frozenset(thread_ids() - before) if api == "jack" else frozenset())


def list_ports(api: str, client_name: str = "improvd-list", *,
               open_client: OpenClient = open_rt_client) -> tuple[list[str], list[str]]:
    """(inputs improvd can listen to, outputs it can play to) of an API."""
    mi = open_client("in", api, client_name)[0]
    mo = open_client("out", api, client_name)[0]
    try:
        return list(mi.get_ports()), list(mo.get_ports())
    finally:
        mi.delete()
        mo.delete()


class Port:
    """A port opened by its config name (`spec`) around an rtmidi object `rt` (`open_rt_client`'s, or a test's
    fake), which the port owns from here on: it is deleted when the port cannot be opened and when it closes.

    `check()` is the port watch; `lost` says the port it is connected to is gone, `losing` that it is going (what
    sounds is being released, see `daemon/io/outport.py`), `closed` that improvd closed it."""

    kind = "port"

    def __init__(self, rt, api: str, spec: str, port_name: str) -> None:
        self._rt = rt
        self.api = api
        self.spec = spec
        self.virtual, self._target = parse_spec(spec)
        if self.virtual and api == "winmm":
            rt.delete()
            raise PortError(f"cannot create virtual MIDI {self.kind} {spec!r}: {LOOPBACK_HINT}")
        self._port_name = port_name
        self._lock = threading.Lock()  # open/close/check (main thread) against the poller's reads and the writes
        self.connected_to: str | None = None
        self.lost = False
        self.losing = False  # the port it is connected to went away; what sounds is being released
        self.closed = False
        self._reopen_failing = False
        try:
            if self.virtual:
                rt.open_virtual_port(self._target)
            else:
                self._open(match_port(self._target, self._names(), kind=self.kind))
        except BaseException:
            rt.delete()
            raise

    def _names(self) -> list[str]:
        return list(self._rt.get_ports())

    def _open(self, name: str) -> None:
        names = self._names()
        try:
            self._rt.open_port(names.index(name), self._port_name)
        except (ValueError, rtmidi.InvalidPortError, rtmidi.SystemError, RuntimeError) as err:
            raise PortError(f"cannot open MIDI {self.kind} {name!r}: {err}") from err
        self.connected_to = name

    def describe(self) -> str:
        where = f"virtual port {self._target!r}" if self.virtual else repr(self.connected_to or self._target)
        return f"{DISPLAY_NAME[self.api]} {self.kind} {where}"

    def check(self) -> str | None:
        """Watchdog (main thread, every ~0.5 s): notice the port this one is connected to going away or coming
        back. Virtual ports have nothing to watch. Returns 'lost', 'back' or None."""
        if self.virtual or self.closed:
            return None
        names = self._names()
        if not self.lost:
            if self.connected_to in names:
                return None
            log.warning("MIDI %s %r went away; improvd keeps running and reconnects when it returns",
                        self.kind, self.connected_to)
            with self._lock:
                self.losing = True  # from here on, nothing new starts through this port (see OutputPort.send)
            try:
                self._losing()
            finally:
                with self._lock:
                    self.lost = True
                    self.losing = False
                    self._rt.close_port()
            return "lost"
        try:
            name = match_port(self._target, names, kind=self.kind)
        except PortError:
            return None
        try:
            with self._lock:
                self._open(name)
                self.lost = False
        except PortError as err:  # it is there but cannot be opened (yet): say so once, try again next time
            if not self._reopen_failing:
                self._reopen_failing = True
                log.warning("%s; improvd tries again every check", err)
            return None
        self._reopen_failing = False
        self._reopened()
        log.warning("MIDI %s %r is back; reconnected", self.kind, name)
        return "back"

    def _losing(self) -> None:
        """Hook when the port this one is connected to went away, before improvd's own port is closed (main
        thread)."""

    def _reopened(self) -> None:
        """Hook after a reconnection (main thread)."""

    def close(self, *, server_gone: bool = False) -> None:
        """Close the port (main thread). With `server_gone`, leave rtmidi alone: libjack crashes closing then."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            if not server_gone:
                self._rt.close_port()
                self._rt.delete()
