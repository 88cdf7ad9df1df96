"""Every state change keeps the promises (issue 17): reload, transport Stop, thru, lost ports, slow and failing
disks, bad files, a model's metadata, file modes.

Engine tests run on a fake clock without threads (`Sim` from test_band.py); the service tests build a `Service`
without MIDI devices where they can, and run `improvd` as a process where the exit status is the promise.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import mido
import pytest

from improvd.daemon.io import recorder
from improvd.daemon.io.inport import InputPort
from improvd.daemon.io.outport import OutputPort
from improvd.daemon.live import service
from improvd.daemon.live.inputsink import InputSink
from improvd.core.config import Config, from_dict, load_config
from improvd.daemon.predict.model import StepModel
from improvd.daemon.io.recorder import SessionRecorder
from improvd.daemon.music.arrival import ArrivalClock
from harness.fakes import FakeClock as Clock
from harness.fakes import FakeMidi, FakeRt, balanced, drain
from harness.engines import T0, Sim
from harness.session import PLAYER_CH
from harness.modelfactory import make_step_model

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_step_model(tmp_path_factory.mktemp("m") / "p.onnx", seed=7, context=200, step_scale=0.6,
                           duration_scale=0.3)


def _key(sim, t_s, pitch, down=True, channel=PLAYER_CH):
    sim.at(t_s, mido.Message("note_on", note=pitch, velocity=90 if down else 0, channel=channel))


def _thru_offs(sim, pitch, channel=PLAYER_CH):
    return [t for t, m in sim.sent if m.channel == channel and m.note == pitch and
            (m.type == "note_off" or (m.type == "note_on" and m.velocity == 0))]


# ---- 1. a reload applies what it says it applies ----------------------------------------------------------------

def test_a_reload_that_turns_thru_off_still_releases_the_thru_notes_sounding(model):
    sim = Sim(model, improvise_kw=dict(max_notes=2, max_hold=8.0), midi=dict(thru=True))
    _key(sim, T0 + 0.1, 48)  # held while the reload comes
    sim.run_until(T0 + 0.2)
    assert (PLAYER_CH, 48) in sim.scheduler.sounding()
    new = sim.config.replace(midi=dataclasses.replace(sim.config.midi, thru=False, output_channel=9,
                                                      input_channels=(16,)))
    sim.engine.request_swap(new, sim.engine.model)
    sim.engine.run_once()  # an idle engine swaps at once (the request wakes it)
    sim.run_until(T0 + 0.3)
    _key(sim, T0 + 0.4, 48, down=False)
    sim.run_until(T0 + 0.5)
    assert _thru_offs(sim, 48) == [pytest.approx(T0 + 0.4)]  # released with the key, not 8 s later
    # [midi] is not reloaded (the service says so): thru goes on, improvd plays on its channel, hears channel 2
    assert sim.engine.config.midi == sim.config.midi
    end = sim.play([60, 62], T0 + 0.6)
    sim.run_until(end + 3)
    assert [m.note for _, m in sim.sent if m.type == "note_on" and m.channel == PLAYER_CH][1:] == [60, 62]
    assert len(sim.note_ons(channel=0)) == 2 and not sim.note_ons(channel=8)
    assert balanced(sim.sent)


def test_a_reload_whose_priming_fails_keeps_the_old_config_and_model(model, tmp_path, caplog):
    sim = Sim(model, improvise_kw=dict(max_notes=2, temperature=0.0))
    end = sim.play([60, 62, 64], T0 + 0.1)
    sim.run_until(end + 3)
    assert len(sim.summaries) == 1
    other = StepModel(make_step_model(tmp_path / "other.onnx", seed=3).path)

    def broken_run(*args, **kwargs):
        raise RuntimeError("onnxruntime: out of memory")
    other.run = broken_run
    new = sim.config.replace(improvise=dataclasses.replace(sim.config.improvise, max_notes=5))
    with caplog.at_level(logging.ERROR):
        sim.engine.request_swap(new, other)
        sim.engine.run_once()
        sim.run_until(sim.t + 0.1)
    assert sim.engine.model is not other and sim.engine.config.improvise.max_notes == 2  # all or nothing
    assert "reload" in caplog.text and "out of memory" in caplog.text
    end = sim.play([60, 62, 64], sim.t + 0.1)
    sim.run_until(end + 3)
    assert len(sim.summaries) == 2 and sim.summaries[-1]["notes_played"] == 2  # still playing, the old way
    assert balanced(sim.sent)


# ---- 2. transport Stop releases the thru notes ------------------------------------------------------------------

def test_transport_stop_releases_the_thru_notes(model):
    sim = Sim(model, improvise_kw=dict(max_notes=2, max_hold=8.0), midi=dict(thru=True))
    sim.at(T0, mido.Message("start"))
    _key(sim, T0 + 0.1, 48)
    sim.run_until(T0 + 0.2)
    assert (PLAYER_CH, 48) in sim.scheduler.sounding()
    sim.at(T0 + 0.25, mido.Message("stop"))
    sim.run_until(T0 + 0.3)
    assert _thru_offs(sim, 48) == [pytest.approx(T0 + 0.25)]
    assert sim.scheduler.sounding() == frozenset()
    _key(sim, T0 + 0.5, 48, down=False)  # the late release sends nothing more
    sim.run_until(T0 + 0.6)
    assert len(_thru_offs(sim, 48)) == 1 and balanced(sim.sent)


# ---- 3. lost ports: nothing slips between the release and the port's closing -------------------------------------

def test_a_note_on_sent_while_a_lost_output_is_released_never_goes_out():
    rt = FakeRt(["synth:in"])
    out = OutputPort("jack", "synth", open_client=FakeMidi(rt))

    def release_all():  # the scheduler's release_all, and the scheduler thread sending a due note-on meanwhile
        out.send(mido.Message("note_off", note=60))
        out.send(mido.Message("note_on", note=61))
        out.send(mido.Message("control_change", control=123, value=0))
    out.on_lost = release_all
    rt.names = []
    assert out.check() == "lost"
    # the note-on would reach improvd's other connections (a DAW), and its note-off would be dropped while lost
    assert rt.calls[1:] == [("send", (0x80, 60, 64)), ("send", (0xB0, 123, 0)), ("close",)]
    rt.names = ["synth:in"]
    assert out.check() == "back"
    out.send(mido.Message("note_on", note=61))
    assert rt.calls[-1] == ("send", (0x90, 61, 64))


def test_a_key_read_before_its_input_was_lost_is_released_after_it():
    engine_queue = queue.SimpleQueue()
    sink = InputSink(engine_queue, None, None)
    rt = FakeRt(["kbd:out"], [([0x90, 60, 100], 0.0)])
    arrival = ArrivalClock(drift=0.0)
    port = InputPort("jack", "kbd", sink, now=lambda: 5.0, start=False, open_client=FakeMidi(rt), arrival=arrival)
    rt.names = []  # the keyboard is unplugged while the poller holds a batch it has read

    def watchdog():  # the main thread's port check
        if port.check() == "lost":
            sink.release_held(6.0)
    real_stamp = arrival.stamp

    def stamp(deltas, polled_s):
        t = threading.Thread(target=watchdog)
        t.start()
        t.join(0.3)
        stamp.thread = t
        return real_stamp(deltas, polled_s)
    arrival.stamp = stamp
    assert port.poll_once() == 1
    stamp.thread.join(2.0)
    got = [(m.type, m.note) for _, m in drain(engine_queue)]
    assert got == [("note_on", 60), ("note_off", 60)]  # the key-down, then its release: nothing held
    assert sink.held == set()


# ---- 6. start-up errors: exit 2 and one line, never a traceback --------------------------------------------------

def _as_user_cmd():
    """The command prefix that runs a child as an unprivileged user when the tests run as root (root reads any
    directory, so a permission error cannot happen to it)."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: cannot run the daemon as an unprivileged user")
    return ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def _run_daemon(config_path, *, unprivileged=False):
    cmd = (_as_user_cmd() if unprivileged else []) + [sys.executable, "-m", "improvd.daemon.cli", "run",
                                                      "--config", str(config_path)]
    env = dict(os.environ, JACK_NO_START_SERVER="1", HOME=str(Path(config_path).parent))
    return subprocess.run(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                          timeout=120)


