"""Which MIDI API, and which port a config names: pure logic, tested without a device.

A port is named in the config as:

- an exact port name as `improvd ports` lists it (on ALSA also without the trailing `client:port` numbers);
- a unique part of one (`fluid` for `FLUID Synth (1234):Synth input port (1234:0)`); when several ports contain it,
  the error lists them;
- `virtual:NAME`: improvd creates a port called NAME that other programs connect to. A virtual input accepts any
  number of connections (several keyboards, a DAW and a sequencer at once): their messages are merged in order of
  arrival. Windows' MIDI API (WinMM) has no virtual ports; use a loopback driver such as loopMIDI there.

`midi.api` names the API (`choose_api`; `auto` asks libjack whether a JACK server runs, `daemon/io/libjack.py`).

Threads: the main thread: at start-up and in `improvd ports` (`choose_api`, `parse_spec`, `match_port`), and in
the port watch every ~0.5 s (`match_port`, through `Port.check`, `daemon/io/port.py`).
"""

from __future__ import annotations

import re
import sys
from typing import Callable

import rtmidi

from improvd.core.errors import PortError
from improvd.daemon.io.libjack import jack_server_running

VIRTUAL_PREFIX = "virtual:"

# config name -> rtmidi API constant
API_BY_NAME = {
    "alsa": rtmidi.API_LINUX_ALSA,
    "jack": rtmidi.API_UNIX_JACK,
    "coremidi": rtmidi.API_MACOSX_CORE,
    "winmm": rtmidi.API_WINDOWS_MM,
}
NAME_BY_API = {v: k for k, v in API_BY_NAME.items()}
DISPLAY_NAME = {"alsa": "ALSA", "jack": "JACK", "coremidi": "CoreMIDI", "winmm": "WinMM"}
LOOPBACK_HINT = ("Windows' MIDI API (WinMM) cannot create virtual ports; install a loopback driver such as loopMIDI "
                 "(https://www.tobias-erichsen.de/software/loopmidi.html), create a port there and give its name")
_ALSA_NUMBERS = re.compile(r"\s+\d+:\d+$")


def compiled_apis() -> list[str]:
    """Config names of the MIDI APIs this python-rtmidi was built with."""
    return [NAME_BY_API[a] for a in rtmidi.get_compiled_api() if a in NAME_BY_API]


def choose_api(name: str, *, compiled: list[str] | None = None, jack_running: Callable[[], bool] | None = None,
               platform: str | None = None) -> str:
    """The API to use for `midi.api = name`.

    `auto` picks JACK when a JACK server is reachable, else ALSA on Linux, CoreMIDI on macOS, WinMM on Windows.

    Raises:
        PortError: the API is not compiled into python-rtmidi, or `auto` finds none for this platform.
    """
    compiled = compiled_apis() if compiled is None else compiled
    platform = sys.platform if platform is None else platform
    if name != "auto":
        if name not in compiled:
            raise PortError(f"midi.api = {name!r} is not available: python-rtmidi here supports "
                            f"{', '.join(compiled) or 'no API'}")
        return name
    probe = jack_server_running if jack_running is None else jack_running
    if "jack" in compiled and probe():
        return "jack"
    native = ("alsa" if platform.startswith("linux") else "coremidi" if platform == "darwin"
              else "winmm" if platform.startswith(("win", "cygwin")) else None)
    if native in compiled:
        return native
    raise PortError(f"midi.api = 'auto' found no usable MIDI API on {platform}: no JACK server is running and "
                    f"python-rtmidi here supports {', '.join(compiled) or 'no API'}")


def strip_alsa_numbers(name: str) -> str:
    """'Midi Through:Midi Through Port-0 14:0' -> 'Midi Through:Midi Through Port-0'."""
    return _ALSA_NUMBERS.sub("", name)


def match_port(spec: str, names: list[str], *, kind: str = "input") -> str:
    """The one port in `names` that `spec` names: an exact name, then the name without ALSA's numbers, then a
    unique substring (case-sensitive first, then not).

    Args:
        spec: what the config says (not `virtual:`).
        names: the ports there are.
        kind: 'input' or 'output', for the error message.

    Raises:
        PortError: no port matches (the message lists the ports there are), or several do (it lists those).
    """
    if spec in names:
        return spec
    for candidates in ([n for n in names if strip_alsa_numbers(n) == spec],
                       [n for n in names if spec in n],
                       [n for n in names if spec.lower() in n.lower()]):
        if len(candidates) == 1:
            return candidates[0]
        if len(candidates) > 1:
            listing = "\n  ".join(candidates)
            raise PortError(f"MIDI {kind} {spec!r} is ambiguous: it matches {len(candidates)} ports:\n  {listing}\n"
                            f"give more of the name")
    listing = "\n  ".join(names) if names else "(none)"
    raise PortError(f"no MIDI {kind} port matches {spec!r}; the {kind} ports there are:\n  {listing}\n"
                    f"(or use 'virtual:NAME' to create a port)")


def parse_spec(spec: str) -> tuple[bool, str]:
    """('virtual:improvd in') -> (True, 'improvd in'); ('fluid') -> (False, 'fluid')."""
    if spec.startswith(VIRTUAL_PREFIX):
        name = spec[len(VIRTUAL_PREFIX):].strip()
        if not name:
            raise PortError(f"{spec!r} is not valid: 'virtual:' needs a port name after it, e.g. 'virtual:improvd in'")
        return True, name
    if not spec.strip():
        raise PortError("an empty port name is not valid: give a port name, a part of one, or 'virtual:NAME'")
    return False, spec
