"""OSC control (daemon/control/oscmap.py, daemon/io/osc.py, daemon/control/oscaddr.py): the addresses and their natural units, bad
input, and the UDP endpoint with a real client on 127.0.0.1 (no MIDI: the engine is a recorder of actions here;
tests/e2e/test_osc_e2e.py drives the daemon)."""

from __future__ import annotations

import logging
import socket
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("pythonosc", reason="the OSC tests need python-osc (pip install 'improvd[osc]')")
from pythonosc.osc_message_builder import OscMessageBuilder  # noqa: E402
from pythonosc.udp_client import SimpleUDPClient  # noqa: E402

from improvd.core.config import OscConfig, from_dict  # noqa: E402
from improvd.daemon.control.cc import Action  # noqa: E402
from improvd.core.errors import ConfigError  # noqa: E402
from improvd.daemon.io.osc import OscServer  # noqa: E402
from improvd.daemon.control.oscaddr import is_loopback, parse_host_port  # noqa: E402
from improvd.daemon.control.oscmap import OscInputError, parse  # noqa: E402


@pytest.mark.parametrize("address,args,action", [
    ("/improvd/temperature", [0.7], Action("temperature", 0.7)),
    ("/improvd/temperature", [0], Action("temperature", 0.0)),
    ("/improvd/top_p", [0.9], Action("top_p", 0.9)),
    ("/improvd/top-p", [1], Action("top_p", 1.0)),
    ("/improvd/top_p", [0.009999999776482582], Action("top_p", 0.01)),  # 0.01 as an OSC (32-bit) float
    ("/improvd/length", [12], Action("max_notes", 12)),
    ("/improvd/length", [12.0], Action("max_notes", 12)),
    ("/improvd/length", ["match"], Action("answer_length", "match")),
    ("/improvd/length", ["8 beats"], Action("answer_length", "8 beats")),
    ("/improvd/key_strength", [0.5], Action("key_strength", 0.5)),
    ("/improvd/key", ["D dorian"], Action("key", "D dorian")),
    ("/improvd/key", ["auto"], Action("key", "auto")),
    ("/improvd/mode", ["continuous"], Action("mode", "continuous")),
    ("/improvd/mode", [0], Action("mode", "respond")),
    ("/improvd/mute", [1], Action("mute", True)),
    ("/improvd/mute", [False], Action("mute", False)),
    ("/improvd/mute", [0.0], Action("mute", False)),
    ("/improvd/panic", [], Action("panic")),
    ("/improvd/panic", [1.0], Action("panic")),
    ("/improvd/panic", [0.0], None),  # a TouchOSC button's release
    ("/improvd/reload", [], Action("reload")),
    ("/improvd/forget", [], Action("forget")),
])
def test_addresses_in_natural_units(address, args, action):
    assert parse(address, args) == action


@pytest.mark.parametrize("address,args,kind,text", [
    ("/x/temperature", [0.5], "unknown address", "is not improvd's: valid addresses are /improvd/temperature"),
    ("/improvd/tempo", [1.0], "unknown address", "'/improvd/tempo' is not improvd's"),
    ("/improvd/temperature", ["hot"], "wrong type", "expected one number"),
    ("/improvd/temperature", [], "wrong type", "(no argument): expected one number"),
    ("/improvd/temperature", [11.0], "out of range", "out of range, allowed 0..10"),
    ("/improvd/temperature", [float("nan")], "out of range", "out of range"),
    ("/improvd/top_p", [0.0], "out of range", "allowed 0.01..1"),
    ("/improvd/length", [0], "out of range", "allowed 1..10000"),
    ("/improvd/length", [2.5], "wrong type", "whole number"),
    ("/improvd/length", ["3 bars"], "wrong value", "answer_length = '3 bars' is not valid"),
    ("/improvd/key", ["H major"], "wrong value", "'H major'"),
    ("/improvd/mode", ["jam"], "wrong value", "expected 'respond' or 'continuous'"),
    ("/improvd/mute", [2], "wrong value", "expected 1 or 0"),
    ("/improvd/panic", ["now"], "wrong type", "expected no argument"),
    ("/improvd/temperature", [True], "wrong type", "expected one number"),
])
def test_bad_input_names_what_is_wrong(address, args, kind, text):
    with pytest.raises(OscInputError) as err:
        parse(address, args)
    assert err.value.kind.startswith(kind)
    assert text in str(err.value)


