"""The musical context the engine measures: MIDI clock and transport, the player's pulse and time scale, the grid
answers are quantized to, and the key. Pure logic with an injected clock (`now` is passed in); the engine thread
owns one `MusicContext` and feeds it.

- MIDI clock (`timing.follow_clock`): 'clock', 'start', 'continue', 'stop' and 'songpos' messages feed a
  `ClockTracker` (daemon/music/clock.py). Stop makes improvd silent until Start or Continue (`stopped`; the engine
  cancels the answer and releases the thru notes; phrases are still heard and fed to the model); Start resets the
  bar (the grid's position 0 is the first tick after it).
- The grid (`timing.quantize`): the clock's while its ticks arrive, else `timing.bpm`'s, else the player's pulse
  (timing.bpm = 0), anchored at the first onset of the phrase being answered. When the clock's ticks stop without a
  Stop mid-answer, the answer goes on on the clock's last grid (its tempo and phase) rather than jump to another
  grid mid-answer; a new answer takes the clock's grid only while its ticks arrive. Placement on the grid:
  daemon/music/placement.py.
- The beat answers are measured in (`improvise.answer_length` in beats, daemon/music/turns.py): the clock's beat
  while it runs, else the grid's when quantize is on, else the player's pulse; None when none is known.
- Follow tempo (`timing.follow_tempo`, daemon/music/tempo.py): the time scale (player's median IOI / the model's) is
  measured on each phrase (continuous mode: on the player's last notes); 1.0 without follow_tempo. The engine
  divides the player's steps and durations by it before they are fed, and multiplies the model's by it (then clamps
  them to step_range / duration_range) before they are played.
- Key (`improvise.key`, daemon/music/keys.py): a fixed key's scale, or with "auto" the Krumhansl-Schmuckler estimate
  over the window (at each answer; continuous: at each player note).
"""

from __future__ import annotations

import logging

import mido
import numpy as np

from improvd.core import notes as nt
from improvd.core.config import TimingConfig
from improvd.daemon.music import tempo
from improvd.daemon.music.clock import ClockTracker
from improvd.daemon.music.keys import Key, estimate_key, parse_key
from improvd.daemon.music.quantize import Grid, division_ticks

log = logging.getLogger("improvd.engine")


def is_auto_key(setting: str) -> bool:
    """Whether an `improvise.key` setting asks for the estimated key."""
    return setting.strip().lower() == "auto"


