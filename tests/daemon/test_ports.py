"""Port name matching and API choice, against made-up port lists, and the input's poller around a fake rtmidi
object (no MIDI device needed)."""

import queue
import time

import mido
import pytest

from improvd.core.errors import PortError
from improvd.daemon.io import port, portnames
from improvd.daemon.io.inport import EOX_GUARD_S, InputPort
from improvd.daemon.io.outport import OutputPort
from improvd.daemon.music.arrival import ArrivalClock
from harness.fakes import FakeMidi, FakeRt

ALSA = ["Midi Through:Midi Through Port-0 14:0", "FLUID Synth (4321):Synth input port (4321:0) 128:0",
        "Keystation 49:Keystation 49 MIDI 1 20:0", "Keystation 49:Keystation 49 MIDI 2 20:1"]
JACK = ["system:midi_capture_1", "a2j:Keystation 49 [20] (capture): Keystation 49 MIDI 1", "improvd:improvd in"]


def test_exact_name_wins_even_when_it_is_a_substring_of_another():
    names = ["synth", "synth 2"]
    assert portnames.match_port("synth", names) == "synth"


def test_alsa_name_without_client_port_numbers():
    assert portnames.match_port("Midi Through:Midi Through Port-0", ALSA) == ALSA[0]


def test_unique_substring_then_case_insensitive():
    assert portnames.match_port("FLUID", ALSA) == ALSA[1]
    assert portnames.match_port("fluid", ALSA) == ALSA[1]
    assert portnames.match_port("capture_1", JACK) == "system:midi_capture_1"


def test_ambiguous_substring_lists_the_matches():
    with pytest.raises(PortError) as err:
        portnames.match_port("Keystation", ALSA)
    text = str(err.value)
    assert "ambiguous" in text and ALSA[2] in text and ALSA[3] in text and ALSA[1] not in text


def test_missing_port_lists_the_ports_there_are():
    with pytest.raises(PortError) as err:
        portnames.match_port("Nord", ALSA, kind="output")
    text = str(err.value)
    assert "'Nord'" in text and "output" in text and all(name in text for name in ALSA)
    with pytest.raises(PortError, match=r"\(none\)"):
        portnames.match_port("Nord", [])


def test_parse_spec():
    assert portnames.parse_spec("virtual:improvd in") == (True, "improvd in")
    assert portnames.parse_spec("fluid") == (False, "fluid")
    with pytest.raises(PortError, match="needs a port name"):
        portnames.parse_spec("virtual:")
    with pytest.raises(PortError, match="empty"):
        portnames.parse_spec(" ")


def test_choose_api():
    both = ["alsa", "jack"]
    assert portnames.choose_api("auto", compiled=both, jack_running=lambda: True, platform="linux") == "jack"
    assert portnames.choose_api("auto", compiled=both, jack_running=lambda: False, platform="linux") == "alsa"
    assert portnames.choose_api("auto", compiled=["coremidi", "jack"], jack_running=lambda: False,
                            platform="darwin") == "coremidi"
    assert portnames.choose_api("auto", compiled=["winmm"], jack_running=lambda: False, platform="win32") == "winmm"
    assert portnames.choose_api("alsa", compiled=both) == "alsa"
    with pytest.raises(PortError, match="coremidi.*supports alsa, jack"):
        portnames.choose_api("coremidi", compiled=both)
    with pytest.raises(PortError, match="no usable MIDI API"):
        portnames.choose_api("auto", compiled=["jack"], jack_running=lambda: False, platform="linux")


def test_virtual_port_on_winmm_suggests_a_loopback_driver():
    for make in (lambda midi: InputPort("winmm", "virtual:improvd in", queue.Queue(), open_client=midi, start=False),
                 lambda midi: OutputPort("winmm", "virtual:improvd out", open_client=midi)):
        rt = FakeRt()
        with pytest.raises(PortError, match="loopMIDI"):
            make(FakeMidi(rt))
        assert rt.deleted


def _polled_input(messages, sink, now, clock=True):
    """The poller alone (no thread), around a fake rtmidi queue."""
    return InputPort("jack", "kbd", sink, now=now, clock=clock, start=False,
                     open_client=FakeMidi(FakeRt(["kbd"], messages)), arrival=ArrivalClock(drift=0.0))


def test_input_poll_stamps_by_rtmidi_deltas_enqueues_and_drops_garbage():
    sink = queue.Queue()
    port = _polled_input([([0x90, 60, 100], 0.0), ([0x90, 200], 0.004), ([0x80, 60, 0], 0.006),
                          ([0x90, 61, 1], 0.001)], sink, now=lambda: 12.5)
    assert port.poll_once() == 4
    # read together at 12.5: the last arrived by then, the others by their deltas before it
    t_on, on = sink.get_nowait()
    t_off, off = sink.get_nowait()
    t_last, last = sink.get_nowait()
    assert on == mido.Message("note_on", note=60, velocity=100) and t_on == pytest.approx(12.5 - 0.011)
    assert off.type == "note_off" and t_off == pytest.approx(12.5 - 0.001)
    assert last == mido.Message("note_on", note=61, velocity=1) and t_last == pytest.approx(12.5)
    assert port.invalid == 1  # malformed: dropped
    assert sink.empty()
    assert port.poll_once() == 0


