"""The player's pulse and the time scale between the player's tempo and the model's.

The model learned steps and durations in seconds at its training data's tempo. With `timing.follow_tempo`, the
engine measures the player's pulse as the median inter-onset interval (IOI) of what they just played, and divides
it by the model's own median IOI (`reference_ioi_s`: `timing.reference_ioi`, else the model card's, else 0.5 s):

    time_scale = player median IOI / reference IOI        (clamped to timing.time_scale_range)

Going into the model, the player's steps and durations are divided by `time_scale`; coming out, the model's predicted
steps and durations are multiplied by it. A phrase played twice as fast thus reaches the model as the same phrase,
and its answer comes twice as fast.

IOIs that are chords (<= `CHORD_S`) or longer than `MAX_IOI_S` (a pause, not a pulse) are left out.

Pure functions; the engine thread calls them.
"""

from __future__ import annotations

import math

import numpy as np

DEFAULT_REFERENCE_IOI_S = 0.5
CHORD_S = 0.03  # an IOI or predicted step up to this is a chord (quantized, a longer step takes a grid step)
MAX_IOI_S = 2.0
# The player's pulse folded into this range by doubling or halving is taken as the beat (75..150 bpm).
BEAT_RANGE_S = (0.4, 0.8)
# Where a model card may carry its training data's median IOI (seconds), first found wins.
CARD_KEYS = (("timing", "median_ioi_s"), ("data", "median_ioi_s"), ("data", "median_step_s"), ("median_ioi_s",))


def reference_ioi_s(card: dict | None, configured_s: float = 0.0) -> float:
    """The model's median IOI in seconds: `configured_s` if > 0, else the card's (see `CARD_KEYS`), else 0.5."""
    if configured_s and configured_s > 0:
        return float(configured_s)
    for path in CARD_KEYS:
        node = card or {}
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, (int, float)) and not isinstance(node, bool) and math.isfinite(node) and node > 0:
            return float(node)
    return DEFAULT_REFERENCE_IOI_S


def median_ioi_s(onsets_s, *, chord_s: float = CHORD_S, max_s: float = MAX_IOI_S) -> float | None:
    """The median of the intervals between successive sorted onsets that are longer than `chord_s` and at most
    `max_s` seconds; None when there is none."""
    onsets = np.sort(np.asarray(onsets_s, dtype=np.float64).reshape(-1))
    iois = np.diff(onsets)
    iois = iois[(iois > chord_s) & (iois <= max_s)]
    return float(np.median(iois)) if len(iois) else None


def time_scale(player_ioi_s: float | None, reference_s: float, bounds: tuple[float, float] = (0.25, 4.0),
               *, previous: float = 1.0) -> float:
    """player_ioi_s / reference_s clamped to `bounds`; `previous` when there is no measurement."""
    if player_ioi_s is None or not player_ioi_s > 0 or not reference_s > 0:
        return previous
    return float(min(max(player_ioi_s / reference_s, bounds[0]), bounds[1]))


def beat_from_ioi(ioi_s: float, beat_range_s: tuple[float, float] = BEAT_RANGE_S) -> float:
    """The player's pulse taken as a quarter note: `ioi_s` doubled or halved into [low, high) seconds."""
    if not ioi_s > 0:
        raise ValueError(f"ioi_s must be > 0, got {ioi_s!r}")
    lo, hi = beat_range_s
    beat = float(ioi_s)
    while beat < lo:
        beat *= 2.0
    while beat >= hi:
        beat /= 2.0
    return beat
