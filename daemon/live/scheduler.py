"""The scheduler: every MIDI message improvd plays goes through it, sent at its absolute deadline.

The scheduler thread writes what is played, and a `cancel`'s note-offs too (queued due now; written by the caller
when the thread is not running). `release_all` writes its note-offs from the thread that calls it (the main thread
when the output is lost, at stop, and from the watchdog), under the same lock, so the set of sounding notes has one
owner at a time (docs/architecture.md).

Events wait in a heap of (due_s, sequence, event); a `threading.Condition` wakes the scheduler thread when an earlier
event is scheduled, on a cancel and on stop. The thread waits on the condition until about `spin_s` (`SPIN_S`,
0.3 ms) before the next deadline, then spins (yielding with `sleep(0)`) for the last stretch, so events leave within
tens of microseconds of their deadlines without burning a core while idle. Deadlines are absolute times on the injected
clock (`now`, `time.perf_counter` by default), so errors never add up.

Every note-on gets its note-off, on every path. The scheduler knows which (channel, pitch) sound and which note
instance each belongs to: a re-trigger of a sounding pitch sends that note's note-off first (and the old note's own
note-off, when due, is then skipped so it cannot cut the new one short); `cancel` drops pending events and releases
sounding notes at once (a whole-heap rebuild); `end_note` ends one note in O(log n) (its pending events are
marked dead and skipped; the heap is compacted once they are half of it); `stop` releases everything in a
`finally`.

Lateness (send time - due time) of every sent event is kept in a bounded ring buffer (`LATENESS_HISTORY` events) for
`stats()`; events later than `late_s` (`LATE_S`, 2 ms) are logged at debug level. `stats()` copies the buffer under the
lock and computes its percentiles outside it, so asking for statistics (e.g. right after a `cancel`) never delays a
note-off; `last_ms` is the cheap path for the latest event's lateness. `stats(since=n)` covers only the events sent
after the n-th (a window: the service logs one on SIGUSR1, benchmarks read lateness over time with it).
`on_sent(sent_time_s, message)` is called after each successful send (in the thread that sent it, with the scheduler's
lock held: keep it quick, e.g. append to a recorder's queue).

Real-time priority: with `realtime_priority` set, the scheduler thread asks the OS for SCHED_FIFO at that priority
(as JACK's own threads do; allowed for root, for users with an `rtprio` limit, e.g. the `audio` group, or through
rtkit). A thread of normal priority that wakes for a deadline can wait milliseconds for a core when other programs
keep the CPUs busy; a real-time one runs at once. When the OS refuses, the scheduler says so once and runs at normal
priority. It spins at most `spin_s` per deadline and sleeps otherwise, so it cannot starve the machine.

Threads: `schedule_note`, `cancel`, `release_all`, `stats` may be called from any thread (the engine's, the main
one); `stop` is called by the main thread. Who writes to the output (`send`, always under the scheduler's lock):
the scheduler thread, for everything due; the caller of `release_all` (and of `stop`, which ends with it), and of
`cancel` while the thread is not running; the scheduler thread itself when its loop fails (it releases everything
before it ends). `run_pending` is the thread's body for one deadline and lets tests drive the scheduler with a fake
clock and no thread.

Why `Scheduler` is one class of about 370 lines: the heap, the map of sounding notes and the lateness ring are one
state under one lock, and every public method is a transaction on all three (a re-trigger, a cancel or an
`end_note` must change the heap and the sounding notes together, or a note-off could be lost or doubled). Split
into classes, each would take the others' lock or reach into their state; the lock discipline is easier to check in
one place. The statistics' percentiles, the only part that needs none of it, are computed outside the lock.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from typing import Callable

import mido
import numpy as np

from improvd.daemon.live.watchdog import HEARTBEAT_S, Heartbeat

log = logging.getLogger("improvd.scheduler")

_ON, _OFF, _MSG = "on", "off", "msg"
_COMPACT_MIN = 64  # events ended early (`end_note`) the heap may hold before it is compacted
SPIN_S = 0.0003  # how long before a deadline the thread stops waiting and spins (seconds)
LATE_S = 0.002  # an event sent later than this after its deadline counts as late (seconds)
LATENESS_HISTORY = 10000  # lateness values kept for `stats()`


@dataclass
class _Event:
    kind: str
    channel: int = 0
    pitch: int = 0
    velocity: int = 0
    note_id: int = -1
    owner: object = None
    message: mido.Message | None = None
    dead: bool = False  # ended early by `end_note`: skipped when due, dropped when the heap is compacted
    done: bool = False  # sent (a note-on) or skipped


def _check_deadline(due_s: float, what: str) -> None:
    """A deadline must be a finite number: a NaN in the heap breaks its order and can hold every event behind it."""
    if not math.isfinite(due_s):
        raise ValueError(f"a {what} deadline must be a finite time in seconds, got {due_s!r}")


def _default_wait(cond: threading.Condition, timeout_s: float | None) -> None:
    cond.wait(timeout_s)


class Scheduler:
    """Sends MIDI messages at absolute deadlines from its own thread.

    Args:
        send: writes one message to the output port (e.g. `port.send`); called with the scheduler's lock held,
            from the threads the module docstring names.
        now: the clock, seconds (monotonic); every deadline is on it.
        sleep: sleep(seconds) used while spinning (`time.sleep`; `sleep(0)` yields).
        wait: wait(condition, timeout_s or None) with the condition's lock held; `Condition.wait` by default.
        spin_s: how long before a deadline the thread stops waiting and spins.
        late_s: events later than this are counted as late and logged at debug level.
        on_sent: called as on_sent(sent_time_s, message) after each message is sent, in the thread that sent it.
        history: how many lateness values `stats()` keeps.
        realtime_priority: SCHED_FIFO priority (1..99) for the scheduler thread, or None for normal priority.
    """

    def __init__(self, send: Callable[[mido.Message], None], *, now: Callable[[], float] = time.perf_counter,
                 sleep: Callable[[float], None] = time.sleep,
                 wait: Callable[[threading.Condition, float | None], None] = _default_wait,
                 spin_s: float = SPIN_S, late_s: float = LATE_S,
                 on_sent: Callable[[float, mido.Message], None] | None = None, history: int = LATENESS_HISTORY,
                 realtime_priority: int | None = None):
        self._send = send
        self._now = now
        self._sleep = sleep
        self._wait = wait
        self.spin_s = float(spin_s)
        self.late_s = float(late_s)
        self.on_sent = on_sent
        self._cond = threading.Condition(threading.RLock())
        self._heap: list[tuple[float, int, _Event]] = []
        self._seq = itertools.count()
        self._note_ids = itertools.count()
        self._sounding: dict[tuple[int, int], tuple[int, object]] = {}  # (channel, pitch) -> (note_id, owner)
        self._notes: dict[int, tuple[_Event, _Event]] = {}  # note_id -> (note-on, note-off) while the off is pending
        self._dead = 0  # events in the heap ended early by `end_note`
        self._generation = 0  # bumped by every change that may move the next deadline
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._lateness_ms = np.zeros(max(int(history), 1), dtype=np.float64)  # ring buffer, by sent count
        self.realtime_priority = realtime_priority
        self.realtime = False  # whether the thread got its real-time priority
        self._max_ms = 0.0
        self._last_ms = 0.0
        self._sent = 0
        self._note_ons = 0  # note messages sent, for the balance check at the end of a run
        self._note_offs = 0
        self._late = 0
        self._failed = 0
        self._send_failing = False
        self.heartbeat = Heartbeat()  # the thread's loop went round (the service's watchdog reads it)

    # ---- scheduling (any thread) -------------------------------------------------------------------------
    def schedule_note(self, onset_s: float, off_s: float, pitch: int, velocity: int, channel: int = 0,
                      owner: object = None) -> int:
        """Schedule a note: note-on at `onset_s`, note-off at `off_s` (absolute seconds on the clock).

        Args:
            onset_s: when the note-on is due.
            off_s: when the note-off is due; at least `onset_s`.
            pitch: MIDI pitch 0..127.
            velocity: note-on velocity 1..127.
            channel: 0-based MIDI channel.
            owner: a tag for `cancel(owner)`.

        Returns:
            The note's id.
        """
        if not 0 <= pitch <= 127 or not 1 <= velocity <= 127 or not 0 <= channel <= 15:
            raise ValueError(f"note out of range: pitch {pitch} (0..127), velocity {velocity} (1..127), "
                             f"channel {channel} (0..15)")
        _check_deadline(onset_s, "note-on")
        _check_deadline(off_s, "note-off")
        note_id = next(self._note_ids)
        on = _Event(_ON, channel, int(pitch), int(velocity), note_id, owner)
        off = _Event(_OFF, channel, int(pitch), 0, note_id, owner)
        with self._cond:
            self._push(onset_s, on)
            self._push(max(off_s, onset_s), off)
            self._notes[note_id] = (on, off)
            self._changed()
        return note_id

    def end_note(self, note_id: int) -> bool:
        """End one note now: its note-off is sent at once (or, not started yet, it never starts). O(log n): its
        pending events are marked and skipped, and the heap is compacted only once they are half of it, so a
        flood of releases (thru under a flood of held keys) costs no whole-heap rebuild each.

        Returns:
            False when the note had already ended (or was cancelled).
        """
        with self._cond:
            pair = self._notes.pop(note_id, None)
            if pair is None:
                return False
            on, off = pair
            off.dead = True
            self._dead += 1
            if on.done:
                self._push(self._now(), _Event(_OFF, off.channel, off.pitch, 0, note_id, off.owner))
            else:
                on.dead = True
                self._dead += 1
            if self._dead > _COMPACT_MIN and 2 * self._dead > len(self._heap):
                self._heap = [item for item in self._heap if not item[2].dead]
                heapq.heapify(self._heap)
                self._dead = 0
            self._changed()
            if not self.running:
                self.run_pending()
        return True

    def schedule_message(self, due_s: float, message: mido.Message, owner: object = None) -> None:
        """Schedule any other message (not a note) at `due_s`."""
        _check_deadline(due_s, "message")
        with self._cond:
            self._push(due_s, _Event(_MSG, owner=owner, message=message))
            self._changed()

    def cancel(self, owner: object = None) -> int:
        """Drop pending events of `owner` (None: everyone's) and release its sounding notes at once.

        The note-offs are sent by the scheduler thread right away (or here, when the thread is not running).

        Returns:
            The number of sounding notes released.
        """
        with self._cond:
            keep = [item for item in self._heap if owner is not None and item[2].owner is not owner
                    and not item[2].dead]
            self._heap = keep
            heapq.heapify(self._heap)
            self._dead = 0
            self._notes = {} if owner is None else {
                nid: pair for nid, pair in self._notes.items() if pair[1].owner is not owner}
            now = self._now()
            releasing = [(key, nid, own) for key, (nid, own) in self._sounding.items()
                         if owner is None or own is owner]
            for (channel, pitch), note_id, own in releasing:
                self._push(now, _Event(_OFF, channel, pitch, 0, note_id, own))
            self._changed()
            if not self.running:
                self.run_pending()
        return len(releasing)

    def release_all(self, lock_timeout_s: float | None = None) -> bool:
        """Drop every pending event and send a note-off for every sounding note now, from the calling thread.

        With `lock_timeout_s`, give up (returning False) when the scheduler's lock cannot be had within that long:
        the watchdog's way out when the scheduler thread is stuck holding it."""
        if not self._cond.acquire(timeout=-1 if lock_timeout_s is None else lock_timeout_s):
            return False
        try:
            self._heap.clear()
            self._notes.clear()
            self._dead = 0
            self._changed()
            now = self._now()
            for (channel, pitch), (note_id, owner) in list(self._sounding.items()):
                self._process(now, _Event(_OFF, channel, pitch, 0, note_id, owner))
            self._sounding.clear()
            return True
        finally:
            self._cond.release()

    # ---- thread ------------------------------------------------------------------------------------------
    @property
    def thread(self) -> threading.Thread | None:
        """The scheduler thread (None before `start`), for the service's watchdog."""
        return self._thread

    @property
    def running(self) -> bool:
        """Whether the scheduler thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Start the scheduler thread."""
        if self._thread is not None:
            raise RuntimeError("the scheduler was already started")
        self._thread = threading.Thread(target=self._run, name="improvd-scheduler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 1.0) -> None:
        """Stop the thread (Event + wake, join with `timeout` seconds), then release every sounding note."""
        try:
            self._stopping.set()
            with self._cond:
                self._changed()
            if self._thread is not None and self._thread is not threading.current_thread():
                self._thread.join(timeout)
                if self._thread.is_alive():
                    log.warning("the scheduler thread did not stop within %.1f s", timeout)
        finally:
            self.release_all()

    def _set_realtime(self) -> None:
        """Scheduler thread: ask for SCHED_FIFO at `realtime_priority` (Linux and other POSIX systems)."""
        if self.realtime_priority is None:
            return
        if not hasattr(os, "sched_setscheduler"):
            log.info("real-time priority is not available on this platform; the scheduler runs at normal priority")
            return
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(int(self.realtime_priority)))
        except (OSError, ValueError) as err:
            log.info("the scheduler runs at normal priority: real-time priority %d was refused (%s); on Linux, "
                     "allow it with an rtprio limit (e.g. the audio group) for steadier timing on a busy machine",
                     self.realtime_priority, err.strerror if isinstance(err, OSError) else err)
            return
        self.realtime = True
        log.debug("the scheduler thread runs with real-time priority %d", self.realtime_priority)

    def _run(self) -> None:
        self._set_realtime()
        try:
            while not self._stopping.is_set():
                self.heartbeat.beat()
                with self._cond:
                    if self._stopping.is_set():
                        break
                    if not self._heap:
                        self._wait(self._cond, HEARTBEAT_S)
                        continue
                    due = self._heap[0][0]
                    remaining = due - self._now()
                    if remaining > self.spin_s:
                        self._wait(self._cond, min(remaining - self.spin_s, HEARTBEAT_S))
                        continue
                    generation = self._generation
                # The last stretch: spin without the lock, so schedule/cancel can still get in and stop the spin.
                while self._now() < due and self._generation == generation and not self._stopping.is_set():
                    self._sleep(0)
                if not self._stopping.is_set():
                    self.run_pending()
        except Exception:
            log.exception("the scheduler thread failed; releasing every sounding note")
            self.release_all()

    def run_pending(self) -> float | None:
        """Send every event due by now, in (due, sequence) order; returns the next deadline or None.

        The thread's body for one deadline; tests call it directly with a fake clock.
        """
        with self._cond:
            while self._heap and self._heap[0][0] <= self._now():
                due, _, event = heapq.heappop(self._heap)
                if event.dead:
                    self._dead -= 1
                    continue
                self._process(due, event)
            return self._heap[0][0] if self._heap else None

    # ---- internals (lock held) ---------------------------------------------------------------------------
    def _push(self, due_s: float, event: _Event) -> None:
        heapq.heappush(self._heap, (float(due_s), next(self._seq), event))

    def _changed(self) -> None:
        self._generation += 1
        self._cond.notify_all()

    def _process(self, due_s: float, event: _Event) -> None:
        key = (event.channel, event.pitch)
        if event.kind == _MSG:
            self._emit(due_s, event.message)
        elif event.kind == _ON:
            event.done = True
            sounding = self._sounding.get(key)
            if sounding is not None:  # re-trigger: end the sounding note first
                self._emit(due_s, mido.Message("note_off", channel=event.channel, note=event.pitch, velocity=0))
                del self._sounding[key]
            if self._emit(due_s, mido.Message("note_on", channel=event.channel, note=event.pitch,
                                              velocity=event.velocity)):
                self._sounding[key] = (event.note_id, event.owner)
        else:
            pair = self._notes.get(event.note_id)
            if pair is not None and pair[1] is event:
                del self._notes[event.note_id]
            sounding = self._sounding.get(key)
            if sounding is None or sounding[0] != event.note_id:
                return  # released already (re-trigger or cancel), or never sounded
            del self._sounding[key]
            self._emit(due_s, mido.Message("note_off", channel=event.channel, note=event.pitch, velocity=0))

    def _emit(self, due_s: float, message: mido.Message) -> bool:
        try:
            self._send(message)
        except Exception as err:  # a port gone away must not stop the music thread; say it once per outage
            self._failed += 1
            if not self._send_failing:
                self._send_failing = True
                log.warning("sending to the MIDI output failed (%s: %s); further failures are not logged until "
                            "a send succeeds", type(err).__name__, err)
            return False
        sent_s = self._now()
        if self._send_failing:
            self._send_failing = False
            log.info("sending to the MIDI output works again (%d messages were lost)", self._failed)
        if message.type == "note_on":
            self._note_ons += 1
        elif message.type == "note_off":
            self._note_offs += 1
        lateness_ms = (sent_s - due_s) * 1000.0
        self._lateness_ms[self._sent % len(self._lateness_ms)] = lateness_ms
        self._last_ms = lateness_ms
        self._max_ms = max(self._max_ms, lateness_ms)
        self._sent += 1
        if lateness_ms > self.late_s * 1000.0:
            self._late += 1
            log.debug("late by %.2f ms: %s", lateness_ms, message)
        if self.on_sent is not None:
            try:
                self.on_sent(sent_s, message)
            except Exception:
                log.exception("the on_sent callback failed")
        return True

    # ---- introspection -----------------------------------------------------------------------------------
    def pending(self) -> int:
        """Events waiting to be sent (not counting those `end_note` ended)."""
        with self._cond:
            return len(self._heap) - self._dead

    def sounding(self) -> frozenset[tuple[int, int]]:
        """(channel, pitch) of the notes sounding now."""
        with self._cond:
            return frozenset(self._sounding)

    def next_due_s(self) -> float | None:
        """The next deadline, or None when nothing is pending."""
        with self._cond:
            return self._heap[0][0] if self._heap else None

    @property
    def last_ms(self) -> float:
        """Lateness of the latest sent event, ms (0 before the first); a cheap read, no lock, for any thread."""
        return self._last_ms

    def stats(self, since: int = 0) -> dict:
        """Lateness of sent events: median, p99 and max in ms, the latest event's (last_ms), and counts: sent,
        late (> late_s), failed sends, pending, sounding, and note_ons / note_offs sent (over the whole run).

        Args:
            since: only the events sent after the first `since` (a window; pass an earlier `stats()["sent"]`).
                The percentiles cover at most the last `history` events of the window; `max_ms` is over the whole
                window when it starts within the buffer, and over the whole run when `since` is 0.

        The buffer is copied under the lock and the percentiles are computed outside it.
        """
        with self._cond:
            sent, size = self._sent, len(self._lateness_ms)
            first = max(int(since), sent - size, 0)
            idx = np.arange(first, sent) % size
            values = self._lateness_ms[idx]  # fancy indexing copies
            counts = {"sent": sent, "late": self._late, "failed": self._failed, "pending": len(self._heap),
                      "sounding": len(self._sounding), "note_ons": self._note_ons, "note_offs": self._note_offs}
            max_all, last = self._max_ms, self._last_ms
        window = since > 0
        return {
            **counts, "window_sent": sent - min(int(since), sent),
            "window_late": int((values > self.late_s * 1000.0).sum()),
            "median_ms": float(np.median(values)) if len(values) else 0.0,
            "p99_ms": float(np.percentile(values, 99)) if len(values) else 0.0,
            "max_ms": (float(values.max()) if len(values) else 0.0) if window else max_all,
            "last_ms": last,
        }
