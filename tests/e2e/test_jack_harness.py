"""The harness itself: a mido JACK virtual port in another process reaches an independent receiver, on time."""

import pytest

from tests.e2e.jack import (Player, Receiver, check_timing, jack_server, parse_dump_line, phrase,  # noqa: F401
                            requires_jack)


def test_parse_dump_line():
    ev = parse_dump_line("  46208: 90 3c 64 note on  (channel  0): pitch  60, velocity 100", 48000)
    assert ev.t_s == pytest.approx(46208 / 48000)
    assert ev.data == (0x90, 60, 100) and ev.kind == "on" and ev.note == 60 and ev.channel == 0
    assert parse_dump_line("  51072: 80 3c 40 note off (channel  0): pitch  60, velocity  64").kind == "off"
    assert parse_dump_line("  51072: 92 3c 00 note on").kind == "off"
    assert parse_dump_line("garbage") is None


@pytest.mark.jack
@requires_jack
def test_player_reaches_receiver(jack_server):
    receiver = Receiver(jack_server)
    player = Player(jack_server)
    try:
        jack_server.connect(player.port, receiver.port)
        player.play(phrase([60, 62, 64, 65], step_s=0.1, duration_s=0.05, channel=0))
        assert receiver.wait_events(lambda evs: len(evs) >= 8, 5.0), receiver.events
        ons = [e for e in receiver.events if e.kind == "on"]
        assert [e.note for e in ons] == [60, 62, 64, 65]
        iois = [b.t_s - a.t_s for a, b in zip(ons, ons[1:])]
        check_timing(jack_server, all(abs(ioi - 0.1) < 0.004 for ioi in iois), iois)
    finally:
        player.stop()
        receiver.stop()
