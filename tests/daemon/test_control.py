"""CC mappings (daemon/control/cc.py) and the [control] / [timing] / new [midi] and [improvise] config keys."""

import mido
import pytest

from improvd.core.config import ControlConfig, load_config
from improvd.daemon.control.cc import Action, ControlMap
from improvd.core.errors import ConfigError


def cc(control, value, channel=0):
    return mido.Message("control_change", control=control, value=value, channel=channel)


def test_knobs_scale_over_their_ranges():
    m = ControlMap(ControlConfig(temperature=74, top_p=71, max_notes=72, key_strength=73,
                                 temperature_range=(0.0, 2.0), top_p_range=(0.5, 1.0), max_notes_range=(1, 64)))
    assert m.handle(cc(74, 0)) == [Action("temperature", 0.0)]
    assert m.handle(cc(74, 127)) == [Action("temperature", 2.0)]
    assert m.handle(cc(74, 64))[0].value == pytest.approx(2.0 * 64 / 127)
    assert m.handle(cc(71, 0)) == [Action("top_p", 0.5)] and m.handle(cc(71, 127)) == [Action("top_p", 1.0)]
    assert m.handle(cc(72, 0)) == [Action("max_notes", 1)] and m.handle(cc(72, 127)) == [Action("max_notes", 64)]
    assert m.handle(cc(72, 64)) == [Action("max_notes", 33)]
    assert m.handle(cc(73, 127)) == [Action("key_strength", 1.0)]
    assert m.mapped == {74: "temperature", 71: "top_p", 72: "max_notes", 73: "key_strength"}


def test_switches_and_buttons():
    m = ControlMap(ControlConfig(mode=80, mute=81, panic=82, reload=83))
    assert m.handle(cc(80, 127)) == [Action("mode", "continuous")]
    assert m.handle(cc(80, 63)) == [Action("mode", "respond")]
    assert m.handle(cc(81, 64)) == [Action("mute", True)] and m.handle(cc(81, 0)) == [Action("mute", False)]
    # buttons act on the rising edge only: press (127), hold (127 again), release (0), press again
    assert [m.handle(cc(82, v)) for v in (127, 127, 0, 100)] == [[Action("panic")], [], [], [Action("panic")]]
    assert [m.handle(cc(83, v)) for v in (0, 127, 0)] == [[], [Action("reload")], []]


def test_channel_filter_and_other_messages():
    m = ControlMap(ControlConfig(channel=2, temperature=1))
    assert m.handle(cc(1, 127, channel=1)) == [Action("temperature", 2.0)]  # channel 2 is 1 on the wire
    assert m.handle(cc(1, 127, channel=0)) == []
    assert m.handle(cc(2, 127, channel=1)) == []  # not mapped
    assert m.handle(mido.Message("note_on", note=1)) == []
    assert ControlMap(ControlConfig(temperature=1)).handle(cc(1, 0, channel=9)) == [Action("temperature", 0.0)]


def write(tmp_path, text):
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def test_new_config_keys(tmp_path):
    config = load_config(write(tmp_path, """
[midi]
clock = "virtual:improvd clock"
thru = true
program = 0
[improvise]
key = "Bb minor"
key_strength = 0.5
[timing]
bpm = 0
quantize = "1/16t"
follow_tempo = true
[control]
channel = 16
temperature = 74
panic = 120
state_cc = 20
state_values = [1, 2, 3]
"""))
    assert config.midi.clock == "virtual:improvd clock" and config.midi.thru and config.midi.program == 0
    assert config.improvise.key == "Bb minor" and config.improvise.key_strength == 0.5
    assert config.timing.bpm == 0.0 and config.timing.quantize == "1/16t" and config.timing.follow_tempo
    assert config.control.panic == 120 and config.control.state_values == (1, 2, 3)


@pytest.mark.parametrize("text, names", [
    ('[improvise]\nkey = "H major"\n', ["improvise.key", "'H major'", '"C major"', '"auto"', "dorian"]),
    ('[improvise]\nkey_strength = 1.5\n', ["improvise.key_strength", "1.5", "0.0..1.0"]),
    ('[timing]\nquantize = "1/7"\n', ["timing.quantize", "'1/7'", "'1/16'", "'1/8t'"]),
    ('[timing]\nbpm = 10\n', ["timing.bpm", "10", "20..400"]),
    ('[timing]\ntime_scale_range = [2.0, 1.0]\n', ["timing.time_scale_range", "low <= high"]),
    ('[control]\ntemperature = 128\n', ["control.temperature", "128", "-1..127"]),
    ('[control]\ntemperature = 7\npanic = 7\n', ["control.panic", "CC 7", "control.temperature"]),
    ('[control]\nstate_values = [0, 127]\n', ["control.state_values", "[0, 127]", "three"]),
    ('[control]\nchannel = 17\n', ["control.channel", "17", "0..16"]),
    ('[midi]\nprogram = 128\n', ["midi.program", "128", "-1..127"]),
])
def test_bad_new_keys_name_the_key_and_the_value(tmp_path, text, names):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    for name in names:
        assert name in str(info.value), f"{name!r} not in {info.value}"
