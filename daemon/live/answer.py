"""The answer lifecycle: feed the model, start an answer, predict each next note ahead, place it in time, hand it to
the scheduler, take back what an interruption cuts, finish and summarise. The engine thread owns one `AnswerPlayer`
(daemon/live/engine.py decides when a phrase is over, when to interrupt and when to swap).

What is fed to the model, and when: daemon/live/feed.py. With `timing.follow_tempo` (daemon/music/context.py) the
model's steps and durations are multiplied by the time scale (then clamped to step_range / duration_range) before
they are played, and divided by it again when fed.

respond mode: when the phrase is over, the phrase's notes are fed and an answer starts. Its first note is due at the
last fed onset plus the predicted step, or at once (now + `lead_s`) if that has passed (with MIDI clock running:
moved to the clock's next beat, or the next point of a coarser quantize grid); each next note at the previous onset
plus its predicted step (kept even when the engine is a little late: the scheduler then sends it at once; only after
a stall of more than `catch_up_s` does it move to now); each note-off at onset plus duration (placement in time,
quantize included: daemon/music/placement.py).
The answer stops after `max_notes` notes or when a note would start more than `max_seconds` after the first one,
or earlier at its `improvise.answer_length` (daemon/music/turns.py: "match" = as long as the call, in beats when a
pulse is known, else in notes; a length in beats also keeps its note-offs within the span); it is finished when its
last note-off is due. A note-on from the player during the answer cancels it at once (`interrupt`,
`scheduler.cancel`): nothing more is sent and its sounding notes are released; notes handed to the scheduler that
had not started are taken back out of the model state.

continuous mode: the first phrase starts the stream the same way, then improvd never stops: each player note is fed
when it completes (`hear`) and the next (not yet handed) note is predicted again from the updated state. Player
notes do not interrupt. `on_answer` is called every `max_notes` notes played (one log line per chunk).

Prediction runs ahead of playback: note k+1 is predicted as soon as note k is handed to the scheduler, and a note
is handed `lookahead_s` (50 ms) before its onset, never earlier, so an interruption finds at most ~50 ms of music
queued.

Texture (`improvise.polyphony`, `improvise.register`, daemon/music/texture.py): measured on the phrase (continuous:
on the player's last `CALL_NOTES` notes); the register bounds the pitch before sampling (`Improviser.predict`), and
a note whose onset would make more than `polyphony` of the answer's notes sound waits for a release (fed with its
real gap). The summary counts the notes delayed and re-chosen.

Hook, called in the engine thread and expected to be quick: `on_answer(summary)` once per finished answer (keys:
notes_heard, notes_played, inference_ms (mean feed + predict time per played note), lateness_ms (the scheduler's
latest event), interrupted, mode, time_scale (1.0 unless timing.follow_tempo), bpm (the grid's tempo, None without
quantize), key (the scale in use, e.g. "C major", or None), length (the answer_length in use, e.g. "8 beats", or
None), delayed and rechosen (notes the texture bounds moved or re-chose)); `notes_played` does not count the notes
an interruption took back.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from improvd.core import notes as nt
from improvd.daemon.live.feed import ModelFeed, call_hook
from improvd.daemon.live.scheduler import Scheduler
from improvd.daemon.live.settings import LiveSettings
from improvd.daemon.music import turns
from improvd.daemon.music.context import MusicContext
from improvd.daemon.music.placement import Placed, Placement
from improvd.daemon.music.texture import Texture, TextureCounts, Voices, texture_for_call
from improvd.daemon.music.tracker import HeardNote, NoteTracker

log = logging.getLogger("improvd.engine")

TEMPO_NOTES = 8  # continuous mode: the player's last notes the time scale is measured on
CALL_NOTES = 16  # continuous mode: the player's last notes the texture bounds are measured on
SPAN_EPS_S = 0.001  # an onset this close to the end of an answer's span is past it


@dataclass(eq=False)
class Answer:
    """An answer being played (respond), or the stream (continuous); also the scheduler owner of its notes."""

    continuous: bool
    heard: int
    first_onset_s: float | None = None
    next: tuple[np.ndarray, Placed] | None = None  # the next note predicted (row in real time) and placed, not handed
    handed: int = 0
    chunk_played: int = 0
    end_s: float = -math.inf  # the latest note-off handed
    chained: bool = False  # the last note fed was improvd's own
    done_handing: bool = False
    inference_s: float = 0.0
    undo: deque = field(default_factory=deque)  # (onset_s, ModelFeed.snapshot()) of notes not started
    budget: turns.Budget = turns.Budget()  # improvise.answer_length for this answer (respond mode)
    texture: Texture = Texture()  # improvise.polyphony / register for this answer
    voices: Voices = field(default_factory=Voices)  # its notes, for the polyphony bound
    counts: TextureCounts = field(default_factory=TextureCounts)
    next_flags: tuple[float, bool] = (0.0, False)  # the next note: (onset delayed by, s; pitch re-chosen)


def describe_budget(budget: turns.Budget) -> str | None:
    """'8 beats', '5 notes' or None (only the caps)."""
    if budget.beats is not None:
        return f"{budget.beats:g} beats"
    if budget.notes is not None:
        return f"{budget.notes} notes"
    return None


class AnswerPlayer:
    """The answer in progress (module docstring). Engine thread.

    Args:
        feed: the model's input and decoding.
        settings: the config and [improvise] values in effect.
        context: the musical context (time scale, grid, key).
        placement: the placement rules (lead_s, catch_up_s).
        scheduler: where notes are handed.
        tracker: the player's notes (velocity hint, the window for key and continuous mode).
        now: the clock, seconds.
        lookahead_s: how long before its onset a note is handed to the scheduler.
        on_answer: the hook (module docstring), or None.
    """

    def __init__(self, feed: ModelFeed, settings: LiveSettings, context: MusicContext, placement: Placement,
                 scheduler: Scheduler, tracker: NoteTracker, *, now: Callable[[], float], lookahead_s: float,
                 on_answer: Callable[[dict], None] | None = None):
        self.current: Answer | None = None
        self.lookahead_s = float(lookahead_s)
        self.on_answer = on_answer
        self._feed = feed
        self._settings = settings
        self._context = context
        self._placement = placement
        self._scheduler = scheduler
        self._tracker = tracker
        self._now = now

    # ---- starting ------------------------------------------------------------------------------------------
    def answer(self, phrase: list[HeardNote], *, silent: str | None = None) -> None:
        """A phrase is over: measure it, feed it, and start its answer, unless `silent` says why not ("muted")."""
        phrase = sorted(phrase, key=lambda n: (n.onset_s, n.pitch))
        self._context.hear_phrase([n.onset_s for n in phrase])
        self._feed.estimate_key(self._tracker.window_notes())
        for note in phrase:
            self._feed.player(note)
        if silent is not None:
            log.debug("phrase of %d notes heard; not answering (%s)", len(phrase), silent)
            return
        imp = self._settings.improvise
        a = Answer(continuous=imp.mode == "continuous", heard=len(phrase))
        a.texture = self._texture_of(phrase)
        if phrase and not a.continuous:
            a.budget = turns.answer_budget(
                self._settings.answer_length, call_notes=len(phrase), first_onset_s=phrase[0].onset_s,
                last_release_s=max(n.onset_s + n.duration_s for n in phrase),
                beat_s=self._context.beat_s(self._now(), answering=False))
        self.current = a
        log.debug("phrase of %d notes heard; answering (time scale %.3f, length %s, %s)", len(phrase),
                  self._context.time_scale, a.budget, a.texture)

    def hear(self, note: HeardNote) -> None:
        """A player's note completed during the continuous stream: fed, and the next note predicted again."""
        a = self.current
        self._context.measure_tempo(self._tracker.window_onsets_s()[-TEMPO_NOTES:])
        self._feed.estimate_key(self._tracker.window_notes())
        a.texture = self._texture_of(self._tracker.window_heard()[-CALL_NOTES:])
        self._feed.player(note)
        a.heard += 1
        a.chained = False
        a.next = None  # predict the next note again from the updated state

    def _texture_of(self, notes) -> Texture:
        """The polyphony and register bounds of an answer to these (player's) notes."""
        imp = self._settings.improvise
        if not notes or (imp.polyphony == 0 and imp.register == "free"):
            return Texture()
        return texture_for_call(imp.polyphony, imp.register, pitches=[n.pitch for n in notes],
                                onsets_s=[n.onset_s for n in notes],
                                ends_s=[n.onset_s + n.duration_s for n in notes],
                                pitch_range=(int(imp.pitch_range[0]), int(imp.pitch_range[1])))

    # ---- playing -----------------------------------------------------------------------------------------
    def next_due_s(self, now: float) -> float:
        """When the answer in progress must next be looked at (absolute seconds)."""
        a = self.current
        if not a.done_handing:
            return now if a.next is None else a.next[1].onset_s - self.lookahead_s
        return a.end_s

    def advance(self) -> bool:
        """Hand the notes now due (predicting each next one), finish the answer when its last note-off is due.

        Returns True when the continuous stream has just played a chunk of `max_notes` notes: the engine then calls
        `end_chunk` (and may swap) and calls `advance` again."""
        a = self.current
        imp = self._settings.improvise
        now = self._now()
        while a.undo and a.undo[0][0] <= now:  # started notes can no longer be taken back
            a.undo.popleft()
        while not a.done_handing:
            if a.next is None:
                a.next = self._predict_next(a)
            else:
                self._refresh_onset(a)
            row, (onset, moved, _) = a.next
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
                return True
        if not a.continuous and a.done_handing and self._now() >= a.end_s:
            self.finish(interrupted=False)
        return False

    def _predict_next(self, a: Answer) -> tuple[np.ndarray, Placed]:
        started = time.perf_counter()
        improviser = self._feed.improviser
        row = improviser.predict(velocity_hint=self._tracker.recent_velocity(), register=a.texture.register)
        rechosen = improviser.rechosen
        a.inference_s += time.perf_counter() - started
        scale = self._context.time_scale
        if scale != 1.0:  # out of the model's time into the player's
            imp = self._settings.improvise
            row[nt.STEP] = min(max(row[nt.STEP] * scale, imp.step_range[0]), imp.step_range[1])
            row[nt.DURATION] = min(max(row[nt.DURATION] * scale, imp.duration_range[0]), imp.duration_range[1])
        now = self._now()
        placed = None
        if a.handed == 0:  # the first note enters on a running clock's beat
            clock_grid = self._context.running_clock_grid(now)
            if clock_grid is not None:
                placed = self._placement.entry(clock_grid, self._context.quantize_ticks, row[nt.STEP],
                                               self._feed.last_onset_s, now)
        if placed is None:
            grid, ticks = self._context.grid(now, answering=True)
            placed = self._placement.place(grid, ticks, row[nt.STEP], self._feed.last_onset_s, now,
                                           chained=a.chained)
        delay = 0.0
        if a.texture.polyphony is not None:
            later = a.voices.earliest_onset(placed.onset_s, a.texture.polyphony)
            if later > placed.onset_s:  # as many notes as allowed sound: wait for a release (daemon/music/texture.py)
                grid, ticks = self._context.grid(now, answering=True)
                delayed = self._placement.delay_to(grid, ticks, later)
                delay, placed = delayed.onset_s - placed.onset_s, delayed
        a.next_flags = (delay, rechosen)
        return row, placed

    def _refresh_onset(self, a: Answer) -> None:
        """Ask the grid again for the time of the next note's grid position (the clock's tempo may have moved)."""
        row, placed = a.next
        if placed.position is None:
            return
        now = self._now()
        grid, ticks = self._context.grid(now, answering=True)
        if grid is None:
            return
        onset, position = self._placement.refresh(grid, ticks, placed.onset_s, placed.position, now)
        a.next = (row, Placed(onset, placed.moved, position))

    def _over_budget(self, a: Answer, onset_s: float) -> bool:
        """Whether a note at `onset_s` is beyond the answer's `improvise.answer_length` (daemon/music/turns.py)."""
        if a.budget.notes is not None and a.handed >= a.budget.notes:
            return True
        span = self._span_s(a)
        return span is not None and a.first_onset_s is not None and onset_s - a.first_onset_s >= span - SPAN_EPS_S

    def _span_s(self, a: Answer) -> float | None:
        if a.budget.beats is None:
            return None
        return a.budget.span_s(self._context.beat_s(self._now(), answering=self.current is not None))

    def _hand(self, a: Answer, onset_s: float, row: np.ndarray, moved: bool) -> None:
        pitch, duration_s, velocity = int(row[nt.PITCH]), float(row[nt.DURATION]), int(row[nt.VELOCITY])
        if a.first_onset_s is None:
            a.first_onset_s = onset_s
        span = None if a.continuous else self._span_s(a)
        imp = self._settings.improvise
        if span is not None:  # an answer of a length in beats does not ring past it
            cut = max(a.first_onset_s + span - onset_s, imp.duration_range[0])
            if cut < duration_s:
                duration_s = cut
                row = row.copy()
                row[nt.DURATION] = cut
        a.voices.prune(onset_s - 1.0)
        a.voices.add(onset_s, onset_s + duration_s)
        a.counts.add(delay_s=a.next_flags[0], rechosen=a.next_flags[1])
        a.next_flags = (0.0, False)
        if not a.continuous:
            a.undo.append((onset_s, self._feed.snapshot()))
        self._scheduler.schedule_note(onset_s, onset_s + duration_s, pitch, velocity,
                                      channel=self._settings.config.midi.output_channel - 1, owner=a)
        scale = self._context.time_scale
        fed = row.copy()
        if moved:
            fed[nt.STEP] = self._feed.step(onset_s)
        elif scale != 1.0:
            fed[nt.STEP] = row[nt.STEP] / scale
        if scale != 1.0:
            fed[nt.DURATION] = row[nt.DURATION] / scale
        started = time.perf_counter()
        self._feed.own(fed, onset_s)
        a.inference_s += time.perf_counter() - started
        a.handed += 1
        a.chunk_played += 1
        a.chained = True
        a.end_s = max(a.end_s, onset_s + duration_s)
        self._feed.report_own(fed, onset_s)

    # ---- changes while playing ---------------------------------------------------------------------------
    def set_mode(self, mode: str) -> None:
        """The mode changed live: respond -> continuous turns the answer into the stream; continuous -> respond
        ends the stream (nothing more is handed, what was handed plays out)."""
        a = self.current
        if a is None:
            return
        if mode == "continuous" and not a.continuous:
            a.continuous = True
        elif mode == "respond" and a.continuous:
            a.continuous = False
            a.done_handing = True
            a.next = None

    def transport_started(self) -> None:
        """MIDI Start: a next note placed on the grid belonged to the bar before Start: predict it again."""
        a = self.current
        if a is not None and a.next is not None and a.next[1].position is not None:
            a.next = None

    def end_chunk(self) -> None:
        """A chunk of the continuous stream was played: its summary, and counting starts again."""
        a = self.current
        self._emit_summary(a, interrupted=False)
        a.heard = 0
        a.chunk_played = 0
        a.inference_s = 0.0

    def after_swap(self) -> None:
        """A reload was applied at a chunk boundary: the stream's next note is predicted by the new model, and
        outside continuous mode the stream ends (its handed notes still end on time; the next phrase is
        answered)."""
        self.current.next = None
        if self._settings.improvise.mode != "continuous":
            self.current = None

    # ---- ending ------------------------------------------------------------------------------------------
    def interrupt(self) -> None:
        """Cancel the answer at once (its notes released); the notes handed that had not started are taken back
        out of the model state."""
        a = self.current
        self._scheduler.cancel(a)
        cut_s = self._now()
        unplayed = 0
        for onset_s, snapshot in a.undo:
            if onset_s > cut_s:  # never sent: take it (and what followed) back out of the model state
                self._feed.restore(snapshot)
                unplayed = sum(1 for o, _ in a.undo if o >= onset_s)
                break
        a.handed -= unplayed
        a.chunk_played -= unplayed
        self.finish(interrupted=True)

    def finish(self, *, interrupted: bool) -> None:
        """The answer is over: its summary."""
        a = self.current
        self.current = None
        if a is not None:
            self._emit_summary(a, interrupted=interrupted)

    def abort(self) -> None:
        """After an engine error: cancel the answer (its notes released), reported as interrupted."""
        a = self.current
        self.current = None
        if a is not None:
            self._scheduler.cancel(a)
            self._emit_summary(a, interrupted=True)

    def _emit_summary(self, a: Answer, *, interrupted: bool) -> None:
        played = a.chunk_played if a.continuous else a.handed
        summary = {
            "mode": "continuous" if a.continuous else "respond",
            "notes_heard": a.heard,
            "notes_played": played,
            "inference_ms": 1000.0 * a.inference_s / played if played else 0.0,
            "lateness_ms": float(self._scheduler.last_ms),
            "interrupted": interrupted,
            "time_scale": self._context.time_scale,
            "bpm": None,
            "key": None,
            "length": describe_budget(a.budget) if not a.continuous else None,
            "delayed": a.counts.delayed,
            "rechosen": a.counts.rechosen,
        }
        grid, _ = self._context.grid(self._now(), answering=self.current is not None)
        if grid is not None:
            summary["bpm"] = grid.bpm
        scale = self._context.key_in_use(self._settings.improvise.key)
        if scale is not None:
            summary["key"] = str(scale)
        call_hook(self.on_answer, summary)
