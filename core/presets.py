"""The training presets: each fixes a model's architecture and how it is trained (pure data, no TensorFlow).

The config's `train.preset` is checked against these names (core/config.py), `improvd train` builds and fits the
model a preset describes (train/model.py, train/fit.py), and fine-tuning keeps the starting model's architecture
(train/init.py). Read by the main thread of `improvd train` and by the config loader.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from improvd.core.modelformat import FEATURES_3, FEATURES_4


@dataclass(frozen=True)
class Preset:
    """Everything that defines a model and how it is trained."""

    name: str
    kind: str                           # "window" or "sequence"
    features: tuple[str, ...]
    context: int = 25                   # window length (window kind) and the evaluation context
    seq_length: int = 64                # training chunk length (sequence kind)
    units: tuple[int, ...] = (128,)
    embedding: int = 0                  # pitch embedding size (sequence kind)
    dropout: float = 0.0
    loss_weights: dict = field(default_factory=lambda: {"pitch": 0.05, "step": 1.0, "duration": 1.0})
    time_loss: str = "mse"              # "mse" or "mae", each with the tutorial's positive pressure
    learning_rate: float = 0.005
    lr_schedule: bool = False           # halve the rate when validation loss stalls
    batch_size: int = 64
    epochs: int = 50
    patience: int = 5
    monitor: str = "loss"               # early stopping and best checkpoint on "loss" or "val_loss"
    transpose: int = 0                  # augmentation: random shifts in -transpose..transpose semitones
    clipnorm: float | None = None
    # the schedule and weight averaging of train.recipe (what fine-tuning uses; off in the presets)
    warmup_steps: int = 0               # linear warm-up of the learning rate over this many batches
    anneal: bool = False                # cosine decay of the rate to the end of the budget (time limit or epochs)
    average: float = 0.0                # decay of a moving average of the weights (0 = off), per batch
    epoch_rows: int = 0                 # an epoch makes whole passes over the training data until it has at
                                        # least this many rows (0 = one pass): fewer validations per step

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PRESETS = {
    "tutorial": Preset(name="tutorial", kind="window", features=FEATURES_3),
    "default": Preset(
        name="default", kind="sequence", features=FEATURES_4, seq_length=64, units=(256,), embedding=48,
        dropout=0.3, loss_weights={"pitch": 1.0, "step": 1.0, "duration": 0.5, "velocity": 0.05},
        time_loss="mae", learning_rate=0.002, lr_schedule=True, batch_size=32, epochs=400, patience=12,
        monitor="val_loss", transpose=6, clipnorm=1.0),
    "tiny": Preset(
        name="tiny", kind="sequence", features=FEATURES_4, seq_length=16, units=(16,), embedding=8,
        dropout=0.0, loss_weights={"pitch": 1.0, "step": 1.0, "duration": 1.0, "velocity": 0.05},
        learning_rate=0.01, batch_size=16, epochs=3, patience=2, monitor="val_loss", transpose=2),
}


def get_preset(name: str) -> Preset:
    """The preset called `name`; ValueError lists the valid ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}") from None
