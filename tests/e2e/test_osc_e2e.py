"""OSC control of `improvd run`, end to end: a real UDP client on 127.0.0.1 and real JACK MIDI ports (dummy driver).

A source process holds a JACK MIDI output and a UDP socket and sends, each at its time, the player's notes, a MIDI
marker and OSC datagrams; the marker goes out right before a datagram from the same process, so `jack_midi_dump -a`
(an independent client) timestamps the moment of the OSC command on the same clock as improvd's notes. State
messages come back to a UDP socket of the test's.
"""

from __future__ import annotations

import random
import socket
import time

import numpy as np
import pytest

pytest.importorskip("pythonosc", reason="the OSC tests need python-osc (pip install 'improvd[osc]')")
from pythonosc.osc_message import OscMessage  # noqa: E402

from harness.band import C_MAJOR  # noqa: E402
from harness.clients import Receiver, Source, balance, notes_of, prime_from_receiver  # noqa: E402
from harness.daemon import Daemon, greedy_answer, toml_config  # noqa: E402
from harness.graph import assert_graph_clean  # noqa: E402
from harness.jack import wire  # noqa: E402
from harness.procs import closing_all, unique_id  # noqa: E402
from harness.session import IMPROVD_CH, PHRASE, PLAYER_CH  # noqa: E402
from tests.e2e.expect import check_timing  # noqa: E402

pytestmark = pytest.mark.jack

MARKER_CH = 15

def notes(pitches, start_s=0.0, step_s=0.15, duration_s=0.1):
    out = []
    for i, p in enumerate(pitches):
        t = start_s + i * step_s
        out += [(t, "midi", [0x90 | PLAYER_CH, p, 90]), (t + duration_s, "midi", [0x80 | PLAYER_CH, p, 0])]
    return out


def free_port() -> int:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class OscRig:
    """improvd with [osc] on a free loopback port, a source (MIDI + UDP), a receiver, and a state sink."""

    def __init__(self, server, tmp_path, model_path, *, improvise=None):
        self.server = server
        self.server_log_start = server.log_size()
        self.client = f"improvd-osc-{unique_id()}"
        self.sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sink.bind(("127.0.0.1", 0))
        self.sink.settimeout(0.05)
        self.port = free_port()
        self.config = toml_config(tmp_path / f"{self.client}.toml", {
            "model": {"path": str(model_path)},
            "midi": {"api": "jack", "client_name": self.client},
            "improvise": {"temperature": 0.0, "silence": 0.3, "max_notes": 8, "velocity": "fixed",
                          "answer_length": "max", **(improvise or {})},
            "osc": {"enabled": True, "port": self.port, "send_to": f"127.0.0.1:{self.sink.getsockname()[1]}"},
        })
        self.receiver = Receiver(server)
        self.source = Source(server, "oscsrc")
        self.daemon = Daemon(server, self.config, "--verbose")
        try:
            self.daemon.wait_ready()
            wire(server, [self.source], [self.receiver], client=self.client, monitor=True)
        except BaseException:
            self.close()
            raise
        self.states: list[tuple] = []

    def send(self, events, wait=True):
        """events: (t_s, "midi", [bytes]) | (t_s, "osc", address, [args]) | (t_s, "raw", hex)."""
        lines = []
        for ev in events:
            if ev[1] == "osc":
                lines.append([ev[0], "osc", self.port, ev[2], ev[3]])
            elif ev[1] == "raw":
                lines.append([ev[0], "raw", self.port, ev[2]])
            else:
                lines.append(list(ev))
        self.source.send_events(lines, wait=wait, timeout=60)

    def osc(self, address, *args):
        self.send([(0.0, "osc", address, list(args))])

    def read_states(self, quiet_s=0.3):
        end = time.monotonic() + quiet_s
        while time.monotonic() < end:
            try:
                data = self.sink.recv(4096)
            except (socket.timeout, TimeoutError):
                continue
            msg = OscMessage(data)
            self.states.append((msg.address, *msg.params))
            end = time.monotonic() + quiet_s
        return self.states

    def ons(self, after=-np.inf):
        return [e for e in list(self.receiver.events) if e.kind == "on" and e.channel == IMPROVD_CH and e.t_s > after]

    def answer(self, n, timeout=10.0):
        ok = self.receiver.wait_events(lambda evs: sum(e.kind == "on" and e.channel == IMPROVD_CH
                                                       for e in evs) >= n, timeout)
        self.receiver.wait_quiet(0.4, timeout=10)
        return ok

    def close(self):
        self.daemon.stop()
        self.source.stop()
        self.receiver.stop()
        self.sink.close()
        # whatever the test checked, improvd's clients must not have cost the graph its cycles
        assert_graph_clean(self.server, self.server_log_start)


