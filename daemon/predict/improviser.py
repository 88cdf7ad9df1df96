"""The decoding loop shared by the daemon (engine thread) and `improvd generate`: feed notes, predict the next one.

An `Improviser` holds a `StepModel`, the recurrent state carried from note to note and the model's outputs after
the last note fed. Its surface is small, like Notochord's: `feed(note)`, `predict()`, `reset()`.

    imp = Improviser(model, Decoding.from_config(config.improvise), rng=np.random.default_rng(seed))
    imp.prime(heard)              # reset, then feed each row of a notes array
    for _ in range(n):
        note = imp.predict()      # decode the next note; it is NOT fed
        imp.feed(note)            # feed what was actually played (the caller decides)

Context: each `feed` is one model call (O(1)). When the notes fed since the last priming exceed the model's
context (`improvd.context`, C), the state is rebuilt from zero over the last C notes fed, so the state always
summarises between C and 2C notes (fewer right after `reset`). Exactly: with k notes fed since the last priming
(or since `reset`), the feed that makes k = C + 1 is followed by `reset` of the state and a feed of the last C
notes, and k becomes 0. A third party reproduces the greedy output (docs/model-format.md) by doing the same.
That rebuild is not done all at once (C model steps in one feed, a spike of C times a note's cost every C + 1
notes): a second state, started from zero after the first note of each cycle, is fed every later note beside the
main one (the same call, a batch of two rows), so at k = C + 1 it has been fed exactly the last C notes and
becomes the state. A batch row's outputs are those of the row fed alone (bit for bit with the shipped model
and onnxruntime's CPU provider; tests/daemon/test_improviser.py checks the rule's outputs to 1e-6).

Session adaptation (`improvise.adapt`, daemon/predict/adapt.py): with a `SessionAdapter`, each note fed is told to it
(`feed(note, player=True)` for the player's notes, which it learns from; improvd's own notes only extend its
context), and `predict` decodes the pitch from the adapter's mixture of the model's distribution and the
session's memory instead of the model's alone, and the step and duration from its timing memory (when it
adapts timing, the default). `forget()` clears that memory. Without an adapter (the default) nothing changes.

Greedy decoding (temperature 0) of a prediction is: pitch = argmax of the logits within `pitch_range`,
step = clip(step, step_range), duration = clip(duration, duration_range) (see `daemon.sampling.decode`).

Threads: one thread at a time (the engine thread in the daemon).
"""

from __future__ import annotations

import dataclasses
import logging
from collections import deque
from dataclasses import dataclass

import numpy as np

from improvd.core import notes as nt
from improvd.daemon.predict.adapt import SessionAdapter, softmax
from improvd.daemon.predict.model import Prediction, StepModel
from improvd.daemon.predict.sampling import Decoding, choose_pitch, decode

__all__ = ["Decoding", "Improviser", "Snapshot"]

log = logging.getLogger("improvd.improviser")

FOLLOW_NOTES = 8  # velocity "follow" without a hint: mean of the last this many notes fed


@dataclass(frozen=True)
class Snapshot:
    """Everything `feed` changes, to undo feeds (e.g. a note handed to the scheduler but never played)."""

    state: np.ndarray
    prediction: Prediction | None
    since_priming: int
    history: tuple
    fed: int
    adapter_context: tuple | None = None
    shadow: np.ndarray | None = None


