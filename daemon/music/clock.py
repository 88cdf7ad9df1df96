"""MIDI beat clock and transport: tempo and grid phase from 0xF8 ticks (24 per quarter note), Start/Continue/Stop.

`ClockTracker` is pure (no thread, no clock of its own): the engine thread hands it the stamped clock messages from
its input queue (`handle(t_s, msg)` for mido types 'clock', 'start', 'continue', 'stop', 'songpos').

Tempo and phase: the time of tick n is modelled as a + b·n, fitted over the last `window` (48, two beats) ticks
that arrived cleanly. Stamps come from rtmidi's arrival times (see daemon/music/arrival.py), which a busy machine can
hold up (a late JACK cycle, a late ALSA thread): ticks then arrive late, often in a bunch. So:

- a tick that arrives less than half a tick length after the previous one (a bunch) is counted but left out of
  the fit: its stamp says when it was taken, not when the tick came;
- the fit is robust: a first line from the median of the successive slopes and the median offset, then a least
  squares fit over the ticks within max(4 × the robust spread of the residuals, `outlier_floor_s`) of it;
- a tempo change shows as residuals (against the fit) that keep growing in one direction, while a hold-up shows as
  late ticks that fall back on the line: after `short` (4) clean ticks in a row whose residuals exceed `change_s`
  (3 ms) and grow by at least a quarter of a millisecond each, in the same direction, the history is cut to those
  ticks, so the estimate follows a change within a few ticks (a sixth of a beat at 100 -> 140 bpm), not two beats;
- more than max(`gap_s` (1 s), `gap_ticks` (24) tick lengths) without a tick means the clock stopped and came back:
  the fit starts again (keeping the last tempo until two ticks have come).

Positions: a tick's song position counts ticks from the last Start (the first tick after Start is position 0, as
MIDI specifies); without a Start, from the first tick seen. Stop freezes the position (ticks that keep coming while
stopped still feed the tempo), Continue goes on from there, Song Position Pointer (in 16ths) sets it. `grid()`
gives the `Grid` whose position p is at the fitted time of song position p.

Transport: `state` is "none" until a Start/Continue/Stop is seen, then "playing" or "stopped".
"""

from __future__ import annotations

import math
from collections import deque

import mido
import numpy as np

from improvd.daemon.music.quantize import CLOCK_TICKS_PER_BEAT, Grid

CLOCK_TYPES = frozenset({"clock", "start", "continue", "stop", "songpos"})


