"""Every state change keeps the promises (issue 17): reload, transport Stop, thru, lost ports, slow and failing
disks, bad files, a model's metadata, file modes.

Engine tests run on a fake clock without threads (`Sim` from test_band.py); the service tests build a `Service`
without MIDI devices where they can, and run `improvd` as a process where the exit status is the promise.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading

import mido
import pytest

from improvd.daemon import ports, service
from improvd.daemon.model import StepModel
from tests.daemon.test_band import PLAYER_CH, T0, Sim, balanced
from tests.daemon.test_reliability import _drain
from tests.modelfactory import make_step_model


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

class _FakeRt:
    """python-rtmidi's surface that a port uses: a port list the test changes, sends and a queue of input."""

    def __init__(self, names, messages=()):
        self.names = list(names)
        self.messages = list(messages)
        self.calls = []

    def get_ports(self):
        return list(self.names)

    def open_port(self, index, name):
        self.calls.append(("open", self.names[index]))

    def close_port(self):
        self.calls.append(("close",))

    def send_message(self, data):
        self.calls.append(("send", tuple(data)))

    def get_message(self):
        return self.messages.pop(0) if self.messages else None

    def delete(self):
        self.calls.append(("delete",))


def test_a_note_on_sent_while_a_lost_output_is_released_never_goes_out():
    rt = _FakeRt(["synth:in"])
    out = ports.OutputPort.__new__(ports.OutputPort)
    ports._Port.__init__(out, rt, "jack", "synth", "improvd out")
    out.sent = 0

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
    sink = service._InputSink(engine_queue, None, None)
    rt = _FakeRt(["kbd:out"], [([0x90, 60, 100], 0.0)])
    port = ports.InputPort.__new__(ports.InputPort)
    port._ignored = ports._ignored_status(False)
    port._sink, port._now = sink, (lambda: 5.0)
    port.dropped = port.invalid = 0
    port._arrival = ports.ArrivalClock(drift=0.0)
    ports._Port.__init__(port, rt, "jack", "kbd", "improvd in")
    rt.names = []  # the keyboard is unplugged while the poller holds a batch it has read

    def watchdog():  # the main thread's port check
        if port.check() == "lost":
            sink.release_held(6.0)
    real_stamp = port._arrival.stamp

    def stamp(deltas, polled_s):
        t = threading.Thread(target=watchdog)
        t.start()
        t.join(0.3)
        stamp.thread = t
        return real_stamp(deltas, polled_s)
    port._arrival.stamp = stamp
    assert port.poll_once() == 1
    stamp.thread.join(2.0)
    got = [(m.type, m.note) for _, m in _drain(engine_queue)]
    assert got == [("note_on", 60), ("note_off", 60)]  # the key-down, then its release: nothing held
    assert sink.held == set()
