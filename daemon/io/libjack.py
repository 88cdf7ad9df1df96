"""libjack through ctypes: the few things improvd asks the JACK server that python-rtmidi does not expose.

- `jack_server_running()`: whether a server is reachable (`midi.api = 'auto'`), by a probe client opened with
  libjack's messages silenced (`libjack_silenced`).
- `JackMonitor`: a client of its own, never activated, that says when the server goes away (`gone`) and reads the
  frame time of its latest cycle (`frame()`), from which the output's budget per cycle (`daemon/io/outport.py`) and
  the stall watch (`daemon/io/jackwatch.py`) tell whether the server still runs its cycles.
- `stale_jack_synchros` / `settle_jack_synchros`: the wait before this process opens a JACK client, so that the new
  client cannot inherit a removed client's synchro (see `stale_jack_synchros`).

No Python function is ever handed to libjack for its own threads' use, except the monitor's shutdown callback
(called once, when the server goes away, in libjack's notification thread; it only sets an Event). In particular
libjack's process-wide error and info handlers stay C code: a Python handler there makes every message that
libjack prints on one of its threads (a client's real-time thread included) wait for the GIL.

Threads: the main thread probes, opens and closes the monitor, and settles the synchros before each rtmidi client
it opens (`daemon/io/port.py`); `JackMonitor.frame` is read by the main thread (the stall watch) and, as the
output's `frame_source`, by whichever thread writes the output (the scheduler thread; the main thread when it
releases notes); `JackMonitor`'s shutdown callback runs on libjack's notification thread.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import logging
import sys
import threading
import time
from typing import Callable

from improvd.core.errors import PortError

log = logging.getLogger("improvd.ports")

_JACK_NO_START_SERVER = 0x01
_SHUTDOWN_CB = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
# Synchro files of JACK clients (jack2 on Linux: one shared-memory futex per client, /dev/shm/jack_sem.*).
_JACK_SYNCHRO = "/dev/shm/jack_sem."
SETTLE_TIMEOUT_S = 0.5  # how long `settle_jack_synchros` waits at most


@functools.cache  # find_library runs ldconfig (a process) each time; the probe and the monitor both ask
def _libjack_name() -> str | None:
    return ctypes.util.find_library("jack") or ("libjack.so.0" if sys.platform.startswith("linux") else None)


def load_libjack():
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
def libjack_silenced(lib):
    """Drop libjack's messages while probing for a server that may not be there ("Cannot connect to server
    ...", "jack server is not running"), without a Python handler: libjack keeps its handlers in two exported C
    function pointers (`jack_error_callback`, `jack_info_callback`); they are saved, pointed at a C function that
    only reads its argument (libc's `strlen`, whose result libjack ignores), and restored afterwards. Where libjack
    does not export them (another JACK implementation), nothing is silenced: a message on stderr is better than
    Python in libjack's threads."""
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
        with libjack_silenced(lib):
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
    lib = load_libjack()
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
        self._lib = load_libjack()
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
