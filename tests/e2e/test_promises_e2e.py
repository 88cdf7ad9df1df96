"""Issue 17 on a real JACK server: an unterminated SysEx from the player does not leave improvd deaf, nor its
notes hanging (rtmidi's JACK input appends everything after one to it until an EOX comes)."""

from __future__ import annotations

import time

import pytest
import rtmidi

from harness.clients import balance
from harness.session import PLAYER_CH, Session

pytestmark = pytest.mark.jack


def test_an_unterminated_sysex_neither_deafens_improvd_nor_leaves_thru_notes_on(jack_server, tmp_path, model,
                                                                                monkeypatch):
    monkeypatch.setenv("JACK_DEFAULT_SERVER", jack_server.name)
    s = Session(jack_server, tmp_path, model, midi={"thru": True}, improvise={"max_hold": 8.0})
    out = rtmidi.MidiOut(rtmidi.API_UNIX_JACK, "sysexer")
    try:
        out.open_virtual_port("out")
        port = jack_server.wait_port("sysexer:out")
        jack_server.connect(port, s.in_port)
        time.sleep(0.2)
        out.send_message([0x90 | PLAYER_CH, 60, 90])
        time.sleep(0.05)
        out.send_message([0xF0, 0x41, 0x10, 0x42])  # a SysEx without its EOX (a buggy or unplugged device)
        time.sleep(0.05)
        out.send_message([0x90 | PLAYER_CH, 62, 90])
        out.send_message([0x80 | PLAYER_CH, 60, 0])
        out.send_message([0x80 | PLAYER_CH, 62, 0])

        def released(events):
            return ("off", 60) in [(e.kind, e.note) for e in events if e.channel == PLAYER_CH] and \
                not balance(events, PLAYER_CH)
        ok = s.receiver.wait_events(released, 2.0)  # the guard's EOX comes within 0.25 s; max_hold is 8 s
        seen = [(e.kind, e.note) for e in s.receiver.events if e.channel == PLAYER_CH]
        assert ok, f"thru after an unterminated SysEx: {seen}\n{s.daemon.log()}"
        # what the SysEx swallowed comes at one time: 62 pressed and released at once sounds not at all
        assert seen in ([("on", 60), ("off", 60)], [("on", 60), ("on", 62), ("off", 60), ("off", 62)]), seen
        out.send_message([0x90 | PLAYER_CH, 64, 90])  # and improvd is not deaf
        time.sleep(0.1)
        out.send_message([0x80 | PLAYER_CH, 64, 0])
        assert s.receiver.wait_events(lambda evs: any(e.note == 64 and e.kind == "off" for e in evs), 2.0)
        on64, off64 = [e.t_s for e in s.receiver.events if e.note == 64]
        assert off64 - on64 == pytest.approx(0.1, abs=0.05)  # stamped as played, not merged
    finally:
        out.delete()
        s.close()
