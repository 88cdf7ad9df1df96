"""Training runs: a run directory, the fit loop with its callbacks, and what is written at the end.

A run directory holds `model.keras` (the best weights), `last.keras` (for `--resume`), `config.json` (the
resolved config and preset), `split.json`, `history.csv`, `metrics.json` and `curves.png`. Ctrl-C (SIGINT) stops
the fit cleanly and keeps the best checkpoint.
"""

from __future__ import annotations

import csv
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from train.batches import batch_dataset
from train.model import Preset, build_model, load_keras

log = logging.getLogger(__name__)


@dataclass
class FitResult:
    model: object
    epochs: int
    best_epoch: int
    seconds: float
    stopped_by: str          # "early_stop", "epochs", "time_limit", "interrupted"
    history: list[dict]


def _callbacks(run_dir: Path, preset: Preset, max_minutes: float, resume: bool, started: float,
               best_so_far: float | None = None):
    import keras

    class TimeLimit(keras.callbacks.Callback):
        """Stops after `max_minutes` of training (checked at the end of each epoch and each batch)."""

        def __init__(self):
            super().__init__()
            self.hit = False

        def _check(self):
            if max_minutes and time.monotonic() - started > max_minutes * 60:
                self.hit = True
                self.model.stop_training = True

        def on_train_batch_end(self, batch, logs=None):
            self._check()

        def on_epoch_end(self, epoch, logs=None):
            self._check()

    class Elapsed(keras.callbacks.Callback):
        """Adds `elapsed_s` (seconds since the fit started) to each epoch's logs, so history.csv has it."""

        def on_epoch_end(self, epoch, logs=None):
            if logs is not None:
                logs["elapsed_s"] = time.monotonic() - started

    monitor = preset.monitor
    limit = TimeLimit()
    cbs = [
        Elapsed(),
        # on --resume, the best value so far carries over: a worse first epoch must not replace model.keras
        keras.callbacks.ModelCheckpoint(str(run_dir / "model.keras"), monitor=monitor, save_best_only=True,
                                        initial_value_threshold=best_so_far),
        keras.callbacks.ModelCheckpoint(str(run_dir / "last.keras")),
        keras.callbacks.CSVLogger(str(run_dir / "history.csv"), append=resume),
        keras.callbacks.EarlyStopping(monitor=monitor, patience=preset.patience, restore_best_weights=True,
                                      baseline=best_so_far),
        limit,
    ]
    if preset.lr_schedule:
        cbs.append(keras.callbacks.ReduceLROnPlateau(monitor=monitor, factor=0.5,
                                                     patience=max(2, preset.patience // 3), min_lr=1e-5))
    return cbs, limit, cbs[4]


def read_history(run_dir: Path) -> list[dict]:
    path = run_dir / "history.csv"
    if not path.exists():
        return []
    with open(path, newline="") as fh:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(fh)]


def fit(run_dir: Path, preset: Preset, train_files: list[np.ndarray], val_files: list[np.ndarray], *,
        epochs: int, max_minutes: float, batch_size: int, seed: int, resume: bool = False,
        progress: bool = True, extra_callbacks: list | None = None) -> FitResult:
    """Train (or continue training) the preset's model on the files' notes.

    Args:
        run_dir: the run directory (checkpoints and history go there).
        preset: the model and recipe.
        train_files, val_files: notes per file (float64 [N, 4]).
        epochs: upper bound on the epoch count (total, counting epochs of a resumed run).
        max_minutes: stop after this long (0 = no limit).
        batch_size: sequences per batch.
        seed: weights, order and augmentation.
        resume: continue from `run_dir/last.keras`.
        extra_callbacks: Keras callbacks run before improvd's own (e.g. a benchmark's probe).
    """
    import keras

    length = preset.context if preset.kind == "window" else preset.seq_length
    f = len(preset.features)
    train_data = batch_dataset(train_files, preset.kind, length, f, batch_size, preset.transpose, seed, True)
    val_data = batch_dataset(val_files, preset.kind, length, f, max(batch_size, 128), 0, seed, False) \
        if val_files else None
    initial_epoch = 0
    if resume:
        model = keras.models.load_model(run_dir / "last.keras", custom_objects=_custom_objects(), compile=True,
                                        safe_mode=True)  # weights and optimizer state
        initial_epoch = len(read_history(run_dir))
        log.info("resuming %s at epoch %d", run_dir, initial_epoch + 1)
    else:
        model = build_model(preset, seed)
    started = time.monotonic()
    previous = [h[preset.monitor] for h in read_history(run_dir) if preset.monitor in h] if resume else []
    cbs, limit, early = _callbacks(run_dir, preset, max_minutes, resume, started,
                                   min(previous) if previous else None)
    cbs = (extra_callbacks or []) + cbs  # before the CSV logger, so what they add to the logs is written
    stopped_by = "epochs"
    try:
        model.fit(train_data, validation_data=val_data, epochs=epochs, initial_epoch=initial_epoch,
                  callbacks=cbs, verbose=1 if progress and sys.stderr.isatty() else 2)
        if limit.hit:
            stopped_by = "time_limit"
        elif early.stopped_epoch:
            stopped_by = "early_stop"
    except KeyboardInterrupt:
        stopped_by = "interrupted"
        log.warning("interrupted: keeping the best checkpoint")
    seconds = time.monotonic() - started
    history = read_history(run_dir)
    best_path = run_dir / "model.keras"
    if best_path.exists():
        model = load_keras(best_path)
    else:  # interrupted before the first epoch ended: keep what there is
        model.save(best_path)
    values = [h.get(preset.monitor, np.inf) for h in history]
    best_epoch = int(np.argmin(values)) + 1 if values else 0
    return FitResult(model, len(history), best_epoch, seconds, stopped_by, history)


def _custom_objects() -> dict:
    from train.model import mae_with_positive_pressure, mse_with_positive_pressure, note_encoder_class
    note_encoder_class()
    return {"mse_with_positive_pressure": mse_with_positive_pressure,
            "mae_with_positive_pressure": mae_with_positive_pressure}


def plot_curves(history: list[dict], path: Path, title: str) -> None:
    """Training and validation curves (total loss and pitch cross-entropy) to a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    epochs = np.arange(1, len(history) + 1)
    for ax, key, label in ((axes[0], "loss", "total loss"), (axes[1], "pitch_loss", "pitch cross-entropy")):
        for prefix, style in (("", "-"), ("val_", "--")):
            values = [h.get(prefix + key) for h in history]
            if any(v is not None for v in values):
                ax.plot(epochs, values, style, label=("validation " if prefix else "training ") + label)
        ax.set_xlabel("epoch")
        ax.set_title(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=float))
    tmp.replace(path)
