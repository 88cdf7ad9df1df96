"""The engine thread: listens to the player, decides when to answer, predicts notes ahead and hands them to the
scheduler. It owns the note tracker (rolling window), the `Improviser` (model state) and the mode (docs/architecture.md).

Input: `input_queue` receives (t_s, mido.Message) items, t_s the arrival time on the same clock as `now`
(`time.perf_counter`), from the input's poller thread, which only puts. `None` is the stop sentinel.

What is fed to the model: one merged sequence of the player's completed notes and improvd's own notes, in the order
the engine learns of them. Each fed note's step is the gap from the previous fed note's onset, clipped to
[0, improvise.step_range high] (a pause between phrases, or a player's note that began before improvd's last one,
stays within what the model knows). A player's note is complete, and fed, when it is released (its duration is
known then). An answered note whose onset is exactly the previous onset plus its predicted step is fed exactly as
predicted; so with temperature 0, every answered note after the first is the greedy continuation (docs/model-format.md) of
the notes fed before it. The first note of an answer usually comes later than predicted (the silence has passed),
and is fed with its real gap.

respond mode: when the phrase is over (`improvise.silence`: a fixed silence, or "auto", measured in the player's
pulse; never while a key or the sustain pedal holds the sound; daemon/turns.py), the phrase's notes are fed and an
answer starts. Its first note is due at the last fed onset plus the predicted step, or at once (now + `lead_s`) if
that has passed (with MIDI clock running: moved to the clock's next beat, or the next point of a coarser quantize
grid); each next note at the previous onset plus its predicted step (kept even when the engine is a
little late: the scheduler then sends it at once; only after a stall of more than `catch_up_s` does it move to now);
each note-off at onset plus duration.
The answer stops after `max_notes` notes or when a note would start more than `max_seconds` after the first one,
or earlier at its `improvise.answer_length` (daemon/turns.py: "match" = as long as the call, in beats when a pulse
is known, else in notes; a length in beats also keeps its note-offs within the span); it is finished when its last
note-off is due. A note-on from the player during the answer cancels it at once
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
the old one was fed. A swap is all or nothing: when priming the new model fails, the running config and model stay.
[midi] (ports, channels, thru, program) is read at start only: a swap keeps the running [midi], so the channels
improvd plays and hears, and the thru notes sounding, are what they were (the service tells the user so).

Hooks for a recorder, all called in the engine thread and expected to be quick: `on_answer(summary)` once per
finished answer (keys: notes_heard, notes_played, inference_ms (mean feed + predict time per played note),
lateness_ms (the scheduler's latest event), interrupted, mode, time_scale (1.0 unless timing.follow_tempo), bpm (the
grid's tempo, None without quantize), key (the scale in use, e.g. "C major", or None), length (the answer_length in
use, e.g. "8 beats", or None), delayed and rechosen (notes the texture bounds moved or re-chose));
`on_note_heard(note_row, onset_s)` for each completed player note and `on_note_played(note_row, onset_s)` for each
note handed to the scheduler (note_row: float64 [4] pitch, step_s as fed, duration_s, velocity). What improvd actually
sent (exact times, with cancels and re-triggers) is best recorded with `Scheduler.on_sent`; the player's notes with
`on_note_heard` (or the raw input).
`on_note_played` also reports the notes an interruption takes back before they start (at most ~`lookahead_s` of
music); `notes_played` in the summary does not count them.

Playing with a band (config [timing], [control], midi.thru/program, improvise.key):

- MIDI clock: 'clock', 'start', 'continue', 'stop' and 'songpos' messages come through the same queue and feed a
  `ClockTracker` (daemon/clock.py) when `timing.follow_clock`. Stop cancels the answer (its notes are released),
  releases the thru notes sounding, and keeps improvd silent until Start or Continue (phrases are still heard and
  fed to the model); Start resets the
  bar (the grid's position 0 is the first tick after it).
- Quantize (`timing.quantize`): a note's predicted onset is snapped to the nearest grid point (daemon/quantize.py),
  never earlier than now + `lead_s`, and a predicted step longer than `CHORD_S` never becomes a chord (it takes at
  least one grid step). The grid is the clock's while ticks arrive, else `timing.bpm`'s, else the player's pulse
  (timing.bpm = 0), anchored at the first onset of the phrase being answered. A note keeps its grid position, and its
  time is asked from the grid again when it is handed to the scheduler, so a tempo change is followed to the note.
  When the clock's ticks stop without a Stop mid-answer, the answer goes on on the clock's last grid; a position
  that would move a note more than `REGRID_STEPS` grid steps belongs to another grid, and the note is snapped again
  from its time. The model is fed the real gaps.
- Follow tempo (`timing.follow_tempo`, daemon/tempo.py): the time scale (player's median IOI / the model's) is
  measured on each phrase (continuous: on the player's last notes); the player's steps and durations are divided by
  it before they are fed, the model's multiplied by it (then clamped to step_range / duration_range) before they are
  played. Rows reported by `on_note_heard` / `on_note_played` are as fed, in the model's time.
- Texture (`improvise.polyphony`, `improvise.register`, daemon/texture.py): measured on the phrase (continuous: on the
  player's last `CALL_NOTES` notes); the register bounds the pitch before sampling (`Improviser.predict`), and a note
  whose onset would make more than `polyphony` of the answer's notes sound waits for a release (fed with its real
  gap). The summary counts the notes delayed and re-chosen.
- OSC (`[osc]`, daemon/osc.py): `control(action)` (any thread) queues a `control.Action`, applied in the engine
  thread as a CC's; besides the CC functions it may set `key` and `answer_length`, and `forget` (clears
  `improvise.adapt`'s session memory; with adaptation off it logs "forget: no session memory"). `on_state(state)` is
  called in the engine thread on each change of state.
- Live control (`[control]`, daemon/control.py): CCs change temperature, top_p, max_notes, key_strength and mode
  (from the next note; they stay across a reload), mute (cancels the answer; phrases are still fed), panic (every
  sounding note released at once, improvd's and thru, an All Notes Off on the output channel, the answer and the
  pending phrase dropped), reload (`on_reload_request()` is called; the service reloads), forget (the session
  memory of `improvise.adapt` is cleared). Each CC is logged at debug.
- Session adaptation (`improvise.adapt = "cache"`, daemon/adapt.py): the player's notes are fed with
  `player=True`, so the Improviser's `SessionAdapter` learns from them (improvd's own notes only extend its
  context); `Engine.forget()` clears it from any thread (at the engine's next wake-up). A reload keeps the memory
  unless `adapt_memory` changed or adaptation was turned off.
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
from improvd.daemon import tempo, turns
from improvd.daemon.clock import CLOCK_TYPES, ClockTracker
from improvd.daemon.config import Config, ImproviseConfig
from improvd.daemon.adapt import SessionAdapter
from improvd.daemon.control import Action, ControlMap
from improvd.daemon.improviser import Decoding, Improviser
from improvd.daemon.keys import Key, estimate_key, parse_key
from improvd.daemon.model import StepModel
from improvd.daemon.quantize import Grid, division_ticks, snap
from improvd.daemon.scheduler import Scheduler
from improvd.daemon.texture import Texture, TextureCounts, Voices, texture_for_call
from improvd.daemon.watchdog import HEARTBEAT_S, Heartbeat
from improvd.daemon.window import HeardNote, NoteTracker

log = logging.getLogger("improvd.engine")

_TICK = object()
_THRU = object()  # the scheduler owner of the thru notes (each is ended by its note id)
MAX_BATCH = 1000  # input items taken in one go before timers are looked at (bounded under a flood)
CHORD_S = 0.03  # a predicted step longer than this is not a chord: quantized, it takes at least one grid step
REGRID_STEPS = 4  # a note's grid position that moves it more than this many grid steps belongs to another grid
TEMPO_NOTES = 8  # continuous mode: the player's last notes the time scale is measured on
STATES = ("idle", "listening", "answering")
SPAN_EPS_S = 0.001  # an onset this close to the end of an answer's span is past it
CALL_NOTES = 16  # continuous mode: the player's last notes the texture bounds are measured on
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
    budget: turns.Budget = turns.Budget()  # improvise.answer_length for this answer (respond mode)
    texture: Texture = Texture()  # improvise.polyphony / register for this answer
    voices: Voices = field(default_factory=Voices)  # its notes, for the polyphony bound
    counts: TextureCounts = field(default_factory=TextureCounts)
    next_flags: tuple[float, bool] = (0.0, False)  # the next note: (onset delayed by, s; pitch re-chosen)


def _describe_budget(budget: turns.Budget) -> str | None:
    """'8 beats', '5 notes' or None (only the caps)."""
    if budget.beats is not None:
        return f"{budget.beats:g} beats"
    if budget.notes is not None:
        return f"{budget.notes} notes"
    return None


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
                 on_state: Callable[[str], None] | None = None,
                 lead_s: float = 0.002, lookahead_s: float = 0.05, catch_up_s: float = 0.1):
        self.input_queue: queue.SimpleQueue = queue.SimpleQueue()
        self.on_answer = on_answer
        self.on_note_heard = on_note_heard
        self.on_note_played = on_note_played
        self.on_reload_request = on_reload_request
        self.on_state = on_state
        self.lead_s = float(lead_s)
        self.lookahead_s = float(lookahead_s)
        self.catch_up_s = float(catch_up_s)
        self.answers = 0
        self._now = now
        self._scheduler = scheduler
        self._config = config
        self._model = model
        self._tracker = NoteTracker.from_config(config.improvise, config.midi)
        self._sustain = turns.Sustain(config.improvise.max_hold)
        self._rng = self._make_rng(config.improvise.seed)
        self._live: dict = {}  # [improvise] values set by CCs; they stay across a reload
        self._imp: ImproviseConfig = config.improvise
        self._auto_key: Key | None = None
        self._clock = ClockTracker()
        self._muted = False
        self._stopped = False  # transport Stop: silent until Start/Continue
        self._time_scale = 1.0
        self._grid_anchor_s: float | None = None
        self._clock_grid = None  # the clock's grid when it was last running (kept while its ticks stop mid-answer)
        self._pulse_beat_s: float | None = None
        self._thru: dict[tuple[int, int], int] = {}  # (channel, pitch) -> the scheduler's note id of a thru note
        self._state: str | None = None
        self._configure(config, model)
        self._forget_requested = threading.Event()
        self._improviser = Improviser(model, self._decoding(), rng=self._rng,
                                      adapter=self._adapter_for(config, None))
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

    def control(self, action: Action) -> None:
        """Apply a control action (from OSC, daemon/oscmap.py) in the engine thread, as a CC's; any thread."""
        self.input_queue.put((self._now(), action))

    def forget(self) -> None:
        """Clear the session memory of `improvise.adapt` (the `forget` control function). Any thread: the engine
        thread does it at its next wake-up, before the next note it decodes."""
        self._forget_requested.set()
        self.input_queue.put(_TICK)

    @property
    def adapter(self) -> SessionAdapter | None:
        """The session adapter in use (None when `improvise.adapt` is "off"); for status and tests."""
        return self._improviser.adapter

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
            if self._forget_requested.is_set():
                self._forget_requested.clear()
                self._forget("forget()")
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
        for expiry in (self._tracker.next_expiry_s(), self._sustain.next_expiry_s()):
            if expiry is not None:
                due.append(expiry)
        a = self._answer
        if a is None:
            end = self._phrase_end_s()
            if end is not None:
                due.append(end)
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
        if isinstance(msg, Action):
            self._apply_action(msg, "OSC")
            return
        if not isinstance(msg, mido.Message) or not math.isfinite(t_s):
            log.debug("ignoring a malformed input item %r", item)
            return
        kind = msg.type
        if kind in CLOCK_TYPES:
            if self._config.timing.follow_clock:
                self._on_clock(t_s, msg)
            return
        if kind == "control_change":
            self._sustain.handle(t_s, msg, self._tracker.channels)
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
            self._release_thru()
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
            self._apply_action(action, f"CC {msg.control}")

    def _apply_action(self, action: Action, source: str) -> None:
        """A control action (a CC's, or OSC's) in the engine thread."""
        if action.function == "panic":
            self._panic()
        elif action.function == "reload":
            log.info("reload requested by %s", source)
            self._hook(self.on_reload_request)
        elif action.function == "forget":
            self._forget(source)
        elif action.function == "mute":
            if action.value and not self._muted and self._answer is not None:
                self._interrupt(self._answer)
            self._muted = bool(action.value)
        else:
            self._set_live(action.function, action.value)
        log.debug("%s: %s%s", source, action.function, "" if action.value is None else f" = {action.value!r}")

    def _forget(self, source: str) -> None:
        """The forget control (a CC, OSC, or `forget()`), engine thread: clear what this session taught improvd
        (`improvise.adapt`'s session memory)."""
        if self._improviser.adapter is None:
            log.info('forget: no session memory (improvise.adapt = "off"), requested by %s', source)
        else:
            self._improviser.forget()
            log.info("forget: session memory cleared, requested by %s", source)

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

    def _release_thru(self) -> None:
        """Release the thru notes sounding now (transport Stop); a key's later release then sends nothing."""
        for note_id in self._thru.values():
            self._scheduler.end_note(note_id)
        self._thru.clear()

    def _pass_thru(self, msg: mido.Message) -> None:
        key = (msg.channel, msg.note)
        if msg.type == "note_on" and msg.velocity > 0:
            if self._tracker.channels and msg.channel not in self._tracker.channels:
                return
            old = self._thru.pop(key, None)
            if old is not None:
                self._scheduler.end_note(old)
            now = self._now()
            self._thru[key] = self._scheduler.schedule_note(now, now + self._imp.max_hold, msg.note, msg.velocity,
                                                            channel=msg.channel, owner=_THRU)
        else:
            note_id = self._thru.pop(key, None)
            if note_id is not None:
                self._scheduler.end_note(note_id)  # O(log n): a flood of releases rebuilds no heap

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
        self._hook(self.on_state, state)
        cc = self._config.control.state_cc
        if cc >= 0:
            value = self._config.control.state_values[STATES.index(state)]
            self._scheduler.schedule_message(self._now(), mido.Message(
                "control_change", control=cc, value=value, channel=self._config.midi.output_channel - 1))

    def _on_time(self, now: float) -> None:
        for note in self._tracker.expire(now):
            self._heard(note)
        self._sustain.expire(now)
        if self._answer is None:
            self._apply_swap()
            end = self._phrase_end_s()
            if end is not None and now >= end:
                self._start_answer()
        if self._answer is not None:
            self._advance(self._answer)

    # ---- listening ---------------------------------------------------------------------------------------
    def _phrase_end_s(self) -> float | None:
        """When the pending phrase is over (daemon/turns.py), or None (no phrase, or something still held)."""
        if not self._phrase:
            return None
        quiet = self._sustain.quiet_since_s(self._tracker.quiet_since_s())
        return turns.phrase_end_s(self._imp.silence, [n.onset_s for n in self._phrase], quiet)

    def _fed_step(self, onset_s: float) -> float:
        """The step fed for a note at `onset_s`: the gap from the last fed onset in the model's time, clipped."""
        if self._last_fed_onset_s is None:
            return 0.0
        return min(max(onset_s - self._last_fed_onset_s, 0.0) / self._time_scale, self._imp.step_range[1])

    def _player_row(self, note: HeardNote) -> np.ndarray:
        return np.array([note.pitch, self._fed_step(note.onset_s), note.duration_s / self._time_scale,
                         note.velocity], np.float64)

    def _feed(self, row: np.ndarray, onset_s: float, *, player: bool = False) -> None:
        self._improviser.feed(row, player=player)
        if self._last_fed_onset_s is None or onset_s > self._last_fed_onset_s:
            self._last_fed_onset_s = onset_s

    def _heard(self, note: HeardNote) -> None:
        a = self._answer
        if a is not None and a.continuous:
            self._measure_tempo(self._tracker.window_onsets_s()[-TEMPO_NOTES:])
            self._estimate_key()
            a.texture = self._texture_of(self._tracker.window_heard()[-CALL_NOTES:])
            row = self._player_row(note)
            self._feed(row, note.onset_s, player=True)
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
        self._clock_grid = None  # a new answer takes the clock's grid only while its ticks arrive
        for note in phrase:
            row = self._player_row(note)
            self._feed(row, note.onset_s, player=True)
            self._hook(self.on_note_heard, row, note.onset_s)
        if self._muted or self._stopped:
            log.debug("phrase of %d notes heard; not answering (%s)", len(phrase),
                      "muted" if self._muted else "transport stopped")
            return
        a = _Answer(continuous=self._imp.mode == "continuous", heard=len(phrase))
        a.texture = self._texture_of(phrase)
        if phrase and not a.continuous:
            a.budget = turns.answer_budget(
                self._answer_length, call_notes=len(phrase), first_onset_s=phrase[0].onset_s,
                last_release_s=max(n.onset_s + n.duration_s for n in phrase), beat_s=self._beat_s(self._now()))
        self._answer = a
        log.debug("phrase of %d notes heard; answering (time scale %.3f, length %s, %s)", len(phrase),
                  self._time_scale, a.budget, a.texture)

    def _texture_of(self, notes) -> Texture:
        """The polyphony and register bounds of an answer to these (player's) notes."""
        imp = self._imp
        if not notes or (imp.polyphony == 0 and imp.register == "free"):
            return Texture()
        return texture_for_call(imp.polyphony, imp.register, pitches=[n.pitch for n in notes],
                                onsets_s=[n.onset_s for n in notes],
                                ends_s=[n.onset_s + n.duration_s for n in notes],
                                pitch_range=(int(imp.pitch_range[0]), int(imp.pitch_range[1])))

    def _beat_s(self, now: float) -> float | None:
        """The pulse answers are measured in (daemon/turns.py): the clock's beat while it runs, else the grid's when
        quantize is on, else the player's pulse; None when none is known."""
        if self._config.timing.follow_clock and self._clock.running(now) and self._clock.bpm:
            return 60.0 / self._clock.bpm
        grid, _ = self._grid(now)
        if grid is not None:
            return 60.0 / grid.bpm
        return self._pulse_beat_s

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
        row = self._improviser.predict(velocity_hint=self._tracker.recent_velocity(), register=a.texture.register)
        rechosen = self._improviser.rechosen
        a.inference_s += time.perf_counter() - started
        if self._time_scale != 1.0:  # out of the model's time into the player's
            imp = self._imp
            row[nt.STEP] = min(max(row[nt.STEP] * self._time_scale, imp.step_range[0]), imp.step_range[1])
            row[nt.DURATION] = min(max(row[nt.DURATION] * self._time_scale, imp.duration_range[0]),
                                   imp.duration_range[1])
        now = self._now()
        entry = self._clock_entry(row, now) if a.handed == 0 else None
        onset, moved, position = entry if entry is not None else self._place(a, row, now)
        delay = 0.0
        if a.texture.polyphony is not None:
            later = a.voices.earliest_onset(onset, a.texture.polyphony)
            if later > onset:  # as many notes as allowed sound: wait for a release (daemon/texture.py)
                delayed_to, moved, position = self._delay_to(later, now)
                delay, onset = delayed_to - onset, delayed_to
        a.next_flags = (delay, rechosen)
        return onset, row, moved, position

    def _clock_entry(self, row: np.ndarray, now: float) -> tuple[float, bool, int] | None:
        """The first note of an answer while a MIDI clock runs: at its predicted onset (or now, if that has passed)
        moved to the next beat, or the next point of a quantize grid coarser than a beat (daemon/turns.py); None
        without a running clock."""
        if not (self._config.timing.follow_clock and self._clock.running(now)):
            return None
        grid = self._clock.grid()
        if grid is None:
            return None
        t = now + self.lead_s
        if self._last_fed_onset_s is not None:
            t = max(t, self._last_fed_onset_s + row[nt.STEP])
        entry = snap(grid, t, turns.entry_ticks(self._quantize_ticks), t)
        return grid.time_of(entry), True, entry

    def _delay_to(self, t_s: float, now: float) -> tuple[float, bool, int | None]:
        """A note moved later, to `t_s` or the first grid point at or after it when quantize is on."""
        grid, ticks = self._grid(now)
        if grid is not None:
            position = snap(grid, t_s, ticks, t_s)
            return grid.time_of(position), True, position
        return t_s, True, None

    def _place(self, a: _Answer, row: np.ndarray, now: float) -> tuple[float, bool, int | None]:
        """Where a predicted note goes in time: (onset, moved from its predicted onset, grid position or None)."""
        if self._last_fed_onset_s is None:
            return now + self.lead_s, True, None
        onset = self._last_fed_onset_s + row[nt.STEP]
        grid, ticks = self._grid(now)
        if grid is not None:
            earliest = now + self.lead_s
            if row[nt.STEP] > CHORD_S:  # not a chord: at least one grid step after the last onset
                earliest = max(earliest, self._last_fed_onset_s + 0.5 * ticks * grid.tick_s)
            position = snap(grid, onset, ticks, earliest)
            return grid.time_of(position), True, position
        # A note chained to improvd's previous one keeps the grid (absolute deadlines, errors do not add up) even if
        # the engine woke a little late: the scheduler sends it at once. Only after a longer stall, or for a note
        # that follows the player's (the first of an answer, or after a player note in continuous mode), does the
        # note move to now.
        earliest = now - self.catch_up_s if a.chained else now + self.lead_s
        if onset < earliest:
            return now + self.lead_s, True, None
        return onset, False, None

    def _grid(self, now: float) -> tuple[Grid | None, int]:
        """The grid answers are quantized to now, and its step in ticks; (None, 0) when quantize is off."""
        ticks = self._quantize_ticks
        if ticks is None:
            return None, 0
        if self._config.timing.follow_clock:
            if self._clock.running(now):
                grid = self._clock.grid()
                if grid is not None:
                    self._clock_grid = grid
                    return grid, ticks
            elif self._clock_grid is not None and self._answer is not None:
                # The clock stopped without a Stop (a cable pulled, a crashed sequencer): the answer goes on on the
                # clock's last grid, its tempo and phase, rather than jump to another grid mid-answer.
                return self._clock_grid, ticks
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
        if abs(grid.time_of(position) - a.next[0]) > REGRID_STEPS * ticks * grid.tick_s:
            # The position belongs to another grid (the clock started or came back after a gap mid-answer): keep
            # the note's time, on the grid there is now.
            position = snap(grid, a.next[0], ticks, now + self.lead_s)
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
                    a.first_onset_s is not None and onset - a.first_onset_s > imp.max_seconds)
                    or self._over_budget(a, onset)):
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

    def _over_budget(self, a: _Answer, onset_s: float) -> bool:
        """Whether a note at `onset_s` is beyond the answer's `improvise.answer_length` (daemon/turns.py)."""
        if a.budget.notes is not None and a.handed >= a.budget.notes:
            return True
        span = self._span_s(a)
        return span is not None and a.first_onset_s is not None and onset_s - a.first_onset_s >= span - SPAN_EPS_S

    def _span_s(self, a: _Answer) -> float | None:
        return a.budget.span_s(self._beat_s(self._now())) if a.budget.beats is not None else None

    def _hand(self, a: _Answer, onset_s: float, row: np.ndarray, moved: bool) -> None:
        pitch, duration_s, velocity = int(row[nt.PITCH]), float(row[nt.DURATION]), int(row[nt.VELOCITY])
        if a.first_onset_s is None:
            a.first_onset_s = onset_s
        span = None if a.continuous else self._span_s(a)
        if span is not None:  # an answer of a length in beats does not ring past it
            cut = max(a.first_onset_s + span - onset_s, self._imp.duration_range[0])
            if cut < duration_s:
                duration_s = cut
                row = row.copy()
                row[nt.DURATION] = cut
        a.voices.prune(onset_s - 1.0)
        a.voices.add(onset_s, onset_s + duration_s)
        a.counts.add(delay_s=a.next_flags[0], rechosen=a.next_flags[1])
        a.next_flags = (0.0, False)
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
            "length": _describe_budget(a.budget) if not a.continuous else None,
            "delayed": a.counts.delayed,
            "rechosen": a.counts.rechosen,
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
        """Take the pending config and model, all or nothing: a model that fails while being primed leaves the
        running config and model in place (logged). [midi] and [record] are not taken: they are read at start only
        (the service says so), so the channels, thru and the notes they sound stay as they are."""
        with self._swap_lock:
            pending, self._pending_swap = self._pending_swap, None
        if pending is None:
            return
        config, model = pending
        config = config.replace(midi=self._config.midi, record=self._config.record)
        rng = self._make_rng(config.improvise.seed) if config.improvise.seed != self._config.improvise.seed \
            else self._rng
        imp = dataclasses.replace(config.improvise, **self._live)
        auto_key = self._auto_key if imp.key.strip().lower() == "auto" else None
        history = self._improviser.history
        try:
            improviser = Improviser(model, Decoding.from_config(
                imp, scale_pcs=auto_key.pitch_classes if auto_key is not None else None), rng=rng,
                adapter=self._adapter_for(config, self._improviser.adapter))
            if len(history):
                improviser.prime(history[-model.context:])
        except Exception as err:
            log.error("reload failed: the new model %s could not be primed (%s: %s); improvd keeps the running "
                      "config and model", model.path, type(err).__name__, err)
            return
        self._rng = rng
        self._tracker.configure([c - 1 for c in config.midi.input_channels], imp.window, imp.max_hold)
        self._configure(config, model)
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
        self._answer_length = turns.parse_answer_length(self._imp.answer_length)
        if hasattr(self, "_sustain"):
            self._sustain.max_hold_s = config.improvise.max_hold

    @staticmethod
    def _adapter_for(config: Config, current: SessionAdapter | None) -> SessionAdapter | None:
        """The session adapter `config` asks for: the current one (its memory kept across a reload) if the
        bound and what it adapts are unchanged, a new one if they changed, None when adaptation is off."""
        imp = config.improvise
        if imp.adapt == "off":
            return None
        timing = imp.adapt == "cache"  # "pitch": pitch only
        if current is not None and current.memory == imp.adapt_memory and current.adapts_timing == timing:
            return current
        return SessionAdapter(imp.adapt_memory, timing=timing)

    def _refresh_improvise(self) -> None:
        self._imp = dataclasses.replace(self._config.improvise, **self._live)
        self._answer_length = turns.parse_answer_length(self._imp.answer_length)
        if self._imp.key.strip().lower() != "auto":
            self._auto_key = None
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