@pytest.fixture
def shared_dir():
    """A temporary directory an unprivileged child can use too (pytest's tmp_path is the tester's alone)."""
    path = Path(tempfile.mkdtemp(prefix="improvd-t17-"))
    path.chmod(0o755)
    yield path
    for sub in path.rglob("*"):
        if sub.is_dir():
            sub.chmod(0o755)
    shutil.rmtree(path, ignore_errors=True)


def _one_clear_line(proc, pattern):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and re.match(r"improvd run: error: .*" + pattern, lines[0]), proc.stderr


def test_a_config_that_is_not_utf8_exits_2_naming_the_byte(shared_dir):
    path = shared_dir / "c.toml"
    path.write_bytes(b'[improvise]\ntemperature = 0.5\n# caf\xe9 in latin-1\n')
    _one_clear_line(_run_daemon(path), r"config file '.*c\.toml' is not UTF-8 text: byte 0xe9 at line 3")


def test_a_directory_given_as_the_config_exits_2(shared_dir):
    _one_clear_line(_run_daemon(shared_dir), r"config file '.*improvd-t17-[^']*' is a directory, not a TOML file")


def test_an_unreadable_config_exits_2(shared_dir):
    path = shared_dir / "c.toml"
    path.write_text("[improvise]\ntemperature = 0.5\n")
    path.chmod(0o000)
    _one_clear_line(_run_daemon(path, unprivileged=True), r"config file '.*c\.toml' cannot be read: Permission")


