"""Live control by MIDI control change (CC): the `[control]` mapping from CC numbers to what they change.

`ControlMap.handle(msg)` turns one control-change message into the `Action`s it means (pure: no thread, no clock).
Values 0..127 map as follows (`lo`, `hi` from the config's `*_range` keys):

| function | kind | value 0..127 becomes |
| --- | --- | --- |
| temperature | knob | lo + (hi - lo) × value / 127 (default 0.0..2.0; 0 = greedy) |
| top_p | knob | lo + (hi - lo) × value / 127 (default 0.5..1.0) |
| max_notes | knob | round(lo + (hi - lo) × value / 127) notes (default 1..64) |
| key_strength | knob | value / 127 (0..1) |
| mode | switch | value >= 64: "continuous", else "respond" |
| mute | switch | value >= 64: muted (improvd listens but does not play) |
| panic | button | acts when the value goes from below 64 to 64 or more: release everything now |
| reload | button | the same edge: reload the config and the model (as SIGHUP does) |
| forget | button | the same edge: clear the session memory of `improvise.adapt` (daemon/predict/adapt.py) |

Buttons act on the rising edge so that a button sending 127 on press and 0 on release acts once. CCs on other
channels than `control.channel` (1..16; 0 = any) and unmapped CC numbers give no action.

The engine thread owns a `ControlMap` and applies the actions.
"""

from __future__ import annotations

from typing import NamedTuple

import mido

from improvd.core.config import CONTROL_FUNCTIONS, ControlConfig

KNOBS = ("temperature", "top_p", "max_notes", "key_strength")
SWITCHES = ("mode", "mute")
BUTTONS = ("panic", "reload", "forget")
ON = 64  # switches and buttons: value >= 64 is on


class Action(NamedTuple):
    """What a CC asks for: `function` (a `CONTROL_FUNCTIONS` name) and its new value (None for buttons)."""

    function: str
    value: object = None


class ControlMap:
    """Maps control-change messages to actions (see the module docstring).

    Args:
        config: the `[control]` section.
    """

    def __init__(self, config: ControlConfig):
        self.config = config
        self.channel = config.channel - 1 if config.channel > 0 else None  # 0-based, None = any
        self._by_cc: dict[int, str] = {getattr(config, f): f for f in CONTROL_FUNCTIONS if getattr(config, f) >= 0}
        self._last: dict[int, int] = {}

    @property
    def mapped(self) -> dict[int, str]:
        """CC number -> function, for the mapped CCs."""
        return dict(self._by_cc)

    def function_of(self, msg: mido.Message) -> str | None:
        """The function a control-change message is mapped to (channel and number), or None."""
        if msg.type != "control_change" or (self.channel is not None and msg.channel != self.channel):
            return None
        return self._by_cc.get(msg.control)

    def handle(self, msg: mido.Message) -> list[Action]:
        """The actions of one message ([] for anything that is not a mapped CC)."""
        function = self.function_of(msg)
        if function is None:
            return []
        value = int(msg.value)
        previous = self._last.get(msg.control)
        self._last[msg.control] = value
        if function in BUTTONS:
            pressed = value >= ON and (previous is None or previous < ON)
            return [Action(function)] if pressed else []
        if function == "mode":
            return [Action("mode", "continuous" if value >= ON else "respond")]
        if function == "mute":
            return [Action("mute", value >= ON)]
        return [Action(function, self.scale(function, value))]

    def scale(self, function: str, value: int) -> float | int:
        """A knob's value 0..127 on its range."""
        c = self.config
        lo, hi = {"temperature": c.temperature_range, "top_p": c.top_p_range, "max_notes": c.max_notes_range,
                  "key_strength": (0.0, 1.0)}[function]
        scaled = lo + (hi - lo) * min(max(value, 0), 127) / 127.0
        return int(round(scaled)) if function == "max_notes" else float(scaled)
