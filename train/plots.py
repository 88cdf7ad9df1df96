"""Plots drawn with matplotlib (the 'train' extra): a run's training curves (`curves.png`, `improvd train`) and the
piano roll `improvd generate --plot` draws of its prime and continuation.

matplotlib is imported at the top: this module is imported only when a plot is asked for, so the daemon's runtime
install (no matplotlib) never loads it. Main thread of `improvd train` and `improvd generate`.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np

from improvd.core import notes as nt

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)
from matplotlib.patches import Patch  # noqa: E402


def plot_piano_roll(prime: np.ndarray, continuation: np.ndarray, cont_start_s: float, path: Path,
                    title: str) -> None:
    """Draw prime and continuation as a piano roll (seconds on x, MIDI pitch on y) to a PNG."""
    fig, ax = plt.subplots(figsize=(12, 4.5))
    for notes, start, colour, label in ((prime, 0.0, "tab:blue", "prime"),
                                        (continuation, cont_start_s, "tab:orange", "continuation")):
        if not len(notes):
            continue
        t = nt.onsets(notes, start)
        for onset, row in zip(t, notes):
            ax.broken_barh([(onset, row[nt.DURATION])], (row[nt.PITCH] - 0.4, 0.8), color=colour)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("MIDI pitch")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(handles=[Patch(color="tab:blue", label="prime"), Patch(color="tab:orange", label="continuation")],
              loc="upper right")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


def plot_curves(history: list[dict], path: Path, title: str) -> None:
    """Training and validation curves (total loss and pitch cross-entropy) to a PNG."""
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
