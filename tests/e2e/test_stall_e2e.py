"""A stalled JACK server (jackd stopped with SIGSTOP) must not freeze improvd: it notices the stall, writes
nothing to its output meanwhile, picks up when the server moves again (every note-on heard gets its note-off),
and a SIGTERM during the stall still ends it within a second, with the recording written."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from harness.clients import Player, Receiver, phrase
from harness.daemon import Daemon, make_model, write_config
from harness.jack import JackServer, wire

pytestmark = pytest.mark.jack


@pytest.fixture
def rig(tmp_path):
    # synchronous mode: a cycle waits for every client, so no MIDI is lost to a missed cycle on a busy host
    server = JackServer(sync=True).start(tmp_path)
    procs = []
    try:
        model = make_model(tmp_path, seed=5)
        config = write_config(tmp_path / "improvd.toml", model=model.path,
                              midi={"input": "virtual:improvd in", "output": "virtual:improvd out"},
                              improvise={"mode": "continuous", "temperature": 0.9},
                              record={"dir": str(tmp_path / "rec")})
        daemon = Daemon(server, config)
        procs.append(daemon)
        daemon.wait_ready()
        receiver = Receiver(server)
        procs.append(receiver)
        player = Player(server)
        procs.append(player)
        wire(server, [player], [receiver])
        yield server, daemon, player, receiver, tmp_path
    finally:
        if server.running:
            os.kill(server.proc.pid, signal.SIGCONT)
        for p in reversed(procs):
            p.stop()
        server.stop()


def _stall(server: JackServer, seconds: float) -> None:
    os.kill(server.proc.pid, signal.SIGSTOP)
    try:
        time.sleep(seconds)
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)


def test_sigterm_while_the_server_is_stopped_exits_within_a_second_with_the_recording(rig):
    server, daemon, player, receiver, tmp = rig
    player.play(phrase([60, 62, 64, 65, 67]))
    assert receiver.wait_events(lambda ev: sum(e.kind == "on" for e in ev) >= 3, 15.0), daemon.log()
    os.kill(server.proc.pid, signal.SIGSTOP)
    try:
        time.sleep(3.0)
        sent = daemon.send_signal(signal.SIGTERM)
        rc = daemon.wait(5.0)
        took = time.perf_counter() - sent
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
    log = daemon.log()
    assert rc == 0, log
    assert took <= 1.0, f"improvd took {took:.2f} s to exit\n{log}"
    assert "the JACK server stalled" in log and "recording written to" in log, log
    assert list(Path(tmp, "rec").glob("*.mid")), log


def test_after_a_stall_improvd_plays_on_and_every_note_on_gets_its_note_off(rig):
    server, daemon, player, receiver, tmp = rig
    player.play(phrase([60, 62, 64, 65, 67]))
    assert receiver.wait_events(lambda ev: sum(e.kind == "on" for e in ev) >= 3, 15.0), daemon.log()
    _stall(server, 2.0)
    daemon.reader.wait_line("the JACK server moves again", 5.0)
    before = len(receiver.events)
    assert receiver.wait_events(lambda ev: sum(e.kind == "on" for e in ev[before:]) >= 3, 15.0), \
        "improvd played nothing after the server moved again:\n" + daemon.log()
    assert daemon.send_signal(signal.SIGTERM) and daemon.wait(5.0) == 0, daemon.log()
    receiver.wait_quiet(0.5, 5.0)
    log = daemon.log()
    assert "the JACK server stalled" in log, log
    ons = sum(e.kind == "on" for e in receiver.events if e.channel == 0)
    offs = sum(e.kind == "off" for e in receiver.events if e.channel == 0)
    assert ons == offs, f"{ons} note-ons, {offs} note-offs at the receiver\n{log}"
