"""improvd's MIDI input (`daemon/io/inport.py` `InputPort`) over a real JACK port, fed by rtmidi from this process: what
the arrival times are worth with the messages improvd drops, and what improvd hears after a SysEx start that never
ends."""

from __future__ import annotations

import queue
import time

import pytest
import rtmidi

from improvd.daemon.io.inport import EOX_GUARD_S, InputPort
from harness.procs import unique_id

pytestmark = pytest.mark.jack


@pytest.fixture
def wired(jack_server, monkeypatch):
    """(send(bytes, wait_s), take() -> [(t_s, mido.Message)]): a sender wired to an InputPort."""
    for key, value in jack_server.env.items():
        monkeypatch.setenv(key, value)
    n = unique_id()
    sink = queue.Queue()
    port = InputPort("jack", "virtual:in", sink, client_name=f"probe-{n}", now=time.monotonic)
    out = rtmidi.MidiOut(rtmidi.API_UNIX_JACK, f"sender-{n}")
    out.open_virtual_port("out")
    jack_server.connect(jack_server.wait_port(f"sender-{n}:out"), jack_server.wait_port(f"probe-{n}:in"))
    time.sleep(0.1)

    def send(data, wait_s=0.0):
        out.send_message(data)
        time.sleep(wait_s)

    def take():
        time.sleep(0.05)
        return [sink.get_nowait() for _ in range(sink.qsize())]

    try:
        yield send, take
    finally:
        out.close_port()
        out.delete()
        port.close()


def test_dropped_message_types_keep_their_time(wired):
    # rtmidi gives a message the time since the previous message it received; when rtmidi itself ignored active
    # sensing, a 0.3 s note held across two was stamped 0.1 s long.
    send, take = wired
    send([0x90, 60, 90], 0.1)
    send([0xFE], 0.1)
    send([0xF0, 0x7D, 1, 0xF7], 0.05)
    send([0xF8], 0.05)
    send([0x80, 60, 0], 0.1)
    got = take()
    assert [m.type for _, m in got] == ["note_on", "note_off"], got
    duration = got[1][0] - got[0][0]
    assert duration == pytest.approx(0.3, abs=0.02), duration  # sleeps on a loaded machine can run long


def test_messages_after_an_unterminated_sysex_are_recovered_within_the_eox_guard(wired):
    """rtmidi 5.0's JACK input (python-rtmidi 1.5.8) takes every event after a SysEx start without F7 as part of
    that SysEx until an event ends with F7. The InputPort's EOX guard sends a lone F7 every `EOX_GUARD_S`, and the
    poller takes the messages out of the SysEx: they are heard, stamped together, within that."""
    send, take = wired
    send([0xF0, 0x7D, 1, 2], 0.02)  # a SysEx start whose end never comes (a cable pulled mid-dump)
    send([0x90, 64, 90], 0.05)
    send([0x80, 64, 0], 0.0)
    time.sleep(EOX_GUARD_S + 0.1)
    between = take()
    assert [(m.type, m.note) for _, m in between] == [("note_on", 64), ("note_off", 64)], between
    # Their own times went with the SysEx: both come stamped with its end, unless the guard's EOX fell between
    # them (it comes every EOX_GUARD_S, at any moment), and then the note-off keeps its own, later time.
    assert between[0][0] <= between[1][0]
    send([0x90, 65, 90], 0.1)  # and the input is not deaf after it
    send([0x80, 65, 0], 0.02)
    after = take()
    assert [m.note for _, m in after] == [65, 65], after
    assert after[1][0] - after[0][0] == pytest.approx(0.1, abs=0.03)
