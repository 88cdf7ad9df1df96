"""Grids and quantization of onsets: pure arithmetic on absolute times (seconds on the engine's clock).

Positions on a grid are counted in MIDI clock ticks (24 per quarter note), so one `Grid` serves a MIDI clock (its
ticks are the positions), a fixed tempo (`timing.bpm`) and the player's pulse alike. A division such as "1/16" is a
number of ticks (`DIVISION_TICKS`: 1/16 = 6, 1/8t = 8); grid points are the positions that are multiples of it,
counted from position 0 (the clock's Start, or the anchor of a fixed grid).

`snap(grid, t_s, ticks, earliest_s)` is the quantizer: the model's predicted onset `t_s` goes to the nearest grid
point, or to the first grid point at or after `earliest_s` if the nearest one is earlier than that. The position is
returned, not only the time, so that the engine can ask the grid again for its time just before the note is sent
(a clock's tempo estimate may have moved meanwhile).
"""

from __future__ import annotations

import math
from typing import NamedTuple

CLOCK_TICKS_PER_BEAT = 24  # MIDI clock: 24 pulses per quarter note (the MIDI 1.0 specification)
# Division name -> grid step in clock ticks.
DIVISION_TICKS: dict[str, int] = {
    "1/1": 96, "1/2": 48, "1/4": 24, "1/8": 12, "1/16": 6, "1/32": 3,
    "1/2t": 32, "1/4t": 16, "1/8t": 8, "1/16t": 4, "1/32t": 2,
    "1/2d": 72, "1/4d": 36, "1/8d": 18, "1/16d": 9,
}


def division_ticks(name: str) -> int | None:
    """Ticks per grid step of a `timing.quantize` value; None for "off".

    Raises:
        ValueError: not a division (the message lists the valid ones).
    """
    if name == "off":
        return None
    try:
        return DIVISION_TICKS[name]
    except KeyError:
        raise ValueError(f"quantize = {name!r} is not valid: allowed values are 'off', "
                         f"{', '.join(repr(k) for k in DIVISION_TICKS)}") from None


class Grid(NamedTuple):
    """A uniform grid of ticks: position p (ticks, may be fractional) is at `origin_s + p * tick_s` seconds."""

    origin_s: float
    tick_s: float

    @classmethod
    def from_bpm(cls, bpm: float, origin_s: float) -> "Grid":
        """The grid of a tempo in quarter notes per minute, position 0 at `origin_s`."""
        if not bpm > 0:
            raise ValueError(f"bpm must be > 0, got {bpm!r}")
        return cls(float(origin_s), 60.0 / (bpm * CLOCK_TICKS_PER_BEAT))

    @classmethod
    def from_beat(cls, beat_s: float, origin_s: float) -> "Grid":
        """The grid whose quarter note lasts `beat_s` seconds, position 0 at `origin_s`."""
        if not beat_s > 0:
            raise ValueError(f"beat_s must be > 0, got {beat_s!r}")
        return cls(float(origin_s), beat_s / CLOCK_TICKS_PER_BEAT)

    @property
    def bpm(self) -> float:
        """Quarter notes per minute."""
        return 60.0 / (self.tick_s * CLOCK_TICKS_PER_BEAT)

    def time_of(self, position: float) -> float:
        """Seconds at `position` (ticks)."""
        return self.origin_s + position * self.tick_s

    def position_of(self, t_s: float) -> float:
        """Position in ticks (fractional) at `t_s` seconds."""
        return (t_s - self.origin_s) / self.tick_s


def snap(grid: Grid, t_s: float, ticks: int, earliest_s: float) -> int:
    """The grid point (a position, a multiple of `ticks`) for an onset predicted at `t_s`.

    The nearest grid point to `t_s` (halfway rounds up, later), unless it is before `earliest_s`: then the first grid
    point at or after `earliest_s`.

    Args:
        grid: the grid.
        t_s: the predicted onset, seconds.
        ticks: the grid step in ticks (`division_ticks`), > 0.
        earliest_s: the earliest acceptable onset (e.g. now + the scheduler's lead), seconds.
    """
    if ticks <= 0:
        raise ValueError(f"ticks must be > 0, got {ticks}")
    k = math.floor(grid.position_of(t_s) / ticks + 0.5)
    if grid.time_of(k * ticks) < earliest_s:
        k = math.ceil(grid.position_of(earliest_s) / ticks - 1e-9)
        if grid.time_of(k * ticks) < earliest_s:  # rounding at the boundary
            k += 1
    return int(k * ticks)
