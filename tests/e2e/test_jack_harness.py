"""The harness itself: a mido JACK virtual port in another process reaches an independent receiver, on time."""

import pytest

from tests.e2e.jack import (JackServer, Player, Receiver, check_timing, jack_server, parse_dump_line,  # noqa: F401
                            phrase, requires_jack, xrun_kind)


def test_parse_dump_line():
    ev = parse_dump_line("  46208: 90 3c 64 note on  (channel  0): pitch  60, velocity 100", 48000)
    assert ev.t_s == pytest.approx(46208 / 48000)
    assert ev.data == (0x90, 60, 100) and ev.kind == "on" and ev.note == 60 and ev.channel == 0
    assert parse_dump_line("  51072: 80 3c 40 note off (channel  0): pitch  60, velocity  64").kind == "off"
    assert parse_dump_line("  51072: 92 3c 00 note on").kind == "off"
    assert parse_dump_line("garbage") is None


def test_xrun_kind_tells_the_driver_from_clients():
    assert xrun_kind("JackTimedDriver::Process XRun = 16 usec") == "driver woke late"
    assert xrun_kind("JackEngine::XRun: client = receiver-1 was not finished, state = Triggered") \
        == "receiver-1 Triggered"
    assert xrun_kind("JackEngine::XRun: client band-1 finished after current callback") == "band-1 finished late"


def _server_with_log(tmp_path, text: str, realtime: bool = True) -> JackServer:
    server = JackServer(realtime=realtime)
    server.log_path = tmp_path / "jackd.log"
    server.log_path.write_text(text)
    return server


def test_timing_miss_fails_unless_the_server_logged_xruns_after_the_mark(tmp_path):
    before = "JackTimedDriver::Process XRun = 16 usec\n"
    client = "JackEngine::XRun: client = receiver-1 was not finished, state = Triggered\n"
    server = _server_with_log(tmp_path, before)
    check_timing(server, True, "fine", since=0)
    # xruns before the mark are not this test's
    with pytest.raises(AssertionError, match="late by 4 ms"):
        check_timing(server, False, "late by 4 ms", since=len(before))
    with pytest.raises(pytest.xfail.Exception, match="1 xruns.*driver woke late.*late by 4 ms"):
        check_timing(server, False, "late by 4 ms", since=0)
    # a client that missed its cycle makes the receiver stamp that cycle's events late
    with pytest.raises(pytest.xfail.Exception, match="1 xruns.*receiver-1 Triggered.*late by 4 ms"):
        check_timing(_server_with_log(tmp_path, before + client), False, "late by 4 ms", since=len(before))
    with pytest.raises(pytest.xfail.Exception, match="without real-time"):
        check_timing(_server_with_log(tmp_path, "", realtime=False), False, "late", since=0)


@pytest.mark.jack
@requires_jack
def test_player_reaches_receiver(jack_server):
    mark = jack_server.log_size()
    receiver = Receiver(jack_server)
    player = Player(jack_server)
    try:
        jack_server.connect(player.port, receiver.port)
        player.play(phrase([60, 62, 64, 65], step_s=0.1, duration_s=0.05, channel=0))
        assert receiver.wait_events(lambda evs: len(evs) >= 8, 5.0), receiver.events
        ons = [e for e in receiver.events if e.kind == "on"]
        assert [e.note for e in ons] == [60, 62, 64, 65]
        iois = [b.t_s - a.t_s for a, b in zip(ons, ons[1:])]
        check_timing(jack_server, all(abs(ioi - 0.1) < 0.004 for ioi in iois), iois, since=mark)
    finally:
        player.stop()
        receiver.stop()
