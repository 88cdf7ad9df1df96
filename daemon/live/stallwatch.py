"""The JACK stall watch: notices the JACK server, or one of improvd's own JACK clients, that stopped running cycles.

Each tick the main thread reads the server's frame time once (`JackMonitor.frame`) and feeds it to

- a `ProgressWatch` (daemon/io/jackwatch.py): a server that ran no cycle for `JACK_STALL_S` has stalled. While it
  stalls, improvd's output writes nothing (`OutputPort.suspend`: rtmidi would block holding the GIL once its ring
  is full); when it moves again, the note-offs owed are written first (`OutputPort.resume`);
- a `ClientWatch` per JACK client of improvd's (its output and inputs): a client whose threads stopped switching
  while the server's frame time moved for `THREAD_STALL_S` has stopped running its cycle (it plays or hears
  nothing): `check` names it, and the service exits with status 4 (`EXIT_THREAD_FAILED`).

At shutdown, `stalled_now` says whether a request to the server could wait for ever (closing a client waits for the
server's answer).

Threads: everything here runs on the main thread (`JackMonitor.frame` is also read by the scheduler's thread,
through `OutputPort`).
"""

from __future__ import annotations

import logging
import time
from typing import Callable

from improvd.daemon.io import jackwatch, libjack, outport
from improvd.daemon.live.watchdog import THREAD_STALL_S

log = logging.getLogger("improvd")

# The JACK server ran no cycle for this long (seconds): it stalled; improvd stops writing to its output.
JACK_STALL_S = 0.5
# At shutdown, the server counts as stalled if its frame time did not move over this long (seconds): then no
# request is made to it (closing a client waits for the server's answer, for ever if it is stopped).
SHUTDOWN_STALL_PROBE_S = 0.2
SHUTDOWN_PROBE_POLL_S = 0.005  # how often the stop's probe reads the frame time


class JackWatch:
    """The stall watch of one JACK server (see the module docstring).

    Args:
        monitor: the server's monitor (`libjack.JackMonitor`): its `frame()`, `rate` and `gone`.
        output: improvd's output port, suspended while the server stalls or its own client is stuck.
        clients: improvd's ports whose JACK clients are watched (those with `jack_threads`).
        now: the service's clock (seconds).
    """

    def __init__(self, monitor: "libjack.JackMonitor", output: "outport.OutputPort", clients=(), *,
                 now: Callable[[], float] = time.perf_counter, stall_s: float = JACK_STALL_S,
                 client_stall_s: float = THREAD_STALL_S) -> None:
        self.monitor = monitor
        self.output = output
        self.now = now
        self.progress = jackwatch.ProgressWatch(stall_s)
        self._clients = [(port, jackwatch.ClientWatch(client_stall_s)) for port in clients
                         if port is not None and port.jack_threads]

    @property
    def stalled(self) -> bool:
        """Whether the server is known to be stalled (the input ports' EOX guard sends nothing then)."""
        return self.progress.stalled

    @property
    def gone(self) -> bool:
        """Whether the server went away (libjack's shutdown notification)."""
        return self.monitor.gone.is_set()

    def check(self) -> list[str]:
        """Main thread, every tick: one frame-time reading for the server's progress and the clients' cycles.
        Logs a stall and its end; returns one line per improvd client that stopped running its cycle ([] if
        none, and always while the server itself stalls)."""
        frame, now = self.monitor.frame(), self.now()
        change = self.progress.update(now, frame)
        if change == "stalled":
            self.output.suspend()
            log.error("the JACK server stalled: no cycle for %.1f s; improvd writes nothing to its output until "
                      "the server moves again", self.progress.stalled_for_s(now))
        elif change == "moving":
            owed = self.output.resume()
            log.warning("the JACK server moves again; output resumed (%d note-off(s) owed sent first, %d messages "
                        "refused meanwhile)", owed, self.output.refused)
        if self.progress.stalled:
            return []
        stuck = []
        for port, watch in self._clients:
            if watch.update(now, frame, self.monitor.rate, jackwatch.thread_switches(port.jack_threads)):
                if port is self.output:
                    self.output.suspend()
                stuck.append(f"improvd's JACK client for its {port.describe()} has not run its cycle for "
                             f"{watch.stall_after_s:.0f} s while the server ran (it "
                             f"{'plays' if port is self.output else 'hears'} nothing)")
        return stuck

    def stalled_now(self) -> bool:
        """Shutdown: whether the server is stalled right now (known, or its frame time does not move over
        `SHUTDOWN_STALL_PROBE_S`)."""
        if self.progress.stalled:
            return True
        first = self.monitor.frame()
        if first is None:
            return False
        # As soon as the frame time moves the server runs (a cycle is 1.3 ms at 64 frames); only a server that runs
        # no cycle for the whole probe counts as stalled. A host that stalls the VM for tens of milliseconds (CPU
        # steal) must not pass for a stalled server: the note-offs would then not be written at stop.
        deadline = time.monotonic() + SHUTDOWN_STALL_PROBE_S
        while time.monotonic() < deadline:
            time.sleep(SHUTDOWN_PROBE_POLL_S)
            if self.monitor.frame() != first:
                return False
        return True
