"""Turn-taking of `improvd run` end to end over real JACK MIDI ports (daemon/music/turns.py): silence = "auto" answers fast
eighths quickly and never cuts into slow legato quarters, answer_length = "match" answers about as long as the call,
and with MIDI clock running the answer enters on a beat. The calls and measures are harness/turns.py's
(bench/turns.py runs the whole set)."""

from __future__ import annotations

import numpy as np
import pytest

from harness.band import TICK, clock, notes, tick_timeline
from harness.clients import Player, Receiver
from harness.daemon import REPO, Daemon, write_config
from harness.jack import wire
from harness.session import IMPROVD_CH, PLAYER_CH
from harness.turns import Call, measure
from tests.e2e.expect import check_timing

pytestmark = pytest.mark.jack

SHIPPED = REPO / "models" / "bach.onnx"


@pytest.mark.skipif(not SHIPPED.is_file(), reason="the shipped model models/bach.onnx is not in this checkout")
def test_auto_silence_and_match_length_with_the_shipped_model(jack_server, tmp_path):
    server_log_start = jack_server.log_size()
    receiver, player = Receiver(jack_server), Player(jack_server)
    client = "improvd-turns-e2e"
    config = write_config(tmp_path / "turns.toml", model=SHIPPED, midi={"client_name": client},
                          improvise={"temperature": 0.9, "seed": 3, "silence": "auto", "answer_length": "match",
                                     "max_notes": 128, "max_seconds": 12.0})
    daemon = Daemon(jack_server, config)
    try:
        daemon.wait_ready()
        wire(jack_server, [player], [receiver], client=client, monitor=True)
        rows = {}
        for call in (Call(160, "eighth", "legato", False), Call(160, "eighth", "detached", True),
                     Call(60, "quarter", "legato", False), Call(60, "quarter", "detached", False)):
            mark = len(receiver.events)
            answers = sum("answer:" in ln for ln in daemon.lines)
            player.play(call.events(PLAYER_CH), wait=True, timeout=60)
            assert daemon.reader.wait_for(lambda: sum("answer:" in ln for ln in daemon.lines) > answers, 20), \
                daemon.log()
            receiver.wait_quiet(0.3, timeout=20)
            rows[call.name] = measure(receiver.events[mark:], PLAYER_CH, IMPROVD_CH, -1e18, 1e18)
    finally:
        daemon.stop()
        player.stop()
        receiver.stop()
    assert not any(r["premature"] for r in rows.values()), rows
    assert all(r["answer_notes"] > 0 for r in rows.values()), rows
    check_timing(jack_server, all(rows[k]["latency_ms"] <= 400 for k in rows if k.startswith("160")),
                 f"160 bpm: first answered note {[rows[k]['latency_ms'] for k in rows if k.startswith('160')]} ms "
                 f"after the last release (target <= 400)", since=server_log_start)
    ratios = [r["ratio"] for r in rows.values()]
    assert 0.75 <= float(np.median(ratios)) <= 1.33, rows


def test_with_midi_clock_the_answer_enters_on_a_beat(band, grid_model):
    b = band(grid_model.path, improvise={"silence": "auto", "max_notes": 4})
    ticks_ev, _ = clock(0.2, 100, 16, transport=True)
    phrase = notes([60, 62, 64, 65], 1.013, 0.3, 0.2)  # off the beat on purpose
    b.source.send(ticks_ev + phrase)
    b.receiver.wait_quiet(0.5, timeout=10)
    events = list(b.receiver.events)
    seen = np.array([e.t_s for e in events if e.data[0] == TICK])
    assert len(seen) >= 24 * 16 - 3, len(seen)
    ticks = tick_timeline(seen, 24 * 16, 60.0 / (100 * 24), 60.0 / (100 * 24))
    beats = ticks[::24]
    ons = [e.t_s for e in b.improvd_ons()]
    assert len(ons) == 4, b.daemon.log()
    player_ons = [e.t_s for e in events if e.channel == PLAYER_CH and e.kind == "on"]
    last_release = max(e.t_s for e in events if e.channel == PLAYER_CH and e.kind == "off")
    dist_ms = float(np.min(np.abs(beats - ons[0]))) * 1000
    check_timing(b.server, dist_ms <= 3.0, f"first answered note {dist_ms:.2f} ms from the nearest beat",
                 since=b.server_log_start)
    # and it is the first beat after the phrase's end (1.5 IOIs after its last onset, half an IOI after the
    # release), or the one after that if the model's own first step reaches past it
    phrase_end = max(player_ons[-1] + 1.5 * 0.3, last_release + 0.5 * 0.3)
    first_beats = beats[beats >= phrase_end - 0.003][:2]
    assert float(np.min(np.abs(first_beats - ons[0]))) <= 0.003, (ons[0], first_beats, phrase_end)