def _record_config(shared_dir, record_dir):
    model = make_step_model(shared_dir / "m.onnx")
    model.path.chmod(0o644)
    path = shared_dir / "c.toml"
    path.write_text(f'[model]\npath = "{model.path}"\n[midi]\napi = "jack"\n[record]\ndir = "{record_dir}"\n')
    path.chmod(0o644)
    return path


def test_a_record_dir_under_an_unreadable_directory_exits_2(shared_dir):
    locked = shared_dir / "locked"
    locked.mkdir(mode=0o700)
    path = _record_config(shared_dir, locked / "sessions")
    _one_clear_line(_run_daemon(path, unprivileged=True), r"record\.dir '.*locked/sessions' cannot be used: "
                                                          r".*Permission denied")


def test_a_record_dir_under_a_file_exits_2(shared_dir):
    (shared_dir / "afile").write_text("x")
    path = _record_config(shared_dir, shared_dir / "afile" / "sessions")
    _one_clear_line(_run_daemon(path), r"record\.dir '.*afile/sessions' cannot be used: .*Not a directory")


# ---- 4. a slow disk or a slow reload never holds the main thread: stop stays prompt ------------------------------

STOP_S = 1.0  # what a stop may take, whatever the disk does (systemd kills after 5 s, with notes on)


class _SlowDisk:
    """A recorder's writer whose writes (and their fsyncs) take `delay_s`; `started` is set once one began."""

    def __init__(self, delay_s):
        self.delay_s = delay_s
        self.started = threading.Event()
        self.release = threading.Event()
        self.writes = 0

    def __call__(self, path, data):
        self.started.set()
        self.release.wait(self.delay_s)
        self.writes += 1


def _watched_service(tmp_path, recorder=None):
    svc = service.Service(from_dict({"record": {"flush_seconds": 0.2}}), now=time.perf_counter)
    svc.recorder = recorder
    checks = []
    svc.check_ports = lambda: checks.append(time.perf_counter())
    runner = threading.Thread(target=lambda: setattr(svc, "status", svc.run()), daemon=True)
    return svc, runner, checks


def test_a_stop_during_a_slow_recording_write_is_prompt(tmp_path):
    disk = _SlowDisk(delay_s=5.0)
    rec = SessionRecorder(tmp_path, now=time.perf_counter, name="s.mid", write=disk)
    rec.add_player(time.perf_counter(), mido.Message("note_on", note=60, velocity=90))  # a note sounds: due
    svc, runner, checks = _watched_service(tmp_path, rec)
    try:
        runner.start()
        assert disk.started.wait(3.0)
        time.sleep(service.PORT_CHECK_S * 2.5)
        n = len(checks)
        assert n >= 2  # the watchdog goes on while the disk is slow
        t_stop = time.perf_counter()
        svc.request_stop()  # SIGTERM's handler
        runner.join(STOP_S)
        assert not runner.is_alive(), "the main thread was held by the recording's write"
        svc.shutdown()
        assert time.perf_counter() - t_stop <= STOP_S
        assert svc.status == 0
    finally:
        disk.release.set()
        svc.stop_requested = True
        svc.wake.set()
        runner.join(6.0)