@pytest.fixture
def rig(jack_server, tmp_path):
    with closing_all(lambda model_path, **kwargs: OscRig(jack_server, tmp_path, model_path, **kwargs)) as make:
        yield make


def test_osc_panic_silences_within_10_ms_and_states_arrive_in_order(rig, long_model):
    r = rig(long_model.path, improvise={"max_notes": 64, "max_seconds": 30.0})
    r.send(notes([60, 62, 64, 65]))
    assert r.receiver.wait_events(lambda evs: sum(e.kind == "on" and e.channel == IMPROVD_CH for e in evs) >= 3, 10)
    r.send([(0.0, "midi", [0xB0 | MARKER_CH, 20, 127]), (0.0, "osc", "/improvd/panic", [])])
    time.sleep(0.5)
    events = list(r.receiver.events)
    t_panic = next(e.t_s for e in events if e.data[0] == 0xB0 | MARKER_CH)
    after = [e for e in events if e.channel == IMPROVD_CH and e.t_s >= t_panic and e.data[0] & 0xF0 in (0x80, 0x90)]
    assert after and all(e.kind == "off" or e.data[2] == 0 for e in after), after
    assert balance(events, IMPROVD_CH) == {}
    check_timing(r.server, all(e.t_s - t_panic <= 0.010 for e in after),
                 f"improvd's note-offs {[round((e.t_s - t_panic) * 1000, 2) for e in after]} ms after the OSC panic",
                 since=r.server_log_start)
    r.daemon.reader.wait_line("panic: [1-9]", 2.0)

    states = r.read_states()
    names = [s[1] for s in states]
    assert names[:3] == ["idle", "listening", "answering"], states
    assert names[-1] == "idle", states
    played = [s[2] for s in states if s[1] == "note"]
    heard = [e.note for e in events if e.channel == IMPROVD_CH and e.kind == "on" and e.t_s < t_panic]
    assert played == heard, (played, heard)
    assert names.index("answering") < names.index("note")


def test_osc_temperature_0_and_top_p_make_answers_greedy(rig, spread_model):
    kw = {"temperature": 1.5, "top_p": 1.0, "seed": 11, "max_notes": 6, "step_range": [0.0, 2.0]}
    answers = {}
    for label in ("sampled", "greedy", "top_p"):
        r = rig(spread_model.path, improvise=kw)
        if label == "greedy":
            r.osc("/improvd/temperature", 0.0)
        elif label == "top_p":  # the smallest nucleus is the most likely pitch alone: greedy pitches at T = 1.5
            r.osc("/improvd/top_p", 0.01)
        r.send(notes(PHRASE))
        assert r.answer(6), r.daemon.log()
        heard = notes_of(r.receiver.events, PLAYER_CH)
        answer = r.ons()
        expected = greedy_answer(spread_model, prime_from_receiver(heard), 6, answer[0].t_s - heard[-1][0])
        answers[label] = ([e.note for e in answer], expected[:, 0].astype(int).tolist())
        r.close()
    for label in ("greedy", "top_p"):
        played, greedy = answers[label]
        assert played == greedy, (label, answers)
    played, greedy = answers["sampled"]
    assert played != greedy, answers  # the control made the difference