class ClockTracker:
    """Tempo, phase and transport from MIDI clock (see the module docstring).

    Args:
        window: clean ticks in the fit (24..96 is sensible; 48 = two beats).
        short: clean ticks in a row, drifting away from the fit, that make a tempo change.
        change_s: how far (seconds) a tick's stamp must be from the fit to count as drifting.
        gap_ticks: a silence longer than max(`gap_s`, this many tick lengths) restarts the fit.
        gap_s: see `gap_ticks`.
        bunch: a tick arriving less than this fraction of a tick length after the previous one is left out.
        outlier_floor_s: residuals below this are never outliers (seconds; the jitter of a MIDI interface).
        timeout_s: the clock counts as running while its last tick is at most this old (and 3 tick lengths).
    """

    def __init__(self, window: int = 48, short: int = 4, change_s: float = 0.003, gap_ticks: float = 24.0,
                 gap_s: float = 1.0, bunch: float = 0.5, outlier_floor_s: float = 0.002, timeout_s: float = 0.3):
        if window < 3 or short < 2 or short >= window:
            raise ValueError(f"need window >= 3 and 2 <= short < window, got window={window}, short={short}")
        self.window = int(window)
        self.short = int(short)
        self.change_s = float(change_s)
        self.gap_ticks = float(gap_ticks)
        self.gap_s = float(gap_s)
        self.bunch = float(bunch)
        self.outlier_floor_s = float(outlier_floor_s)
        self.timeout_s = float(timeout_s)
        self.state = "none"
        self.ticks = 0  # ticks seen
        self.bunched = 0  # ticks left out of the fit because they came in a bunch
        self.restarts = 0  # times the fit restarted or was cut (tempo changes, gaps)
        self._history: deque[tuple[int, float]] = deque(maxlen=self.window)  # (tick count, t_s) of clean ticks
        self._drift: list[tuple[int, float]] = []  # (count, residual_s) of the clean ticks drifting in a row
        self._offset = 0  # song position = count - offset
        self._stopped_at: int | None = None  # song position of the next tick, while stopped
        self._fit: tuple[float, float, int] | None = None  # (a, b, count of a): t(count) = a + b * (count - c0)
        self._tick_s: float | None = None  # the latest tick length (kept across restarts, as a prior)
        self._last_t: float | None = None
    # ---- input -------------------------------------------------------------------------------------------
    def handle(self, t_s: float, msg: mido.Message) -> str | None:
        """Take one stamped message; returns its type if it was a clock or transport message, else None."""
        kind = msg.type
        if kind == "clock":
            self.tick(t_s)
        elif kind == "start":
            self.start()
        elif kind == "continue":
            self.resume()
        elif kind == "stop":
            self.stop()
        elif kind == "songpos":
            self.song_position(msg.pos)
        else:
            return None
        return kind

    def start(self) -> None:
        """Start: the next tick is song position 0 (the bar starts again)."""
        self.state = "playing"
        self._stopped_at = None
        self._offset = self.ticks  # the next tick's count

    def resume(self) -> None:
        """Continue: go on from the position where Stop (or a Song Position Pointer) left it."""
        self.state = "playing"
        if self._stopped_at is not None:
            self._offset = self.ticks - self._stopped_at
            self._stopped_at = None

    def stop(self) -> None:
        """Stop: the position freezes; ticks that keep coming still feed the tempo."""
        if self.state != "stopped":
            self._stopped_at = self.ticks - self._offset
        self.state = "stopped"

    def song_position(self, sixteenths: int) -> None:
        """Song Position Pointer: the next tick is at `sixteenths` × 6 ticks (applied now if playing)."""
        position = int(sixteenths) * (CLOCK_TICKS_PER_BEAT // 4)
        if self.state == "playing":
            self._offset = self.ticks - position
        else:
            self._stopped_at = position

    def tick(self, t_s: float) -> None:
        """One 0xF8 tick stamped at `t_s` seconds."""
        count = self.ticks
        self.ticks += 1
        last, self._last_t = self._last_t, float(t_s)
        prior = self.tick_s
        if last is not None:
            gap = t_s - last
            if gap < 0 or gap > max(self.gap_s, self.gap_ticks * prior if prior else 0.0):
                self._history.clear()
                self._drift.clear()
                self._fit = None
                self.restarts += 1
            elif prior and gap < self.bunch * prior:
                self.bunched += 1
                return
        if self._fit is not None:
            self._follow_drift(count, t_s - self._predict(count))
        self._history.append((count, float(t_s)))
        self._refit()

    def _predict(self, count: int) -> float:
        a, b, c0 = self._fit
        return a + b * (count - c0)

    def _follow_drift(self, count: int, residual_s: float) -> None:
        """Cut the history to the last ticks when they drift away from the fit (a tempo change)."""
        if abs(residual_s) <= self.change_s:
            self._drift.clear()
            return
        if self._drift:
            prev = self._drift[-1][1]
            if (residual_s > 0) != (prev > 0) or abs(residual_s) < abs(prev) + 0.00025:
                self._drift.clear()  # not drifting on: a hold-up falling back, or noise
        self._drift.append((count, residual_s))
        if len(self._drift) >= self.short:
            first = self._drift[0][0]
            while self._history and self._history[0][0] < first:
                self._history.popleft()
            self._drift.clear()
            self.restarts += 1

    # ---- the fit -----------------------------------------------------------------------------------------
    def _refit(self) -> None:
        n = len(self._history)
        if n < 2:
            self._fit = None
            return
        counts = np.array([c for c, _ in self._history], dtype=np.float64)
        times = np.array([t for _, t in self._history], dtype=np.float64)
        c0 = int(counts[-1])
        x = counts - c0
        keep = np.ones(n, dtype=bool)
        if n >= 4:
            b0 = float(np.median(np.diff(times) / np.diff(x)))
            a0 = float(np.median(times - b0 * x))
            residuals = times - (a0 + b0 * x)
            spread = 1.4826 * float(np.median(np.abs(residuals - np.median(residuals))))
            keep = np.abs(residuals) <= max(4.0 * spread, self.outlier_floor_s)
            if keep.sum() < 2:
                keep[:] = True
        a, b = self._line(x, times, keep)
        if b > 0 and math.isfinite(b):
            self._fit = (a, b, c0)
            self._tick_s = b

    @staticmethod
    def _line(x: np.ndarray, y: np.ndarray, keep: np.ndarray) -> tuple[float, float]:
        xs, ys = x[keep], y[keep]
        xm, ym = xs.mean(), ys.mean()
        var = float(((xs - xm) ** 2).sum())
        b = float(((xs - xm) * (ys - ym)).sum() / var) if var > 0 else 0.0
        return float(ym - b * xm), b

    # ---- what the engine asks ----------------------------------------------------------------------------
    @property
    def tick_s(self) -> float | None:
        """The estimated length of one tick in seconds, or None before two ticks."""
        return self._fit[1] if self._fit is not None else self._tick_s

    @property
    def bpm(self) -> float | None:
        """The estimated tempo in quarter notes per minute, or None before two ticks."""
        tick_s = self.tick_s
        return 60.0 / (tick_s * CLOCK_TICKS_PER_BEAT) if tick_s else None

    @property
    def last_tick_s(self) -> float | None:
        """When the last tick arrived, or None."""
        return self._last_t

    def running(self, now_s: float) -> bool:
        """Whether ticks are arriving: the last one is at most `timeout_s` (or 3 tick lengths) old."""
        if self._last_t is None or self.tick_s is None:
            return False
        return now_s - self._last_t <= max(self.timeout_s, 3.0 * self.tick_s)

    def position_of_next_tick(self) -> int:
        """The song position of the next tick."""
        return self._stopped_at if self._stopped_at is not None else self.ticks - self._offset

    def grid(self) -> Grid | None:
        """The clock's grid (position = song position in ticks), or None before two ticks."""
        if self._fit is not None:
            a, b, c0 = self._fit
        elif self._history and self._tick_s is not None:  # one tick since a restart: the last tempo as a prior
            c0, a = self._history[-1]
            b = self._tick_s
        else:
            return None
        # song position p is tick count p + offset
        return Grid(a + b * (self._offset - c0), b)
