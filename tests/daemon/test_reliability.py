"""Reliability of the daemon's parts (issue 6), without MIDI devices: the scheduler's statistics and real-time
priority, the bounded input sink, lost ports, bad models at start and during play, every config key's checks,
atomic recordings on a full disk, and what the code may load."""

from __future__ import annotations

import errno
import logging
import os
import queue
import re
import subprocess
import sys
import threading
import time
import typing
from dataclasses import fields
from pathlib import Path

import mido
import numpy as np
import pytest

from improvd.core import config as cfg
from improvd.core import midifile
from improvd.daemon.io import inport, outport, portnames
from improvd.daemon.io.outport import OutputPort
from improvd.daemon.live import service
from improvd.daemon.live.inputsink import OVERLOAD_OVER_S, InputSink, OverloadWatch
from improvd.daemon.live.reload import load_model
from improvd.daemon.live.watchdog import Heartbeat
from improvd.core.config import Config, ImproviseConfig, MidiConfig, from_dict
from improvd.daemon.live.engine import Engine
from improvd.core.errors import ConfigError, ModelError
from improvd.daemon.predict.model import StepModel
from improvd.daemon.io.recorder import SessionRecorder
from improvd.daemon.live.scheduler import Scheduler
from harness.fakes import FakeClock as Clock
from harness.fakes import FakeMidi, FakeRt, drain, off, on
from harness.modelfactory import make_step_model

REPO = Path(__file__).resolve().parents[2]


# ---- scheduler -------------------------------------------------------------------------------------------------

def _fake_scheduler(**kw):
    clock = Clock()
    sent = []
    s = Scheduler(lambda m: sent.append((clock.t, m)), now=clock, sleep=lambda _s: None,
                  wait=lambda c, t: c.wait(0), **kw)
    return clock, sent, s


def test_stats_are_computed_outside_the_lock(monkeypatch):
    clock, _, s = _fake_scheduler()
    s.schedule_note(clock.t, clock.t + 1, 60, 90)
    s.run_pending()
    others_got_in = []
    real_median = np.median

    def median(values, *args, **kwargs):
        # another thread (the scheduler's, the engine's) can take the lock while the statistics are computed
        t = threading.Thread(target=lambda: others_got_in.append(s.pending()))
        t.start()
        t.join(1.0)
        return real_median(values, *args, **kwargs)
    monkeypatch.setattr("improvd.daemon.live.scheduler.np.median", median)
    s.stats()
    assert others_got_in == [1]


def test_last_ms_and_windows_and_a_ring_that_wraps():
    clock, _, s = _fake_scheduler(history=4)
    assert s.last_ms == 0.0
    for k in range(6):  # note-ons 0, 1, ..., 5 ms late
        s.schedule_note(clock.t - k / 1000, clock.t + 100, 40 + k, 90)
        s.run_pending()
    assert s.last_ms == pytest.approx(5.0)
    everything = s.stats()
    assert everything["sent"] == 6 and everything["max_ms"] == pytest.approx(5.0)
    assert everything["median_ms"] == pytest.approx(3.5)  # the last 4 kept: 2, 3, 4, 5
    window = s.stats(since=4)
    assert window["window_sent"] == 2 and window["median_ms"] == pytest.approx(4.5)
    assert window["max_ms"] == pytest.approx(5.0) and window["p99_ms"] <= 5.0
    assert s.stats(since=6)["window_sent"] == 0 and s.stats(since=6)["median_ms"] == 0.0


def test_realtime_priority_when_allowed_and_a_clear_note_when_refused(monkeypatch, caplog):
    s = Scheduler(lambda m: None, realtime_priority=5)
    monkeypatch.setattr(os, "sched_setscheduler", lambda *a: (_ for _ in ()).throw(PermissionError(
        errno.EPERM, "Operation not permitted")))
    with caplog.at_level(logging.INFO, logger="improvd.scheduler"):
        s._set_realtime()
    assert not s.realtime
    assert "normal priority" in caplog.text and "Operation not permitted" in caplog.text
    monkeypatch.setattr(os, "sched_setscheduler", lambda *a: None)
    s._set_realtime()
    assert s.realtime
    assert not Scheduler(lambda m: None).realtime  # none asked, none taken