def test_config_defaults_off_and_loopback_only_unless_chosen():
    osc = from_dict({}).osc
    assert not osc.enabled and osc.listen == "127.0.0.1" and not osc.allow_network and osc.send_to == ""
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2")
    with pytest.raises(ConfigError, match="not a loopback address.*allow_network = true"):
        from_dict({"osc": {"listen": "0.0.0.0"}})
    assert from_dict({"osc": {"listen": "0.0.0.0", "allow_network": True}}).osc.listen == "0.0.0.0"
    with pytest.raises(ConfigError, match="osc.send_to = 'pd' is not valid"):
        from_dict({"osc": {"send_to": "pd"}})
    assert parse_host_port("[::1]:9001") == ("::1", 9001)


class Recorder:
    def __init__(self):
        self.actions = []

    def __call__(self, action):
        self.actions.append(action)


@pytest.fixture
def endpoint():
    """An OscServer on a free loopback port sending state to a UDP socket of the test's."""
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    sink.settimeout(2.0)
    rec = Recorder()
    server = OscServer(OscConfig(enabled=True, port=0, send_to=f"127.0.0.1:{sink.getsockname()[1]}"), rec)
    server.start()
    yield server, rec, sink
    server.stop()
    sink.close()


def wait_for(predicate, timeout=2.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return predicate()


def test_a_udp_client_controls_and_bad_input_is_logged_once_per_kind(endpoint, caplog):
    server, rec, _ = endpoint
    client = SimpleUDPClient(*server.address)
    caplog.set_level(logging.WARNING, logger="improvd.osc")
    client.send_message("/improvd/temperature", 0.0)
    client.send_message("/improvd/key", "D dorian")
    for _ in range(3):
        client.send_message("/improvd/temperature", "hot")
        client._sock.sendto(b"\x00garbage\xff", server.address)
        client.send_message("/nope", 1)
    client.send_message("/improvd/panic", [])
    assert wait_for(lambda: len(rec.actions) == 3 and server.bad == 9)
    assert rec.actions == [Action("temperature", 0.0), Action("key", "D dorian"), Action("panic")]
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 3, warnings
    assert any("expected one number" in w for w in warnings)
    assert any("is not an OSC packet" in w for w in warnings)
    assert any("'/nope' is not improvd's" in w for w in warnings)


def test_state_messages_arrive_in_order(endpoint):
    import mido
    from pythonosc.osc_message import OscMessage
    server, _, sink = endpoint
    server.state("idle")
    server.state("listening")
    server.state("answering")
    server.sent(0.0, mido.Message("note_on", note=64, velocity=90, channel=0))
    server.sent(0.0, mido.Message("note_on", note=65, velocity=90, channel=3))  # not improvd's channel
    server.sent(0.0, mido.Message("note_off", note=64, channel=0))
    server.state("idle")
    got = []
    while len(got) < 5:
        msg = OscMessage(sink.recv(4096))
        got.append((msg.address, *msg.params))
    assert got == [("/improvd/state", "idle"), ("/improvd/state", "listening"), ("/improvd/state", "answering"),
                   ("/improvd/state", "note", 64, 90), ("/improvd/state", "idle")]


def test_a_busy_port_is_a_clear_error():
    from improvd.core.errors import ImprovdError
    taken = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    taken.bind(("127.0.0.1", 0))
    try:
        with pytest.raises(ImprovdError, match=r"cannot listen on 127\.0\.0\.1:\d+ .*choose another osc.port"):
            OscServer(OscConfig(enabled=True, port=taken.getsockname()[1]), Recorder())
    finally:
        taken.close()


def test_missing_python_osc_names_the_extra(monkeypatch):
    import builtins
    from improvd.core.errors import ImprovdError
    real_import = builtins.__import__

    def no_pythonosc(name, *args, **kwargs):
        if name.startswith("pythonosc"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_pythonosc)
    with pytest.raises(ImprovdError, match=r"pip install 'improvd\[osc\]'"):
        OscServer(OscConfig(enabled=True, port=0), Recorder())


def _message(address, args):
    b = OscMessageBuilder(address=address)
    for a in args:
        b.add_arg(a)
    return b.build().dgram


ADDRESSES = ["/improvd/temperature", "/improvd/top_p", "/improvd/length", "/improvd/key_strength", "/improvd/key",
             "/improvd/mode", "/improvd/mute", "/improvd/panic", "/improvd/reload", "/improvd/forget", "/improvd",
             "/", "/improvd/state"]
# OSC strings end at their first NUL, so a text argument holding one is not a message python-osc's builder can
# make (it re-parses what it built and raises); raw datagrams (st.binary above) still carry any byte, NULs included.
ARG = st.one_of(st.integers(-2**31, 2**31 - 1), st.floats(allow_nan=True, allow_infinity=True, width=32),
                st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=20),
                st.booleans(),
                st.binary(min_size=1, max_size=8))


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=200),
                 st.builds(_message, st.sampled_from(ADDRESSES), st.lists(ARG, max_size=3)),
                 st.builds(lambda m, cut: m[:cut], st.builds(_message, st.sampled_from(ADDRESSES),
                                                             st.lists(ARG, max_size=3)), st.integers(0, 40))))
