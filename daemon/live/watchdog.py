"""The thread watchdog: notices a worker thread (engine, scheduler, MIDI input poller) that died or stopped making
progress. Pure logic; the main thread calls `ThreadWatch.check` every tick.

Each watched worker has a `threading.Thread` and a heartbeat: the monotonic time (`time.monotonic`) at which its
loop last went round (`Heartbeat.beat()`, called by the worker itself). A worker loop never waits longer than
`HEARTBEAT_S` without going round, so a heartbeat older than `stall_after_s` means the thread is stuck (blocked
in a call that does not return, or spinning). A process that was stopped as a whole (SIGSTOP, a laptop's sleep)
stops its main thread too: a check that comes `stall_after_s` or more after the previous one is skipped, so that
the workers get one tick to beat again before they are judged.

improvd's own JACK clients run no Python and have no heartbeat: `daemon/live/stallwatch.py` watches them.

Threads: `Heartbeat.beat` is called by the worker it belongs to; `ThreadWatch.watch` (at start-up) and
`ThreadWatch.check` by the main thread.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable

# The longest a worker loop waits before going round (seconds): its heartbeat's period when it has nothing to do.
HEARTBEAT_S = 0.25
# A worker whose heartbeat is this old (seconds) has stopped making progress.
THREAD_STALL_S = 2.0


class Heartbeat:
    """The time a worker's loop last went round (monotonic seconds); a plain float write, cheap in any thread."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.last_s = clock()

    def beat(self) -> None:
        self.last_s = self._clock()


@dataclass
class Watched:
    """One worker: its name (for the log), its thread (None until started) and its heartbeat."""

    name: str
    thread: Callable[[], threading.Thread | None]
    heartbeat: Heartbeat


class ThreadWatch:
    """Checks workers for death and stalls.

    Args:
        stall_after_s: a heartbeat older than this is a stall.
        clock: monotonic seconds (the heartbeats' clock).
    """

    def __init__(self, stall_after_s: float = THREAD_STALL_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.stall_after_s = float(stall_after_s)
        self._clock = clock
        self._workers: list[Watched] = []
        self._last_check_s: float | None = None

    def watch(self, name: str, thread: Callable[[], threading.Thread | None], heartbeat: Heartbeat) -> None:
        """Main thread, at start-up: watch a worker, named `name` in the log (`thread()` is None until it starts)."""
        self._workers.append(Watched(name, thread, heartbeat))

    def check(self) -> list[str]:
        """Main thread: one line per worker that died or stalled ('the engine thread died', 'the scheduler thread
        made no progress for 2.4 s'); [] when all are well, or when this check comes so late after the previous
        one that the whole process was stopped."""
        now = self._clock()
        previous, self._last_check_s = self._last_check_s, now
        if previous is not None and now - previous >= self.stall_after_s:
            for w in self._workers:  # the whole process stood still: give every worker a fresh start
                w.heartbeat.last_s = max(w.heartbeat.last_s, now)
            return []
        problems = []
        for w in self._workers:
            thread = w.thread()
            if thread is None:
                continue
            if not thread.is_alive():
                problems.append(f"the {w.name} thread died")
            elif now - w.heartbeat.last_s >= self.stall_after_s:
                problems.append(f"the {w.name} thread made no progress for {now - w.heartbeat.last_s:.1f} s")
        return problems
