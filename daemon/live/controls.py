"""Live controls and thru: the [improvise] values in effect (the config's, with what CCs and OSC set on top) and the
player's notes passed through. The engine thread owns both and applies the control actions
(daemon/live/engine.py `Engine._apply_action`).

- Live control (`[control]`, daemon/control/cc.py): CCs change temperature, top_p, max_notes, key_strength and mode
  (from the next note; they stay across a reload: `LiveSettings`), mute (cancels the answer; phrases are still
  fed), panic (every sounding note released at once, improvd's and thru, an All Notes Off on the output channel,
  the answer and the pending phrase dropped), reload (`on_reload_request()` is called; the service reloads), forget
  (the session memory of `improvise.adapt` is cleared). Each CC is logged at debug.
- OSC (`[osc]`, daemon/io/osc.py): `Engine.control(action)` (any thread) queues a `control.Action`, applied in the
  engine thread as a CC's; besides the CC functions it may set `key` and `answer_length`, and `forget` (with
  adaptation off it logs "forget: no session memory").
- Session adaptation (`improvise.adapt = "cache"`, daemon/predict/adapt.py): the player's notes are fed with
  `player=True`, so the Improviser's `SessionAdapter` learns from them (improvd's own notes only extend its
  context); `Engine.forget()` clears it from any thread (at the engine's next wake-up). A reload keeps the memory
  unless `adapt_memory` changed or adaptation was turned off.
- Thru (`midi.thru`): the player's note-ons and note-offs on the listened channels are sent at once through the
  scheduler, each as a tracked note (so panic, Stop and exit release it; a key held past `improvise.max_hold` is
  released then).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import mido

from improvd.core.config import Config, ImproviseConfig
from improvd.daemon.control.cc import ControlMap
from improvd.daemon.live.scheduler import Scheduler
from improvd.daemon.music import turns
from improvd.daemon.predict.improviser import Decoding

ALL_NOTES_OFF = 123  # the channel mode message panic sends (CC 123)


def all_notes_off(channel: int) -> mido.Message:
    """The All Notes Off message for `channel` (0-based)."""
    return mido.Message("control_change", control=ALL_NOTES_OFF, value=0, channel=channel)


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


class Thru:
    """The thru notes sounding, each a scheduler note ended by its note id (the scheduler owner is this object)."""

    def __init__(self, scheduler: Scheduler, now: Callable[[], float]):
        self._scheduler = scheduler
        self._now = now
        self._notes: dict[tuple[int, int], int] = {}  # (channel, pitch) -> the scheduler's note id

    def handle(self, msg: mido.Message, channels, max_hold_s: float) -> None:
        """A player's note-on or note-off: passed through at once (`channels`: those listened to, empty for all)."""
        key = (msg.channel, msg.note)
        if msg.type == "note_on" and msg.velocity > 0:
            if channels and msg.channel not in channels:
                return
            old = self._notes.pop(key, None)
            if old is not None:
                self._scheduler.end_note(old)
            now = self._now()
            self._notes[key] = self._scheduler.schedule_note(now, now + max_hold_s, msg.note, msg.velocity,
                                                             channel=msg.channel, owner=self)
        else:
            note_id = self._notes.pop(key, None)
            if note_id is not None:
                self._scheduler.end_note(note_id)  # O(log n): a flood of releases rebuilds no heap

    def release(self) -> None:
        """Release the thru notes sounding now (transport Stop); a key's later release then sends nothing."""
        for note_id in self._notes.values():
            self._scheduler.end_note(note_id)
        self._notes.clear()

    def forget(self) -> None:
        """Forget the thru notes, which the scheduler has already released (panic)."""
        self._notes.clear()
