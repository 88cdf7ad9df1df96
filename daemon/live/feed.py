"""The model's input and its decoding: the `Improviser` (model state, daemon/predict/improviser.py) and what is fed
to it. The engine thread owns one `ModelFeed` (the answer player feeds it; a reload replaces its Improviser).

What is fed to the model: one merged sequence of the player's completed notes and improvd's own notes, in the order
the engine learns of them. Each fed note's step is the gap from the previous fed note's onset, clipped to
[0, improvise.step_range high] (a pause between phrases, or a player's note that began before improvd's last one,
stays within what the model knows). A player's note is complete, and fed, when it is released (its duration is
known then). An answered note whose onset is exactly the previous onset plus its predicted step is fed exactly as
predicted; so with temperature 0, every answered note after the first is the greedy continuation
(docs/model-format.md) of the notes fed before it. The first note of an answer usually comes later than predicted
(the silence has passed), and is fed with its real gap. With `timing.follow_tempo` (daemon/music/context.py) the
player's steps and durations are divided by the time scale before they are fed (improvd's own: daemon/live/answer.py).
The player's notes are fed with `player=True`, so the Improviser's `SessionAdapter` (`improvise.adapt`) learns from
them; improvd's own notes only extend its context.

Hooks, called in the engine thread and expected to be quick: `on_note_heard(note_row, onset_s)` for each player note
fed and `on_note_played(note_row, onset_s)` for each of improvd's notes fed as it is handed to the scheduler
(note_row: float64 [4] pitch, step_s as fed, duration_s, velocity, in the model's time); together they are the
model's input in order (the engine tests replay it through a reference model). `on_note_played` also reports the
notes an interruption takes back before they start (at most ~`lookahead_s` of music). What improvd actually sent
(exact times, with cancels and re-triggers) is `Scheduler.on_sent`'s.

Decoding (daemon/predict/improviser.py `Decoding`): the [improvise] values in effect; the key's scale (a fixed
`improvise.key`, or with "auto" the estimate, re-made at each answer and, in continuous mode, at each player note:
daemon/music/context.py) weighted by `improvise.key_strength`.
"""

from __future__ import annotations

import logging
from typing import Callable

import numpy as np

from improvd.daemon.live.settings import LiveSettings
from improvd.daemon.music.context import MusicContext
from improvd.daemon.music.tracker import HeardNote
from improvd.daemon.predict.improviser import Improviser, Snapshot

log = logging.getLogger("improvd.engine")


def call_hook(hook, *args) -> None:
    """Call an engine hook (None: nothing), logging what it raises: a hook never stops the engine."""
    if hook is None:
        return
    try:
        hook(*args)
    except Exception:
        log.exception("an engine callback failed")


class ModelFeed:
    """The Improviser and the onset of the last note fed (module docstring). Engine thread.

    Args:
        improviser: the model state and decoding.
        settings: the [improvise] values in effect (step_range, the decoding values).
        context: the musical context (the time scale, the estimated key).
        on_note_heard, on_note_played: the hooks (module docstring), or None.
    """

    def __init__(self, improviser: Improviser, settings: LiveSettings, context: MusicContext, *,
                 on_note_heard: Callable[[np.ndarray, float], None] | None = None,
                 on_note_played: Callable[[np.ndarray, float], None] | None = None):
        self.improviser = improviser
        self.last_onset_s: float | None = None  # the latest onset fed
        self.on_note_heard = on_note_heard
        self.on_note_played = on_note_played
        self._settings = settings
        self._context = context

    def step(self, onset_s: float) -> float:
        """The step fed for a note at `onset_s`: the gap from the last fed onset in the model's time, clipped."""
        if self.last_onset_s is None:
            return 0.0
        return min(max(onset_s - self.last_onset_s, 0.0) / self._context.time_scale,
                   self._settings.improvise.step_range[1])

    def player(self, note: HeardNote) -> None:
        """Feed a completed note of the player's."""
        row = np.array([note.pitch, self.step(note.onset_s), note.duration_s / self._context.time_scale,
                        note.velocity], np.float64)
        self._feed(row, note.onset_s, player=True)
        call_hook(self.on_note_heard, row, note.onset_s)

    def own(self, row: np.ndarray, onset_s: float) -> None:
        """Feed one of improvd's notes (`row` as fed, in the model's time), handed to the scheduler for `onset_s`;
        the caller then reports it (`report_own`), after it timed the feeding."""
        self._feed(row, onset_s)

    def report_own(self, row: np.ndarray, onset_s: float) -> None:
        """Call `on_note_played` for a note of improvd's fed."""
        call_hook(self.on_note_played, row, onset_s)

    def _feed(self, row: np.ndarray, onset_s: float, *, player: bool = False) -> None:
        self.improviser.feed(row, player=player)
        if self.last_onset_s is None or onset_s > self.last_onset_s:
            self.last_onset_s = onset_s

    def snapshot(self) -> tuple[Snapshot, float | None]:
        """What `restore` takes back to: the model state and the last fed onset."""
        return self.improviser.snapshot(), self.last_onset_s

    def restore(self, snapshot: tuple[Snapshot, float | None]) -> None:
        """Take the notes fed since `snapshot` back out of the model state."""
        state, self.last_onset_s = snapshot
        self.improviser.restore(state)

    def refresh_decoding(self) -> None:
        """Decode with the [improvise] values and the key in effect now."""
        self.improviser.decoding = self._settings.decoding(self._context.scale_pcs())

    def estimate_key(self, window: np.ndarray) -> None:
        """With improvise.key = "auto": the key of the window's notes, decoded with from now on."""
        if self._context.estimate_key(self._settings.improvise.key, window):
            self.refresh_decoding()
