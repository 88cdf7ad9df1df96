"""Training runs: a run directory, the fit loop with its callbacks, and what is written at the end.

A run directory holds `model.keras` (the best weights), `last.keras` (for `--resume`), `config.json` (the
resolved config and preset), `split.json`, `history.csv`, `metrics.json` and `curves.png`. Ctrl-C (SIGINT) stops
the fit cleanly and keeps the best checkpoint.

Batches stream through `tf.data` (`train.batches.tf_dataset`). Under a `tf.distribute` strategy the model is
built in its scope, the global batch is `batch_size × replicas`, and only the chief's checkpoints land in the
run directory: the other workers write theirs to a temporary directory and delete it (`train.distribute`).

Threads: the main thread of `improvd train` (TensorFlow runs its own threads inside `fit`; SIGINT is handled
on the main thread).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from improvd.train import distribute
from improvd.train.batches import BatchSource, tf_dataset
from improvd.core.presets import Preset
from improvd.train.model import build_model, float32_copy, is_mixed, load_keras

log = logging.getLogger(__name__)


@dataclass
class FitResult:
    model: object
    epochs: int
    best_epoch: int
    seconds: float
    stopped_by: str          # "early_stop", "epochs", "time_limit", "interrupted"
    history: list[dict]
    replicas: int = 1
    global_batch: int = 0
    weights_sha256: str = ""  # of the weights as training left them (equal on every worker of a run)


SYNC_EVERY = 64  # batches between the workers' agreement on the time limit (multi-worker runs)


def _callbacks(run_dir: Path, preset: Preset, max_minutes: float, resume: bool, started: float,
               best_so_far: float | None = None, strategy=None, epochs: int = 0, steps_per_epoch: int = 1):
    import keras

    from improvd.train.recipe import schedule_callbacks

    multi = distribute.is_multi_worker(strategy)

    class TimeLimit(keras.callbacks.Callback):
        """Stops after `max_minutes` of training (checked at the end of each epoch and each batch).

        With several workers, every worker must stop at the same step: they agree (an all-reduce) every
        `SYNC_EVERY` batches and at the end of each epoch, and stop if any of them is past the limit.
        """

        def __init__(self):
            super().__init__()
            self.hit = False

        def _check(self, sync: bool):
            late = bool(max_minutes) and time.monotonic() - started > max_minutes * 60
            if multi:
                if not (sync and max_minutes):
                    return
                late = distribute.agree_any(strategy, late)
            if late:
                self.hit = True
                self.model.stop_training = True

        def on_train_batch_end(self, batch, logs=None):
            self._check(batch % SYNC_EVERY == SYNC_EVERY - 1)

        def on_epoch_end(self, epoch, logs=None):
            self._check(True)

    class Elapsed(keras.callbacks.Callback):
        """Adds `elapsed_s` (seconds since the fit started) to each epoch's logs, so history.csv has it."""

        def on_epoch_end(self, epoch, logs=None):
            if logs is not None:
                logs["elapsed_s"] = time.monotonic() - started

    monitor = preset.monitor
    limit = TimeLimit()
    # the learning-rate schedule and weight averaging (train.recipe); the average is swapped out again right
    # after the best checkpoint and early stopping have judged it, so last.keras holds the raw weights
    before, after = schedule_callbacks(preset, preset.learning_rate, max_minutes, epochs, steps_per_epoch,
                                       started, resume)
    # (mode "min": every monitor is a loss, and Keras guesses the direction only for the names it knows)
    early = keras.callbacks.EarlyStopping(monitor=monitor, mode="min", patience=preset.patience,
                                          restore_best_weights=True, baseline=best_so_far)
    cbs = [
        Elapsed(),
        *before,
        # on --resume, the best value so far carries over: a worse first epoch must not replace model.keras
        keras.callbacks.ModelCheckpoint(str(run_dir / "model.keras"), monitor=monitor, mode="min",
                                        save_best_only=True, initial_value_threshold=best_so_far),
        early,
        *after,
        keras.callbacks.ModelCheckpoint(str(run_dir / "last.keras")),
        keras.callbacks.CSVLogger(str(run_dir / "history.csv"), append=resume),
        limit,
    ]
    if preset.lr_schedule and not preset.anneal:  # annealing sets the rate itself
        cbs.append(keras.callbacks.ReduceLROnPlateau(monitor=monitor, mode="min", factor=0.5,
                                                     patience=max(2, preset.patience // 3), min_lr=1e-5))
    return cbs, limit, early


def read_history(run_dir: Path) -> list[dict]:
    path = run_dir / "history.csv"
    if not path.exists():
        return []
    with open(path, newline="") as fh:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(fh)]


def fit(run_dir: Path, preset: Preset, train_files, val_files, *,
        epochs: int, max_minutes: float, batch_size: int, seed: int, resume: bool = False,
        progress: bool = True, extra_callbacks: list | None = None, strategy=None, is_chief: bool = True,
        mixed_precision: bool = False, init_weights: list | None = None) -> FitResult:
    """Train (or continue training) the preset's model on the files' notes.

    Args:
        run_dir: the run directory (checkpoints and history go there; on a non-chief worker, read from for
            `resume` only: its own checkpoints go to a temporary directory that is deleted).
        preset: the model and recipe.
        train_files, val_files: notes per file (a `train.data.NoteSet` or a list of arrays [N, 4]).
        epochs: upper bound on the epoch count (total, counting epochs of a resumed run).
        max_minutes: stop after this long (0 = no limit).
        batch_size: sequences per batch per replica (the global batch is this × the replicas in sync).
        seed: weights, order and augmentation.
        resume: continue from `run_dir/last.keras`.
        extra_callbacks: Keras callbacks run before improvd's own (e.g. a benchmark's probe).
        strategy: a `tf.distribute.Strategy` (`train.distribute.make_strategy`), or None for the default.
        is_chief: this process writes the run directory.
        mixed_precision: compute in float16 where it is safe (`mixed_float16`; for GPUs); `model.keras` is
            still written in float32.
        init_weights: fine-tuning: the starting model's weights (`get_weights()` of a model with the preset's
            architecture) instead of random ones; ignored on `resume` (`last.keras` holds them by then).
    """
    import keras

    length = preset.context if preset.kind == "window" else preset.seq_length
    f = len(preset.features)
    replicas = strategy.num_replicas_in_sync if strategy is not None else 1
    # (a small data set makes several passes per epoch: `epoch_rows`)
    train_source = BatchSource(train_files, preset.kind, length, f, preset.transpose, seed, True,
                               min_rows=preset.epoch_rows)
    train_data = tf_dataset(train_source, batch_size, strategy)
    val_data = None
    if len(val_files):
        val_source = BatchSource(val_files, preset.kind, length, f, 0, seed, False)
        val_data = tf_dataset(val_source, max(batch_size, 128), strategy)
    write_dir = run_dir if is_chief else Path(tempfile.mkdtemp(prefix="improvd-worker-"))
    initial_epoch = 0
    previous: list[float] = []
    if resume:
        history = read_history(run_dir)
        initial_epoch = len(history)
        previous = [h[preset.monitor] for h in history if preset.monitor in h]
        if not is_chief:
            shutil.copy(run_dir / "history.csv", write_dir / "history.csv")
    with strategy.scope() if strategy is not None else contextlib.nullcontext():
        if resume:
            model = keras.models.load_model(run_dir / "last.keras", custom_objects=_custom_objects(),
                                            compile=True, safe_mode=True)  # weights and optimizer state
            log.info("resuming %s at epoch %d", run_dir, initial_epoch + 1)
        else:
            model = build_model(preset, seed, mixed_precision)
            if init_weights is not None:
                model.set_weights(init_weights)
                log.info("starting from the given weights (fine-tuning)")
    distribute.prepare_model(model, strategy, train_source.batch(train_source.plan(0), 0, 0, 0, batch_size, 1))
    started = time.monotonic()
    cbs, limit, early = _callbacks(write_dir, preset, max_minutes, resume, started,
                                   min(previous) if previous else None, strategy, epochs,
                                   train_source.steps(batch_size * replicas))

    class Epochs(keras.callbacks.Callback):
        """Tells the batch source which epoch's plan to cut (every worker cuts the same one)."""

        def on_epoch_begin(self, epoch, logs=None):
            train_source.epoch = epoch

    cbs = [Epochs()] + (extra_callbacks or []) + cbs  # before the CSV logger, so what they add is written
    stopped_by = "epochs"
    try:
        model.fit(train_data, validation_data=val_data, epochs=epochs, initial_epoch=initial_epoch,
                  callbacks=cbs, shuffle=False, verbose=1 if progress and sys.stderr.isatty() else 2)
        if limit.hit:
            stopped_by = "time_limit"
        elif early.stopped_epoch:
            stopped_by = "early_stop"
    except KeyboardInterrupt:
        stopped_by = "interrupted"
        log.warning("interrupted: keeping the best checkpoint")
    seconds = time.monotonic() - started
    weights_sha256 = hashlib.sha256(b"".join(np.asarray(w, np.float32).tobytes()
                                             for w in model.get_weights())).hexdigest()
    history = read_history(write_dir)
    best_path = write_dir / "model.keras"
    if best_path.exists():
        model = load_keras(best_path)
    if is_mixed(model):  # what is evaluated and exported computes in float32
        model = float32_copy(model, preset)
        model.save(best_path)
    elif not best_path.exists():  # interrupted before the first epoch ended: keep what there is
        model.save(best_path)
    values = [h.get(preset.monitor, np.inf) for h in history]
    best_epoch = int(np.argmin(values)) + 1 if values else 0
    if not is_chief:
        shutil.rmtree(write_dir, ignore_errors=True)
    return FitResult(model, len(history), best_epoch, seconds, stopped_by, history, replicas,
                     batch_size * replicas, weights_sha256)


def _custom_objects() -> dict:
    from improvd.train.model import mae_with_positive_pressure, mse_with_positive_pressure, note_encoder_class
    note_encoder_class()
    return {"mse_with_positive_pressure": mse_with_positive_pressure,
            "mae_with_positive_pressure": mae_with_positive_pressure}


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=float))
    tmp.replace(path)
