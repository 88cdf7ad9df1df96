"""Port name matching and API choice, against made-up port lists (no MIDI device needed)."""

import queue

import mido
import pytest

from daemon import ports
from daemon.errors import PortError

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


def test_input_callback_stamps_and_enqueues_and_drops_garbage():
    port = ports.InputPort.__new__(ports.InputPort)  # the callback alone, without a device
    port._sink = queue.Queue(maxsize=2)
    port._now = lambda: 12.5
    port.dropped = 0
    port._on_message(([0x90, 60, 100], 0.0))
    port._on_message(([0x90, 200], 0.0))  # malformed: dropped
    port._on_message(([0x80, 60, 0], 0.0))
    port._on_message(([0x90, 61, 1], 0.0))  # queue full: counted
    assert port._sink.get_nowait() == (12.5, mido.Message("note_on", note=60, velocity=100))
    assert port._sink.get_nowait()[1].type == "note_off"
    assert port.dropped == 1