class MusicContext:
    """Clock, transport, pulse, time scale, grid and key (module docstring). Engine thread.

    Args:
        timing: the [timing] config.
        card: the model's card (its training data's median IOI, for the time scale).
    """

    def __init__(self, timing: TimingConfig, card: dict | None):
        self.clock = ClockTracker()
        self.stopped = False  # transport Stop: silent until Start/Continue
        self.time_scale = 1.0
        self.pulse_beat_s: float | None = None
        self.auto_key: Key | None = None  # the estimated key, with improvise.key = "auto"
        self._anchor_s: float | None = None
        self._clock_grid: Grid | None = None  # the clock's grid when last running (kept while its ticks stop)
        self.configure(timing, card)

    def configure(self, timing: TimingConfig, card: dict | None) -> None:
        """Take a [timing] config and model card (start-up, reload)."""
        self.timing = timing
        self.quantize_ticks = division_ticks(timing.quantize)
        self.reference_ioi_s = tempo.reference_ioi_s(card, timing.reference_ioi)
        if not timing.follow_tempo:
            self.time_scale = 1.0

    # ---- clock and transport ----------------------------------------------------------------------------
    def on_clock(self, t_s: float, msg: mido.Message) -> str | None:
        """A clock or transport message: the transport event it was ('start', 'continue', 'stop') or None."""
        restarts = self.clock.restarts
        kind = self.clock.handle(t_s, msg)
        if self.clock.restarts != restarts:
            log.debug("clock: tempo change or gap at t=%.6f s; now %.2f bpm", t_s, self.clock.bpm or 0.0)
        if kind == "stop":
            self.stopped = True
            log.debug("transport: stop; improvd is silent until start or continue")
        elif kind in ("start", "continue"):
            self.stopped = False
            log.debug("transport: %s", kind)
        return kind

    def running_clock_grid(self, now: float) -> Grid | None:
        """The clock's grid while `timing.follow_clock` and its ticks arrive, else None."""
        if not (self.timing.follow_clock and self.clock.running(now)):
            return None
        return self.clock.grid()

    # ---- tempo -------------------------------------------------------------------------------------------
    def measure_tempo(self, onsets_s) -> None:
        """Measure the time scale on these (player's) onsets; 1.0 without `timing.follow_tempo`."""
        timing = self.timing
        if not timing.follow_tempo:
            self.time_scale = 1.0
            return
        bounds = (timing.time_scale_range[0], timing.time_scale_range[1])
        self.time_scale = tempo.time_scale(tempo.median_ioi_s(onsets_s), self.reference_ioi_s, bounds,
                                           previous=self.time_scale)

    def hear_phrase(self, onsets_s: list[float]) -> None:
        """A phrase about to be answered (onsets in order): its time scale, the player's pulse, the grid's anchor."""
        self.measure_tempo(onsets_s)
        ioi = tempo.median_ioi_s(onsets_s)
        if ioi is not None:
            self.pulse_beat_s = tempo.beat_from_ioi(ioi)
        if onsets_s:
            self._anchor_s = onsets_s[0]
        self._clock_grid = None  # a new answer takes the clock's grid only while its ticks arrive

    # ---- grid and beat -----------------------------------------------------------------------------------
    def grid(self, now: float, *, answering: bool) -> tuple[Grid | None, int]:
        """The grid answers are quantized to now, and its step in ticks; (None, 0) when quantize is off.
        `answering`: an answer is in progress (it keeps a stopped clock's last grid)."""
        ticks = self.quantize_ticks
        if ticks is None:
            return None, 0
        if self.timing.follow_clock:
            if self.clock.running(now):
                grid = self.clock.grid()
                if grid is not None:
                    self._clock_grid = grid
                    return grid, ticks
            elif self._clock_grid is not None and answering:
                # The clock stopped without a Stop (a cable pulled, a crashed sequencer): the answer goes on on the
                # clock's last grid, its tempo and phase, rather than jump to another grid mid-answer.
                return self._clock_grid, ticks
        anchor = self._anchor_s if self._anchor_s is not None else now
        bpm = self.timing.bpm
        if bpm > 0:
            return Grid.from_bpm(bpm, anchor), ticks
        return Grid.from_beat(self.pulse_beat_s or tempo.DEFAULT_REFERENCE_IOI_S, anchor), ticks

    def beat_s(self, now: float, *, answering: bool) -> float | None:
        """The pulse answers are measured in (daemon/music/turns.py); None when none is known."""
        if self.timing.follow_clock and self.clock.running(now) and self.clock.bpm:
            return 60.0 / self.clock.bpm
        grid, _ = self.grid(now, answering=answering)
        if grid is not None:
            return 60.0 / grid.bpm
        return self.pulse_beat_s

    # ---- key ---------------------------------------------------------------------------------------------
    def keep_auto_key(self, setting: str) -> None:
        """Drop the estimated key unless `setting` (improvise.key) is "auto"."""
        if not is_auto_key(setting):
            self.auto_key = None

    def estimate_key(self, setting: str, window: np.ndarray) -> bool:
        """With `setting` "auto", estimate the key over the window's notes (rows); whether the estimate changed."""
        if not is_auto_key(setting):
            return False
        key = estimate_key(window[:, nt.PITCH], window[:, nt.DURATION])
        if key is not None and key != self.auto_key:
            log.debug("key estimated from the window: %s", key)
            self.auto_key = key
            return True
        return False

    def key_in_use(self, setting: str) -> Key | None:
        """The scale decoding is bound to: the estimate with "auto", none with "none", else the fixed key."""
        if is_auto_key(setting):
            return self.auto_key
        return parse_key(setting) if setting.strip().lower() != "none" else None

    def scale_pcs(self) -> tuple[int, ...] | None:
        """The estimated key's pitch classes (for `Decoding.from_config`), None without an estimate."""
        return self.auto_key.pitch_classes if self.auto_key is not None else None
