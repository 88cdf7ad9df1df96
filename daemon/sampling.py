"""Pure decoding: from the model's outputs for the next note to the note that is played.

Pitch: temperature 0 takes the argmax within `pitch_range` (ties go to the lowest pitch); otherwise the logits
are divided by the temperature, pitches outside `pitch_range` are masked, and the pitch is drawn from the smallest
set of most likely pitches whose probability adds up to `top_p` (nucleus sampling), with one uniform draw from the
given `numpy.random.Generator`, so a seed reproduces a run. Step and duration are clamped to their configured
bounds. Velocity follows a policy: the model's prediction, the player's recent mean, or a fixed value.

Nothing here keeps state or touches a thread; the engine thread and `improvd generate` call it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from daemon.config import ImproviseConfig

VELOCITY_POLICIES = ("model", "follow", "fixed")


@dataclass(frozen=True)
class Decoding:
    """How predictions become notes (the `[improvise]` keys that matter to decoding).

    Attributes:
        temperature: 0 = greedy; otherwise the softmax temperature.
        top_p: nucleus sampling mass, 0 < top_p <= 1.
        pitch_range: lowest and highest MIDI pitch allowed, inclusive.
        step_range: bounds of the step in seconds, inclusive.
        duration_range: bounds of the duration in seconds, inclusive.
        velocity: "model", "follow" or "fixed".
        fixed_velocity: the velocity of "fixed" (and of "follow" before any note was heard).
    """

    temperature: float = 0.0
    top_p: float = 1.0
    pitch_range: tuple[int, int] = (0, 127)
    step_range: tuple[float, float] = (0.0, 2.0)
    duration_range: tuple[float, float] = (0.03, 4.0)
    velocity: str = "follow"
    fixed_velocity: int = 90

    def __post_init__(self):
        if self.temperature < 0 or not math.isfinite(self.temperature):
            raise ValueError(f"temperature = {self.temperature!r} is not valid: expected a number >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p = {self.top_p!r} is not valid: expected 0 < top_p <= 1")
        lo, hi = self.pitch_range
        if not 0 <= lo <= hi <= 127:
            raise ValueError(f"pitch_range = {list(self.pitch_range)!r} is not valid: expected 0 <= low <= high <= 127")
        for name in ("step_range", "duration_range"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi:
                raise ValueError(f"{name} = {list(getattr(self, name))!r} is not valid: expected 0 <= low <= high")
        if self.velocity not in VELOCITY_POLICIES:
            raise ValueError(f"velocity = {self.velocity!r} is not valid: allowed values are {VELOCITY_POLICIES}")
        if not 1 <= self.fixed_velocity <= 127:
            raise ValueError(f"fixed_velocity = {self.fixed_velocity!r} is out of range: allowed 1..127")

    @classmethod
    def from_config(cls, improvise: ImproviseConfig, *, temperature: float | None = None,
                    top_p: float | None = None) -> "Decoding":
        """The decoding of an `[improvise]` section; `temperature`/`top_p` override it (e.g. from the CLI)."""
        return cls(temperature=improvise.temperature if temperature is None else temperature,
                   top_p=improvise.top_p if top_p is None else top_p,
                   pitch_range=(int(improvise.pitch_range[0]), int(improvise.pitch_range[1])),
                   step_range=(float(improvise.step_range[0]), float(improvise.step_range[1])),
                   duration_range=(float(improvise.duration_range[0]), float(improvise.duration_range[1])),
                   velocity=improvise.velocity, fixed_velocity=int(improvise.fixed_velocity))


def log_softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable log-softmax along `axis` (float64); -inf entries stay -inf."""
    x = np.asarray(logits, dtype=np.float64)
    top = np.max(x, axis=axis, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    shifted = x - top
    with np.errstate(divide="ignore"):
        return shifted - np.log(np.sum(np.exp(shifted), axis=axis, keepdims=True))


def choose_pitch(logits: np.ndarray, temperature: float, top_p: float, pitch_range: tuple[int, int],
                 rng: np.random.Generator | None) -> int:
    """Pick the next pitch.

    Args:
        logits: [128] pitch logits (a [1, 128] row is accepted).
        temperature: 0 = argmax within `pitch_range`; > 0 = sample from softmax(logits / temperature).
        top_p: keep the smallest set of most likely pitches whose probability reaches `top_p` (1 = all).
        pitch_range: (low, high) MIDI pitches allowed, inclusive; the rest are never chosen.
        rng: the generator of the one uniform draw a sample takes; unused (may be None) when temperature is 0.

    Returns:
        A MIDI pitch in `pitch_range`.
    """
    logits = np.asarray(logits, dtype=np.float64).reshape(-1)
    lo, hi = int(pitch_range[0]), int(pitch_range[1])
    masked = np.full(logits.shape, -np.inf)
    masked[lo:hi + 1] = logits[lo:hi + 1]
    masked = np.where(np.isnan(masked), -np.inf, masked)
    if not np.isfinite(masked).any():  # nothing usable in range: every allowed pitch is equally likely
        masked[lo:hi + 1] = 0.0
    if temperature == 0:
        return int(np.argmax(masked))
    if rng is None:
        raise ValueError("sampling with temperature > 0 needs a numpy Generator")
    probs = np.exp(log_softmax(masked / temperature))
    order = np.argsort(-probs, kind="stable")
    sorted_p = probs[order]
    cum = np.cumsum(sorted_p)
    # Keep each pitch whose preceding mass is still short of top_p: the smallest set that reaches it.
    keep = (cum - sorted_p) < top_p
    keep[0] = True
    kept = sorted_p[keep]
    bounds = np.cumsum(kept) / np.sum(kept)
    u = rng.random()
    index = min(int(np.searchsorted(bounds, u, side="right")), len(kept) - 1)
    return int(order[keep][index])


def clamp(value: float, bounds: tuple[float, float]) -> float:
    """`value` clamped to the inclusive (low, high) `bounds`, as a Python float; NaN becomes low."""
    value = float(value)
    if math.isnan(value):
        return float(bounds[0])
    return float(min(max(value, bounds[0]), bounds[1]))


def choose_velocity(policy: str, *, model_velocity: float | None, player_velocity: float | None,
                    fixed_velocity: int) -> int:
    """The velocity of the next note, 1..127.

    Args:
        policy: "model" (the model's prediction; the player's mean, then `fixed_velocity`, when the model has
            none), "follow" (the player's recent mean; `fixed_velocity` before any note was heard) or "fixed".
        model_velocity: the model's predicted velocity, or None.
        player_velocity: the mean velocity of the player's recent notes, or None.
        fixed_velocity: the fixed velocity.
    """
    if policy not in VELOCITY_POLICIES:
        raise ValueError(f"velocity policy {policy!r} is not valid: allowed values are {VELOCITY_POLICIES}")
    candidates = {"model": (model_velocity, player_velocity), "follow": (player_velocity,), "fixed": ()}[policy]
    for value in candidates:
        if value is not None and math.isfinite(value):
            return int(min(max(round(value), 1), 127))
    return int(fixed_velocity)


def decode(logits: np.ndarray, step_s: float, duration_s: float, velocity: float | None, decoding: Decoding,
           rng: np.random.Generator | None, player_velocity: float | None = None) -> np.ndarray:
    """One note row [pitch, step_s, duration_s, velocity] (float64) from the model's outputs for one note.

    Greedy decoding (temperature 0) is exactly: argmax pitch within the range, `clamp(step)`, `clamp(duration)`.
    """
    pitch = choose_pitch(logits, decoding.temperature, decoding.top_p, decoding.pitch_range, rng)
    vel = choose_velocity(decoding.velocity, model_velocity=velocity, player_velocity=player_velocity,
                          fixed_velocity=decoding.fixed_velocity)
    return np.array([pitch, clamp(step_s, decoding.step_range), clamp(duration_s, decoding.duration_range), vel],
                    dtype=np.float64)
