"""The engine thread: listens to the player, decides when to answer, predicts notes ahead and hands them to the
scheduler. It owns the note tracker (rolling window), the `Improviser` (model state) and the mode (DESIGN.md §5).

Input: `input_queue` receives (t_s, mido.Message) items, t_s the arrival time on the same clock as `now`
(`time.perf_counter`), from the input's poller thread, which only puts. `None` is the stop sentinel.

What is fed to the model: one merged sequence of the player's completed notes and improvd's own notes, in the order
the engine learns of them. Each fed note's step is the gap from the previous fed note's onset, clipped to
[0, improvise.step_range high] (a pause between phrases, or a player's note that began before improvd's last one,
stays within what the model knows). A player's note is complete, and fed, when it is released (its duration is
known then). An answered note whose onset is exactly the previous onset plus its predicted step is fed exactly as
predicted; so with temperature 0, every answered note after the first is the greedy continuation (DESIGN.md §3) of
the notes fed before it. The first note of an answer usually comes later than predicted (the silence has passed),
and is fed with its real gap.

respond mode: when no key has been held for `improvise.silence` s after a phrase, the phrase's notes are fed and an
answer starts. Its first note is due at the last fed onset plus the predicted step, or at once (now + `lead_s`) if
that has passed; each next note at the previous onset plus its predicted step (kept even when the engine is a
little late: the scheduler then sends it at once; only after a stall of more than `catch_up_s` does it move to now);
each note-off at onset plus duration.
The answer stops after `max_notes` notes or when a note would start more than `max_seconds` after the first one;
it is finished when its last note-off is due. A note-on from the player during the answer cancels it at once
(`scheduler.cancel`): nothing more is sent and its sounding notes are released; notes handed to the scheduler that
had not started are taken back out of the model state.

continuous mode: the first phrase starts the stream the same way, then improvd never stops: each player note is fed
when it completes and the next (not yet handed) note is predicted again from the updated state. Player notes do not
interrupt. `on_answer` is called every `max_notes` notes played (one log line per chunk).

Prediction runs ahead of playback: note k+1 is predicted as soon as note k is handed to the scheduler, and a note
is handed `lookahead_s` (50 ms) before its onset, never earlier, so an interruption finds at most ~50 ms of music
queued.

Hot reload: `request_swap(config, model)` (main thread) is applied by the engine thread between phrases (when no
answer is playing; in continuous mode at the next chunk boundary). The new Improviser is primed with the last notes
the old one was fed.

Hooks for a recorder, all called in the engine thread and expected to be quick: `on_answer(summary)` once per
finished answer (keys: notes_heard, notes_played, inference_ms (mean feed + predict time per played note),
lateness_ms (the scheduler's latest event), interrupted, mode, time_scale (1.0 unless timing.follow_tempo), bpm (the
grid's tempo, None without quantize), key (the scale in use, e.g. "C major", or None));
`on_note_heard(note_row, onset_s)` for each completed player note and `on_note_played(note_row, onset_s)` for each
note handed to the scheduler (note_row: float64 [4] pitch, step_s as fed, duration_s, velocity). What improvd actually
sent (exact times, with cancels and re-triggers) is best recorded with `Scheduler.on_sent`; the player's notes with
`on_note_heard` (or the raw input).
`on_note_played` also reports the notes an interruption takes back before they start (at most ~`lookahead_s` of
music); `notes_played` in the summary does not count them.

Playing with a band (config [timing], [control], midi.thru/program, improvise.key):

- MIDI clock: 'clock', 'start', 'continue', 'stop' and 'songpos' messages come through the same queue and feed a
  `ClockTracker` (daemon/clock.py) when `timing.follow_clock`. Stop cancels the answer (its notes are released) and
  keeps improvd silent until Start or Continue (phrases are still heard and fed to the model); Start resets the
  bar (the grid's position 0 is the first tick after it).
- Quantize (`timing.quantize`): a note's predicted onset is snapped to the nearest grid point (daemon/quantize.py),
  never earlier than now + `lead_s`, and a predicted step longer than `CHORD_S` never becomes a chord (it takes at
  least one grid step). The grid is the clock's while ticks arrive, else `timing.bpm`'s, else the player's pulse
  (timing.bpm = 0), anchored at the first onset of the phrase being answered. A note keeps its grid position, and its
  time is asked from the grid again when it is handed to the scheduler, so a tempo change is followed to the note.
  The model is fed the real gaps.
- Follow tempo (`timing.follow_tempo`, daemon/tempo.py): the time scale (player's median IOI / the model's) is
  measured on each phrase (continuous: on the player's last notes); the player's steps and durations are divided by
  it before they are fed, the model's multiplied by it (then clamped to step_range / duration_range) before they are
  played. Rows reported by `on_note_heard` / `on_note_played` are as fed, in the model's time.
- Live control (`[control]`, daemon/control.py): CCs change temperature, top_p, max_notes, key_strength and mode
  (from the next note; they stay across a reload), mute (cancels the answer; phrases are still fed), panic (every
  sounding note released at once, improvd's and thru, an All Notes Off on the output channel, the answer and the
  pending phrase dropped), reload (`on_reload_request()` is called; the service reloads). Each CC is logged at debug.
- State out (`control.state_cc`): idle / listening (a key held or a phrase pending) / answering, sent on change
  through the scheduler.
- Thru (`midi.thru`): the player's note-ons and note-offs on the listened channels are sent at once through the
  scheduler, each as a tracked note (so panic, Stop and exit release it; a key held past `improvise.max_hold` is
  released then).
- Program change (`midi.program`) through the scheduler when the engine starts.
- Key (`improvise.key`, daemon/keys.py): a fixed key's scale, or with "auto" the Krumhansl-Schmuckler estimate over
  the window (at each answer; continuous: at each player note), weighted by `improvise.key_strength` in decoding.

Faults: malformed queue items are skipped; an exception while handling input or time is logged, the current answer
is cancelled (its notes released) and the engine goes on listening. `stop` during an answer cancels it, and it is
reported as interrupted.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import mido
import numpy as np

from improvd.daemon import notes as nt
from improvd.daemon import tempo
from improvd.daemon.clock import CLOCK_TYPES, ClockTracker
from improvd.daemon.config import Config, ImproviseConfig
from improvd.daemon.control import ControlMap
from improvd.daemon.improviser import Decoding, Improviser
from improvd.daemon.keys import Key, estimate_key, parse_key
from improvd.daemon.model import StepModel
from improvd.daemon.quantize import Grid, division_ticks, snap
from improvd.daemon.scheduler import Scheduler
from improvd.daemon.watchdog import HEARTBEAT_S, Heartbeat
from improvd.daemon.window import HeardNote, NoteTracker

log = logging.getLogger("improvd.engine")

_TICK = object()
MAX_BATCH = 1000  # input items taken in one go before timers are looked at (bounded under a flood)
CHORD_S = 0.03  # a predicted step longer than this is not a chord: quantized, it takes at least one grid step
TEMPO_NOTES = 8  # continuous mode: the player's last notes the time scale is measured on
STATES = ("idle", "listening", "answering")
ALL_NOTES_OFF = 123


@dataclass(eq=False)
class _Answer:
    """An answer being played (respond), or the stream (continuous); also the scheduler owner of its notes."""

    continuous: bool
    heard: int
    first_onset_s: float | None = None
    # (onset_s, row in real time, moved from its predicted onset, grid position or None), not handed
    next: tuple[float, np.ndarray, bool, int | None] | None = None
    handed: int = 0
    chunk_played: int = 0
    end_s: float = -math.inf  # the latest note-off handed
    chained: bool = False  # the last note fed was improvd's own
    done_handing: bool = False
    inference_s: float = 0.0
    undo: deque = field(default_factory=deque)  # (onset_s, Snapshot, last_fed_onset_s) of notes not started


class Engine:
    """The engine thread (see the module docstring).

    Args:
        config: the whole checked config (uses [improvise] and [midi]).
        model: the loaded step model.
        scheduler: the running scheduler that plays the notes.
        now: the clock, seconds; the same clock as the input stamps and the scheduler.
        on_answer: called with a summary dict once per finished answer.
        on_note_heard: called as on_note_heard(note_row, onset_s) for each completed player note.
        on_note_played: called as on_note_played(note_row, onset_s) for each note handed to the scheduler.
        on_reload_request: called (engine thread, no arguments) when the reload CC is pressed.
        lead_s: safety margin, seconds, when a note is due at once.
        lookahead_s: how long before its onset a note is handed to the scheduler.
        catch_up_s: how late a note chained to improvd's previous one may be and still keep its deadline (it is
            sent at once); later than that, it moves to now.
    """

    def __init__(self, config: Config, model: StepModel, scheduler: Scheduler, *,
                 now: Callable[[], float] = time.perf_counter,
                 on_answer: Callable[[dict], None] | None = None,
                 on_note_heard: Callable[[np.ndarray, float], None] | None = None,
                 on_note_played: Callable[[np.ndarray, float], None] | None = None,
                 on_reload_request: Callable[[], None] | None = None,
                 lead_s: float = 0.002, lookahead_s: float = 0.05, catch_up_s: float = 0.1):
        self.input_queue: queue.SimpleQueue = queue.SimpleQueue()
        self.on_answer = on_answer
        self.on_note_heard = on_note_heard
        self.on_note_played = on_note_played
        self.on_reload_request = on_reload_request
        self.lead_s = float(lead_s)
        self.lookahead_s = float(lookahead_s)
        self.catch_up_s = float(catch_up_s)
        self.answers = 0
        self._now = now
        self._scheduler = scheduler
        self._config = config
        self._model = model
        self._tracker = NoteTracker.from_config(config.improvise, config.midi)
        self._rng = self._make_rng(config.improvise.seed)
        self._live: dict = {}  # [improvise] values set by CCs; they stay across a reload
        self._imp: ImproviseConfig = config.improvise
        self._auto_key: Key | None = None
        self._clock = ClockTracker()
        self._muted = False
        self._stopped = False  # transport Stop: silent until Start/Continue
        self._time_scale = 1.0
        self._grid_anchor_s: float | None = None
        self._pulse_beat_s: float | None = None
        self._thru: dict[tuple[int, int], object] = {}  # (channel, pitch) -> scheduler owner of a thru note
        self._state: str | None = None
        self._configure(config, model)
        self._improviser = Improviser(model, self._decoding(), rng=self._rng)
        self._phrase: list[HeardNote] = []
        self._last_fed_onset_s: float | None = None
        self._answer: _Answer | None = None
        self._swap_lock = threading.Lock()
        self._pending_swap: tuple[Config, StepModel] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.heartbeat = Heartbeat()  # the thread's loop went round (the service's watchdog reads it)

    @staticmethod
    def _make_rng(seed: int) -> np.random.Generator:
        return np.random.default_rng(None if seed < 0 else seed)

    # ---- control (main thread) ---------------------------------------------------------------------------
    @property
    def config(self) -> Config:
        """The config in use (after the last applied swap)."""
        return self._config

    @property
    def model(self) -> StepModel:
        """The model in use (after the last applied swap)."""
        return self._model

    @property
    def playing(self) -> bool:
        """Whether an answer (or the continuous stream) is in progress."""
        return self._answer is not None

    @property
    def improvise(self) -> ImproviseConfig:
        """The [improvise] values in effect: the config's, with what the CCs changed."""
        return self._imp

    @property
    def muted(self) -> bool:
        """Whether improvd is muted (by the mute CC)."""
        return self._muted

    @property
    def clock(self) -> ClockTracker:
        """The MIDI clock state (owned by the engine thread; read it for tests and logs only)."""
        return self._clock

    @property
    def time_scale(self) -> float:
        """The current time scale (player's tempo / the model's; 1.0 unless timing.follow_tempo)."""
        return self._time_scale

    @property
    def state(self) -> str | None:
        """'idle', 'listening' or 'answering' (as last computed by the engine thread)."""
        return self._state

    @property
    def thread(self) -> threading.Thread | None:
        """The engine thread (None before `start`), for the service's watchdog."""
        return self._thread

    def start(self) -> None:
        """Start the engine thread, after `begin`."""
        if self._thread is not None:
            raise RuntimeError("the engine was already started")
        self.begin()
        self._thread = threading.Thread(target=self._run, name="improvd-engine", daemon=True)
        self._thread.start()

    def begin(self) -> None:
        """Send what goes out at start, through the scheduler: `midi.program` and the state CC (idle).

        `start` calls it; tests that drive the engine without its thread (`run_once`) call it themselves."""
        if self._config.midi.program >= 0:
            self._scheduler.schedule_message(self._now(), mido.Message(
                "program_change", program=self._config.midi.program, channel=self._config.midi.output_channel - 1))
        self._update_state()

    def stop(self, timeout: float = 1.0) -> None:
        """Stop the thread (Event + sentinel, join with `timeout` s). The caller then stops the scheduler."""
        self._stop.set()
        self.input_queue.put(None)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("the engine thread did not stop within %.1f s", timeout)

    def request_swap(self, config: Config, model: StepModel) -> None:
        """Use `config` and `model` from the next phrase on (hot reload); a later request replaces this one."""
        with self._swap_lock:
            self._pending_swap = (config, model)
        self.input_queue.put(_TICK)  # wake the engine so an idle one swaps now

    # ---- the thread --------------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self.heartbeat.beat()
                timeout = self._timeout()
                timeout = HEARTBEAT_S if timeout is None else min(timeout, HEARTBEAT_S)
                try:
                    if timeout is not None and timeout <= 0:
                        item = self.input_queue.get_nowait()
                    else:
                        item = self.input_queue.get(timeout=timeout)
                except queue.Empty:
                    item = _TICK
                if item is None:
                    break
                self._process(item)
        finally:
            if self._answer is not None:
                self._scheduler.cancel(self._answer)
                self._finish(interrupted=True)

    def run_once(self) -> None:
        """Take what is queued (up to `MAX_BATCH` items), then act on the time: the thread's body for one wake-up.

        Tests drive the engine with it, with a fake clock and no thread (see `next_wake_s`)."""
        try:
            item = self.input_queue.get_nowait()
        except queue.Empty:
            item = _TICK
        if item is None:
            self._stop.set()
            return
        self._process(item)

    def next_wake_s(self) -> float | None:
        """When the engine must next act without input (absolute seconds on its clock), or None."""
        timeout = self._timeout()
        return None if timeout is None else self._now() + timeout

    def _process(self, item) -> None:
        try:
            # Take everything already waiting before deciding anything: a burst is one moment.
            taken = 0
            while True:
                if item is not _TICK:
                    self._on_input(item)
                taken += 1
                if taken >= MAX_BATCH:
                    break
                try:
                    item = self.input_queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._stop.set()
                    break
            self._on_time(self._now())
            self._update_state()
        except Exception:
            log.exception("engine error; the current answer is cancelled and the engine goes on listening")
            self._abort()

    def _timeout(self) -> float | None:
        """Seconds until the engine must act without input, or None to wait for input only."""
        now = self._now()
        due = []
        expiry = self._tracker.next_expiry_s()
        if expiry is not None:
            due.append(expiry)
        a = self._answer
        if a is None:
            quiet = self._tracker.quiet_since_s()
            if self._phrase and quiet is not None:
                due.append(quiet + self._imp.silence)
        elif not a.done_handing:
            due.append(now if a.next is None else a.next[0] - self.lookahead_s)
        else:
            due.append(a.end_s)
        return max(0.0, min(due) - now) if due else None

    def _on_input(self, item) -> None:
        try:
            t_s, msg = item
            t_s = float(t_s)
        except (TypeError, ValueError):
            t_s, msg = math.nan, None
        if not isinstance(msg, mido.Message) or not math.isfinite(t_s):
            log.debug("ignoring a malformed input item %r", item)
            return
        kind = msg.type
        if kind in CLOCK_TYPES:
            if self._config.timing.follow_clock:
                self._on_clock(t_s, msg)
            return
        if kind == "control_change":
            self._on_control(msg)
        update = self._tracker.handle(t_s, msg)
        a = self._answer
        if update.note_on and a is not None and not a.continuous:
            self._interrupt(a)
        if self._config.midi.thru and kind in ("note_on", "note_off"):
            self._pass_thru(msg)
        for note in update.completed:
            self._heard(note)

    # ---- clock, transport, control, thru -----------------------------------------------------------------
    def _on_clock(self, t_s: float, msg: mido.Message) -> None:
        restarts = self._clock.restarts
        kind = self._clock.handle(t_s, msg)
        if self._clock.restarts != restarts:
            log.debug("clock: tempo change or gap at t=%.6f s; now %.2f bpm", t_s, self._clock.bpm or 0.0)
        if kind == "stop":
            self._stopped = True
            log.debug("transport: stop; improvd is silent until start or continue")
            if self._answer is not None:
                self._interrupt(self._answer)
        elif kind in ("start", "continue"):
            self._stopped = False
            log.debug("transport: %s", kind)
            a = self._answer
            if kind == "start" and a is not None and a.next is not None and a.next[3] is not None:
                a.next = None  # its grid position belonged to the bar before Start: predict it again

    def _on_control(self, msg: mido.Message) -> None:
        actions = self._control.handle(msg)
        function = self._control.function_of(msg)
        log.debug("CC %d = %d on channel %d%s", msg.control, msg.value, msg.channel + 1,
                  f" ({function})" if function else " (not mapped)")
        for action in actions:
            if action.function == "panic":
                self._panic()
            elif action.function == "reload":
                log.info("reload requested by CC %d", msg.control)
                self._hook(self.on_reload_request)
            elif action.function == "mute":
                if action.value and not self._muted and self._answer is not None:
                    self._interrupt(self._answer)
                self._muted = bool(action.value)
            else:
                self._set_live(action.function, action.value)

    def _set_live(self, name: str, value) -> None:
        self._live[name] = value
        self._refresh_improvise()
        a = self._answer
        if name == "mode" and a is not None:
            if value == "continuous" and not a.continuous:
                a.continuous = True
            elif value == "respond" and a.continuous:
                a.continuous = False  # the stream ends: nothing more is handed, what was handed plays out
                a.done_handing = True
                a.next = None

    def _panic(self) -> None:
        """Release everything now: improvd's notes and the thru notes, then All Notes Off on the output channel."""
        a = self._answer
        released = self._scheduler.cancel()
        self._scheduler.schedule_message(self._now(), mido.Message(
            "control_change", control=ALL_NOTES_OFF, value=0, channel=self._config.midi.output_channel - 1))
        self._thru.clear()
        self._phrase.clear()
        if a is not None:
            self._interrupt(a)
        log.info("panic: %d sounding notes released", released)

    def _pass_thru(self, msg: mido.Message) -> None:
        key = (msg.channel, msg.note)
        if msg.type == "note_on" and msg.velocity > 0:
            if self._tracker.channels and msg.channel not in self._tracker.channels:
                return
            old = self._thru.pop(key, None)
            if old is not None:
                self._scheduler.cancel(old)
            owner = object()
            now = self._now()
            self._scheduler.schedule_note(now, now + self._imp.max_hold, msg.note, msg.velocity,
                                          channel=msg.channel, owner=owner)
            self._thru[key] = owner
        else:
            owner = self._thru.pop(key, None)
            if owner is not None:
                self._scheduler.cancel(owner)

    def _update_state(self) -> None:
        if self._answer is not None:
            state = "answering"
        elif self._tracker.held or self._phrase:
            state = "listening"
        else:
            state = "idle"
        if state == self._state:
            return
        self._state = state
        cc = self._config.control.state_cc
        if cc >= 0:
            value = self._config.control.state_values[STATES.index(state)]
            self._scheduler.schedule_message(self._now(), mido.Message(
                "control_change", control=cc, value=value, channel=self._config.midi.output_channel - 1))

    def _on_time(self, now: float) -> None:
        for note in self._tracker.expire(now):
            self._heard(note)
        if self._answer is None:
            self._apply_swap()
            quiet = self._tracker.quiet_since_s()
            if self._phrase and quiet is not None and now >= quiet + self._imp.silence:
                self._start_answer()
        if self._answer is not None:
            self._advance(self._answer)

    # ---- listening ---------------------------------------------------------------------------------------
    def _fed_step(self, onset_s: float) -> float:
        """The step fed for a note at `onset_s`: the gap from the last fed onset in the model's time, clipped."""
        if self._last_fed_onset_s is None:
            return 0.0
        return min(max(onset_s - self._last_fed_onset_s, 0.0) / self._time_scale, self._imp.step_range[1])

    def _player_row(self, note: HeardNote) -> np.ndarray:
        return np.array([note.pitch, self._fed_step(note.onset_s), note.duration_s / self._time_scale,
                         note.velocity], np.float64)

    def _feed(self, row: np.ndarray, onset_s: float) -> None:
        self._improviser.feed(row)
        if self._last_fed_onset_s is None or onset_s > self._last_fed_onset_s:
            self._last_fed_onset_s = onset_s

    def _heard(self, note: HeardNote) -> None:
        a = self._answer
        if a is not None and a.continuous:
            self._measure_tempo(self._tracker.window_onsets_s()[-TEMPO_NOTES:])
            self._estimate_key()
            row = self._player_row(note)
            self._feed(row, note.onset_s)
            a.heard += 1
            a.chained = False
            a.next = None  # predict the next note again from the updated state
            self._hook(self.on_note_heard, row, note.onset_s)
        else:
            self._phrase.append(note)
            # Bounded under an input flood (no silence, no end of phrase): only the last notes matter to the answer.
            cap = max(self._config.improvise.window, self._model.context)
            if len(self._phrase) > cap:
                del self._phrase[:len(self._phrase) - cap]

    def _start_answer(self) -> None:
        phrase = sorted(self._phrase, key=lambda n: (n.onset_s, n.pitch))
        self._phrase.clear()
        onsets = [n.onset_s for n in phrase]
        self._measure_tempo(onsets)
        self._estimate_key()
        ioi = tempo.median_ioi_s(onsets)
        if ioi is not None:
            self._pulse_beat_s = tempo.beat_from_ioi(ioi)
        if phrase:
            self._grid_anchor_s = phrase[0].onset_s
        for note in phrase:
            row = self._player_row(note)
            self._feed(row, note.onset_s)
            self._hook(self.on_note_heard, row, note.onset_s)
        if self._muted or self._stopped:
            log.debug("phrase of %d notes heard; not answering (%s)", len(phrase),
                      "muted" if self._muted else "transport stopped")
            return
        self._answer = _Answer(continuous=self._imp.mode == "continuous", heard=len(phrase))
        log.debug("phrase of %d notes heard; answering (time scale %.3f)", len(phrase), self._time_scale)

    def _measure_tempo(self, onsets_s) -> None:
        timing = self._config.timing
        if not timing.follow_tempo:
            self._time_scale = 1.0
            return
        bounds = (timing.time_scale_range[0], timing.time_scale_range[1])
        self._time_scale = tempo.time_scale(tempo.median_ioi_s(onsets_s), self._reference_ioi_s, bounds,
                                            previous=self._time_scale)

    def _estimate_key(self) -> None:
        if self._imp.key.strip().lower() != "auto":
            return
        window = self._tracker.window_notes()
        key = estimate_key(window[:, nt.PITCH], window[:, nt.DURATION])
        if key is not None and key != self._auto_key:
            log.debug("key estimated from the window: %s", key)
            self._auto_key = key
            self._improviser.decoding = self._decoding()

    # ---- playing -----------------------------------------------------------------------------------------
    def _predict_next(self, a: _Answer) -> tuple[float, np.ndarray, bool, int | None]:
        started = time.perf_counter()
        row = self._improviser.predict(velocity_hint=self._tracker.recent_velocity())
        a.inference_s += time.perf_counter() - started
        if self._time_scale != 1.0:  # out of the model's time into the player's
            imp = self._imp
            row[nt.STEP] = min(max(row[nt.STEP] * self._time_scale, imp.step_range[0]), imp.step_range[1])
            row[nt.DURATION] = min(max(row[nt.DURATION] * self._time_scale, imp.duration_range[0]),
                                   imp.duration_range[1])
        now = self._now()
        if self._last_fed_onset_s is None:
            return now + self.lead_s, row, True, None
        onset = self._last_fed_onset_s + row[nt.STEP]
        grid, ticks = self._grid(now)
        if grid is not None:
            earliest = now + self.lead_s
            if row[nt.STEP] > CHORD_S:  # not a chord: at least one grid step after the last onset
                earliest = max(earliest, self._last_fed_onset_s + 0.5 * ticks * grid.tick_s)
            position = snap(grid, onset, ticks, earliest)
            return grid.time_of(position), row, True, position
        # A note chained to improvd's previous one keeps the grid (absolute deadlines, errors do not add up) even if
        # the engine woke a little late: the scheduler sends it at once. Only after a longer stall, or for a note
        # that follows the player's (the first of an answer, or after a player note in continuous mode), does the
        # note move to now.
        earliest = now - self.catch_up_s if a.chained else now + self.lead_s
        if onset < earliest:
            return now + self.lead_s, row, True, None
        return onset, row, False, None

    def _grid(self, now: float) -> tuple[Grid | None, int]:
        """The grid answers are quantized to now, and its step in ticks; (None, 0) when quantize is off."""
        ticks = self._quantize_ticks
        if ticks is None:
            return None, 0
        if self._config.timing.follow_clock and self._clock.running(now):
            grid = self._clock.grid()
            if grid is not None:
                return grid, ticks
        anchor = self._grid_anchor_s if self._grid_anchor_s is not None else now
        bpm = self._config.timing.bpm
        if bpm > 0:
            return Grid.from_bpm(bpm, anchor), ticks
        return Grid.from_beat(self._pulse_beat_s or tempo.DEFAULT_REFERENCE_IOI_S, anchor), ticks

    def _refresh_onset(self, a: _Answer) -> None:
        """Ask the grid again for the time of the next note's grid position (the clock's tempo may have moved).

        If that time has passed (the engine was held up, or the tempo went up), the note moves to the next grid
        point instead of being sent late, off the grid."""
        if a.next is None or a.next[3] is None:
            return
        now = self._now()
        grid, ticks = self._grid(now)
        if grid is None:
            return
        position = a.next[3]
        if grid.time_of(position) < now + self.lead_s:
            position = snap(grid, now + self.lead_s, ticks, now + self.lead_s)
        a.next = (grid.time_of(position), a.next[1], a.next[2], position)

    def _advance(self, a: _Answer) -> None:
        imp = self._imp
        now = self._now()
        while a.undo and a.undo[0][0] <= now:  # started notes can no longer be taken back
            a.undo.popleft()
        while not a.done_handing:
            if a.next is None:
                a.next = self._predict_next(a)
            else:
                self._refresh_onset(a)
            onset, row, moved, _ = a.next
            if not a.continuous and (a.handed >= imp.max_notes or (
                    a.first_onset_s is not None and onset - a.first_onset_s > imp.max_seconds)):
                a.done_handing = True
                a.next = None
                break
            if onset - self.lookahead_s > self._now():
                break
            self._hand(a, onset, row, moved)
            a.next = None
            if a.continuous and a.chunk_played >= imp.max_notes:
                self._chunk_done(a)
                if self._answer is not a:
                    return
        if not a.continuous and a.done_handing and self._now() >= a.end_s:
            self._finish(interrupted=False)

    def _hand(self, a: _Answer, onset_s: float, row: np.ndarray, moved: bool) -> None:
        pitch, duration_s, velocity = int(row[nt.PITCH]), float(row[nt.DURATION]), int(row[nt.VELOCITY])
        if a.first_onset_s is None:
            a.first_onset_s = onset_s
        if not a.continuous:
            a.undo.append((onset_s, self._improviser.snapshot(), self._last_fed_onset_s))
        self._scheduler.schedule_note(onset_s, onset_s + duration_s, pitch, velocity,
                                      channel=self._config.midi.output_channel - 1, owner=a)
        fed = row.copy()
        if moved:
            fed[nt.STEP] = self._fed_step(onset_s)
        elif self._time_scale != 1.0:
            fed[nt.STEP] = row[nt.STEP] / self._time_scale
        if self._time_scale != 1.0:
            fed[nt.DURATION] = row[nt.DURATION] / self._time_scale
        started = time.perf_counter()
        self._feed(fed, onset_s)
        a.inference_s += time.perf_counter() - started
        a.handed += 1
        a.chunk_played += 1
        a.chained = True
        a.end_s = max(a.end_s, onset_s + duration_s)
        self._hook(self.on_note_played, fed, onset_s)

    def _interrupt(self, a: _Answer) -> None:
        self._scheduler.cancel(a)
        cut_s = self._now()
        unplayed = 0
        for onset_s, snapshot, last_fed in a.undo:
            if onset_s > cut_s:  # never sent: take it (and what followed) back out of the model state
                self._improviser.restore(snapshot)
                self._last_fed_onset_s = last_fed
                unplayed = sum(1 for o, _, _ in a.undo if o >= onset_s)
                break
        a.handed -= unplayed
        a.chunk_played -= unplayed
        self._finish(interrupted=True)

    def _chunk_done(self, a: _Answer) -> None:
        self._emit_summary(a, interrupted=False)
        a.heard = 0
        a.chunk_played = 0
        a.inference_s = 0.0
        with self._swap_lock:
            pending = self._pending_swap is not None
        if pending:
            self._apply_swap()
            a.next = None
            if self._imp.mode != "continuous":
                self._answer = None  # its handed notes still end on time; the next phrase is answered

    def _finish(self, *, interrupted: bool) -> None:
        a = self._answer
        self._answer = None
        if a is not None:
            self._emit_summary(a, interrupted=interrupted)

    def _emit_summary(self, a: _Answer, *, interrupted: bool) -> None:
        self.answers += 1
        played = a.chunk_played if a.continuous else a.handed
        summary = {
            "mode": "continuous" if a.continuous else "respond",
            "notes_heard": a.heard,
            "notes_played": played,
            "inference_ms": 1000.0 * a.inference_s / played if played else 0.0,
            "lateness_ms": float(self._scheduler.last_ms),
            "interrupted": interrupted,
            "time_scale": self._time_scale,
            "bpm": None,
            "key": None,
        }
        grid, _ = self._grid(self._now())
        if grid is not None:
            summary["bpm"] = grid.bpm
        scale = self._key_in_use()
        if scale is not None:
            summary["key"] = str(scale)
        self._hook(self.on_answer, summary)

    def _abort(self) -> None:
        a = self._answer
        self._answer = None
        self._phrase.clear()
        if a is not None:
            self._scheduler.cancel(a)
            self._emit_summary(a, interrupted=True)

    def _apply_swap(self) -> None:
        with self._swap_lock:
            pending, self._pending_swap = self._pending_swap, None
        if pending is None:
            return
        config, model = pending
        history = self._improviser.history
        if config.improvise.seed != self._config.improvise.seed:
            self._rng = self._make_rng(config.improvise.seed)
        imp = config.improvise
        self._tracker.configure([c - 1 for c in config.midi.input_channels], imp.window, imp.max_hold)
        self._configure(config, model)
        improviser = Improviser(model, self._decoding(), rng=self._rng)
        if len(history):
            improviser.prime(history[-model.context:])
        self._model, self._improviser = model, improviser
        log.info("now playing %s (mode %s)", model.path, self._imp.mode)

    # ---- configuration -----------------------------------------------------------------------------------
    def _configure(self, config: Config, model: StepModel) -> None:
        """Take a config and model (start-up, swap): what is derived from them, with the live CC values on top."""
        self._config = config
        self._control = ControlMap(config.control)
        self._quantize_ticks = division_ticks(config.timing.quantize)
        self._reference_ioi_s = tempo.reference_ioi_s(model.card, config.timing.reference_ioi)
        if not config.timing.follow_tempo:
            self._time_scale = 1.0
        if config.improvise.key.strip().lower() != "auto":
            self._auto_key = None
        self._imp = dataclasses.replace(config.improvise, **self._live)

    def _refresh_improvise(self) -> None:
        self._imp = dataclasses.replace(self._config.improvise, **self._live)
        self._improviser.decoding = self._decoding()

    def _decoding(self) -> Decoding:
        pcs = self._auto_key.pitch_classes if self._auto_key is not None else None
        return Decoding.from_config(self._imp, scale_pcs=pcs)

    def _key_in_use(self) -> Key | None:
        setting = self._imp.key.strip().lower()
        if setting == "auto":
            return self._auto_key
        return parse_key(self._imp.key) if setting != "none" else None

    @staticmethod
    def _hook(hook, *args) -> None:
        if hook is None:
            return
        try:
            hook(*args)
        except Exception:
            log.exception("an engine callback failed")
