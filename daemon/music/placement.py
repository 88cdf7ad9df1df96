"""Placement in time: where a predicted note of an answer is played, given the grid in use (pure; the engine thread
calls it with its clock's `now`).

- Without quantize (no grid) a note's onset is the last fed onset plus its predicted step. A note chained to
  improvd's previous one keeps that absolute deadline even when the engine is a little late (the scheduler then
  sends it at once; errors do not add up); only after a stall of more than `catch_up_s` does it move to now
  (+ `lead_s`). A note that follows the player's (the first of an answer, or after a player note in continuous mode)
  moves to now as soon as its onset has passed.
- With quantize (`timing.quantize`) the onset is snapped to the nearest grid point (daemon/music/quantize.py), never
  earlier than now + `lead_s`, and a predicted step longer than `tempo.CHORD_S` never becomes a chord (it takes at
  least one grid step). The note keeps its grid position; `refresh` asks the grid again for that position's time
  when the note is handed (a tempo change is followed to the note). A position that would move a note more than
  `REGRID_STEPS` grid steps belongs to another grid (the clock started or came back after a gap mid-answer): the
  note is snapped again from its time. A position whose time has passed moves to the next grid point rather than
  be sent late, off the grid.
- The first note of an answer while a MIDI clock runs (`entry`): at its predicted onset (or now, if that has passed)
  moved to the next beat, or the next point of a quantize grid coarser than a beat (daemon/music/turns.py).
- The model is fed the real gaps (daemon/live/feed.py): a note moved from its predicted onset is fed with its
  real step.
- A note delayed by the polyphony bound (`delay_to`, daemon/music/texture.py) goes to the time it may start, or the
  first grid point at or after it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from improvd.daemon.music import turns
from improvd.daemon.music.quantize import Grid, snap
from improvd.daemon.music.tempo import CHORD_S

REGRID_STEPS = 4  # a note's grid position that moves it more than this many grid steps belongs to another grid


class Placed(NamedTuple):
    """Where a note goes: its onset (s), whether that moved it from its predicted onset, its grid position or None."""

    onset_s: float
    moved: bool
    position: int | None


@dataclass(frozen=True)
class Placement:
    """The placement rules (module docstring) with the engine's margins.

    Args:
        lead_s: safety margin, seconds, when a note is due at once.
        catch_up_s: how late a note chained to improvd's previous one may be and still keep its deadline.
    """

    lead_s: float
    catch_up_s: float

    def entry(self, grid: Grid, quantize_ticks: int | None, step_s: float, last_onset_s: float | None,
              now: float) -> Placed:
        """The first note of an answer on a running MIDI clock's `grid`."""
        t = now + self.lead_s
        if last_onset_s is not None:
            t = max(t, last_onset_s + step_s)
        position = snap(grid, t, turns.entry_ticks(quantize_ticks), t)
        return Placed(grid.time_of(position), True, position)

    def place(self, grid: Grid | None, ticks: int, step_s: float, last_onset_s: float | None, now: float, *,
              chained: bool) -> Placed:
        """A predicted note `step_s` after the last fed onset; `grid` None when quantize is off, `ticks` its step.
        `chained`: the last note fed was improvd's own."""
        if last_onset_s is None:
            return Placed(now + self.lead_s, True, None)
        onset = last_onset_s + step_s
        if grid is not None:
            earliest = now + self.lead_s
            if step_s > CHORD_S:  # not a chord: at least one grid step after the last onset
                earliest = max(earliest, last_onset_s + 0.5 * ticks * grid.tick_s)
            position = snap(grid, onset, ticks, earliest)
            return Placed(grid.time_of(position), True, position)
        earliest = now - self.catch_up_s if chained else now + self.lead_s
        if onset < earliest:
            return Placed(now + self.lead_s, True, None)
        return Placed(onset, False, None)

    def delay_to(self, grid: Grid | None, ticks: int, t_s: float) -> Placed:
        """A note moved later, to `t_s` or the first grid point at or after it when quantize is on."""
        if grid is not None:
            position = snap(grid, t_s, ticks, t_s)
            return Placed(grid.time_of(position), True, position)
        return Placed(t_s, True, None)

    def refresh(self, grid: Grid, ticks: int, onset_s: float, position: int, now: float) -> tuple[float, int]:
        """The time of a placed note's grid `position` on `grid` now: (onset, position)."""
        if abs(grid.time_of(position) - onset_s) > REGRID_STEPS * ticks * grid.tick_s:
            # The position belongs to another grid: keep the note's time, on the grid there is now.
            position = snap(grid, onset_s, ticks, now + self.lead_s)
        if grid.time_of(position) < now + self.lead_s:
            position = snap(grid, now + self.lead_s, ticks, now + self.lead_s)
        return grid.time_of(position), position
