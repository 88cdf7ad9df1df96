"""Batches cut on the fly from the notes of each file: memory grows with notes, never with notes × window.

`chunk_plan` and `window_plan` return small index arrays (file, start); `make_batch` slices the notes when a
batch is asked for. Keras sees them through `NoteBatches` (a `keras.utils.PyDataset`).
"""

from __future__ import annotations

import numpy as np

from daemon import notes as nt


def chunk_plan(lengths: np.ndarray, seq_length: int, rng: np.random.Generator | None) -> np.ndarray:
    """(file, start) of the training chunks of one epoch for the sequence kind.

    Each file is cut into consecutive chunks of `seq_length` targets (seq_length + 1 notes) from a random
    phase (or phase 0 without `rng`), so one epoch sees each note about once.
    """
    rows = []
    for f, n in enumerate(lengths):
        if n < 2:
            continue
        phase = int(rng.integers(0, seq_length)) if rng is not None and n > seq_length + 1 else 0
        starts = np.arange(phase, max(n - 1, 1), seq_length)
        if phase and rng is not None:
            starts = np.concatenate([[0], starts])  # the opening of the piece is trained too
        rows.append(np.stack([np.full(len(starts), f), starts], axis=1))
    plan = np.concatenate(rows) if rows else np.zeros((0, 2), dtype=np.int64)
    if rng is not None:
        rng.shuffle(plan)
    return plan


def window_plan(lengths: np.ndarray, context: int) -> np.ndarray:
    """(file, start) of every window of `context` notes that has a next note (the tutorial kind)."""
    rows = [np.stack([np.full(n - context, f), np.arange(n - context)], axis=1)
            for f, n in enumerate(lengths) if n > context]
    return np.concatenate(rows) if rows else np.zeros((0, 2), dtype=np.int64)


def transpose_shift(chunk: np.ndarray, max_shift: int, rng: np.random.Generator) -> int:
    """A random shift in -max_shift..max_shift that keeps every pitch of `chunk` in 0..127."""
    lo, hi = chunk[:, nt.PITCH].min(), chunk[:, nt.PITCH].max()
    low = int(max(-max_shift, -lo))
    high = int(min(max_shift, 127 - hi))
    return int(rng.integers(low, high + 1)) if high >= low else 0


def make_batch(files: list[np.ndarray], plan: np.ndarray, kind: str, length: int, num_features: int,
               transpose: int = 0, rng: np.random.Generator | None = None):
    """Inputs, targets and sample weights for the (file, start) rows of `plan`.

    Sequence kind: inputs [B, length, F] raw notes, targets the next note at every position, weight 0 on
    padding. Window kind: inputs [B, length, 3] with pitch / 128 (the tutorial's), targets the next note only.
    """
    b = len(plan)
    x = np.zeros((b, length, num_features), dtype=np.float32)
    seq = kind == "sequence"
    shape = (b, length) if seq else (b,)
    y = {"pitch": np.zeros(shape, dtype=np.int32), "step": np.zeros(shape + (1,), np.float32),
         "duration": np.zeros(shape + (1,), np.float32)}
    if num_features > 3:
        y["velocity"] = np.zeros(shape + (1,), np.float32)
    w = np.zeros(shape, dtype=np.float32)
    for row, (f, start) in enumerate(plan):
        chunk = files[f][start:start + length + 1]
        if transpose and rng is not None:
            chunk = chunk.copy()
            chunk[:, nt.PITCH] += transpose_shift(chunk, transpose, rng)
        inputs, targets = chunk[:-1], chunk[1:] if seq else chunk[length:length + 1]
        x[row, :len(inputs)] = inputs[:, :num_features]
        n = len(targets)
        sl = (row, slice(0, n)) if seq else (row,)
        t = targets if seq else targets[0]
        y["pitch"][sl] = t[..., nt.PITCH]
        y["step"][sl] = t[..., nt.STEP, None] if seq else t[nt.STEP]
        y["duration"][sl] = t[..., nt.DURATION, None] if seq else t[nt.DURATION]
        if "velocity" in y:
            y["velocity"][sl] = (t[..., nt.VELOCITY, None] if seq else t[nt.VELOCITY]) / 127.0
        w[sl] = 1.0
    if not seq:
        x[..., nt.PITCH] /= 128.0
    return x, y, w


def batch_dataset(files: list[np.ndarray], kind: str, length: int, num_features: int, batch_size: int,
                  transpose: int = 0, seed: int | None = None, shuffle: bool = True):
    """A `keras.utils.PyDataset` over `files` (a new chunk phase and shuffle each epoch when `shuffle`)."""
    import keras

    lengths = np.array([len(f) for f in files])

    class NoteBatches(keras.utils.PyDataset):
        def __init__(self):
            super().__init__()
            self.epoch = 0
            self.rng = np.random.default_rng(seed)
            self._new_plan()

        def _new_plan(self):
            if kind == "sequence":
                self.plan = chunk_plan(lengths, length, self.rng if shuffle else None)
            else:
                self.plan = window_plan(lengths, length)
                if shuffle:
                    self.plan = self.plan[self.rng.permutation(len(self.plan))]

        def __len__(self):
            return max(1, int(np.ceil(len(self.plan) / batch_size)))

        def __getitem__(self, i):
            rows = self.plan[i * batch_size:(i + 1) * batch_size]
            x, y, w = make_batch(files, rows, kind, length, num_features,
                                 transpose if shuffle else 0, self.rng)
            return x, y, {k: w for k in y}

        def on_epoch_end(self):
            self.epoch += 1
            self._new_plan()

    return NoteBatches()
