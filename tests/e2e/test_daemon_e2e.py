"""`improvd run` end to end over real JACK MIDI ports (dummy driver, 48 kHz, 64-frame periods).

The player is another process; the receiver is `jack_midi_dump -a`, a third-party client that timestamps every
event in frames of the server's clock. The player plays on channel 2 and improvd answers on channel 1; both are
connected to the receiver, so one clock sees the phrase and the answer.
"""

from __future__ import annotations

import signal
import time

import numpy as np
import pytest

from harness.clients import Player, balance, notes_of, phrase, prime_from_receiver
from harness.daemon import Daemon, greedy_answer, write_config
from harness.graph import midi_lost
from harness.jack import JackServer
from harness.session import DUR_S, IMPROVD_CH, PHRASE, PLAYER_CH, SILENCE_S, STEP_S, heard_notes
from tests.e2e.expect import check_timing

pytestmark = pytest.mark.jack

PITCH_RANGE = (21, 108)
STEP_RANGE = (0.0, 2.0)
DURATION_RANGE = (0.03, 4.0)


def test_phrase_is_answered_with_the_greedy_notes_on_time(session, model):
    s = session(improvise={"max_notes": 12})
    s.player.play(phrase(PHRASE, step_s=STEP_S, duration_s=DUR_S, channel=PLAYER_CH))
    s.wait_answer_notes(12, timeout=10)
    s.receiver.wait_quiet(0.5, timeout=10)
    assert s.daemon.proc.poll() is None

    heard = heard_notes(s)
    answer = notes_of(s.receiver.events, IMPROVD_CH)
    assert [n[1] for n in heard] == PHRASE
    assert len(answer) == 12 and all(n[2] is not None for n in answer), answer

    expected = greedy_answer(model, prime_from_receiver(heard), 12, answer[0][0] - heard[-1][0],
                             pitch_range=PITCH_RANGE, step_range=STEP_RANGE, duration_range=DURATION_RANGE)
    assert [n[1] for n in answer] == expected[:, 0].astype(int).tolist()

    # The first note comes once the silence has passed (its predicted step is shorter than the silence).
    end_of_silence = max(n[2] for n in heard) + SILENCE_S
    first_delay = answer[0][0] - end_of_silence
    check_timing(s.server, -0.003 <= first_delay <= 0.02, f"first note {first_delay * 1000:.2f} ms after the silence",
                 since=s.server_log_start)

    # Inter-onset intervals against the predicted steps; durations against the predicted durations (a note ends
    # early where the next note of the same pitch starts while it still sounds).
    onsets = np.array([n[0] for n in answer])
    offs = np.array([n[2] for n in answer])
    ioi_err = np.diff(onsets) - expected[1:, 1]
    predicted_on = onsets[0] + np.concatenate([[0.0], np.cumsum(expected[1:, 1])])
    predicted_off = predicted_on + expected[:, 2]
    for k in range(len(answer)):
        for j in range(k + 1, len(answer)):
            if expected[j, 0] == expected[k, 0] and predicted_on[j] < predicted_off[k]:
                predicted_off[k] = predicted_on[j]
                break
    dur_err = (offs - onsets) - (predicted_off - predicted_on)
    errors_ms = np.abs(np.concatenate([ioi_err, dur_err])) * 1000
    check_timing(s.server, np.percentile(errors_ms, 95) <= 3.0 and errors_ms.max() <= 6.0,
                 f"inter-onset errors {np.round(ioi_err * 1000, 2)} ms, duration errors {np.round(dur_err * 1000, 2)} ms",
                 since=s.server_log_start)
    assert any(line.count("answer:") and "played 12" in line for line in s.daemon.lines), s.daemon.log()


