"""`improvd ports`: print the MIDI inputs and outputs of the chosen API, the names `midi.input` and `midi.output`
take (`daemon/io/portnames.py` says how a name is matched). Main thread; nothing here is live.
"""

from __future__ import annotations

from improvd.daemon.io.port import list_ports
from improvd.daemon.io.portnames import DISPLAY_NAME, LOOPBACK_HINT, choose_api


def cmd_ports(args, config) -> int:
    """`improvd ports`: print the inputs and outputs of the chosen MIDI API."""
    api = choose_api(config.midi.api)
    inputs, outputs = list_ports(api)
    print(f"MIDI API: {DISPLAY_NAME[api]}" + (" (chosen by midi.api = 'auto')" if config.midi.api == "auto" else ""))
    print("inputs (what improvd can listen to, for midi.input):")
    for name in inputs:
        print(f"  {name}")
    if not inputs:
        print("  (none)")
    print("outputs (what improvd can play to, for midi.output):")
    for name in outputs:
        print(f"  {name}")
    if not outputs:
        print("  (none)")
    if api == "winmm":
        print(f"note: {LOOPBACK_HINT}")
    else:
        print("or 'virtual:NAME' to create a port that other programs connect to")
    return 0
