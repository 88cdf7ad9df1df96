"""The settings in effect: the config in use, its CC mapping, and the [improvise] values the engine plays with: the
config's, with the values live controls (CCs, OSC) set on top, which stay across a reload (daemon/live/controls.py).
Owned by the engine thread; the engine's parts read it.
"""

from __future__ import annotations

import dataclasses

from improvd.core.config import Config, ImproviseConfig
from improvd.daemon.control.cc import ControlMap
from improvd.daemon.music import turns
from improvd.daemon.predict.improviser import Decoding


class LiveSettings:
    """The config in use, its CC mapping, and the [improvise] values in effect: the config's, with the values live
    controls set on top (those stay across a reload)."""

    def __init__(self, config: Config):
        self.live: dict = {}  # [improvise] values set by CCs and OSC
        self.configure(config)

    def configure(self, config: Config) -> None:
        """Take a config (start-up, reload); the live values stay on top."""
        self.config = config
        self.control = ControlMap(config.control)
        self._refresh()

    def set(self, name: str, value) -> None:
        """Set an [improvise] value live (a CC's or OSC's)."""
        self.live[name] = value
        self._refresh()

    def over(self, improvise: ImproviseConfig) -> ImproviseConfig:
        """`improvise` with the live values on top."""
        return dataclasses.replace(improvise, **self.live)

    def decoding(self, scale_pcs: tuple[int, ...] | None) -> Decoding:
        """The decoding the values in effect ask for, bound to `scale_pcs` (an estimated key) with key "auto"."""
        return Decoding.from_config(self.improvise, scale_pcs=scale_pcs)

    def _refresh(self) -> None:
        self.improvise = self.over(self.config.improvise)
        self.answer_length = turns.parse_answer_length(self.improvise.answer_length)