@pytest.mark.skipif(not hasattr(os, "sched_getscheduler"), reason="POSIX scheduling only")
def test_the_scheduler_thread_runs_real_time_where_permitted():
    seen = []
    s = Scheduler(lambda m: seen.append(os.sched_getscheduler(0)), realtime_priority=5)
    s.start()
    try:
        s.schedule_note(time.perf_counter() + 0.005, time.perf_counter() + 0.01, 60, 90)
        deadline = time.monotonic() + 2
        while len(seen) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        s.stop()
    assert os.sched_getscheduler(0) != os.SCHED_FIFO  # the caller's thread is left alone
    if s.realtime:
        assert seen[:2] == [os.SCHED_FIFO, os.SCHED_FIFO]


# ---- the input sink --------------------------------------------------------------------------------------------

def test_input_sink_is_bounded_but_keeps_the_releases_of_keys_it_let_through():
    q = queue.SimpleQueue()
    rec = SessionRecorder("/nonexistent", now=Clock())
    sink = InputSink(q, rec, None, limit=3)
    sink.put_nowait((1.0, on(60)))
    sink.put_nowait((1.1, mido.Message("pitchwheel", pitch=100)))
    sink.put_nowait((1.2, on(61)))
    sink.put_nowait((1.3, on(62)))  # full: dropped
    sink.put_nowait((1.4, mido.Message("aftertouch", value=3)))  # full: dropped
    sink.put_nowait((1.5, off(62)))  # the key was never let through: dropped
    sink.put_nowait((1.6, off(60)))  # let through: its release always passes
    sink.put_nowait((1.7, mido.Message("note_on", note=61, velocity=0)))
    assert sink.received == 8 and sink.dropped == 3
    kinds = [(m.type, getattr(m, "note", None), m.velocity if m.type == "note_on" else None) for _, m in drain(q)]
    assert kinds == [("note_on", 60, 90), ("pitchwheel", None, None), ("note_on", 61, 90), ("note_off", 60, None),
                     ("note_on", 61, 0)]
    assert sink.held == set()
    rec.drain()
    assert rec.note_counts == {"player": 2, "improvd": 0}  # notes only, both released


def test_input_sink_releases_the_keys_held_on_a_lost_input():
    q = queue.SimpleQueue()
    sink = InputSink(q, None, None)
    sink.put_nowait((1.0, on(60, channel=2)))
    sink.put_nowait((1.0, on(64, channel=2)))
    sink.put_nowait((1.1, off(64, channel=2)))
    drain(q)
    assert sink.release_held(2.5) == 1
    (t_s, msg), = drain(q)
    assert t_s == 2.5 and msg.type == "note_off" and (msg.channel, msg.note) == (2, 60)
    assert sink.release_held(3.0) == 0


def test_clock_only_sink_takes_clock_and_transport_only():
    q = queue.SimpleQueue()
    sink = InputSink(q, None, None, clock_only=True)
    sink.put_nowait((1.0, on(60)))
    sink.put_nowait((1.0, mido.Message("clock")))
    sink.put_nowait((1.0, mido.Message("stop")))
    assert [m.type for _, m in drain(q)] == ["clock", "stop"]


def test_an_input_overload_is_logged_once_when_it_starts_and_once_when_it_ends(caplog):
    clock = Clock()
    sink = InputSink(queue.SimpleQueue(), None, None, limit=0)
    watch = OverloadWatch(sink, now=clock)
    with caplog.at_level(logging.WARNING, logger="improvd"):
        for _ in range(3):
            sink.put_nowait((1.0, on(60)))
            watch.check()
            clock.t += 0.1
            watch.check()  # a tick without drops is not the end of it
        clock.t += OVERLOAD_OVER_S
        watch.check()
        watch.check()
    lines = [r.getMessage() for r in caplog.records]
    assert sum("input overload:" in ln for ln in lines) == 1
    assert sum("input overload over: 3 messages dropped" in ln for ln in lines) == 1


# ---- ports that go away ------------------------------------------------------------------------------------------

def _output(rt):
    return OutputPort("jack", "synth", open_client=FakeMidi(rt))