def test_input_poll_counts_the_deltas_of_the_messages_it_drops():
    # rtmidi gives each message the time since the previous one it received; the poller drops active sensing,
    # SysEx and (without the clock) clock ticks and MTC itself, so their deltas still count: a note held 0.3 s
    # across two active-sensing messages is stamped 0.3 s long, not 0.1 s.
    sink = queue.Queue()
    port = _polled_input([([0x90, 60, 90], 0.0), ([0xFE], 0.1), ([0xF0, 1, 2, 0xF7], 0.05), ([0xF8], 0.05),
                          ([0xF1, 3], 0.05), ([0xFE], 0.05), ([0x80, 60, 0], 0.1), ([0xFC], 0.02)], sink,
                         now=lambda: 5.0, clock=False)
    assert port.poll_once() == 8
    got = [sink.get_nowait() for _ in range(sink.qsize())]
    assert [m.type for _, m in got] == ["note_on", "note_off", "stop"]  # transport passes, as rtmidi let it
    assert got[1][0] - got[0][0] == pytest.approx(0.4)
    assert port.invalid == 0
    clocked = _polled_input([([0xF8], 0.0), ([0xFE], 0.01), ([0xF1, 3], 0.01), ([0xF8], 0.01)], sink,
                            now=lambda: 1.0, clock=True)
    clocked.poll_once()
    got = [sink.get_nowait() for _ in range(sink.qsize())]
    assert [m.type for _, m in got] == ["clock", "quarter_frame", "clock"]
    assert got[2][0] - got[0][0] == pytest.approx(0.03)


def test_input_poll_reads_nothing_while_the_port_is_lost_or_closed():
    sink = queue.Queue()
    port = _polled_input([([0x90, 60, 100], 0.0)], sink, now=lambda: 1.0)
    port.lost = True
    assert port.poll_once() == 0 and sink.empty()
    port.lost, port.closed = False, True
    assert port.poll_once() == 0 and sink.empty()


def test_input_poll_reads_a_flood_in_bounded_batches():
    sink = queue.Queue()
    n = InputPort.BATCH + 10
    port = _polled_input([([0xF8], 0.0001)] * n, sink, now=lambda: 3.0)
    assert port.poll_once() == InputPort.BATCH
    assert port.poll_once() == 10
    times = [sink.get_nowait()[0] for _ in range(n)]
    assert times == sorted(times) and times[-1] <= 3.0


def test_list_ports_gives_the_inputs_and_outputs_and_deletes_its_clients():
    mi, mo = FakeRt(["kbd:out"]), FakeRt(["synth:in", "daw:in"])
    midi = FakeMidi(mi, mo)
    assert port.list_ports("alsa", open_client=midi) == (["kbd:out"], ["synth:in", "daw:in"])
    assert [o[:3] for o in midi.opened] == [("in", "alsa", "improvd-list"), ("out", "alsa", "improvd-list")]
    assert mi.deleted and mo.deleted


def test_the_input_opens_its_client_with_rtmidis_queue_limit_and_asks_rtmidi_to_ignore_nothing():
    rt = FakeRt(["kbd"])
    midi = FakeMidi(rt)
    InputPort("alsa", "kbd", queue.Queue(), client_name="me", start=False, open_client=midi)
    assert midi.opened == [("in", "alsa", "me", {"queue_size_limit": InputPort.QUEUE_LIMIT})]  # ALSA: no EOX guard
    assert rt.ignored_types == {"sysex": False, "timing": False, "active_sense": False}  # their deltas count


def _wait_for(condition, timeout_s=5.0):
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def test_the_eox_guard_connects_to_improvds_own_input_only_and_sends_a_lone_eox_unless_the_server_stalls():
    # improvd's own client is 'improvd', or 'improvd-NN' when JACK renamed a second one; another program's port of
    # the same name is not improvd's
    rt, guard = FakeRt(), FakeRt(["other:improvd in", "improvd-2:improvd in"])
    port_ = InputPort("jack", "virtual:improvd in", queue.Queue(), open_client=FakeMidi(rt, guard))
    try:
        assert guard.calls[0] == ("open", "improvd-2:improvd in")
        assert _wait_for(lambda: guard.sent)  # the poller's first round sends one at once
        port_.server_stalled = lambda: True  # rtmidi's send could spin holding the GIL: nothing now
        time.sleep(EOX_GUARD_S + 0.1)  # a send already past the check may still land
        stalled = len(guard.sent)
        time.sleep(3 * EOX_GUARD_S)
        assert len(guard.sent) == stalled
        port_.server_stalled = lambda: False
        assert _wait_for(lambda: len(guard.sent) > stalled)
    finally:
        port_.close()
    assert set(guard.sent) == {(0xF7,)}
    assert guard.calls[-2:] == [("close",), ("delete",)] and rt.calls[-2:] == [("close",), ("delete",)]


def test_no_eox_guard_where_improvds_own_input_cannot_be_told_apart():
    rt, guard = FakeRt(), FakeRt(["improvd:improvd in", "improvd-2:improvd in"])
    port_ = InputPort("jack", "virtual:improvd in", queue.Queue(), start=False, open_client=FakeMidi(rt, guard))
    port_.close()
    assert guard.calls == [("delete",)]  # never opened, deleted at once
