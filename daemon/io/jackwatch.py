"""Noticing a JACK server, or one of improvd's own JACK clients, that stopped running its cycles (pure logic fed
with readings, plus the /proc reads of a client's threads).

- `ProgressWatch`: the server stalled (its frame time, `daemon/io/libjack.py` `JackMonitor.frame`, stopped moving)
  and when it moves again; the service then suspends and resumes the output (`daemon/io/outport.py`).
- `ClientWatch`: one of improvd's own clients stopped running its cycle while the server runs (its threads make no
  context switch, `thread_switches`); the service then exits with status 4.
- `thread_ids` / `thread_switches`: this process's threads and their voluntary context switches (Linux).

Threads: the main thread alone: the service feeds both watches every tick (`daemon/live/service.py`), and
`thread_ids` is read around the opening of each rtmidi client (`daemon/io/port.py`, also on the main thread), to
learn which threads the client started.
"""

from __future__ import annotations

import os

_TASKS = "/proc/self/task"


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