def test_fuzzed_datagrams_never_raise_and_only_valid_actions_pass(data):
    rec = Recorder()
    server = OscServer(OscConfig(enabled=True, port=0), rec)  # never started: only its parser runs, on this thread
    try:
        handed = server.handle_datagram(data)
    finally:
        server.stop()
    assert handed == len(rec.actions)
    for action in rec.actions:
        assert action.function in ("temperature", "top_p", "max_notes", "answer_length", "key_strength", "key",
                                   "mode", "mute", "panic", "reload", "forget")
        if action.function == "temperature":
            assert 0 <= action.value <= 10


def test_the_engine_applies_osc_actions_in_its_thread(caplog):
    """Engine.control queues an action; the engine thread applies it like a CC's (tests/daemon/test_band.py's Sim)."""
    from harness.engines import T0, Sim
    from harness.modelfactory import make_step_model
    import tempfile
    from pathlib import Path
    with tempfile.TemporaryDirectory() as tmp:
        ref = make_step_model(Path(tmp) / "m.onnx", seed=7, context=64, step_scale=0.6, duration_scale=0.3)
        sim = Sim(ref, improvise_kw=dict(temperature=1.0))
        caplog.set_level(logging.INFO, logger="improvd.engine")
        for action in (Action("temperature", 0.0), Action("key", "D dorian"), Action("answer_length", "3 notes"),
                       Action("max_notes", 5), Action("mute", True), Action("forget")):
            sim.engine.control(action)
        sim.engine.run_once()  # what the engine thread does when the queue wakes it
        imp = sim.engine.improvise
        assert (imp.temperature, imp.key, imp.answer_length, imp.max_notes) == (0.0, "D dorian", "3 notes", 5)
        assert sim.engine.muted
        assert "forget: no session memory" in caplog.text
        sim.engine.control(Action("mute", False))
        sim.engine.run_once()
        end = sim.play([60, 62, 64], T0 + 0.2, spacing_s=0.3, hold_s=0.2)
        sim.run_until(end + 5)
        ons = sim.note_ons()
        assert len(ons) == 3 and all(m.note % 12 in {2, 4, 5, 7, 9, 11, 0} for _, m in ons)


def test_a_flood_of_control_messages_is_cut_at_the_rate_limit(endpoint, caplog):
    from improvd.daemon.io.osc import MAX_RATE
    server, rec, _ = endpoint
    caplog.set_level(logging.WARNING, logger="improvd.osc")
    data = _message("/improvd/temperature", [0.5])
    handed = sum(server.handle_datagram(data) for _ in range(MAX_RATE + 200))
    assert handed <= MAX_RATE + 1 and len(rec.actions) == handed  # (a new one-second window may just begin)
    assert caplog.text.count("control messages a second") == 1