def test_a_lost_output_releases_through_its_own_port_first_and_is_logged_once(caplog):
    rt = FakeRt(["synth:in"])
    out = _output(rt)
    out.on_lost = lambda: out.send(mido.Message("note_off", note=60))  # what the scheduler's release_all does
    rt.names = []
    with caplog.at_level(logging.WARNING, logger="improvd.ports"):
        assert out.check() == "lost"
        assert out.check() is None and out.check() is None
    assert rt.calls[1:] == [("send", (0x80, 60, 64)), ("close",)]  # released before the port closed
    out.send(mido.Message("note_on", note=61))  # while lost: dropped
    assert ("send", (0x90, 61, 64)) not in rt.calls
    rt.names = ["other", "synth:in"]
    rt.fail_open = True
    with caplog.at_level(logging.WARNING, logger="improvd.ports"):
        assert out.check() is None and out.check() is None  # there but cannot be opened: said once
        rt.fail_open = False
        assert out.check() == "back"
    text = caplog.text
    assert text.count("went away") == 1 and text.count("cannot open") == 1 and text.count("is back") == 1
    out.send(mido.Message("note_on", note=61))
    assert rt.calls[-1] == ("send", (0x90, 61, 64))


# ---- bad models ----------------------------------------------------------------------------------------------------

def test_nonfinite_outputs_are_named_and_refused_at_load(tmp_path):
    good = make_step_model(tmp_path / "good.onnx")
    assert StepModel(good.path).nonfinite_outputs() == []
    for outputs, value in ((("step",), float("nan")), (("pitch_logits", "state_out"), float("inf"))):
        bad = make_step_model(tmp_path / "bad.onnx", nonfinite_outputs=outputs, nonfinite_value=value)
        assert StepModel(bad.path).nonfinite_outputs() == list(outputs) if outputs[0] == "step" else \
            StepModel(bad.path).nonfinite_outputs() == ["pitch_logits", "state_out"]
        config = Config().replace(model=cfg.ModelConfig(path=str(bad.path)))
        with pytest.raises(ModelError, match=f"non-finite outputs .* in {outputs[0]}"):
            load_model(config)


def test_bad_models_at_start_exit_2_with_an_error_naming_what_is_wrong(tmp_path):
    (tmp_path / "junk.onnx").write_bytes(b"\x08\x01not an onnx model at all" * 20)
    make_step_model(tmp_path / "window.onnx", format_tag="window-1")
    make_step_model(tmp_path / "nan.onnx", nonfinite_outputs=("duration",))
    cases = {"missing.onnx": r"model file '.*missing\.onnx' does not exist",
             "junk.onnx": r"junk\.onnx' is not a loadable ONNX model",
             "window.onnx": r"window\.onnx' is not a step-format model .*improvd\.format = 'window-1'",
             "nan.onnx": r"nan\.onnx' gives non-finite outputs \(NaN or infinity\) in duration"}
    procs = {}
    for name in cases:
        config = tmp_path / f"{name}.toml"
        config.write_text(f'[model]\npath = "{tmp_path / name}"\n[midi]\napi = "jack"\n')
        procs[name] = subprocess.Popen([sys.executable, "-m", "improvd.daemon.cli", "run", "--config", str(config)],
                                       cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                       env=dict(os.environ, JACK_NO_START_SERVER="1"))
    for name, pattern in cases.items():
        _, err = procs[name].communicate(timeout=60)
        assert procs[name].returncode == 2, err
        assert re.search(r"improvd run: error: .*" + pattern, err), err
        assert "Traceback" not in err


def test_nonfinite_outputs_during_play_are_replaced_and_logged_once(tmp_path, caplog):
    """A model that passed the load check but goes wrong later: the engine plays safe values, says it once."""
    ref = make_step_model(tmp_path / "nan.onnx", nonfinite_outputs=("step", "duration", "pitch_logits"))
    model = StepModel(ref.path)  # loaded directly: the daemon's check at load would refuse it
    sent = []
    scheduler = Scheduler(lambda m: sent.append(m))
    imp = ImproviseConfig(temperature=0.0, silence=0.05, max_notes=4, answer_length="max", velocity="fixed",
                          fixed_velocity=80,
                          pitch_range=(40, 80), duration_range=(0.02, 1.0))
    engine = Engine(Config(improvise=imp, midi=MidiConfig()), model, scheduler)
    scheduler.start()
    engine.start()
    try:
        with caplog.at_level(logging.WARNING):
            t = time.perf_counter()
            for k, p in enumerate((60, 62, 64)):
                engine.input_queue.put((t + 0.02 * k, on(p)))
                engine.input_queue.put((t + 0.02 * k + 0.01, off(p)))
            deadline = time.monotonic() + 5
            while sum(m.type == "note_off" for m in sent) < 4 and time.monotonic() < deadline:
                time.sleep(0.02)
    finally:
        engine.stop()
        scheduler.stop()
    ons = [m for m in sent if m.type == "note_on"]
    assert len(ons) == 4 and all(40 <= m.note <= 80 for m in ons)
    assert sum(m.type == "note_off" for m in sent) == 4
    assert caplog.text.count("non-finite outputs") == 1


