"""Reliability of `improvd run` end to end over real JACK MIDI ports (issue 6): input floods, keys held too long,
ports that go away and come back, reloads with good and bad models and configs, recordings that survive `kill -9`
and a full disk, and no network sockets.

After every scenario, the note-ons and note-offs improvd sent, as seen by an independent receiver
(`jack_midi_dump -a`), balance. CI-sized: the full 10 s flood is `bench/flood.py`.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import mido
import pytest

from harness.clients import Player, Receiver, balance, note_counts, notes_of, phrase, prime_from_receiver
from harness.daemon import greedy_answer, input_counts, window_stats
from harness.flood import Flooder
from harness.graph import assert_graph_clean, midi_lost
from harness.modelfactory import make_step_model
from harness.procs import unique_id
from harness.session import DUR_S, IMPROVD_CH, PHRASE, PLAYER_CH, STEP_S, heard_notes
from tests.e2e.expect import check_timing

pytestmark = pytest.mark.jack


def improvd_ons(events) -> int:
    return sum(e.kind == "on" and e.channel == IMPROVD_CH for e in events)


def stop_and_check_balance(s, *receivers) -> None:
    """SIGTERM, exit 0, and every note-on improvd sent has its note-off at each receiver."""
    s.daemon.send_signal(signal.SIGTERM)
    assert s.daemon.wait(3.0) == 0, s.daemon.log()
    for receiver in receivers or (s.receiver,):
        receiver.wait_quiet(0.2, 5)
        hanging = balance(receiver.events, IMPROVD_CH)
        if hanging:
            detail = (s.daemon.log() + "\n" + "\n".join(
                f"{e.t_s:.4f} {e.data}" for e in receiver.events if e.channel == IMPROVD_CH and e.note in hanging))
            midi_lost(s.server, s.server_log_start, f"notes left sounding at the receiver: {hanging}\n{detail}")


# ---- floods ----------------------------------------------------------------------------------------------------

def _wire_flooder(s, name):
    flooder = Flooder(s.server, client=name)
    s.server.connect(flooder.port, s.in_port)
    return flooder


def test_flood_during_continuous_play_keeps_time_and_no_note_hangs(session):
    # improvd listens to channel 2; the flood sends everything, notes on the 15 other channels (see bench/flood.py)
    s = session(improvise={"mode": "continuous", "temperature": 0.9, "seed": 3, "max_hold": 0.5},
                midi={"input_channels": [PLAYER_CH + 1]})
    flooder = _wire_flooder(s, f"flooder-c{unique_id()}")
    try:
        s.player.play(phrase(PHRASE, step_s=STEP_S, duration_s=DUR_S, channel=PLAYER_CH))
        s.wait_answer_notes(3)
        window_stats(s.daemon, len(s.daemon.lines))  # start the window at the flood
        mark = len(s.daemon.lines)
        before = improvd_ons(s.receiver.events)
        flooder.flood(2.0, 10000, hang=2, quiet_channel=PLAYER_CH)
        during = window_stats(s.daemon, mark)
        sent = flooder.result()
        assert sent["sent"] >= 15000, sent  # the flooder kept (nearly) its rate
        assert during["sent"] >= 10 and during["p99_ms"] < 2.0, during  # it played on, on time
        time.sleep(1.0)  # the held keys expire (max_hold) and improvd plays on
        assert improvd_ons(s.receiver.events) > before + 2, s.daemon.log()
        assert s.daemon.proc.poll() is None
        stop_and_check_balance(s)
        ons, offs = note_counts(s.receiver.events, IMPROVD_CH)
        assert ons == offs
        received = input_counts(s.daemon.lines)
        assert received is not None and received["received"] > 0 and received["invalid"] > 0, s.daemon.log()
    finally:
        flooder.stop()


def test_after_a_flood_with_stuck_keys_a_phrase_is_answered(session):
    s = session(improvise={"max_notes": 6, "max_hold": 0.5})
    flooder = _wire_flooder(s, f"flooder-r{unique_id()}")
    try:
        log_mark = s.server.log_size()
        flooder.flood(2.0, 10000, hang=3)
        # improvd's JACK clients do not make the server's cycle late: no xrun names them, whatever the host does.
        # With a Python MIDI callback in JACK's process thread, waiting for the GIL, about 5 xruns a second of this
        # flood named improvd's input; with libjack calling a Python error handler, its input stopped for good.
        assert_graph_clean(s.server, log_mark)
        time.sleep(0.6)  # the three stuck keys count as released after max_hold...
        s.receiver.wait_quiet(0.8, 10)  # ...and improvd may answer the flood's last notes: let that end
        before = improvd_ons(s.receiver.events)
        s.player.play(phrase(PHRASE, step_s=STEP_S, duration_s=DUR_S, channel=PLAYER_CH))
        s.wait_answer_notes(before + 6)
        s.receiver.wait_quiet(0.5, 10)
        stop_and_check_balance(s)
    finally:
        flooder.stop()


def test_a_key_held_longer_than_max_hold_counts_as_released(session):
    s = session(improvise={"max_notes": 4, "max_hold": 0.8, "silence": 0.3})
    events = phrase(PHRASE[:4], step_s=STEP_S, duration_s=DUR_S, channel=PLAYER_CH)
    stuck_at = 4 * STEP_S
    events.append((stuck_at, "note_on", 72, 90, PLAYER_CH))  # its note-off never comes
    s.player.play(events)
    s.wait_answer_notes(4, timeout=10)
    heard = [e for e in s.receiver.events if e.channel == PLAYER_CH and e.kind == "on"]
    first = next(e for e in s.receiver.events if e.channel == IMPROVD_CH and e.kind == "on")
    # The answer starts once the stuck key counts as released (max_hold) and the silence has passed.
    delay = first.t_s - heard[-1].t_s
    # Measured on the receiver's frame clock, which loses the time the dummy driver sleeps too long (CI once saw
    # 1.084 s here): an expected failure only where the server logged xruns during the test (`check_timing`).
    check_timing(s.server, 0.8 + 0.3 - 0.01 <= delay <= 0.8 + 0.3 + 0.3,
                 f"first answer {delay:.4f} s after the stuck key, expected 1.09-1.40 s", since=s.server_log_start)
    s.receiver.wait_quiet(0.4, 10)
    s.player.play([(0.0, "note_off", 72, 0, PLAYER_CH)])  # the late release is ignored
    stop_and_check_balance(s)


# ---- ports that go away ------------------------------------------------------------------------------------------

def test_output_port_that_goes_away_is_released_and_reconnected(session, jack_server):
    synth_name = f"synth-{unique_id()}"
    synth = Receiver(jack_server, synth_name, exact_name=True)
    back = None
    try:
        s = session(midi={"output": synth.port}, improvise={"max_notes": 32, "max_seconds": 4.0})
        s.player.play(phrase(PHRASE, step_s=STEP_S, duration_s=DUR_S, channel=PLAYER_CH))
        s.wait_answer_notes(3)  # the independent receiver, wired to improvd's port too, hears it
        synth.stop()
        s.daemon.reader.wait_line("went away", 5.0)
        # The release reached what else was connected to improvd's port before it closed.
        s.receiver.wait_quiet(0.2, 5)
        assert balance(s.receiver.events, IMPROVD_CH) == {}, s.daemon.log()
        back = Receiver(jack_server, synth_name, exact_name=True)  # the synth restarts: the same port name
        t_back = time.monotonic()
        s.daemon.reader.wait_line("is back; reconnected", 5.0)
        reconnect_s = time.monotonic() - t_back
        print(f"output reconnected {reconnect_s * 1000:.0f} ms after the synth's port returned")
        assert reconnect_s < 1.5, reconnect_s
        heard_before = improvd_ons(back.events)
        s.player.play(phrase(PHRASE, step_s=STEP_S, duration_s=DUR_S, channel=PLAYER_CH))  # interrupts, if need be
        assert back.wait_events(lambda evs: improvd_ons(evs) >= heard_before + 3, 10), s.daemon.log()
        stop_and_check_balance(s, back)
        assert sum("went away" in ln for ln in s.daemon.lines) == 1, s.daemon.log()
    finally:
        synth.stop()
        if back is not None:
            back.stop()


def test_input_port_that_goes_away_releases_its_held_keys(session, jack_server):
    keys = Player(jack_server, client="keys")
    try:
        s = session(midi={"input": keys.port}, improvise={"max_notes": 3, "max_hold": 30.0, "silence": 0.3})
        jack_server.connect(keys.port, s.receiver.port)
        events = phrase(PHRASE[:4], step_s=STEP_S, duration_s=DUR_S, channel=PLAYER_CH)
        events.append((4 * STEP_S, "note_on", 72, 90, PLAYER_CH))  # held when the keyboard is unplugged
        keys.play(events)
        time.sleep(0.2)
        assert improvd_ons(s.receiver.events) == 0  # a key is held: no answer yet
        keys.proc.kill()  # unplugged
        s.daemon.reader.wait_line("went away", 5.0)
        released = s.daemon.reader.wait_line(r"released \d+ key\(s\) held on the lost input", 5.0)
        if "released 1 key(s)" not in released:  # a note-off of the phrase did not reach improvd
            midi_lost(s.server, s.server_log_start, f"{released}\n{s.daemon.log()}")
        s.wait_answer_notes(3, timeout=5)  # the phrase is over: improvd answers without waiting for max_hold
        s.receiver.wait_quiet(0.3, 10)
        stop_and_check_balance(s)
        assert sum("went away" in ln for ln in s.daemon.lines) == 1, s.daemon.log()
    finally:
        keys.stop()


def test_virtual_ports_survive_their_peers_leaving(session, jack_server):
    s = session(improvise={"max_notes": 16, "max_seconds": 3.0, "max_hold": 0.5})
    synth = Receiver(jack_server, client="synth")
    jack_server.connect(s.out_port, synth.port)
    try:
        s.player.play(phrase(PHRASE, step_s=STEP_S, duration_s=DUR_S, channel=PLAYER_CH))
        s.wait_answer_notes(3)
        synth.stop()  # one of two listeners leaves mid-answer
        s.player.play([(0.0, "note_on", 72, 90, PLAYER_CH)])  # interrupts, and stays held...
        # A killed client stalls the server's graph for a few cycles (xruns, MIDI of those cycles lost for every
        # client): let the interruption's releases reach the receiver before the player goes.
        s.receiver.wait_events(lambda evs: any(e.channel == PLAYER_CH and e.kind == "on" and e.note == 72 for e in evs)
                               and not balance(evs, IMPROVD_CH), 2.0)
        s.player.proc.kill()  # ...as the player leaves
        time.sleep(0.3)
        assert s.daemon.proc.poll() is None
        second = Player(jack_server)
        try:
            jack_server.connect(second.port, s.in_port)  # the virtual input is still there
            jack_server.connect(second.port, s.receiver.port)
            before = improvd_ons(s.receiver.events)
            time.sleep(0.5)  # the stuck key expires (max_hold)
            second.play(phrase(PHRASE[:4], step_s=STEP_S, duration_s=DUR_S, channel=PLAYER_CH))
            s.wait_answer_notes(before + 3)
            s.receiver.wait_quiet(0.3, 10)
            stop_and_check_balance(s)
            assert not any("went away" in ln for ln in s.daemon.lines), s.daemon.log()
        finally:
            second.stop()
    finally:
        synth.stop()


# ---- reloads ---------------------------------------------------------------------------------------------------

def test_reload_keeps_the_old_model_on_bad_ones_and_swaps_in_a_good_one(session, tmp_path):
    s = session(improvise={"max_notes": 8})
    config = next(tmp_path.glob(f"{s.client}.toml"))
    original = config.read_text()

    def reload_with(text: str, expect: str) -> None:
        start = len(s.daemon.lines)
        config.write_text(text)
        s.daemon.send_signal(signal.SIGHUP)
        s.daemon.reader.wait_line(expect, 10.0, start=start)

    reload_with(original.replace("temperature = 0.0", 'temperature = "hot"'),
                r"reload failed, improvd keeps the running config and model: improvise\.temperature")
    reload_with(original.replace("silence = 0.4", "silence = nan"),
                r"reload failed.*improvise\.silence = nan")
    nan_model = make_step_model(tmp_path / "nan.onnx", seed=4, nonfinite_outputs=("step",))
    reload_with(original.replace(str(s.daemon_model), str(nan_model.path)),
                r"reload failed.*non-finite outputs.*step")
    (tmp_path / "junk.onnx").write_bytes(b"this is not ONNX" * 10)
    reload_with(original.replace(str(s.daemon_model), str(tmp_path / "junk.onnx")),
                r"reload failed.*junk\.onnx.*not a loadable ONNX model")
    wrong = make_step_model(tmp_path / "wrong.onnx", format_tag="window-1")
    reload_with(original.replace(str(s.daemon_model), str(wrong.path)), r"reload failed.*improvd\.format")
    good = make_step_model(tmp_path / "good.onnx", seed=11, context=64)
    reload_with(original.replace(str(s.daemon_model), str(good.path)), r"reloaded: model .*good\.onnx")

    s.player.play(phrase(PHRASE, step_s=STEP_S, duration_s=DUR_S, channel=PLAYER_CH))
    s.wait_answer_notes(8)
    s.receiver.wait_quiet(0.5, 10)
    s.daemon.reader.wait_line(r"now playing .*good\.onnx", 2.0)
    heard = heard_notes(s)
    answer = notes_of(s.receiver.events, IMPROVD_CH)
    expected = greedy_answer(good, prime_from_receiver(heard), 8, answer[0][0] - heard[-1][0])
    assert [n[1] for n in answer] == expected[:, 0].astype(int).tolist()  # the new model's greedy answer
    stop_and_check_balance(s)


# ---- recordings ------------------------------------------------------------------------------------------------

def _tracks(path: Path) -> dict[str, int]:
    """Note-ons per named track of a MIDI file."""
    out = {}
    for track in mido.MidiFile(path).tracks:
        names = [m.name for m in track if m.type == "track_name"]
        if names:
            out[names[0]] = sum(m.type == "note_on" and m.velocity > 0 for m in track)
    return out


def test_recording_is_flushed_while_running_and_survives_kill_9(session, tmp_path):
    rec_dir = tmp_path / "rec"
    s = session(improvise={"max_notes": 6}, record={"dir": str(rec_dir), "flush_seconds": 0.5})
    s.player.play(phrase(PHRASE, step_s=STEP_S, duration_s=DUR_S, channel=PLAYER_CH))
    s.wait_answer_notes(6)
    s.receiver.wait_quiet(0.3, 10)
    time.sleep(0.8)  # one flush interval and a tick
    files = list(rec_dir.glob("*.mid"))
    assert len(files) == 1
    assert _tracks(files[0]) == {"player": len(PHRASE), "improvd": 6}  # written while running
    s.daemon.proc.send_signal(signal.SIGKILL)
    s.daemon.wait(3.0)
    assert _tracks(files[0]) == {"player": len(PHRASE), "improvd": 6}  # still whole after kill -9
    assert not list(rec_dir.glob(".*.tmp"))


@pytest.fixture
def tiny_disk(tmp_path):
    """A 96 KiB tmpfs (needs root and permission to mount; skipped otherwise)."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(mount)], capture_output=True,
                         text=True)
    if out.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {out.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_full_disk_is_reported_once_and_the_music_goes_on(session, tiny_disk):
    filler = tiny_disk / "filler"
    with open(filler, "wb", buffering=0) as fh:  # fill the disk
        try:
            while True:
                fh.write(b"\0" * 4096)
        except OSError:
            pass
    s = session(improvise={"max_notes": 6}, record={"dir": str(tiny_disk), "flush_seconds": 0.3})
    s.player.play(phrase(PHRASE, step_s=STEP_S, duration_s=DUR_S, channel=PLAYER_CH))
    s.daemon.reader.wait_line("cannot write the recording .*No space left on device", 5.0)
    s.wait_answer_notes(6)  # the music did not stop
    s.receiver.wait_quiet(0.3, 10)
    s.player.play(phrase(PHRASE[:4], step_s=STEP_S, duration_s=DUR_S, channel=PLAYER_CH))
    s.wait_answer_notes(12)
    assert sum("cannot write the recording" in ln for ln in s.daemon.lines) == 1, s.daemon.log()
    assert not list(tiny_disk.glob(".*.tmp"))  # no half-written temporary file is left to fill the disk
    filler.unlink()  # space again: the next flush writes it
    s.daemon.reader.wait_line("is written again", 5.0)
    s.receiver.wait_quiet(0.3, 10)
    stop_and_check_balance(s)
    files = list(tiny_disk.glob("*.mid"))
    assert len(files) == 1 and _tracks(files[0]) == {"player": len(PHRASE) + 4, "improvd": 12}


# ---- the network -------------------------------------------------------------------------------------------------

def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        m = re.fullmatch(r"socket:\[(\d+)\]", target)
        if m:
            inodes.add(int(m.group(1)))
    return inodes


def _inet_inodes() -> dict[int, str]:
    """inode -> 'proto local-address state' of every IPv4/IPv6 TCP, UDP and raw socket."""
    out = {}
    for proto in ("tcp", "tcp6", "udp", "udp6", "udplite", "udplite6", "raw", "raw6"):
        path = Path("/proc/net") / proto
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            if len(fields) > 9:
                out[int(fields[9])] = f"{proto} {fields[1]} state {fields[3]}"
    return out


def test_improvd_has_no_network_socket(session):
    s = session()
    s.player.play(phrase(PHRASE[:4], step_s=STEP_S, duration_s=DUR_S, channel=PLAYER_CH))
    s.wait_answer_notes(3)
    mine = _socket_inodes(s.daemon.proc.pid)
    assert mine, "improvd should at least hold JACK's unix sockets"
    inet = _inet_inodes()
    assert not {i: inet[i] for i in mine if i in inet}
    stop_and_check_balance(s)