def test_a_stop_during_a_slow_reload_is_prompt(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[improvise]\ntemperature = 0.5\n")
    loading = threading.Event()
    release = threading.Event()

    def slow_load(config):
        loading.set()
        release.wait(5.0)
        return object()
    svc = service.Service(load_config(path), load_model=slow_load)
    checks = []
    svc.check_ports = lambda: checks.append(time.perf_counter())

    class Engine:
        swaps = []

        def request_swap(self, config, model):
            self.swaps.append((config, model))

        def stop(self, timeout):
            pass
    svc.engine = Engine()
    runner = threading.Thread(target=lambda: setattr(svc, "status", svc.run()), daemon=True)
    try:
        runner.start()
        svc.request_reload()  # SIGHUP's handler
        assert loading.wait(3.0)
        time.sleep(service.PORT_CHECK_S * 2.5)
        assert len(checks) >= 2
        t_stop = time.perf_counter()
        svc.request_stop()
        runner.join(STOP_S)
        assert not runner.is_alive(), "the main thread was held by the reload"
        svc.shutdown()
        assert time.perf_counter() - t_stop <= STOP_S
    finally:
        release.set()
        svc.stop_requested = True
        svc.wake.set()
        runner.join(6.0)


def test_a_reload_still_swaps_once_loaded_off_the_main_thread(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[improvise]\ntemperature = 0.5\n")
    svc = service.Service(load_config(path), load_model=lambda config: "model")
    swapped = threading.Event()

    class Engine:
        def request_swap(self, config, model):
            self.got = (config, model)
            swapped.set()

        def stop(self, timeout):
            pass
    svc.engine = Engine()
    svc.check_ports = lambda: None
    path.write_text("[improvise]\ntemperature = 0.7\n[midi]\nthru = true\n")
    runner = threading.Thread(target=svc.run, daemon=True)
    runner.start()
    try:
        svc.request_reload()
        assert swapped.wait(3.0)
        config, model = svc.engine.got
        assert model == "model" and config.improvise.temperature == 0.7
        # [midi] is not reloaded: the running config keeps it, so the next reload warns again
        assert svc.config.midi.thru is False and svc.config.improvise.temperature == 0.7
    finally:
        svc.stop_requested = True
        svc.wake.set()
        runner.join(2.0)


def test_shutdown_does_not_wait_for_a_hung_disk_and_says_so(tmp_path, caplog):
    disk = _SlowDisk(delay_s=5.0)
    rec = SessionRecorder(tmp_path, now=time.perf_counter, name="s.mid", write=disk)
    rec.add_player(time.perf_counter(), mido.Message("note_on", note=60, velocity=90))
    svc = service.Service(Config())
    svc.recorder = rec
    try:
        t0 = time.perf_counter()
        with caplog.at_level(logging.ERROR, logger="improvd"):
            svc.shutdown()
        assert time.perf_counter() - t0 <= STOP_S
        assert "recording" in caplog.text and "not written" in caplog.text
    finally:
        disk.release.set()


# ---- 5. a recording that cannot be written keeps memory bounded --------------------------------------------------

class _FullDisk:
    def __init__(self):
        self.full = True
        self.written = {}

    def __call__(self, path, data):
        if self.full:
            raise OSError(28, "No space left on device")
        self.written[path] = bytes(data)


def _play_for(rec, clock, seconds, rate=5.0, flush_s=10.0):
    """`rate` notes a second for `seconds`, flushed every `flush_s`; returns the largest file the recorder held."""
    largest = 0
    end = clock.t + seconds
    while clock.t < end:
        for k in range(int(rate * flush_s)):
            t = clock.t + k / rate
            rec.add_player(t, mido.Message("note_on", note=60 + k % 12, velocity=90))
            rec.add_player(t + 0.1, mido.Message("note_off", note=60 + k % 12))
        clock.t += flush_s
        rec.flush()
        largest = max(largest, len(rec._file_bytes(clock.t)))
    return largest


def test_a_disk_that_stays_full_keeps_the_recorders_memory_bounded_and_writing_resumes(tmp_path, caplog):
    clock = Clock(100.0)
    disk = _FullDisk()
    rec = SessionRecorder(tmp_path, now=clock, name="s.mid", write=disk, rotate_s=3600.0)
    with caplog.at_level(logging.WARNING, logger="improvd.record"):
        one_hour = _play_for(rec, clock, 3600.0)
        four_hours = _play_for(rec, clock, 3 * 3600.0)
    assert four_hours <= 1.05 * one_hour  # what cannot be written is let go after a file's length, not kept
    assert caplog.text.count("cannot write the recording") == 1  # the failure said once
    disk.full = False
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="improvd.record"):
        _play_for(rec, clock, 60.0)
    assert "written again" in caplog.text
    player, _ = rec.tracks()
    assert len(player.notes) > 0 and rec.path in disk.written


def test_without_rotation_a_failing_recording_is_bounded_by_size(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(recorder, "MAX_UNWRITTEN_BYTES", 32 * 1024)  # the real limit, 4 MiB, is hours of notes
    clock = Clock(100.0)
    rec = SessionRecorder(tmp_path, now=clock, name="s.mid", write=_FullDisk(), rotate_s=None)
    with caplog.at_level(logging.WARNING, logger="improvd.record"):
        largest = _play_for(rec, clock, 3600.0)
    assert largest <= 32 * 1024 + 1024  # the limit plus one flush interval's notes
    assert "dropped" in caplog.text


# ---- 7. a model's metadata is bounded --------------------------------------------------------------------------

def test_a_model_declaring_a_huge_context_is_refused_naming_the_bound(tmp_path):
    from improvd.daemon.predict import model as model_mod
    from improvd.core.errors import ModelError
    huge = make_step_model(tmp_path / "huge.onnx", context=1_000_000)
    with pytest.raises(ModelError, match=r"improvd.context = '1000000', expected .* at most 256"):
        StepModel(huge.path)
    edge = make_step_model(tmp_path / "edge.onnx", context=model_mod.MAX_CONTEXT)
    assert StepModel(edge.path).context == model_mod.MAX_CONTEXT == 256


# ---- 8. files: the process umask is left alone; recordings are the user's own ----------------------------------

@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_writing_a_file_never_changes_the_process_umask(tmp_path, monkeypatch, umask_022):
    from improvd.core import atomic
    calls = []
    real = os.umask
    monkeypatch.setattr(os, "umask", lambda mask: (calls.append(mask), real(mask))[1])
    with atomic.atomic_writer(tmp_path / "f.bin") as fh:
        fh.write(b"x")
    rec = SessionRecorder(tmp_path, now=Clock(1.0), name="s.mid")
    rec.add_player(1.0, mido.Message("note_on", note=60, velocity=90))
    assert rec.flush()
    # the umask is process-wide: set to 0 even for a moment, a file another thread creates then is world-writable
    assert calls == []


@pytest.mark.parametrize("umask,mode", [(0o022, 0o600), (0o077, 0o600), (0o002, 0o600), (0o277, 0o400)])
def test_recordings_are_0600_or_stricter_by_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        rec = SessionRecorder(tmp_path, now=Clock(1.0), name="s.mid")
        rec.add_player(1.0, mido.Message("note_on", note=60, velocity=90))
        assert rec.flush()
    finally:
        os.umask(old)
    assert (tmp_path / "s.mid").stat().st_mode & 0o777 == mode


def test_other_files_keep_the_mode_open_would_give(tmp_path, umask_022):
    from improvd.core import atomic
    with atomic.atomic_writer(tmp_path / "model.onnx") as fh:
        fh.write(b"x")
    assert (tmp_path / "model.onnx").stat().st_mode & 0o777 == 0o644


# ---- also: NaN deadlines, a clock that stops without Stop, thru under a flood of held keys -----------------------

def test_a_non_finite_deadline_is_refused_and_never_blocks_the_notes_behind_it():
    from improvd.daemon.live.scheduler import Scheduler
    clock = Clock(10.0)
    sent = []
    s = Scheduler(lambda m: sent.append((clock.t, m)), now=clock)
    for bad in (float("nan"), float("inf"), float("-inf")):
        with pytest.raises(ValueError, match="deadline"):
            s.schedule_note(bad, 11.0, 60, 90)
        with pytest.raises(ValueError, match="deadline"):
            s.schedule_note(10.5, bad, 60, 90)
        with pytest.raises(ValueError, match="deadline"):
            s.schedule_message(bad, mido.Message("control_change", control=1, value=1))
    s.schedule_note(10.5, 10.6, 62, 90)
    clock.t = 11.0
    s.run_pending()
    assert [(m.type, m.note) for _, m in sent] == [("note_on", 62), ("note_off", 62)]
    assert s.pending() == 0


def test_a_clock_that_stops_without_stop_does_not_stall_a_quantized_answer(model):
    sim = Sim(model, improvise_kw=dict(max_notes=40), timing=dict(quantize="1/16", follow_clock=True, bpm=100))
    sim.at(T0, mido.Message("start"))
    sim.clock(T0 + 0.001, 100, 24 * 20)  # 20 beats (12 s) of clock, then it stops: no Stop message
    end = sim.play([60, 62, 64], T0 + 9.0)
    sim.run_until(T0 + 12.0)
    assert sim.engine.playing
    n = len(sim.note_ons())
    sim.run_until(T0 + 14.0)  # 2 s after the last tick: the answer goes on, on the bpm grid
    assert len(sim.note_ons()) > n
    sim.run_until(T0 + 60.0)
    assert not sim.engine.playing and len(sim.note_ons()) == 40 and balanced(sim.sent)
    ons = [t for t, _ in sim.note_ons()]
    assert max(b - a for a, b in zip(ons, ons[1:])) < 2.0  # no stall between two notes


def test_releasing_thru_notes_under_a_flood_of_held_keys_never_rebuilds_the_schedule(model, monkeypatch):
    from improvd.daemon.live import scheduler as scheduler_mod
    sim = Sim(model, improvise_kw=dict(max_notes=2, max_hold=60.0, silence=30.0), midi=dict(thru=True))
    keys = [(ch, p) for ch in range(16) for p in range(128)][:1500]
    t = T0 + 0.1
    for ch, p in keys:  # 1500 keys held at once
        sim.at(t, mido.Message("note_on", note=p, velocity=90, channel=ch))
        t += 0.0001
    sim.run_until(t + 0.01)
    assert len(sim.scheduler.sounding()) == 1500
    rebuilds = []
    real = scheduler_mod.heapq.heapify
    monkeypatch.setattr(scheduler_mod.heapq, "heapify", lambda h: (rebuilds.append(len(h)), real(h))[1])
    for ch, p in keys:
        sim.at(t, mido.Message("note_off", note=p, channel=ch))
        t += 0.0001
    sim.run_until(t + 0.01)
    # each release was a whole-heap rebuild under the scheduler's lock: O(held keys) per message, O(n^2) a flood
    assert len(rebuilds) <= 16 and sum(rebuilds) <= 4 * 1500, (len(rebuilds), sum(rebuilds))
    assert sim.scheduler.sounding() == frozenset() and sim.scheduler.pending() <= 64
    assert balanced(sim.sent)


def test_end_note_releases_a_sounding_note_now_and_a_future_one_never_starts():
    from improvd.daemon.live.scheduler import Scheduler
    clock = Clock(10.0)
    sent = []
    s = Scheduler(lambda m: sent.append((clock.t, m.type, m.note)), now=clock)
    sounding = s.schedule_note(10.0, 20.0, 60, 90)
    future = s.schedule_note(12.0, 13.0, 62, 90)
    s.run_pending()
    clock.t = 11.0
    assert s.end_note(sounding) and s.end_note(future)
    assert not s.end_note(sounding)  # once
    clock.t = 30.0
    s.run_pending()
    assert sent == [(10.0, "note_on", 60), (11.0, "note_off", 60)]
    assert s.pending() == 0 and s.sounding() == frozenset()


# ---- also: an unterminated SysEx swallows what follows it ------------------------------------------------------

def test_messages_swallowed_by_an_unterminated_sysex_are_recovered():
    # rtmidi appends every event after an unterminated SysEx to it until an EOX (0xF7) comes (seen on JACK with
    # python-rtmidi 1.5.8: 4000 notes came as one 12005-byte SysEx); MIDI ends a SysEx at any status byte.
    sink = queue.Queue()
    rt = FakeRt(["kbd"], [([0x90, 60, 100], 0.0),
                          ([0xF0, 0x41, 0x10, 0x90, 61, 100, 0xF8, 0x80, 60, 0, 0x80, 61, 0, 0xF7], 0.5),
                          ([0xF0, 0x7E, 0x01, 0xF7], 0.1)])  # a proper SysEx: dropped, as before
    port = InputPort("jack", "kbd", sink, now=lambda: 5.0, clock=True, start=False, open_client=FakeMidi(rt),
                     arrival=ArrivalClock(drift=0.0))
    assert port.poll_once() == 3
    got = [(t, m.type, getattr(m, "note", None)) for t, m in drain(sink)]
    assert [g[1:] for g in got] == [("note_on", 60), ("note_on", 61), ("clock", None), ("note_off", 60),
                                    ("note_off", 61)]
    assert all(t == pytest.approx(5.0 - 0.1) for t, *_ in got[1:])  # at the swallowing message's arrival
    assert port.invalid == 0 and port.recovered == 4


def test_where_the_umask_cannot_be_read_files_are_kept_private(tmp_path, monkeypatch):
    from improvd.core import atomic
    monkeypatch.setattr(atomic, "current_umask", lambda: None)  # no /proc (macOS): never wider than 0600
    with atomic.atomic_writer(tmp_path / "model.onnx") as fh:
        fh.write(b"x")
    assert (tmp_path / "model.onnx").stat().st_mode & 0o777 == 0o600
