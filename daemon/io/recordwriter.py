"""The recording's own thread: drains and writes a `SessionRecorder` (daemon/io/recorder.py) off the main thread.

`RecordWriter` runs the thread "improvd-recorder": it encodes what was heard and sent every `DRAIN_S`, writes the
file every `interval_s` (`record.flush_seconds`) and once more at stop. The writes (each with its fsyncs) never run
on the main thread, so a slow or hung disk cannot hold the thread that handles signals and port checks; at stop the
main thread waits for the last write only as long as it is told (`stop(timeout)`).

Threads: `start` and `stop` are called by the main thread; every `SessionRecorder` method but `add_player` /
`add_improvd` runs on this thread while it lives.
"""

from __future__ import annotations

import logging
import threading

from improvd.daemon.io.recorder import SessionRecorder

log = logging.getLogger("improvd")

DRAIN_S = 0.1  # how often the thread encodes what was recorded since (seconds)


class RecordWriter:
    """Drains `recorder` every `DRAIN_S` and writes it every `interval_s` and at stop, on a thread of its own."""

    def __init__(self, recorder: SessionRecorder, interval_s: float) -> None:
        self.recorder = recorder
        self.interval_s = float(interval_s)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="improvd-recorder", daemon=True)
        self.written: bool | None = None  # the last write's result, once the thread has ended

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stopping.wait(DRAIN_S):
            try:
                self.recorder.drain()
                if self.recorder.due(self.interval_s):
                    self.recorder.flush()
            except Exception:  # a bug here must not end the recording for the rest of the session
                log.exception("the recording thread failed; it goes on")
        try:
            self.written = self.recorder.flush()
        except Exception:
            log.exception("the last write of the recording failed")
            self.written = False

    def stop(self, timeout: float) -> bool:
        """Ask for the last write and wait up to `timeout` s; True when the thread ended (then `written` says
        whether the file was written), False when the disk holds it still. A writer never started runs its last
        write now, on its thread."""
        self._stopping.set()
        if self._thread.ident is None:
            self._thread.start()
        self._thread.join(timeout)
        return not self._thread.is_alive()
