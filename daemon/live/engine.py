"""The engine thread: listens to the player, decides when a phrase is over and an answer starts, and runs the
answer in progress. It owns the mode and the state machine, and these parts (each file specifies its behaviour):

- daemon/music/listener.py: the keys and pedal held, the pending phrase and when it ends (the note tracker);
- daemon/live/feed.py: the Improviser (model state, session adapter), what is fed to it, the decoding;
- daemon/live/answer.py: the answer lifecycle, respond and continuous modes, prediction ahead, the summary;
- daemon/music/context.py: MIDI clock and transport, the player's pulse and time scale, the grid, the key;
- daemon/music/placement.py: where each answered note goes in time (quantize);
- daemon/live/controls.py: live controls (CC and OSC actions: mute, panic, reload, forget, values) and thru;
- daemon/live/settings.py: the config and [improvise] values in effect; daemon/live/swap.py: the hot swap of a reload.

docs/architecture.md has the threads and what each owns.

Input: `input_queue` receives (t_s, mido.Message) items, t_s the arrival time on the same clock as `now`
(`time.perf_counter`), from the input's poller thread, which only puts; and `control.Action`s (`control`, any
thread). `None` is the stop sentinel. A burst is one moment: everything waiting (up to `MAX_BATCH` items) is taken
before anything is decided.

States: idle; listening (a key held or a phrase pending); answering (an answer, or the continuous stream, in
progress). A player's completed note joins the pending phrase (in continuous mode, while the stream plays, it goes
to the stream: daemon/live/answer.py). When the phrase is over (`improvise.silence`: a fixed silence, or "auto",
measured in the player's pulse; never while a key or the sustain pedal holds the sound; daemon/music/turns.py), its
notes are fed and an answer starts, unless improvd is muted or the transport is stopped. A note-on from the player
during a respond-mode answer interrupts it. State out (`control.state_cc`): the state is sent on change through
the scheduler, and `on_state(state)` is called. Program change (`midi.program`) goes out through the scheduler when
the engine starts.

Hot reload: `request_swap(config, model)` (main thread) is applied by the engine thread between phrases (when no
answer is playing; in continuous mode at the next chunk boundary), all or nothing (daemon/live/swap.py).

Faults: malformed queue items are skipped; an exception while handling input or time is logged, the current answer
is cancelled (its notes released) and the engine goes on listening. `stop` during an answer cancels it, and it is
reported as interrupted.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from typing import Callable

import mido
import numpy as np

from improvd.core.config import Config, ImproviseConfig
from improvd.daemon.control.cc import Action
from improvd.daemon.live import swap
from improvd.daemon.live.answer import AnswerPlayer
from improvd.daemon.live.controls import LiveControls, Thru
from improvd.daemon.live.feed import ModelFeed, call_hook
from improvd.daemon.live.scheduler import Scheduler
from improvd.daemon.live.settings import LiveSettings
from improvd.daemon.live.watchdog import HEARTBEAT_S, Heartbeat
from improvd.daemon.music.clock import CLOCK_TYPES
from improvd.daemon.music.context import MusicContext
from improvd.daemon.music.listener import Listener
from improvd.daemon.music.placement import Placement
from improvd.daemon.music.tracker import HeardNote
from improvd.daemon.predict.adapt import SessionAdapter
from improvd.daemon.predict.improviser import Improviser
from improvd.daemon.predict.model import StepModel

log = logging.getLogger("improvd.engine")

_TICK = object()
MAX_BATCH = 1000  # input items taken in one go before timers are looked at (bounded under a flood)
STATES = ("idle", "listening", "answering")


class Engine:
    """The engine thread (see the module docstring).

    Args:
        config: the whole checked config (uses [improvise], [timing], [control] and [midi]).
        model: the loaded step model.
        scheduler: the running scheduler that plays the notes.
        now: the clock, seconds; the same clock as the input stamps and the scheduler.
        on_answer: called with a summary dict once per finished answer (daemon/live/answer.py).
        on_note_heard: called as on_note_heard(note_row, onset_s) for each player note fed to the model.
        on_note_played: called as on_note_played(note_row, onset_s) for each note handed to the scheduler.
        on_reload_request: called (engine thread, no arguments) when the reload CC is pressed.
        on_state: called (engine thread) with 'idle', 'listening' or 'answering' on each change of state.
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
        self.on_state = on_state
        self._now = now
        self._scheduler = scheduler
        self._model = model
        self._settings = LiveSettings(config)
        self._context = MusicContext(config.timing, model.card)
        self._listener = Listener(config.improvise, config.midi)
        self._thru = Thru(scheduler, now)
        self._rng = swap.make_rng(config.improvise.seed)
        self._state: str | None = None
        self._forget_requested = threading.Event()
        improviser = Improviser(model, self._settings.decoding(None), rng=self._rng,
                                adapter=swap.adapter_for(config, None))
        self._feed = ModelFeed(improviser, self._settings, self._context, on_note_heard=on_note_heard,
                               on_note_played=on_note_played)
        self._answers = AnswerPlayer(self._feed, self._settings, self._context, Placement(lead_s, catch_up_s),
                                     scheduler, self._listener.tracker, now=now, lookahead_s=lookahead_s,
                                     on_answer=on_answer)
        self._controls = LiveControls(self._settings, self._context, self._feed, self._answers, self._listener,
                                      self._thru, scheduler, now=now, on_reload_request=on_reload_request)
        self._swaps = swap.PendingSwap()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.heartbeat = Heartbeat()  # the thread's loop went round (the service's watchdog reads it)

    # ---- control (main thread) ---------------------------------------------------------------------------
    @property
    def config(self) -> Config:
        """The config in use (after the last applied swap)."""
        return self._settings.config

    @property
    def model(self) -> StepModel:
        """The model in use (after the last applied swap)."""
        return self._model

    @property
    def playing(self) -> bool:
        """Whether an answer (or the continuous stream) is in progress."""
        return self._answers.current is not None

    @property
    def improvise(self) -> ImproviseConfig:
        """The [improvise] values in effect: the config's, with what the CCs changed."""
        return self._settings.improvise

    @property
    def muted(self) -> bool:
        """Whether improvd is muted (by the mute CC)."""
        return self._controls.muted

    @property
    def lookahead_s(self) -> float:
        """How long before its onset a note is handed to the scheduler."""
        return self._answers.lookahead_s

    @property
    def thread(self) -> threading.Thread | None:
        """The engine thread (None before `start`), for the service's watchdog."""
        return self._thread

    @property
    def adapter(self) -> SessionAdapter | None:
        """The session adapter in use (None when `improvise.adapt` is "off"); for status and tests."""
        return self._feed.improviser.adapter

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
        midi = self.config.midi
        if midi.program >= 0:
            self._scheduler.schedule_message(self._now(), mido.Message(
                "program_change", program=midi.program, channel=midi.output_channel - 1))
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
        """Apply a control action (from OSC, daemon/control/oscmap.py) in the engine thread, as a CC's; any thread."""
        self.input_queue.put((self._now(), action))

    def forget(self) -> None:
        """Clear the session memory of `improvise.adapt` (the `forget` control function). Any thread: the engine
        thread does it at its next wake-up, before the next note it decodes."""
        self._forget_requested.set()
        self.input_queue.put(_TICK)

    def request_swap(self, config: Config, model: StepModel) -> None:
        """Use `config` and `model` from the next phrase on (hot reload); a later request replaces this one."""
        self._swaps.request(config, model)
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
            self._answers.abort()

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
                self._controls.forget("forget()")
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
            self._listener.phrase.clear()
            self._answers.abort()

    def _timeout(self) -> float | None:
        """Seconds until the engine must act without input, or None to wait for input only."""
        now = self._now()
        expiry = self._listener.next_expiry_s()
        due = [] if expiry is None else [expiry]
        if self._answers.current is None:
            end = self._listener.phrase_end_s(self.improvise.silence)
            if end is not None:
                due.append(end)
        else:
            due.append(self._answers.next_due_s(now))
        return max(0.0, min(due) - now) if due else None

    def _on_input(self, item) -> None:
        try:
            t_s, msg = item
            t_s = float(t_s)
        except (TypeError, ValueError):
            t_s, msg = math.nan, None
        if isinstance(msg, Action):
            self._controls.apply(msg, "OSC")
            return
        if not isinstance(msg, mido.Message) or not math.isfinite(t_s):
            log.debug("ignoring a malformed input item %r", item)
            return
        kind = msg.type
        if kind in CLOCK_TYPES:
            if self.config.timing.follow_clock:
                self._on_clock(t_s, msg)
            return
        if kind == "control_change":
            self._controls.control_change(msg)
        update = self._listener.handle(t_s, msg)
        a = self._answers.current
        if update.note_on and a is not None and not a.continuous:
            self._answers.interrupt()
        if self.config.midi.thru and kind in ("note_on", "note_off"):
            self._thru.handle(msg, self._listener.tracker.channels, self.improvise.max_hold)
        for note in update.completed:
            self._heard(note)

    def _on_time(self, now: float) -> None:
        for note in self._listener.expire(now):
            self._heard(note)
        if self._answers.current is None:
            self._apply_swap()
            end = self._listener.phrase_end_s(self.improvise.silence)
            if end is not None and now >= end:
                self._start_answer()
        if self._answers.current is not None:
            self._advance()

    def _update_state(self) -> None:
        if self._answers.current is not None:
            state = "answering"
        elif self._listener.listening:
            state = "listening"
        else:
            state = "idle"
        if state == self._state:
            return
        self._state = state
        call_hook(self.on_state, state)
        control, midi = self.config.control, self.config.midi
        if control.state_cc >= 0:
            value = control.state_values[STATES.index(state)]
            self._scheduler.schedule_message(self._now(), mido.Message(
                "control_change", control=control.state_cc, value=value, channel=midi.output_channel - 1))

    # ---- listening and answering ------------------------------------------------------------------------
    def _heard(self, note: HeardNote) -> None:
        a = self._answers.current
        if a is not None and a.continuous:
            self._answers.hear(note)
        else:  # bounded under an input flood: only the last notes matter to the answer
            self._listener.add(note, max(self.config.improvise.window, self._model.context))

    def _start_answer(self) -> None:
        silent = "muted" if self._controls.muted else "transport stopped" if self._context.stopped else None
        self._answers.answer(self._listener.take_phrase(), silent=silent)

    def _advance(self) -> None:
        while self._answers.advance():  # the continuous stream played a chunk: a reload may apply here
            self._answers.end_chunk()
            if self._swaps.pending:
                self._apply_swap()
                self._answers.after_swap()
                if self._answers.current is None:
                    return

    # ---- clock and transport ----------------------------------------------------------------------
    def _on_clock(self, t_s: float, msg: mido.Message) -> None:
        kind = self._context.on_clock(t_s, msg)
        if kind == "stop":  # silent until Start or Continue
            self._thru.release()
            if self._answers.current is not None:
                self._answers.interrupt()
        elif kind == "start":
            self._answers.transport_started()

    # ---- hot swap (daemon/live/swap.py) --------------------------------------------------------------------
    def _apply_swap(self) -> None:
        """Take the pending config and model, all or nothing (daemon/live/swap.py)."""
        pending = self._swaps.take()
        if pending is None:
            return
        prepared = swap.prepare(*pending, running=self.config, settings=self._settings,
                                scale_pcs=self._context.scale_pcs(), improviser=self._feed.improviser, rng=self._rng)
        if prepared is None:
            return
        config, imp = prepared.config, self._settings.over(prepared.config.improvise)
        self._rng = prepared.rng
        self._listener.configure([c - 1 for c in config.midi.input_channels], imp.window, imp.max_hold,
                                 config.improvise.max_hold)
        self._settings.configure(config)
        self._context.configure(config.timing, prepared.model.card)
        self._context.keep_auto_key(config.improvise.key)
        self._model, self._feed.improviser = prepared.model, prepared.improviser
        log.info("now playing %s (mode %s)", prepared.model.path, self.improvise.mode)
