"""Pure decoding: from the model's outputs for the next note to the note that is played.

Pitch: temperature 0 takes the argmax within `pitch_range` (ties go to the lowest pitch); otherwise the logits
are divided by the temperature, pitches outside `pitch_range` are masked, and the pitch is drawn from the smallest
set of most likely pitches whose probability adds up to `top_p` (nucleus sampling), with one uniform draw from the
given `numpy.random.Generator`, so a seed reproduces a run.

Key: with a scale (`scale_pcs`, pitch classes) and `key_strength` s, the probability of every pitch outside the
scale is multiplied by (1 - s) after the temperature and before top-p, then renormalised; in logits that is adding
log(1 - s) to the out-of-scale ones. At s = 1 they are masked (never chosen), at s = 0 nothing changes. Greedy
decoding takes the argmax of logits + log(1 - s) on the out-of-scale pitches, so at s = 1 it too stays in the scale.
If no pitch of the scale lies in `pitch_range`, the key is ignored (the range wins).

Step and duration are clamped to their configured bounds. Velocity follows a policy: the model's prediction, the
player's recent mean, or a fixed value.

Nothing here keeps state or touches a thread; the engine thread and `improvd generate` call it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from improvd.core.config import ImproviseConfig
from improvd.core.notes import NUM_PITCHES

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
        scale_pcs: pitch classes (0..11) of the key's scale, or None for no key.
        key_strength: 0..1, how strongly out-of-scale pitches are suppressed (1 = never played).
    """

    temperature: float = 0.0
    top_p: float = 1.0
    pitch_range: tuple[int, int] = (0, 127)
    step_range: tuple[float, float] = (0.0, 2.0)
    duration_range: tuple[float, float] = (0.03, 4.0)
    velocity: str = "follow"
    fixed_velocity: int = 90
    scale_pcs: tuple[int, ...] | None = None
    key_strength: float = 0.0

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
        if not 0 <= self.key_strength <= 1:
            raise ValueError(f"key_strength = {self.key_strength!r} is out of range: allowed 0..1")
        if self.scale_pcs is not None and not all(0 <= pc <= 11 for pc in self.scale_pcs):
            raise ValueError(f"scale_pcs = {self.scale_pcs!r} is not valid: expected pitch classes 0..11")

    @classmethod
    def from_config(cls, improvise: ImproviseConfig, *, temperature: float | None = None,
                    top_p: float | None = None, scale_pcs: tuple[int, ...] | None = None) -> "Decoding":
        """The decoding of an `[improvise]` section; `temperature`/`top_p` override it (e.g. from the CLI).

        The scale is `improvise.key`'s; with key "auto" it is `scale_pcs` (the caller's estimate; None = none yet).
        """
        from improvd.daemon.music.keys import parse_key

        setting = improvise.key.strip().lower()
        if setting == "auto":
            pcs = tuple(scale_pcs) if scale_pcs is not None else None
        else:
            key = parse_key(improvise.key)
            pcs = key.pitch_classes if key is not None else None
        return cls(temperature=improvise.temperature if temperature is None else temperature,
                   top_p=improvise.top_p if top_p is None else top_p,
                   pitch_range=(int(improvise.pitch_range[0]), int(improvise.pitch_range[1])),
                   step_range=(float(improvise.step_range[0]), float(improvise.step_range[1])),
                   duration_range=(float(improvise.duration_range[0]), float(improvise.duration_range[1])),
                   velocity=improvise.velocity, fixed_velocity=int(improvise.fixed_velocity),
                   scale_pcs=pcs, key_strength=float(improvise.key_strength) if setting != "none" else 0.0)


def log_softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable log-softmax along `axis` (float64); -inf entries stay -inf."""
    x = np.asarray(logits, dtype=np.float64)
    top = np.max(x, axis=axis, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    shifted = x - top
    with np.errstate(divide="ignore"):
        return shifted - np.log(np.sum(np.exp(shifted), axis=axis, keepdims=True))


_PITCH_CLASS = np.arange(NUM_PITCHES) % 12


def key_penalty(scale_pcs, key_strength: float) -> np.ndarray | None:
    """float64 [128]: 0 for the pitches of the scale, log(1 - key_strength) (-inf at 1) for the others; None when
    there is no key or the strength is 0."""
    if scale_pcs is None or key_strength <= 0:
        return None
    in_scale = np.zeros(12, dtype=bool)
    in_scale[list(scale_pcs)] = True
    with np.errstate(divide="ignore"):
        out = np.log1p(-min(float(key_strength), 1.0))
    return np.where(in_scale[_PITCH_CLASS], 0.0, out)


def choose_pitch(logits: np.ndarray, temperature: float, top_p: float, pitch_range: tuple[int, int],
                 rng: np.random.Generator | None, *, scale_pcs=None, key_strength: float = 0.0) -> int:
    """Pick the next pitch.

    Args:
        logits: [128] pitch logits (a [1, 128] row is accepted).
        temperature: 0 = argmax within `pitch_range`; > 0 = sample from softmax(logits / temperature).
        top_p: keep the smallest set of most likely pitches whose probability reaches `top_p` (1 = all).
        pitch_range: (low, high) MIDI pitches allowed, inclusive; the rest are never chosen.
        rng: the generator of the one uniform draw a sample takes; unused (may be None) when temperature is 0.
        scale_pcs: pitch classes 0..11 of a key's scale, or None.
        key_strength: 0..1; out-of-scale probabilities are multiplied by 1 - key_strength (see the module doc).

    Returns:
        A MIDI pitch in `pitch_range` (and in the scale when key_strength is 1 and the scale meets the range).
    """
    logits = np.asarray(logits, dtype=np.float64).reshape(-1)
    lo, hi = int(pitch_range[0]), int(pitch_range[1])
    masked = np.full(logits.shape, -np.inf)
    masked[lo:hi + 1] = logits[lo:hi + 1]
    masked = np.where(np.isnan(masked), -np.inf, masked)
    if not np.isfinite(masked).any():  # nothing usable in range: every allowed pitch is equally likely
        masked[lo:hi + 1] = 0.0
    penalty = key_penalty(scale_pcs, key_strength)
    if penalty is not None and not np.isfinite(masked + penalty).any():
        # Nothing finite left with the key: its scale pitches in range only had -inf logits (or there are none).
        in_range_scale = np.zeros(128, dtype=bool)
        in_range_scale[lo:hi + 1] = np.isfinite(penalty[lo:hi + 1])
        if in_range_scale.any():
            masked = np.where(in_range_scale, 0.0, -np.inf)  # every scale pitch in range equally likely
        penalty = None
    if temperature == 0:
        return int(np.argmax(masked if penalty is None else masked + penalty))
    if rng is None:
        raise ValueError("sampling with temperature > 0 needs a numpy Generator")
    scaled = masked / temperature
    if penalty is not None:
        scaled = scaled + penalty
    probs = np.exp(log_softmax(scaled))
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
    pitch = choose_pitch(logits, decoding.temperature, decoding.top_p, decoding.pitch_range, rng,
                         scale_pcs=decoding.scale_pcs, key_strength=decoding.key_strength)
    vel = choose_velocity(decoding.velocity, model_velocity=velocity, player_velocity=player_velocity,
                          fixed_velocity=decoding.fixed_velocity)
    return np.array([pitch, clamp(step_s, decoding.step_range), clamp(duration_s, decoding.duration_range), vel],
                    dtype=np.float64)
