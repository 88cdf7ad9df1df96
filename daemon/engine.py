"""The engine thread: listens to the player, decides when to answer, predicts notes ahead and hands them to the
scheduler. It owns the note tracker (rolling window), the `Improviser` (model state) and the mode (DESIGN.md §5).

Input: `input_queue` receives (t_s, mido.Message) items, t_s stamped on arrival in the MIDI callback on the same
clock as `now` (`time.perf_counter`); the callback only puts. `None` is the stop sentinel.

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
lateness_ms (the scheduler's latest event), interrupted, mode); `on_note_heard(note_row, onset_s)` for each
completed player note and `on_note_played(note_row, onset_s)` for each note handed to the scheduler (note_row:
float64 [4] pitch, step_s as fed, duration_s, velocity). What improvd actually sent (exact times, with cancels and
re-triggers) is best recorded with `Scheduler.on_sent`; the player's notes with `on_note_heard` (or the raw input).
`on_note_played` also reports the notes an interruption takes back before they start (at most ~`lookahead_s` of
music); `notes_played` in the summary does not count them.

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
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import mido
import numpy as np

from daemon import notes as nt
from daemon.config import Config
from daemon.improviser import Decoding, Improviser
from daemon.model import StepModel
from daemon.scheduler import Scheduler
from daemon.window import HeardNote, NoteTracker

log = logging.getLogger("improvd.engine")

_TICK = object()
MAX_BATCH = 1000  # input items taken in one go before timers are looked at (bounded under a flood)


@dataclass(eq=False)
class _Answer:
    """An answer being played (respond), or the stream (continuous); also the scheduler owner of its notes."""

    continuous: bool
    heard: int
    first_onset_s: float | None = None
    next: tuple[float, np.ndarray, bool] | None = None  # (onset_s, row, moved by the "now" rule), not handed
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
                 lead_s: float = 0.002, lookahead_s: float = 0.05, catch_up_s: float = 0.1):
        self.input_queue: queue.SimpleQueue = queue.SimpleQueue()
        self.on_answer = on_answer
        self.on_note_heard = on_note_heard
        self.on_note_played = on_note_played
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
        self._improviser = Improviser(model, Decoding.from_config(config.improvise), rng=self._rng)
        self._phrase: list[HeardNote] = []
        self._last_fed_onset_s: float | None = None
        self._answer: _Answer | None = None
        self._swap_lock = threading.Lock()
        self._pending_swap: tuple[Config, StepModel] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

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

    def start(self) -> None:
        """Start the engine thread."""
        if self._thread is not None:
            raise RuntimeError("the engine was already started")
        self._thread = threading.Thread(target=self._run, name="improvd-engine", daemon=True)
        self._thread.start()

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
                timeout = self._timeout()
                try:
                    if timeout is not None and timeout <= 0:
                        item = self.input_queue.get_nowait()
                    else:
                        item = self.input_queue.get(timeout=timeout)
                except queue.Empty:
                    item = _TICK
                if item is None:
                    break
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
                except Exception:
                    log.exception("engine error; the current answer is cancelled and the engine goes on listening")
                    self._abort()
        finally:
            if self._answer is not None:
                self._scheduler.cancel(self._answer)
                self._finish(interrupted=True)

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
                due.append(quiet + self._config.improvise.silence)
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
        update = self._tracker.handle(t_s, msg)
        a = self._answer
        if update.note_on and a is not None and not a.continuous:
            self._interrupt(a)
        for note in update.completed:
            self._heard(note)

    def _on_time(self, now: float) -> None:
        for note in self._tracker.expire(now):
            self._heard(note)
        if self._answer is None:
            self._apply_swap()
            quiet = self._tracker.quiet_since_s()
            if self._phrase and quiet is not None and now >= quiet + self._config.improvise.silence:
                self._start_answer()
        if self._answer is not None:
            self._advance(self._answer)

    # ---- listening ---------------------------------------------------------------------------------------
    def _fed_step(self, onset_s: float) -> float:
        if self._last_fed_onset_s is None:
            return 0.0
        return min(max(onset_s - self._last_fed_onset_s, 0.0), self._config.improvise.step_range[1])

    def _feed(self, row: np.ndarray, onset_s: float) -> None:
        self._improviser.feed(row)
        if self._last_fed_onset_s is None or onset_s > self._last_fed_onset_s:
            self._last_fed_onset_s = onset_s

    def _heard(self, note: HeardNote) -> None:
        a = self._answer
        if a is not None and a.continuous:
            row = np.array([note.pitch, self._fed_step(note.onset_s), note.duration_s, note.velocity], np.float64)
            self._feed(row, note.onset_s)
            a.heard += 1
            a.chained = False
            a.next = None  # predict the next note again from the updated state
            self._hook(self.on_note_heard, row, note.onset_s)
        else:
            self._phrase.append(note)

    def _start_answer(self) -> None:
        phrase = sorted(self._phrase, key=lambda n: (n.onset_s, n.pitch))
        self._phrase.clear()
        for note in phrase:
            row = np.array([note.pitch, self._fed_step(note.onset_s), note.duration_s, note.velocity], np.float64)
            self._feed(row, note.onset_s)
            self._hook(self.on_note_heard, row, note.onset_s)
        self._answer = _Answer(continuous=self._config.improvise.mode == "continuous", heard=len(phrase))
        log.debug("phrase of %d notes heard; answering", len(phrase))

    # ---- playing -----------------------------------------------------------------------------------------
    def _predict_next(self, a: _Answer) -> tuple[float, np.ndarray, bool]:
        started = time.perf_counter()
        row = self._improviser.predict(velocity_hint=self._tracker.recent_velocity())
        a.inference_s += time.perf_counter() - started
        now = self._now()
        if self._last_fed_onset_s is None:
            return now + self.lead_s, row, True
        onset = self._last_fed_onset_s + row[nt.STEP]
        # A note chained to improvd's previous one keeps the grid (absolute deadlines, errors do not add up) even if
        # the engine woke a little late: the scheduler sends it at once. Only after a longer stall, or for a note
        # that follows the player's (the first of an answer, or after a player note in continuous mode), does the
        # note move to now.
        earliest = now - self.catch_up_s if a.chained else now + self.lead_s
        if onset < earliest:
            return now + self.lead_s, row, True
        return onset, row, False

    def _advance(self, a: _Answer) -> None:
        imp = self._config.improvise
        now = self._now()
        while a.undo and a.undo[0][0] <= now:  # started notes can no longer be taken back
            a.undo.popleft()
        while not a.done_handing:
            if a.next is None:
                a.next = self._predict_next(a)
            onset, row, moved = a.next
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
        for onset_s, snap, last_fed in a.undo:
            if onset_s > cut_s:  # never sent: take it (and what followed) back out of the model state
                self._improviser.restore(snap)
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
            if self._config.improvise.mode != "continuous":
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
            "lateness_ms": float(self._scheduler.stats()["last_ms"]),
            "interrupted": interrupted,
        }
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
        improviser = Improviser(model, Decoding.from_config(imp), rng=self._rng)
        if len(history):
            improviser.prime(history[-model.context:])
        self._config, self._model, self._improviser = config, model, improviser
        log.info("now playing %s (mode %s)", model.path, imp.mode)

    @staticmethod
    def _hook(hook, *args) -> None:
        if hook is None:
            return
        try:
            hook(*args)
        except Exception:
            log.exception("an engine callback failed")