def test_osc_mute_length_key_mode_forget_and_reload_change_what_is_heard(rig, spread_model):
    r = rig(spread_model.path, improvise={"temperature": 1.0, "top_p": 1.0, "seed": 5, "max_notes": 8,
                                          "fixed_velocity": 90})
    black = [61, 63, 66, 68, 70]
    # mute: the phrase is heard, not answered
    r.osc("/improvd/mute", 1)
    r.send(notes(black))
    time.sleep(1.0)
    assert r.ons() == []
    r.osc("/improvd/mute", 0)
    # length 3 (improvise.max_notes), in C major only
    r.send([(0.0, "osc", "/improvd/length", [3]), (0.0, "osc", "/improvd/key", ["C major"]),
            (0.0, "osc", "/improvd/key_strength", [1.0])] + notes(black, 0.05))
    assert r.answer(3)
    time.sleep(0.5)
    first = r.ons()
    assert len(first) == 3 and all(e.note % 12 in C_MAJOR for e in first), [e.note for e in first]
    # key strength 0: the key no longer holds 8 notes from flat distributions
    mark = first[-1].t_s
    r.send([(0.0, "osc", "/improvd/key_strength", [0.0]), (0.0, "osc", "/improvd/length", [8])]
           + notes(black, 0.05))
    assert r.receiver.wait_events(lambda evs: len(r.ons(after=mark)) >= 8, 10), r.daemon.log()
    r.receiver.wait_quiet(0.4, timeout=10)
    assert any(e.note % 12 not in C_MAJOR for e in r.ons(after=mark)), [e.note for e in r.ons(after=mark)]
    first = r.ons()
    # answer_length as a string: 2 notes
    mark = first[-1].t_s
    r.send([(0.0, "osc", "/improvd/length", ["2 notes"])] + notes(black, 0.05))
    assert r.answer(5)
    assert len(r.ons(after=mark)) == 2
    # continuous: improvd goes on past the length
    mark = r.ons()[-1].t_s
    r.send([(0.0, "osc", "/improvd/mode", ["continuous"])] + notes(black, 0.05))
    assert r.receiver.wait_events(lambda evs: len(r.ons(after=mark)) >= 12, 10), r.daemon.log()
    r.osc("/improvd/mode", "respond")
    r.receiver.wait_quiet(0.5, timeout=10)
    # forget and reload act (and say so) without a sound
    r.osc("/improvd/forget")
    r.daemon.reader.wait_line("forget: no session memory", 3.0)
    r.config.write_text(r.config.read_text().replace("fixed_velocity = 90", "fixed_velocity = 40"))
    r.osc("/improvd/reload")
    r.daemon.reader.wait_line(r"reloaded: model", 10.0)
    mark = r.ons()[-1].t_s
    r.send(notes(black))
    assert r.receiver.wait_events(lambda evs: len(r.ons(after=mark)) >= 2, 10), r.daemon.log()
    r.receiver.wait_quiet(0.4, timeout=10)
    assert {e.data[2] for e in r.ons(after=mark)} == {40}  # the reloaded file's velocity
    assert {e.data[2] for e in first} == {90}
    assert balance(r.receiver.events, IMPROVD_CH) == {}
    assert r.daemon.proc.poll() is None


def test_fuzzed_datagrams_never_crash_the_daemon_or_leave_a_note_hanging(rig, long_model):
    r = rig(long_model.path, improvise={"mode": "continuous", "max_notes": 16})
    r.send(notes(PHRASE))
    rnd = random.Random(7)
    addresses = ["/improvd/temperature", "/improvd/top_p", "/improvd/length", "/improvd/key_strength",
                 "/improvd/key", "/improvd/mode", "/improvd/mute", "/improvd/panic", "/improvd/forget",
                 "/improvd/nope", "/x", "/improvd"]
    values = [0, 1, -1, 0.5, 2.0, 1e9, float("nan"), "match", "C major", "H minor", "continuous", "", True, False]
    events = []
    for i in range(1500):
        t = i * 0.004
        if rnd.random() < 0.4:
            events.append((t, "raw", bytes(rnd.getrandbits(8) for _ in range(rnd.randint(0, 64))).hex()))
        else:
            args = [rnd.choice(values) for _ in range(rnd.randint(0, 2))]
            events.append((t, "osc", rnd.choice(addresses), args))
    r.send(events)
    # back to a known state, then a clean answer: the daemon still plays and every note ends
    r.send([(0.0, "osc", "/improvd/mute", [0]), (0.0, "osc", "/improvd/mode", ["respond"]),
            (0.0, "osc", "/improvd/temperature", [0.0]), (0.0, "osc", "/improvd/length", [4]),
            (0.0, "osc", "/improvd/length", ["max"]), (0.0, "osc", "/improvd/panic", [])])
    r.receiver.wait_quiet(0.5, timeout=15)
    mark = max([e.t_s for e in r.receiver.events] or [0.0])
    r.send(notes(PHRASE))
    assert r.receiver.wait_events(lambda evs: len(r.ons(after=mark)) >= 4, 10), r.daemon.log()
    r.receiver.wait_quiet(0.5, timeout=10)
    assert len(r.ons(after=mark)) == 4, r.daemon.log()
    assert r.daemon.proc.poll() is None
    assert r.daemon.stop() == 0
    assert balance(r.receiver.events, IMPROVD_CH) == {}
    warnings = [ln for ln in r.daemon.lines if "further input of this kind is dropped" in ln]
    assert 3 <= len(warnings) <= 60, warnings  # once per kind, not once per datagram
    assert any("is not an OSC packet" in ln for ln in warnings)