class Improviser:
    """Feeds notes to a `StepModel` with the state carried, and decodes the next note.

    Args:
        model: the step-format model.
        decoding: how predictions become notes (`Decoding.from_config(config.improvise)`).
        rng: the generator used for sampling (temperature > 0); a fresh unseeded one when None.
        adapter: session adaptation (`daemon.adapt.SessionAdapter`), or None for the model alone. `reset` and
            `prime` keep its memory (a reload keeps the session); `forget` clears it.
    """

    def __init__(self, model: StepModel, decoding: Decoding, *, rng: np.random.Generator | None = None,
                 adapter: SessionAdapter | None = None):
        self.model = model
        self.decoding = decoding
        self.rng = rng if rng is not None else np.random.default_rng()
        self.adapter = adapter
        self._probs: tuple | None = None  # (prediction, its pitch distribution), for the adapter
        if decoding.velocity == "model" and not model.has_velocity:
            log.warning("improvise.velocity = 'model' but %s predicts no velocity: following the player's "
                        "velocity instead", model.path)
        self._history: deque = deque(maxlen=model.context)
        self.rechosen = False  # the last `predict` with a register picked another pitch than it would without
        self.reset()

    def reset(self) -> None:
        """Forget everything: zero state, no prediction, empty history."""
        self._state = self.model.zero_state(1)
        self._shadow: np.ndarray | None = None  # the next cycle's state: zero fed the notes since the cycle's first
        self._prediction: Prediction | None = None
        self._since_priming = 0
        self._history.clear()
        self._fed = 0

    @property
    def fed(self) -> int:
        """Notes fed since the last `reset`."""
        return self._fed

    @property
    def since_priming(self) -> int:
        """Notes fed since the state was last started from zero (0..context)."""
        return self._since_priming

    @property
    def prediction(self) -> Prediction | None:
        """The model's raw outputs for the next note (None before the first feed)."""
        return self._prediction

    @property
    def history(self) -> np.ndarray:
        """The last (up to `model.context`) notes fed, float64 [K, 4]."""
        return np.array(self._history, dtype=np.float64).reshape(-1, 4)

    def _step(self, row: np.ndarray) -> None:
        self._prediction = self.model.run(row[None, :self.model.num_features], self._state)
        self._state = self._prediction.state

    def forget(self) -> None:
        """Clear the session adapter's memory (no-op without adaptation); the model's state is untouched."""
        if self.adapter is not None:
            self.adapter.forget()

    def _model_probs(self) -> np.ndarray | None:
        """The model's pitch distribution for the next note (computed once per prediction), or None."""
        pred = self._prediction
        if pred is None:
            return None
        if self._probs is None or self._probs[0] is not pred:
            self._probs = (pred, softmax(pred.pitch_logits[0]))
        return self._probs[1]

    def feed(self, note, *, player: bool = False) -> None:
        """Feed one note (a row: pitch, step_s, duration_s[, velocity]); only the model's F features are used.

        `player`: the note is the player's (the session adapter learns from it); improvd's own notes are fed
        with False. Re-primes from zero over the last `context` notes when the notes since the last priming
        exceed it.
        """
        row = np.zeros(4, dtype=np.float64)
        values = np.asarray(note, dtype=np.float64).reshape(-1)[:4]
        row[:len(values)] = values
        if self.adapter is not None:
            pred = self._prediction
            self.adapter.observe(int(row[nt.PITCH]), self._model_probs(), learn=player,
                                 timing=(row[nt.STEP], row[nt.DURATION]),
                                 model_timing=(max(float(pred.step[0]), 0.0), max(float(pred.duration[0]), 0.0))
                                 if pred is not None else None)
        self._history.append(row)
        self._fed += 1
        self._since_priming += 1
        if self._shadow is None:  # the first note of a cycle (k = 1): the next cycle's state starts after it
            self._step(row)
            self._shadow = self.model.zero_state(1)
            return
        pair = self.model.run(np.repeat(row[None, :self.model.num_features], 2, axis=0),
                              np.concatenate((self._state, self._shadow)))
        rebuilt = self._since_priming > self.model.context
        r = 1 if rebuilt else 0  # the row that continues: the main state, or the rebuilt one at k = C + 1
        self._prediction = Prediction(pair.pitch_logits[r:r + 1], pair.step[r:r + 1], pair.duration[r:r + 1],
                                      pair.velocity[r:r + 1] if pair.velocity is not None else None,
                                      pair.state[r:r + 1])
        self._state = self._prediction.state
        if rebuilt:
            self._shadow = None
            self._since_priming = 0
        else:
            self._shadow = pair.state[1:]

    def prime(self, notes: np.ndarray) -> None:
        """`reset`, then feed each row of `notes` (float [K, 3 or 4]) in order."""
        self.reset()
        for row in np.asarray(notes, dtype=np.float64).reshape(len(notes), -1):
            self.feed(row)

    def predict(self, *, velocity_hint: float | None = None, register: tuple[int, int] | None = None) -> np.ndarray:
        """Decode the next note from the current outputs; it is not fed.

        Args:
            velocity_hint: the player's recent mean velocity for the "follow" policy; when None, the mean of
                the last notes fed is followed.
            register: (low, high) pitches the note must keep within, on top of the decoding's `pitch_range`
                (`improvise.register = "match"`, daemon/music/texture.py); None = the decoding's range only. With a
                register, `rechosen` tells afterwards whether the same draw without it would have picked another
                pitch (the generator is left as if only the bounded draw had been made).

        Returns:
            float64 [4]: pitch, step_s, duration_s, velocity.

        Raises:
            ValueError: nothing has been fed since `reset`.
        """
        if self._prediction is None:
            raise ValueError("nothing to predict from: feed at least one note first")
        pred = self._prediction
        if velocity_hint is None and self._history:
            recent = [row[nt.VELOCITY] for row in list(self._history)[-FOLLOW_NOTES:] if row[nt.VELOCITY] > 0]
            velocity_hint = float(np.mean(recent)) if recent else None
        model_velocity = float(pred.velocity[0]) if pred.velocity is not None else None
        logits = pred.pitch_logits[0]
        step, duration = float(pred.step[0]), float(pred.duration[0])
        if self.adapter is not None:  # log-probabilities of the mixture: decoding treats them as logits
            with np.errstate(divide="ignore"):
                logits = np.log(self.adapter.mix(self._model_probs()))
            step, duration = self.adapter.timing(max(step, 0.0), max(duration, 0.0))
        decoding = self.decoding
        self.rechosen = False
        bounded = None
        if register is not None:
            lo = max(decoding.pitch_range[0], int(register[0]))
            hi = min(decoding.pitch_range[1], int(register[1]))
            if lo <= hi and (lo, hi) != tuple(decoding.pitch_range):
                bounded = dataclasses.replace(decoding, pitch_range=(lo, hi))
        if bounded is None:
            return decode(logits, step, duration, model_velocity, decoding, self.rng, player_velocity=velocity_hint)
        before = self.rng.bit_generator.state
        row = decode(logits, step, duration, model_velocity, bounded, self.rng, player_velocity=velocity_hint)
        after = self.rng.bit_generator.state
        self.rng.bit_generator.state = before  # the same draw without the register
        free = choose_pitch(logits, decoding.temperature, decoding.top_p, decoding.pitch_range,
                            self.rng, scale_pcs=decoding.scale_pcs, key_strength=decoding.key_strength)
        self.rng.bit_generator.state = after
        self.rechosen = int(free) != int(row[nt.PITCH])
        return row

    def snapshot(self) -> Snapshot:
        """What `restore` needs to undo the feeds made after this call (O(context) copy)."""
        return Snapshot(self._state.copy(), self._prediction, self._since_priming, tuple(self._history), self._fed,
                        self.adapter.save() if self.adapter is not None else None,
                        self._shadow.copy() if self._shadow is not None else None)

    def restore(self, snap: Snapshot) -> None:
        """Go back to a `snapshot` (of this Improviser, with the same model)."""
        self._state = snap.state.copy()
        self._shadow = snap.shadow.copy() if snap.shadow is not None else None
        self._prediction = snap.prediction
        self._since_priming = snap.since_priming
        self._history.clear()
        self._history.extend(snap.history)
        self._fed = snap.fed
        if self.adapter is not None and snap.adapter_context is not None:
            self.adapter.restore(snap.adapter_context)
