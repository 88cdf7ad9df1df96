"""The input gate between the MIDI input's poller and the engine: a bounded hand-off that never loses a release.

`InputSink` is what an `InputPort`'s poller hands each `(t_s, message)` to: it puts the message on the engine's
queue, unless the engine is `INPUT_QUEUE_LIMIT` messages behind (an input flood: new input is dropped, but never
the release of a key that was let through), and gives notes to the recorder and events to the verbose log.
`OverloadWatch` logs an overload once when it starts and once when it is over.

Threads: `InputSink.put_nowait` runs on the MIDI input's poller thread (cheap, never blocks); `release_held` and
`OverloadWatch.check` on the main thread.
"""

from __future__ import annotations

import collections
import logging
import time
from typing import Callable

import mido

from improvd.core.midifile import NOTE_TYPES
from improvd.daemon.io.recorder import SessionRecorder
from improvd.daemon.music.clock import CLOCK_TYPES

log = logging.getLogger("improvd")

# Input messages the engine may be behind before new input is dropped (an input flood): about 0.1-0.5 s of work.
INPUT_QUEUE_LIMIT = 2000
OVERLOAD_OVER_S = 1.0  # an overload is over after this long without a dropped message


class InputSink:
    """What the input's poller hands each `(t_s, message)` to (MIDI input thread: cheap, never blocks).

    - The engine's queue, bounded: while the engine is `limit` or more items behind (an input flood), new
      messages are dropped and counted in `dropped`, except the release of a key that was let through (so the
      engine never sees a key pressed that it will not see released, and memory stays bounded).
    - The recorder (note messages only) and the verbose log (clock ticks excepted), when they are on.

    It remembers the keys it let through that are held, so that when the input port goes away the main thread can
    release them (`release_held`). With `clock_only` (the `midi.clock` port), only clock and transport messages
    (`CLOCK_TYPES`) are taken.
    """

    def __init__(self, engine_queue, recorder: SessionRecorder | None, events: collections.deque | None,
                 *, clock_only: bool = False, limit: int = INPUT_QUEUE_LIMIT) -> None:
        self._queue = engine_queue
        self._recorder = None if clock_only else recorder
        self._events = events
        self._clock_only = clock_only
        self.limit = int(limit)
        self.held: set[tuple[int, int]] = set()  # (channel, pitch) let through and not yet released
        self.received = 0
        self.dropped = 0

    def put_nowait(self, item) -> None:
        """MIDI input thread: one `(t_s, message)`."""
        self.received += 1
        msg = item[1]
        kind = msg.type
        if self._clock_only and kind not in CLOCK_TYPES:
            return
        if kind in NOTE_TYPES:
            key = (msg.channel, msg.note)
            if kind == "note_on" and msg.velocity > 0:
                if self._queue.qsize() >= self.limit:
                    self.dropped += 1
                    return
                self.held.add(key)
            elif key in self.held:
                self.held.discard(key)
            elif self._queue.qsize() >= self.limit:
                self.dropped += 1
                return
            self._queue.put_nowait(item)
            if self._recorder is not None:
                self._recorder.add_player(*item)
        elif self._queue.qsize() >= self.limit:
            self.dropped += 1
            return
        else:
            self._queue.put_nowait(item)
            if kind == "clock":
                return
        if self._events is not None:
            self._events.append(("heard", *item))

    def release_held(self, t_s: float) -> int:
        """Main thread, once the input port is closed: a note-off, stamped `t_s`, for every key held; returns
        how many."""
        keys = sorted(self.held)
        self.held.clear()
        for channel, pitch in keys:
            item = (t_s, mido.Message("note_off", channel=channel, note=pitch, velocity=0))
            self._queue.put_nowait(item)
            if self._recorder is not None:
                self._recorder.add_player(*item)
        return len(keys)


class OverloadWatch:
    """Main thread, every tick: logs an input overload of `sink` once when it starts (a message was dropped) and
    once when it is over (no drop for `over_s`).

    Args:
        sink: the input sink whose `dropped` count is watched.
        now: the service's clock (seconds).
        over_s: how long without a drop ends an overload.
    """

    def __init__(self, sink: InputSink, now: Callable[[], float] = time.perf_counter, *,
                 over_s: float = OVERLOAD_OVER_S) -> None:
        self.sink = sink
        self._now = now
        self._over_s = float(over_s)
        self._dropped_seen = 0
        self._last_drop_s = 0.0
        self.overloaded = False

    def check(self) -> None:
        dropped = self.sink.dropped
        if dropped > self._dropped_seen:
            self._last_drop_s = self._now()
            if not self.overloaded:
                self.overloaded = True
                log.warning("input overload: more than %d messages wait for the engine; new input is dropped "
                            "(releases of held keys are kept) until it catches up", self.sink.limit)
        elif self.overloaded and self._now() - self._last_drop_s >= self._over_s:
            self.overloaded = False
            log.warning("input overload over: %d messages dropped so far", dropped)
        self._dropped_seen = dropped