# ---- configuration: every key ----------------------------------------------------------------------------------

def _keys():
    for section, cls in cfg._section_types().items():
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            yield section, f.name, hints[f.name], f.metadata


KEYS = list(_keys())


@pytest.mark.parametrize("section,key,tp,meta", KEYS, ids=[f"{s}.{k}" for s, k, _, _ in KEYS])
def test_every_key_with_a_wrong_type_or_range_names_itself(section, key, tp, meta):
    bad_values = [{"a": "table"}]
    if typing.get_origin(tp) is tuple:
        bad_values.append("not a list")
        item = typing.get_args(tp)[0]
        if item is not str:
            bad_values.append(["x"])
    elif tp is bool:
        bad_values.append(1)
    elif tp in (int, float):
        bad_values.append("7")
        if tp is float:
            bad_values += [float("nan"), float("inf")]
        if meta.get("lo") is not None:
            bad_values.append(tp(meta["lo"]) - 1)
        if meta.get("hi") is not None:
            bad_values.append(tp(meta["hi"]) + 1)
    if meta.get("choices"):
        bad_values.append("no-such-choice")
    for value in bad_values:
        if typing.get_origin(tp) is tuple and value not in ({"a": "table"}, "not a list", ["x"]):
            value = [value, value]
        with pytest.raises(ConfigError) as err:
            from_dict({section: {key: value}})
        assert f"{section}.{key}" in str(err.value), (value, str(err.value))


def test_a_bad_reload_keeps_the_running_config(tmp_path, caplog):
    path = tmp_path / "c.toml"
    path.write_text('[improvise]\ntemperature = 0.5\n[model]\npath = "m.onnx"\n')
    svc = service.Service(cfg.load_config(path))
    path.write_text('[improvise]\ntemperature = "hot"\n')
    with caplog.at_level(logging.ERROR, logger="improvd"):
        assert svc.reload() is False
    assert svc.config.improvise.temperature == 0.5
    assert "reload failed, improvd keeps the running config and model: improvise.temperature" in caplog.text


# ---- recordings ----------------------------------------------------------------------------------------------------

def test_a_write_that_fails_midway_leaves_the_old_file_whole_and_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "s.mid"
    track = midifile.Track("player", np.array([[60, 0, 0.5, 90]], dtype=np.float64), channel=0, start_s=0.0)
    midifile.write_notes(path, [track])
    before = path.read_bytes()

    def full_disk(self, filename=None, file=None):
        file.write(b"MThd")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(mido.MidiFile, "save", full_disk)
    with pytest.raises(OSError):
        midifile.write_notes(path, [track, track])
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["s.mid"]


def test_the_recorder_keeps_notes_only_and_syncs_its_directory(tmp_path, monkeypatch):
    clock = Clock()
    rec = SessionRecorder(tmp_path, now=clock, name="s.mid")
    rec.add_player(100.0, mido.Message("sysex", data=[1, 2, 3]))
    rec.add_player(100.0, mido.Message("pitchwheel", pitch=3))
    rec.add_player(100.0, on(60))
    assert len(rec._incoming["player"]) == 1
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    clock.t = 101.0
    assert rec.flush()
    assert len(synced) >= 2  # the file, then its directory


# ---- what is loaded ----------------------------------------------------------------------------------------------

def test_only_onnx_is_loaded_as_a_model_and_numpy_caches_refuse_pickles():
    sources = [p for d in ("daemon", "train", "export") for p in (REPO / d).rglob("*.py")]
    offenders = []
    for path in sources:
        text = path.read_text(encoding="utf-8")
        for m in re.finditer(r"np\.load\(([^)]*)\)", text):
            if "allow_pickle=False" not in m.group(1):
                offenders.append(f"{path.relative_to(REPO)}: np.load without allow_pickle=False")
        for bad in ("pickle.load", "pickle.loads", "torch.load", "joblib.load", "dill.load", "marshal.load"):
            if bad in text:
                offenders.append(f"{path.relative_to(REPO)}: {bad}")
    assert not offenders, offenders
    daemon_text = "\n".join(p.read_text(encoding="utf-8") for p in (REPO / "daemon").rglob("*.py"))
    assert "InferenceSession(" in daemon_text and daemon_text.count("InferenceSession(") == 1  # daemon/predict/model.py
    # The one network interface is OSC (daemon/io/osc.py, off by default); nothing else in the daemon opens a socket.
    # That the default daemon opens none is checked at run time below.
    network = re.compile(r"\b(socket|http\.server|socketserver|asyncio\.start_server)\b")
    users = sorted(str(p.relative_to(REPO)) for p in (REPO / "daemon").rglob("*.py")
                   if network.search(p.read_text(encoding="utf-8")))
    assert users == ["daemon/io/osc.py"], users


