"""Learning-rate schedule and weight averaging for a training run (what `improvd train --init` fine-tunes with).

- `lr_factor`: the learning rate's multiplier at a point of the run: a linear warm-up over the first
  `warmup_steps` batches, then, with `anneal`, a cosine decay to `ANNEAL_FLOOR` × the rate at the end of the
  run's budget (its `--max-minutes` if it has one, else its epochs).
- `WeightAverage`: an exponential moving average of the weights, updated after every batch; validation and the
  checkpoints (`model.keras`, so also early stopping's choice) see the averaged weights, training goes on from
  the raw ones, and `last.keras` holds the raw ones (what `--resume` continues from).

Both are Keras callbacks made by `schedule_callbacks`, called by `train.fit` in the main thread of
`improvd train` (Keras runs callbacks in the thread that called `fit`).
"""

from __future__ import annotations

import math
import time

import numpy as np

ANNEAL_FLOOR = 0.02  # the annealed rate ends at 2% of the preset's, not 0: the last minute still learns a little


def lr_factor(step: int, progress: float, warmup_steps: int, anneal: bool) -> float:
    """The learning rate's multiplier after `step` batches, at `progress` (0..1) through the run's budget."""
    if step < 0 or not math.isfinite(progress):
        raise ValueError(f"lr_factor: step {step} must be ≥ 0 and progress {progress} finite")
    factor = 1.0
    if warmup_steps > 0 and step < warmup_steps:
        factor = (step + 1) / warmup_steps
    if anneal:
        p = min(max(progress, 0.0), 1.0)
        factor *= ANNEAL_FLOOR + (1.0 - ANNEAL_FLOOR) * 0.5 * (1.0 + math.cos(math.pi * p))
    return factor


def budget_progress(elapsed_s: float, max_minutes: float, epoch: int, batch: int, steps_per_epoch: int,
                    epochs: int) -> float:
    """How far through its budget a run is (0..1): by wall time when it has a time limit, else by epochs."""
    if max_minutes > 0:
        return min(1.0, max(0.0, elapsed_s / (max_minutes * 60.0)))
    if epochs <= 0:
        return 0.0
    return min(1.0, (epoch + batch / max(1, steps_per_epoch)) / epochs)


def average_into(average: list[np.ndarray], weights: list[np.ndarray], decay: float) -> None:
    """average ← decay · average + (1 − decay) · weights, in place (the float weights only)."""
    for a, w in zip(average, weights):
        if np.issubdtype(a.dtype, np.floating):
            a *= decay
            a += (1.0 - decay) * w


def schedule_callbacks(preset, base_lr: float, max_minutes: float, epochs: int, steps_per_epoch: int,
                       started: float, resume: bool):
    """(before, after): callbacks to run before improvd's checkpoint callbacks and right after the best-model
    checkpoint and early stopping (the averaged weights are swapped out there). Empty when the preset asks
    for neither a schedule nor averaging."""
    import keras

    before, after = [], []
    warmup = 0 if resume else preset.warmup_steps  # a resumed run's weights are already adapted
    if warmup or preset.anneal:
        class Schedule(keras.callbacks.Callback):
            """Sets the optimizer's learning rate before every batch (`lr_factor` × the preset's rate)."""

            def __init__(self):
                super().__init__()
                self.step = 0
                self.epoch = 0

            def on_epoch_begin(self, epoch, logs=None):
                self.epoch = epoch

            def on_train_batch_begin(self, batch, logs=None):
                if not preset.anneal and self.step >= warmup:  # warmed up: the plateau rule owns the rate
                    return
                progress = budget_progress(time.monotonic() - started, max_minutes, self.epoch, batch,
                                           steps_per_epoch, epochs)
                self.model.optimizer.learning_rate.assign(
                    base_lr * lr_factor(self.step, progress, warmup, preset.anneal))
                self.step += 1

        before.append(Schedule())

    if preset.average:
        state = {"average": None, "raw": None}

        class Average(keras.callbacks.Callback):
            """Keeps the moving average; puts it in the model for validation and the best checkpoint."""

            def on_train_begin(self, logs=None):
                state["average"] = [np.array(w, dtype=np.asarray(w).dtype) for w in self.model.get_weights()]

            def on_train_batch_end(self, batch, logs=None):
                average_into(state["average"], self.model.get_weights(), preset.average)

            def on_test_begin(self, logs=None):
                if state["average"] is not None and state["raw"] is None:
                    state["raw"] = self.model.get_weights()
                    self.model.set_weights(state["average"])

        class Restore(keras.callbacks.Callback):
            """Puts the raw weights back after the best checkpoint and early stopping have seen the average."""

            def on_epoch_end(self, epoch, logs=None):
                if state["raw"] is not None:
                    self.model.set_weights(state["raw"])
                    state["raw"] = None

        before.append(Average())
        after.append(Restore())
    return before, after
