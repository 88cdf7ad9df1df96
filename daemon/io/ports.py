"""MIDI ports: choose the API, list ports, open an input or an output by name, notice ports that come and go.

The layer over python-rtmidi is thin on purpose; name matching (`match_port`) is pure and tested without a device.

A port is named in the config as:

- an exact port name as `improvd ports` lists it (on ALSA also without the trailing `client:port` numbers);
- a unique part of one (`fluid` for `FLUID Synth (1234):Synth input port (1234:0)`); when several ports contain it,
  the error lists them;
- `virtual:NAME`: improvd creates a port called NAME that other programs connect to. A virtual input accepts any
  number of connections (several keyboards, a DAW and a sequencer at once): their messages are merged in order of
  arrival. Windows' MIDI API (WinMM) has no virtual ports; use a loopback driver such as loopMIDI there.

Threads: an input's poller thread reads rtmidi's queue every millisecond, stamps each message with its arrival
time and enqueues it; `OutputPort.send` is called by the scheduler thread alone; `check()` (the port watch),
open/close, `OutputPort.suspend`/`resume` and `JackMonitor.frame` run on the main thread (`frame` also on the
scheduler's, through `OutputPort`); the monitor's shutdown callback runs once on libjack's notification thread.

Why polling and not rtmidi's callback: on JACK, rtmidi calls the callback from JACK's real-time process thread, and
a Python callback has to take the GIL there. While another thread holds it, the process cycle cannot finish, and
JACK counts an xrun for the whole server: every client's MIDI of that cycle is lost and a DAW's audio glitches.
Measured with `bench/flood.py --mode respond --seconds 5`: 67 xruns naming improvd's input client with the
callback. Polled, rtmidi's own C++ code queues the message in the process thread (no Python, no GIL), and the
arrival time still comes from rtmidi's timestamps (`daemon/music/arrival.py`), not from when the poll ran.

Why rtmidi ignores no message type: rtmidi computes each message's delta time from the previous message it
received, ignored ones included, so an ignored message takes its delta with it. Active sensing (many keyboards
send it every 300 ms) then shortened every stamped interval that spanned one: a 0.3 s note held across two was
stamped 0.1 s long. The poller drops those types itself (`_ignored_status`), after their deltas are counted.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import queue
import re
import sys
import threading
import time
from typing import Callable

import mido
import rtmidi

from improvd.daemon.music.arrival import ArrivalClock
from improvd.core.errors import PortError
from improvd.daemon.live.watchdog import Heartbeat

log = logging.getLogger("improvd.ports")

VIRTUAL_PREFIX = "virtual:"

# config name -> rtmidi API constant
API_BY_NAME = {
    "alsa": rtmidi.API_LINUX_ALSA,
    "jack": rtmidi.API_UNIX_JACK,
    "coremidi": rtmidi.API_MACOSX_CORE,
    "winmm": rtmidi.API_WINDOWS_MM,
}
NAME_BY_API = {v: k for k, v in API_BY_NAME.items()}
DISPLAY_NAME = {"alsa": "ALSA", "jack": "JACK", "coremidi": "CoreMIDI", "winmm": "WinMM"}
LOOPBACK_HINT = ("Windows' MIDI API (WinMM) cannot create virtual ports; install a loopback driver such as loopMIDI "
                 "(https://www.tobias-erichsen.de/software/loopmidi.html), create a port there and give its name")
_ALSA_NUMBERS = re.compile(r"\s+\d+:\d+$")

# ----------------------------------------------------------------------------------------------------------------
# JACK server probing and monitoring, through libjack directly (rtmidi does not expose the server's state).
#
# No Python function is ever handed to libjack for its own threads' use, except the monitor's shutdown callback
# (called once, when the server goes away, in libjack's notification thread; it only sets an Event). In particular
# libjack's process-wide error and info handlers stay C code: a Python handler there makes every message that
# libjack prints on one of its threads (a client's real-time thread included) wait for the GIL.

_JACK_NO_START_SERVER = 0x01
_SHUTDOWN_CB = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
# Synchro files of JACK clients (jack2 on Linux: one shared-memory futex per client, /dev/shm/jack_sem.*).
_JACK_SYNCHRO = "/dev/shm/jack_sem."
SETTLE_TIMEOUT_S = 0.5  # how long `settle_jack_synchros` waits at most


def _libjack_name() -> str | None:
    return ctypes.util.find_library("jack") or ("libjack.so.0" if sys.platform.startswith("linux") else None)


def _libjack():
    """libjack as a ctypes library, or None when it is not installed."""
    name = _libjack_name()
    if name is None:
        return None
    try:
        lib = ctypes.CDLL(name)
    except OSError:
        return None
    lib.jack_client_open.restype = ctypes.c_void_p
    lib.jack_client_open.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.POINTER(ctypes.c_int)]
    lib.jack_client_close.argtypes = [ctypes.c_void_p]
    lib.jack_on_shutdown.argtypes = [ctypes.c_void_p, _SHUTDOWN_CB, ctypes.c_void_p]
    lib.jack_is_realtime.argtypes = [ctypes.c_void_p]
    lib.jack_get_sample_rate.restype = ctypes.c_uint32
    lib.jack_get_sample_rate.argtypes = [ctypes.c_void_p]
    lib.jack_client_real_time_priority.argtypes = [ctypes.c_void_p]
    return lib


@contextlib.contextmanager
def _libjack_silenced(lib):
    """Drop libjack's messages while probing for a server that may not be there ("Cannot connect to server
    ...", "jack server is not running"), without a Python handler: libjack keeps its handlers in two exported C function pointers
    (`jack_error_callback`, `jack_info_callback`); they are saved, pointed at a C function that only reads its
    argument (libc's `strlen`, whose result libjack ignores), and restored afterwards. Where libjack does not export
    them (another JACK implementation), nothing is silenced: a message on stderr is better than Python in
    libjack's threads."""
    libc = ctypes.CDLL(ctypes.util.find_library("c")) if sys.platform.startswith("linux") else None
    try:
        slots = [ctypes.c_void_p.in_dll(lib, name) for name in ("jack_error_callback", "jack_info_callback")]
        quiet = ctypes.cast(libc.strlen, ctypes.c_void_p).value if libc is not None else None
    except (ValueError, AttributeError):
        slots, quiet = [], None
    if quiet is None:
        slots = []
    saved = [slot.value for slot in slots]
    for slot in slots:
        slot.value = quiet
    try:
        yield
    finally:
        for slot, value in zip(slots, saved):
            slot.value = value


def _open_jack_client(lib, name: str, *, quiet: bool = False) -> int | None:
    """A JACK client that is never activated (it costs no cycles, and having no thread that waits on its synchro it
    needs no `settle_jack_synchros`), or None when no server is reachable."""
    status = ctypes.c_int(0)
    if quiet:
        with _libjack_silenced(lib):
            client = lib.jack_client_open(name.encode(), _JACK_NO_START_SERVER, ctypes.byref(status))
    else:
        client = lib.jack_client_open(name.encode(), _JACK_NO_START_SERVER, ctypes.byref(status))
    return client or None


def stale_jack_synchros(maps_path: str = "/proc/self/maps") -> list[str]:
    """The JACK synchro files this process still has mapped although their clients are gone ('(deleted)').

    Why it matters (jack2 1.9.x on Linux, read in its source, `JackLibClient.cpp`, `JackLinuxFutex.cpp`): all the
    JACK clients of one process share one table of synchros indexed by the server's client number. An entry for
    another program's client is mapped when one of this process's clients is told that client was added, and
    unmapped only when one of them is told, on its own notification thread, that it was removed. A new client of
    this process that the server gives the number of a client removed a moment before, while that notice is still
    unread, finds the entry mapped and keeps it ('Already connected'): its real-time thread then waits on the dead
    client's futex, which nobody signals. The server logs `client = NAME was not finished, state = Triggered` and
    `Process error` every cycle, the client hears nothing, and every client of the server loses its cycles.
    An unlinked synchro file still mapped here is exactly such an unread notice."""
    try:
        with open(maps_path, encoding="ascii", errors="replace") as fh:
            return [ln.split("/dev/shm/", 1)[1].strip() for ln in fh
                    if _JACK_SYNCHRO in ln and ln.rstrip().endswith("(deleted)")]
    except OSError:
        return []


def settle_jack_synchros(timeout_s: float = SETTLE_TIMEOUT_S, *, maps_path: str = "/proc/self/maps",
                         sleep: Callable[[float], None] = time.sleep,
                         clock: Callable[[], float] = time.monotonic) -> bool:
    """Before this process opens a JACK client: wait (at most `timeout_s`) until its clients have read every
    notice of a removed client (`stale_jack_synchros` is empty), so that the new client cannot inherit a dead
    client's synchro. Returns whether that was reached; where /proc is not there, True at once."""
    deadline = clock() + timeout_s
    while stale_jack_synchros(maps_path):
        if clock() >= deadline:
            log.debug("JACK clients of this process still map removed clients' synchros after %.1f s", timeout_s)
            return False
        sleep(0.001)
    return True


def jack_server_running() -> bool:
    """True when a JACK server is reachable (never starts one)."""
    lib = _libjack()
    if lib is None:
        return False
    client = _open_jack_client(lib, "improvd-probe", quiet=True)
    if client is None:
        return False
    lib.jack_client_close(client)
    return True


class JackMonitor:
    """Watches the JACK server through a client of its own that is never activated (it adds nothing to the
    server's cycle; open it after the MIDI ports, see `stale_jack_synchros`):

    - `gone` is set when the server shuts down (from libjack's notification thread);
    - `frame()` is the frame time of the server's latest cycle, read from shared memory (no request to the server,
      so it answers at once even while the server is stopped): where it stops moving, the server stalled;
    - `realtime` and `client_priority` say whether the server runs its clients real-time, and at which priority.
    """

    def __init__(self, client_name: str = "improvd-monitor") -> None:
        self.gone = threading.Event()
        self._lib = _libjack()
        if self._lib is None:
            raise PortError("libjack is not installed, so the JACK API cannot be used")
        self._client = _open_jack_client(self._lib, client_name)
        if self._client is None:
            raise PortError("no JACK server is running (start one, e.g. with qjackctl or "
                            "'jackd -d alsa', or choose another API with midi.api)")
        # The frame time is read for every message the output writes: through PyDLL, which keeps the GIL, since it
        # is a read of shared memory that never blocks (`jack_last_frame_time`), and giving the GIL up and taking
        # it back could make the scheduler wait for another thread's turn.
        self._last_frame_time = ctypes.PyDLL(_libjack_name()).jack_last_frame_time
        self._last_frame_time.restype = ctypes.c_uint32
        self._last_frame_time.argtypes = [ctypes.c_void_p]
        self._cb = _SHUTDOWN_CB(self._on_shutdown)  # kept alive as long as the client
        self._lib.jack_on_shutdown(self._client, self._cb, None)
        self.rate = int(self._lib.jack_get_sample_rate(self._client))
        self.realtime = bool(self._lib.jack_is_realtime(self._client))
        priority = self._lib.jack_client_real_time_priority(self._client) if self.realtime else -1
        self.client_priority = priority if priority > 0 else None

    def _on_shutdown(self, _arg) -> None:
        self.gone.set()

    def frame(self) -> int | None:
        """The server's frame time at its latest cycle (wraps at 2**32); None once the client is closed."""
        if self._client is None or self.gone.is_set():
            return None
        return int(self._last_frame_time(self._client))

    def close(self) -> None:
        """Close the monitor's client, unless the server is gone (libjack crashes closing clients then)."""
        if self._client is not None and not self.gone.is_set():
            self._lib.jack_client_close(self._client)
        self._client = None


class ProgressWatch:
    """Notices a JACK server that stopped running its cycles, from `JackMonitor.frame()` readings (pure logic;
    the main thread feeds it every tick).

    `update(now_s, frame)` returns 'stalled' when the frame time has not moved for `stall_after_s`, 'moving' on
    the first reading that moved after a stall, else None. `stalled` says where it stands, `stalled_for_s(now)`
    how long."""

    def __init__(self, stall_after_s: float) -> None:
        self.stall_after_s = float(stall_after_s)
        self.stalled = False
        self._frame: int | None = None
        self._moved_s: float | None = None

    def update(self, now_s: float, frame: int | None) -> str | None:
        if frame is None:
            return None
        if frame != self._frame or self._moved_s is None:
            self._frame, self._moved_s = frame, now_s
            if self.stalled:
                self.stalled = False
                return "moving"
            return None
        if not self.stalled and now_s - self._moved_s >= self.stall_after_s:
            self.stalled = True
            return "stalled"
        return None

    def stalled_for_s(self, now_s: float) -> float:
        return now_s - self._moved_s if self._moved_s is not None else 0.0


# ----------------------------------------------------------------------------------------------------------------
# API choice and port names (pure where possible).

def compiled_apis() -> list[str]:
    """Config names of the MIDI APIs this python-rtmidi was built with."""
    return [NAME_BY_API[a] for a in rtmidi.get_compiled_api() if a in NAME_BY_API]


def choose_api(name: str, *, compiled: list[str] | None = None, jack_running: Callable[[], bool] | None = None,
               platform: str | None = None) -> str:
    """The API to use for `midi.api = name`.

    `auto` picks JACK when a JACK server is reachable, else ALSA on Linux, CoreMIDI on macOS, WinMM on Windows.

    Raises:
        PortError: the API is not compiled into python-rtmidi, or `auto` finds none for this platform.
    """
    compiled = compiled_apis() if compiled is None else compiled
    platform = sys.platform if platform is None else platform
    if name != "auto":
        if name not in compiled:
            raise PortError(f"midi.api = {name!r} is not available: python-rtmidi here supports "
                            f"{', '.join(compiled) or 'no API'}")
        return name
    probe = jack_server_running if jack_running is None else jack_running
    if "jack" in compiled and probe():
        return "jack"
    native = ("alsa" if platform.startswith("linux") else "coremidi" if platform == "darwin"
              else "winmm" if platform.startswith(("win", "cygwin")) else None)
    if native in compiled:
        return native
    raise PortError(f"midi.api = 'auto' found no usable MIDI API on {platform}: no JACK server is running and "
                    f"python-rtmidi here supports {', '.join(compiled) or 'no API'}")


def strip_alsa_numbers(name: str) -> str:
    """'Midi Through:Midi Through Port-0 14:0' -> 'Midi Through:Midi Through Port-0'."""
    return _ALSA_NUMBERS.sub("", name)


def match_port(spec: str, names: list[str], *, kind: str = "input") -> str:
    """The one port in `names` that `spec` names: an exact name, then the name without ALSA's numbers, then a
    unique substring (case-sensitive first, then not).

    Args:
        spec: what the config says (not `virtual:`).
        names: the ports there are.
        kind: 'input' or 'output', for the error message.

    Raises:
        PortError: no port matches (the message lists the ports there are), or several do (it lists those).
    """
    if spec in names:
        return spec
    for candidates in ([n for n in names if strip_alsa_numbers(n) == spec],
                       [n for n in names if spec in n],
                       [n for n in names if spec.lower() in n.lower()]):
        if len(candidates) == 1:
            return candidates[0]
        if len(candidates) > 1:
            listing = "\n  ".join(candidates)
            raise PortError(f"MIDI {kind} {spec!r} is ambiguous: it matches {len(candidates)} ports:\n  {listing}\n"
                            f"give more of the name")
    listing = "\n  ".join(names) if names else "(none)"
    raise PortError(f"no MIDI {kind} port matches {spec!r}; the {kind} ports there are:\n  {listing}\n"
                    f"(or use 'virtual:NAME' to create a port)")


def parse_spec(spec: str) -> tuple[bool, str]:
    """('virtual:improvd in') -> (True, 'improvd in'); ('fluid') -> (False, 'fluid')."""
    if spec.startswith(VIRTUAL_PREFIX):
        name = spec[len(VIRTUAL_PREFIX):].strip()
        if not name:
            raise PortError(f"{spec!r} is not valid: 'virtual:' needs a port name after it, e.g. 'virtual:improvd in'")
        return True, name
    if not spec.strip():
        raise PortError("an empty port name is not valid: give a port name, a part of one, or 'virtual:NAME'")
    return False, spec


def _new_rt(cls, api: str, client_name: str, **kwargs):
    return _new_rt_threads(cls, api, client_name, **kwargs)[0]


def _new_rt_threads(cls, api: str, client_name: str, **kwargs) -> tuple:
    """A new rtmidi object, and the threads its JACK client started (its notification thread and the one that
    runs its cycle; Linux, else none), for `ClientWatch`."""
    if api == "jack":
        settle_jack_synchros()
    before = thread_ids()
    try:
        rt = cls(API_BY_NAME[api], client_name, **kwargs)
    except (rtmidi.SystemError, RuntimeError) as err:
        hint = API_HINTS.get(api, "")
        raise PortError(f"cannot use the {DISPLAY_NAME[api]} MIDI API: {err}{hint}") from err
    return rt, (frozenset(thread_ids() - before) if api == "jack" else frozenset())


_TASKS = "/proc/self/task"


def thread_ids() -> set[int]:
    """This process's threads (Linux; an empty set elsewhere)."""
    try:
        return {int(t) for t in os.listdir(_TASKS)}
    except OSError:
        return set()


def thread_switches(tids, tasks: str = _TASKS) -> int | None:
    """The voluntary context switches of these threads together (Linux), None where none can be read. A JACK
    client's thread switches at least twice a cycle (it waits for the cycle, then for the next)."""
    total, seen = 0, False
    for tid in tids:
        try:
            with open(f"{tasks}/{tid}/status", encoding="ascii", errors="replace") as fh:
                for line in fh:
                    if line.startswith("voluntary_ctxt_switches:"):
                        total += int(line.split()[1])
                        seen = True
                        break
        except (OSError, ValueError):
            continue
    return total if seen else None


class ClientWatch:
    """Notices one of improvd's own JACK clients that stopped running its cycle while the server runs (pure logic;
    the main thread feeds it every tick): its threads make no context switch for `stall_after_s` while the
    server's frame time advanced by at least half that long. A client stuck so hears nothing (an input) or plays
    nothing (an output), and the server logs a process error every cycle, for every client."""

    def __init__(self, stall_after_s: float) -> None:
        self.stall_after_s = float(stall_after_s)
        self.stuck = False
        self._switches: int | None = None
        self._since_s = 0.0
        self._since_frame = 0

    def update(self, now_s: float, frame: int | None, rate: int, switches: int | None) -> bool:
        """True once, when the client is found stuck."""
        if frame is None or switches is None:
            return False
        if switches != self._switches:
            self._switches, self._since_s, self._since_frame = switches, now_s, frame
            self.stuck = False
            return False
        ran = ((frame - self._since_frame) % 2**32) / max(rate, 1)
        if not self.stuck and now_s - self._since_s >= self.stall_after_s and ran >= self.stall_after_s / 2:
            self.stuck = True
            return True
        return False


API_HINTS = {
    "alsa": " (no ALSA sequencer: load it with 'sudo modprobe snd-seq', or start a JACK server, e.g. "
            "'jackd -d alsa' or 'jackd -d dummy', and set midi.api = \"jack\" or \"auto\")",
    "jack": " (is a JACK server running? start one, e.g. 'jackd -d alsa', or choose midi.api = \"alsa\")",
}


def list_ports(api: str, client_name: str = "improvd-list") -> tuple[list[str], list[str]]:
    """(inputs improvd can listen to, outputs it can play to) of an API."""
    mi = _new_rt(rtmidi.MidiIn, api, client_name)
    mo = _new_rt(rtmidi.MidiOut, api, client_name)
    try:
        return list(mi.get_ports()), list(mo.get_ports())
    finally:
        mi.delete()
        mo.delete()


# ----------------------------------------------------------------------------------------------------------------
# Open ports.

class _Port:
    """What an input and an output share: opening by spec, and the watchdog's `check`."""

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
        self._lock = threading.Lock()  # open/close (main thread) against send (scheduler thread)
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


SYSEX, MTC_QUARTER_FRAME, EOX, CLOCK_TICK, ACTIVE_SENSING = 0xF0, 0xF1, 0xF7, 0xF8, 0xFE
# JACK: how often the EOX guard sends a lone EOX to improvd's own input (see `InputPort`), seconds.
EOX_GUARD_S = 0.25


def _ignored_status(clock: bool) -> frozenset[int]:
    """Status bytes the poller drops: SysEx, a lone EOX (the EOX guard's) and active sensing; MIDI clock and MTC
    too unless the input takes the clock (what rtmidi's `ignore_types(sysex=True, timing=not clock,
    active_sense=True)` would drop)."""
    ignored = {SYSEX, EOX, ACTIVE_SENSING}
    if not clock:
        ignored |= {MTC_QUARTER_FRAME, CLOCK_TICK}
    return frozenset(ignored)


class InputPort(_Port):
    """An input whose messages are stamped with their arrival time and handed to a queue as `(t_s, mido.Message)`.

    A poller thread reads rtmidi's queue every `poll_s` (see the module's docstring for why not a callback).

    Args:
        api: config name of the API ('jack', 'alsa', ...).
        spec: port name, unique part of one, or `virtual:NAME`.
        sink: a queue (`put_nowait`) that receives `(arrival time on the clock now, message)`; when it is full
            the message is dropped and counted in `dropped`.
        client_name: the MIDI client name other programs see.
        now: the clock (tests inject one).
        clock: also take MIDI clock and transport messages (0xF8 ticks, Start, Continue, Stop, Song Position);
            otherwise the poller drops them.
        port_name: the name of improvd's own port (JACK shows it).
        poll_s: how often the poller reads rtmidi's queue while messages come, seconds.
        idle_poll_s: how often once nothing came for `IDLE_AFTER_S` (an idle daemon costs a third of the CPU;
            only the reaction to the next message waits up to this long, its arrival time stays exact).
        start: start the poller thread (tests drive `poll_once` themselves).

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

    def __init__(self, api: str, spec: str, sink: "queue.Queue", *, client_name: str = "improvd",
                 now: Callable[[], float] = time.perf_counter, clock: bool = False,
                 port_name: str = "improvd in", poll_s: float = 0.001, idle_poll_s: float = 0.003,
                 start: bool = True) -> None:
        self._sink = sink
        self._now = now
        self.poll_s = float(poll_s)
        self.idle_poll_s = float(idle_poll_s)
        self.dropped = 0
        self.invalid = 0  # messages whose bytes mido could not parse (dropped)
        self.recovered = 0  # messages taken out of an unterminated SysEx that had swallowed them
        self._arrival = ArrivalClock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.heartbeat = Heartbeat()  # the poller's loop went round (the service's watchdog reads it)
        rt, self.jack_threads = _new_rt_threads(rtmidi.MidiIn, api, client_name, queue_size_limit=self.QUEUE_LIMIT)
        rt.ignore_types(sysex=False, timing=False, active_sense=False)  # see the module's docstring
        self._ignored = _ignored_status(clock)
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
        """JACK: a MidiOut connected to this input, for the lone EOX (see the class docstring). Without one (another
        API, or improvd's own port cannot be told apart from another's) the input goes on without it."""
        if self.api != "jack":
            return None
        own = f":{self._own_port_name()}"
        try:
            guard = _new_rt(rtmidi.MidiOut, "jack", f"{self._client_name}-eox")
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
        """Poller thread: read what rtmidi has queued (at most `BATCH`), stamp, parse, enqueue; returns how many
        messages were read. Invalid bytes are dropped and counted."""
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
                try:
                    self._sink.put_nowait((t_s, msg))
                except queue.Full:
                    self.dropped += 1
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
            try:
                self._sink.put_nowait((t_s, msg))
            except queue.Full:
                self.dropped += 1

    @property
    def thread(self) -> threading.Thread | None:
        """The poller thread (None when not started), for the service's watchdog."""
        return self._thread

    def close(self, *, server_gone: bool = False) -> None:
        self._stopping.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(1.0)
        self._close_eox_guard(server_gone=server_gone)
        super().close(server_gone=server_gone)


class OutputSuspended(PortError):
    """A message was not written: the output is suspended (the JACK server stalled), or writing it could fill
    rtmidi's ring buffer (see `OutputPort`)."""


class OutputPort(_Port):
    """An output; `send` is called by the scheduler thread alone. While the port it is connected to is gone,
    messages are dropped.

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
    """

    kind = "output"
    RING_BYTES = 16384  # rtmidi's JACK ring buffer (RtMidi.cpp, JACK_RINGBUFFER_SIZE)
    CYCLE_BUDGET_BYTES = RING_BYTES // 2  # written at most between two of the server's cycles

    def __init__(self, api: str, spec: str, *, client_name: str = "improvd") -> None:
        rt, self.jack_threads = _new_rt_threads(rtmidi.MidiOut, api, client_name)
        super().__init__(rt, api, spec, "improvd out")
        self._init_output()

    def _init_output(self) -> None:
        """The output's own state (tests that build a port around a fake rtmidi object call it)."""
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
        """Write one message now (scheduler thread); `OutputSuspended` when it cannot be written safely. While the
        port is being lost (`on_lost` releasing what sounds), a note-on is dropped: it would reach improvd's other
        connections, and its note-off would be dropped once the port is lost."""
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
        """Main thread: stop writing (the JACK server stalled)."""
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


# ----------------------------------------------------------------------------------------------------------------

def cmd_ports(args, config) -> int:
    """`improvd ports`: print the inputs and outputs of the chosen MIDI API."""
    api = choose_api(config.midi.api)
    inputs, outputs = list_ports(api)
    print(f"MIDI API: {DISPLAY_NAME[api]}" + (" (chosen by midi.api = 'auto')" if config.midi.api == "auto" else ""))
    print("inputs (what improvd can listen to, for midi.input):")
    for name in inputs:
        print(f"  {name}")
    if not inputs:
        print("  (none)")
    print("outputs (what improvd can play to, for midi.output):")
    for name in outputs:
        print(f"  {name}")
    if not outputs:
        print("  (none)")
    if api == "winmm":
        print(f"note: {LOOPBACK_HINT}")
    else:
        print("or 'virtual:NAME' to create a port that other programs connect to")
    return 0
