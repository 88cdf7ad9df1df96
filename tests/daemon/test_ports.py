"""Port name matching and API choice, against made-up port lists (no MIDI device needed)."""

import queue
import threading

import mido
import pytest

from improvd.daemon.io import ports
from improvd.core.errors import PortError

ALSA = ["Midi Through:Midi Through Port-0 14:0", "FLUID Synth (4321):Synth input port (4321:0) 128:0",
        "Keystation 49:Keystation 49 MIDI 1 20:0", "Keystation 49:Keystation 49 MIDI 2 20:1"]
JACK = ["system:midi_capture_1", "a2j:Keystation 49 [20] (capture): Keystation 49 MIDI 1", "improvd:improvd in"]


def test_exact_name_wins_even_when_it_is_a_substring_of_another():
    names = ["synth", "synth 2"]
    assert ports.match_port("synth", names) == "synth"


def test_alsa_name_without_client_port_numbers():
    assert ports.match_port("Midi Through:Midi Through Port-0", ALSA) == ALSA[0]


def test_unique_substring_then_case_insensitive():
    assert ports.match_port("FLUID", ALSA) == ALSA[1]
    assert ports.match_port("fluid", ALSA) == ALSA[1]
    assert ports.match_port("capture_1", JACK) == "system:midi_capture_1"


def test_ambiguous_substring_lists_the_matches():
    with pytest.raises(PortError) as err:
        ports.match_port("Keystation", ALSA)
    text = str(err.value)
    assert "ambiguous" in text and ALSA[2] in text and ALSA[3] in text and ALSA[1] not in text


def test_missing_port_lists_the_ports_there_are():
    with pytest.raises(PortError) as err:
        ports.match_port("Nord", ALSA, kind="output")
    text = str(err.value)
    assert "'Nord'" in text and "output" in text and all(name in text for name in ALSA)
    with pytest.raises(PortError, match=r"\(none\)"):
        ports.match_port("Nord", [])


def test_parse_spec():
    assert ports.parse_spec("virtual:improvd in") == (True, "improvd in")
    assert ports.parse_spec("fluid") == (False, "fluid")
    with pytest.raises(PortError, match="needs a port name"):
        ports.parse_spec("virtual:")
    with pytest.raises(PortError, match="empty"):
        ports.parse_spec(" ")


def test_choose_api():
    both = ["alsa", "jack"]
    assert ports.choose_api("auto", compiled=both, jack_running=lambda: True, platform="linux") == "jack"
    assert ports.choose_api("auto", compiled=both, jack_running=lambda: False, platform="linux") == "alsa"
    assert ports.choose_api("auto", compiled=["coremidi", "jack"], jack_running=lambda: False,
                            platform="darwin") == "coremidi"
    assert ports.choose_api("auto", compiled=["winmm"], jack_running=lambda: False, platform="win32") == "winmm"
    assert ports.choose_api("alsa", compiled=both) == "alsa"
    with pytest.raises(PortError, match="coremidi.*supports alsa, jack"):
        ports.choose_api("coremidi", compiled=both)
    with pytest.raises(PortError, match="no usable MIDI API"):
        ports.choose_api("auto", compiled=["jack"], jack_running=lambda: False, platform="linux")


def test_virtual_port_on_winmm_suggests_a_loopback_driver():
    class FakeRt:
        deleted = False

        def delete(self):
            self.deleted = True
    rt = FakeRt()
    with pytest.raises(PortError, match="loopMIDI"):
        ports._Port(rt, "winmm", "virtual:improvd in", "improvd in")
    assert rt.deleted


class _QueuedRt:
    """rtmidi.MidiIn's polling surface: `get_message()` pops (bytes, delta_s) or gives None."""

    def __init__(self, messages):
        self.messages = list(messages)

    def get_message(self):
        return self.messages.pop(0) if self.messages else None


def _polled_input(messages, sink, now, clock=True):
    port = ports.InputPort.__new__(ports.InputPort)  # the poller alone, without a device
    port._ignored = ports._ignored_status(clock)
    port._rt = _QueuedRt(messages)
    port._lock = threading.Lock()
    port._sink, port._now = sink, now
    port.closed = port.lost = False
    port.dropped = port.invalid = 0
    port._arrival = ports.ArrivalClock(drift=0.0)
    return port


def test_input_poll_stamps_by_rtmidi_deltas_enqueues_and_drops_garbage():
    sink = queue.Queue(maxsize=2)
    port = _polled_input([([0x90, 60, 100], 0.0), ([0x90, 200], 0.004), ([0x80, 60, 0], 0.006),
                          ([0x90, 61, 1], 0.001)], sink, now=lambda: 12.5)
    assert port.poll_once() == 4
    # read together at 12.5: the last arrived by then, the others by their deltas before it
    t_on, on = sink.get_nowait()
    t_off, off = sink.get_nowait()
    assert on == mido.Message("note_on", note=60, velocity=100) and t_on == pytest.approx(12.5 - 0.011)
    assert off.type == "note_off" and t_off == pytest.approx(12.5 - 0.001)
    assert port.invalid == 1  # malformed: dropped
    assert port.dropped == 1  # queue full: counted
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
    n = ports.InputPort.BATCH + 10
    port = _polled_input([([0xF8], 0.0001)] * n, sink, now=lambda: 3.0)
    assert port.poll_once() == ports.InputPort.BATCH
    assert port.poll_once() == 10
    times = [sink.get_nowait()[0] for _ in range(n)]
    assert times == sorted(times) and times[-1] <= 3.0