def _inet_sockets() -> set[tuple[str, str]]:
    """(table, local address) of this process's open IPv4/IPv6 sockets (TCP, UDP, raw), from /proc: the sockets
    that could be a network port (unix sockets, e.g. JACK's, are not)."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            m = re.match(r"socket:\[(\d+)\]", os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            continue
        if m:
            inodes.add(m.group(1))
    found = set()
    for table in ("tcp", "tcp6", "udp", "udp6", "raw", "raw6"):
        path = Path(f"/proc/self/net/{table}")
        if path.exists():
            for line in path.read_text().splitlines()[1:]:
                parts = line.split()
                if len(parts) > 9 and parts[9] in inodes:
                    found.add((table, parts[1]))
    return found


class _FakePort:
    invalid = 0
    on_lost = None
    thread = None  # no poller thread: the watchdog has nothing to judge
    jack_threads = frozenset()

    def __init__(self, *args, **kwargs):
        self.heartbeat = Heartbeat()

    def send(self, msg):
        pass

    def describe(self):
        return "fake"

    def check(self):
        return None

    def close(self, server_gone=False):
        pass


@pytest.mark.skipif(not Path("/proc/self/net/udp").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("osc", [False, True])
def test_the_default_daemon_opens_no_network_port(tmp_path, monkeypatch, osc):
    """The whole daemon started (model, scheduler, engine, ports faked) with the default config holds no IP socket;
    with [osc] enabled it holds exactly one, on loopback (the check can see a socket when there is one)."""
    if osc:
        pytest.importorskip("pythonosc")
    ref = make_step_model(tmp_path / "m.onnx", seed=1)
    monkeypatch.setattr(portnames, "choose_api", lambda name, **kw: "fake")
    monkeypatch.setattr(outport, "OutputPort", _FakePort)
    monkeypatch.setattr(inport, "InputPort", _FakePort)
    config = Config().replace(model=cfg.ModelConfig(path=str(ref.path)))
    if osc:
        config = config.replace(osc=cfg.OscConfig(enabled=True, port=0))
    before = _inet_sockets()
    svc = service.Service(config)
    try:
        svc.start()
        opened = _inet_sockets() - before
    finally:
        svc.shutdown()
    if osc:
        assert len(opened) == 1 and next(iter(opened))[1].startswith("0100007F:"), opened  # 127.0.0.1
    else:
        assert opened == set(), opened
    assert _inet_sockets() - before == set()  # and shutdown closes it


def test_a_long_recording_goes_on_in_a_new_file(tmp_path):
    clock = Clock(100.0)
    rec = SessionRecorder(tmp_path, now=clock, name="first.mid", rotate_s=60.0)
    rec.add_player(100.5, on(60))
    rec.add_player(101.0, off(60))
    rec.add_improvd(159.0, on(64))  # still sounding at the rotation
    clock.t = 130.0
    assert rec.flush() and rec.files == []
    clock.t = 160.5
    assert rec.flush()
    assert rec.files == [tmp_path / "first.mid"] and rec.path != tmp_path / "first.mid"
    assert rec.note_counts == {"player": 0, "improvd": 1}
    rec.add_improvd(161.0, off(64))
    rec.add_player(162.0, on(62))
    rec.add_player(162.5, off(62))
    clock.t = 163.0
    assert rec.flush()
    first = midifile.read_notes(tmp_path / "first.mid")
    second_player, second_improvd = rec.tracks()
    assert sorted(first[:, 0].astype(int).tolist()) == [60, 64]
    np.testing.assert_allclose(second_improvd.notes[:, 2], [0.5])  # from the new file's start to its release
    np.testing.assert_allclose(second_player.notes[:, 0], [62])
    assert len(list(tmp_path.glob("*.mid"))) == 2
