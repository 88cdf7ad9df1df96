"""Hot swap, the engine's side of a reload: the pending request (`Engine.request_swap`, main thread) and the new Improviser
built for it (engine thread, between phrases: when no answer is playing; in continuous mode at the next chunk
boundary).

The new Improviser is primed with the last notes the old one was fed. A swap is all or nothing: when priming the new
model fails, the running config and model stay (logged). [midi] (ports, channels, thru, program) and [record] are
read at start only: a swap keeps the running ones, so the channels improvd plays and hears, and the thru notes
sounding, are what they were (the service tells the user so). The session memory of `improvise.adapt` is kept
unless `adapt_memory` changed or adaptation was turned off; the random generator is kept unless the seed changed.
"""

from __future__ import annotations

import logging
import threading
from typing import NamedTuple

import numpy as np

from improvd.core.config import Config
from improvd.daemon.live.settings import LiveSettings
from improvd.daemon.music.context import is_auto_key
from improvd.daemon.predict.adapt import SessionAdapter
from improvd.daemon.predict.improviser import Decoding, Improviser
from improvd.daemon.predict.model import StepModel

log = logging.getLogger("improvd.engine")


def make_rng(seed: int) -> np.random.Generator:
    """The sampling generator for `improvise.seed` (negative: unseeded)."""
    return np.random.default_rng(None if seed < 0 else seed)


def adapter_for(config: Config, current: SessionAdapter | None) -> SessionAdapter | None:
    """The session adapter `config` asks for: the current one (its memory kept across a reload) if the bound and
    what it adapts are unchanged, a new one if they changed, None when adaptation is off."""
    imp = config.improvise
    if imp.adapt == "off":
        return None
    timing = imp.adapt == "cache"  # "pitch": pitch only
    if current is not None and current.memory == imp.adapt_memory and current.adapts_timing == timing:
        return current
    return SessionAdapter(imp.adapt_memory, timing=timing)


class Swap(NamedTuple):
    """A reload ready to apply: the config (with the running [midi] and [record]), the model, its Improviser and
    random generator."""

    config: Config
    model: StepModel
    improviser: Improviser
    rng: np.random.Generator


class PendingSwap:
    """The latest reload request: any thread requests, the engine thread takes it (a later request replaces an
    earlier one)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: tuple[Config, StepModel] | None = None

    def request(self, config: Config, model: StepModel) -> None:
        with self._lock:
            self._pending = (config, model)

    @property
    def pending(self) -> bool:
        with self._lock:
            return self._pending is not None

    def take(self) -> tuple[Config, StepModel] | None:
        with self._lock:
            pending, self._pending = self._pending, None
        return pending


def prepare(config: Config, model: StepModel, *, running: Config, settings: LiveSettings,
            scale_pcs: tuple[int, ...] | None, improviser: Improviser, rng: np.random.Generator) -> Swap | None:
    """Build what a reload to `config` and `model` plays with, from the running config, the live settings, the
    estimated key's pitch classes, the running Improviser and generator; None (logged) when the new model fails
    while being primed."""
    config = config.replace(midi=running.midi, record=running.record)
    if config.improvise.seed != running.improvise.seed:
        rng = make_rng(config.improvise.seed)
    imp = settings.over(config.improvise)
    history = improviser.history
    try:
        new = Improviser(model, Decoding.from_config(imp, scale_pcs=scale_pcs if is_auto_key(imp.key) else None),
                         rng=rng, adapter=adapter_for(config, improviser.adapter))
        if len(history):
            new.prime(history[-model.context:])
    except Exception as err:
        log.error("reload failed: the new model %s could not be primed (%s: %s); improvd keeps the running "
                  "config and model", model.path, type(err).__name__, err)
        return None
    return Swap(config, model, new, rng)