def test_player_interrupts_the_answer(session):
    s = session(improvise={"max_notes": 64, "max_seconds": 20.0, "silence": SILENCE_S})
    s.player.play(phrase(PHRASE, step_s=STEP_S, duration_s=DUR_S, channel=PLAYER_CH))
    s.wait_answer_notes(3)
    s.player.play([(0.0, "note_on", 72, 100, PLAYER_CH)])  # held: no new phrase while we look
    assert s.receiver.wait_events(lambda evs: any(e.channel == PLAYER_CH and e.note == 72 for e in evs), 5)
    time.sleep(SILENCE_S * 0.75)
    events = list(s.receiver.events)
    t_int = next(e.t_s for e in events if e.channel == PLAYER_CH and e.note == 72 and e.kind == "on")
    after = [e for e in events if e.channel == IMPROVD_CH and e.t_s >= t_int]
    assert all(e.kind == "off" for e in after), after
    check_timing(s.server, all(e.t_s <= t_int + 0.010 for e in after),
                 f"improvd events {[round((e.t_s - t_int) * 1000, 2) for e in after]} ms after the interruption",
                 since=s.server_log_start)
    assert balance(events, IMPROVD_CH) == {}
    s.player.play([(0.0, "note_off", 72, 0, PLAYER_CH)])
    assert s.daemon.send_signal(signal.SIGTERM)
    assert s.daemon.wait(2.0) == 0
    s.receiver.wait_quiet(0.2, 5)
    assert balance(s.receiver.events, IMPROVD_CH) == {}
    assert any("interrupted" in line for line in s.daemon.lines), s.daemon.log()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_mid_answer_releases_every_note_and_exits_0(session, tmp_path, sig):
    rec_dir = tmp_path / f"rec-{int(sig)}"
    s = session(improvise={"max_notes": 64, "max_seconds": 20.0}, record={"dir": str(rec_dir)})
    s.player.play(phrase(PHRASE, step_s=STEP_S, duration_s=DUR_S, channel=PLAYER_CH))
    s.wait_answer_notes(3)
    t0 = s.daemon.send_signal(sig)
    rc = s.daemon.wait(3.0)
    elapsed = time.perf_counter() - t0
    assert rc == 0, s.daemon.log()
    assert elapsed < 1.0, elapsed
    s.receiver.wait_quiet(0.2, 5)
    assert balance(s.receiver.events, IMPROVD_CH) == {}

    from improvd.core.midifile import read_notes
    import mido
    files = list(rec_dir.glob("*.mid"))
    assert len(files) == 1, s.daemon.log()
    midi = mido.MidiFile(files[0])
    counts = {}
    for track in midi.tracks:
        names = [m.name for m in track if m.type == "track_name"]
        if names:
            counts[names[0]] = sum(m.type == "note_on" and m.velocity > 0 for m in track)
    if counts["player"] != len(PHRASE):
        midi_lost(s.server, s.server_log_start, f"improvd heard {counts['player']} of {len(PHRASE)} notes")
    assert counts["improvd"] == sum(e.kind == "on" for e in s.events(IMPROVD_CH))
    assert len(read_notes(files[0])) >= len(PHRASE)


def test_continuous_mode_keeps_playing(session):
    s = session(improvise={"mode": "continuous", "max_notes": 16, "temperature": 0.8, "seed": 7})
    s.player.play(phrase(PHRASE, step_s=STEP_S, duration_s=DUR_S, channel=PLAYER_CH), wait=False)
    s.wait_answer_notes(8, timeout=10)
    s.daemon.send_signal(signal.SIGTERM)
    assert s.daemon.wait(2.0) == 0
    s.receiver.wait_quiet(0.2, 5)
    assert balance(s.receiver.events, IMPROVD_CH) == {}


def test_missing_port_is_an_error_listing_the_ports(jack_server, tmp_path, model):
    player = Player(jack_server)
    try:
        config = write_config(tmp_path / "c.toml", model=model.path, midi={"input": "no such keyboard"})
        daemon = Daemon(jack_server, config)
        rc = daemon.wait(20.0)
        text = daemon.log()
        assert rc == 2, text
        assert "no such keyboard" in text and player.port in text, text
    finally:
        player.stop()


def test_input_port_that_goes_away_is_reconnected(session, jack_server):
    first = Player(jack_server, client="keys")
    back = None
    try:
        s = session(midi={"input": first.port}, improvise={"max_notes": 2})
        first.stop()
        s.daemon.reader.wait_line("went away", 5.0)
        back = Player(jack_server, client=first.client, exact_name=True)  # the same port comes back
        s.daemon.reader.wait_line("is back; reconnected", 5.0)
        jack_server.connect(back.port, s.receiver.port)
        back.play(phrase(PHRASE[:4], step_s=STEP_S, duration_s=DUR_S, channel=PLAYER_CH))
        s.wait_answer_notes(2, timeout=5)
    finally:
        first.stop()
        if back is not None:
            back.stop()


def test_jack_server_gone_exits_non_zero(tmp_path, model):
    server = JackServer().start(tmp_path)
    try:
        config = write_config(tmp_path / "c.toml", model=model.path, midi={"client_name": "improvd-gone"})
        daemon = Daemon(server, config)
        daemon.wait_ready()
        server.stop()
        rc = daemon.wait(5.0)
        assert rc == 3, daemon.log()
        assert "JACK server went away" in daemon.log()
    finally:
        server.stop()


def test_sighup_with_a_broken_model_keeps_the_old_one(session, tmp_path):
    s = session(improvise={"max_notes": 3})
    config = next(tmp_path.glob(f"{s.client}.toml"))
    config.write_text(config.read_text().replace(str(s.daemon_model), str(tmp_path / "missing.onnx")))
    s.daemon.send_signal(signal.SIGHUP)
    s.daemon.reader.wait_line("reload failed, improvd keeps the running config and model: .*missing.onnx", 5.0)
    s.player.play(phrase(PHRASE[:4], step_s=STEP_S, duration_s=DUR_S, channel=PLAYER_CH))
    s.wait_answer_notes(3)
    s.daemon.send_signal(signal.SIGTERM)
    assert s.daemon.wait(2.0) == 0
