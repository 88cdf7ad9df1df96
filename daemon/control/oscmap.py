"""OSC control: the addresses improvd answers to, their arguments in natural units, and what they become (pure: no
network I/O, no thread; daemon/io/osc.py receives the datagrams and calls `parse`).

| address | argument | does |
| --- | --- | --- |
| /improvd/temperature | number 0..10 | improvise.temperature (0 = greedy) |
| /improvd/top_p (or /improvd/top-p) | number 0.01..1 | improvise.top_p |
| /improvd/length | integer 1..10000, or a string | integer: improvise.max_notes (the max_notes knob's); string: |
| | | improvise.answer_length ("match", "max", "12 notes", "8 beats") |
| /improvd/key_strength (or /improvd/key-strength) | number 0..1 | improvise.key_strength |
| /improvd/key | string | improvise.key ("D dorian", "auto", "none", ...) |
| /improvd/mode | string "respond" or "continuous" (or 0 / 1) | improvise.mode |
| /improvd/mute | 1 / 0, true / false | mute on / off (improvd listens but does not play) |
| /improvd/panic | none | every sounding note released now, the answer dropped |
| /improvd/reload | none | reload the config file and the model (as SIGHUP) |
| /improvd/forget | none | forget the session (clears `improvise.adapt`'s session memory; logs "forget: no session memory" with adaptation off) |

Numbers may come as OSC int or float (TouchOSC sends floats, Pure Data floats); booleans as OSC T/F or numbers.
Ranges are the config's own (`improvd.core.config` field metadata): one home for them. Anything else raises
`OscInputError` with a `kind` (for "logged once per kind") and a message naming the address, the value and what
is valid; nothing of it reaches the engine.

The engine applies the resulting `control.Action`s like a CC's (same functions, same thread).
"""

from __future__ import annotations

import dataclasses
import math

from improvd.core.config import ImproviseConfig
from improvd.daemon.control.cc import Action

PREFIX = "/improvd"
STATE_ADDRESS = PREFIX + "/state"  # sent: "idle" / "listening" / "answering", and "note" pitch velocity
KNOBS = {"temperature": "temperature", "top_p": "top_p", "top-p": "top_p", "key_strength": "key_strength",
         "key-strength": "key_strength"}
BUTTONS = ("panic", "reload", "forget")
FUNCTIONS = ("temperature", "top_p", "length", "key_strength", "key", "mode", "mute", "panic", "reload", "forget")
MODES = ("respond", "continuous")
FLOAT32_SLACK = 1e-6  # relative: a value this close outside a bound is the bound (32-bit float rounding)


class OscInputError(ValueError):
    """Bad OSC input; `kind` groups errors for logging once per kind (e.g. "unknown address /x")."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def _range(name: str) -> tuple[float, float]:
    meta = {f.name: f.metadata for f in dataclasses.fields(ImproviseConfig)}[name]
    return meta["lo"], meta["hi"]


def _number(address: str, args: list, name: str):
    if len(args) != 1 or isinstance(args[0], bool) or not isinstance(args[0], (int, float)):
        raise OscInputError(f"wrong type {address}", f"OSC {address} {_show(args)}: expected one number")
    value = float(args[0])
    lo, hi = _range(name)
    if math.isfinite(value):  # OSC floats are 32-bit: 0.01 arrives as 0.0099999998, still the bound meant
        if lo - FLOAT32_SLACK * max(1.0, abs(lo)) <= value < lo:
            value = float(lo)
        elif hi < value <= hi + FLOAT32_SLACK * max(1.0, abs(hi)):
            value = float(hi)
    if not math.isfinite(value) or not lo <= value <= hi:
        raise OscInputError(f"out of range {address}", f"OSC {address} {_show(args)}: out of range, allowed "
                                                          f"{lo:g}..{hi:g}")
    return value


def _show(args: list) -> str:
    return " ".join(repr(a) for a in args) if args else "(no argument)"


def parse(address: str, args: list) -> Action | None:
    """The action of one OSC message (None for a button's release, which does nothing).

    Raises:
        OscInputError: unknown address, wrong type or number of arguments, value out of range.
    """
    if not isinstance(address, str) or not address.startswith(PREFIX + "/"):
        raise OscInputError(f"unknown address {str(address)[:40]}",
                            f"OSC address {str(address)[:80]!r} is not improvd's: valid addresses are "
                            + ", ".join(f"{PREFIX}/{f}" for f in FUNCTIONS))
    args = list(args)
    name = address[len(PREFIX) + 1:]
    if name in KNOBS:
        return Action(KNOBS[name], _number(address, args, KNOBS[name]))
    if name == "length":
        if len(args) == 1 and isinstance(args[0], str):
            from improvd.daemon.music.turns import parse_answer_length
            try:
                parse_answer_length(args[0])
            except ValueError as err:
                raise OscInputError(f"wrong value {address}", f"OSC {address}: {err}") from None
            return Action("answer_length", args[0].strip())
        value = _number(address, args, "max_notes")
        if value != int(value):
            raise OscInputError(f"wrong type {address}", f"OSC {address} {_show(args)}: expected a whole number "
                                                         f"of notes or an answer length such as 'match'")
        return Action("max_notes", int(value))
    if name == "key":
        if len(args) != 1 or not isinstance(args[0], str):
            raise OscInputError(f"wrong type {address}", f"OSC {address} {_show(args)}: expected one string such "
                                                         f"as 'D dorian', 'auto' or 'none'")
        from improvd.daemon.music.keys import VALID_FORMS, check_key_setting
        try:
            check_key_setting(args[0])
        except ValueError:
            raise OscInputError(f"wrong value {address}", f"OSC {address} {args[0]!r}: expected {VALID_FORMS}") \
                from None
        return Action("key", args[0])
    if name == "mode":
        if len(args) == 1 and isinstance(args[0], str) and args[0].strip().lower() in MODES:
            return Action("mode", args[0].strip().lower())
        if len(args) == 1 and not isinstance(args[0], (bool, str)) and args[0] in (0, 1):
            return Action("mode", MODES[int(args[0])])
        raise OscInputError(f"wrong value {address}", f"OSC {address} {_show(args)}: expected 'respond' or "
                                                      f"'continuous' (or 0 / 1)")
    if name == "mute":
        if len(args) == 1 and isinstance(args[0], bool):
            return Action("mute", args[0])
        if len(args) == 1 and isinstance(args[0], (int, float)) and args[0] in (0, 1):
            return Action("mute", bool(args[0]))
        raise OscInputError(f"wrong value {address}", f"OSC {address} {_show(args)}: expected 1 or 0 (or true / "
                                                      f"false)")
    if name in BUTTONS:
        # a button: no argument, or a press value (TouchOSC sends 1 on press and 0 on release: act on the press)
        if args and not (len(args) == 1 and not isinstance(args[0], str) and args[0] in (0, 1, True, False)):
            raise OscInputError(f"wrong type {address}", f"OSC {address} {_show(args)}: expected no argument (or "
                                                         f"1 to press)")
        if args and not args[0]:
            return None  # the button's release
        return Action(name)
    raise OscInputError(f"unknown address {address[:40]}",
                        f"OSC address {address[:80]!r} is not improvd's: valid addresses are "
                        + ", ".join(f"{PREFIX}/{f}" for f in FUNCTIONS))
