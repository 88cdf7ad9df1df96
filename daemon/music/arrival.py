"""Arrival times of polled MIDI input on the daemon's clock, from rtmidi's delta times (pure logic, no I/O).

improvd reads its input by polling rtmidi's queue (see `daemon/io/inport.py`: a Python callback would run in JACK's
real-time thread and make the whole JACK graph late while it waits for the GIL). A polled message comes with the
time since the previous message, measured by rtmidi when the message arrived (on JACK, `jack_get_time()` in the
process cycle: microseconds on the monotonic clock), so the spacing between messages is exact however late the
poll; only the anchor on improvd's clock has to be found. That holds only if every message rtmidi received reaches
`stamp`: a message rtmidi ignores takes its delta with it (the input asks rtmidi to ignore nothing for that reason).

The anchor: with `cum` the sum of the deltas since the first message, a message arrived at `cum + offset` on
improvd's clock, and no message arrives after it is polled, so `offset <= polled_s - cum` for every message of a
batch, tightest for the batch's last. The estimate is the smallest such bound seen, which converges to the true
offset within the shortest poll latency (about a poll interval at worst, tens of microseconds on a quiet machine).
To follow a clock that drifts against improvd's (ALSA's queue timer, CoreMIDI's host time), the estimate may rise
by at most `drift` (0.1%) of the time since the previous batch before the bound applies again. Stamps never go
backwards and never lie after the poll that read them.
"""

from __future__ import annotations

import math
from typing import Sequence


class ArrivalClock:
    """Turns batches of rtmidi delta times into arrival times on the daemon's clock.

    Args:
        drift: how fast the offset estimate may rise, seconds per second (the largest clock drift followed).

    One thread (the input's poller) calls `stamp`.
    """

    def __init__(self, drift: float = 1e-3) -> None:
        self.drift = float(drift)
        self._cum_s = 0.0  # sum of the deltas since the first message
        self._offset_s: float | None = None
        self._polled_s = -math.inf  # the previous batch's poll time
        self._last_s = -math.inf  # the latest stamp given

    def stamp(self, deltas_s: Sequence[float], polled_s: float) -> list[float]:
        """Arrival times (seconds on the daemon's clock) of one batch of messages read by a poll at `polled_s`.

        Args:
            deltas_s: rtmidi's delta time of each message, in order (seconds since the previous message; the
                first message ever has 0). Negative or non-finite deltas count as 0.
            polled_s: when the poll that read them started, on the daemon's clock.

        Returns:
            One time per message, non-decreasing, each at most `polled_s`.
        """
        cums = []
        for delta in deltas_s:
            if math.isfinite(delta) and delta > 0:
                self._cum_s += delta
            cums.append(self._cum_s)
        if not cums:
            return []
        bound = polled_s - cums[-1]
        if self._offset_s is None:
            self._offset_s = bound
        else:
            risen = self._offset_s + self.drift * max(polled_s - self._polled_s, 0.0)
            self._offset_s = min(bound, risen)
        self._polled_s = polled_s
        times = []
        for cum in cums:
            t_s = min(max(cum + self._offset_s, self._last_s), polled_s)
            self._last_s = t_s
            times.append(t_s)
        return times
