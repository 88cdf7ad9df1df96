"""`improvd run` with a band, end to end over real JACK MIDI ports (dummy driver, 48 kHz, 64-frame periods).

A source process (its own mido JACK client) sends MIDI clock (Start, 0xF8 ticks at 100 then 140 bpm, Stop), the
player's notes and CCs, each at its time; `jack_midi_dump -a`, an independent client, timestamps everything the
source and improvd send in frames of the server's clock, so the clock's grid and improvd's notes are measured on
one clock.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.e2e.jack import (REPO, Daemon, Receiver, _LineReader, assert_graph_clean, balance, check_timing,  # noqa: F401
                            jack_server, midi_lost, requires_jack, spawn, toml_config, finish)
from tests.modelfactory import make_step_model

pytestmark = [pytest.mark.jack, requires_jack]

PLAYER_CH = 1  # 0-based: channel 2
IMPROVD_CH = 0
C_MAJOR = {0, 2, 4, 5, 7, 9, 11}
START, TICK, STOP = 0xFA, 0xF8, 0xFC
_names = iter(range(10**6))

SOURCE_SCRIPT = r"""
import json, sys, time
import mido
mido.set_backend("mido.backends.rtmidi/UNIX_JACK")
port = mido.open_output(sys.argv[2], virtual=True, client_name=sys.argv[1])
print("ready", flush=True)
for line in sys.stdin:
    events = json.loads(line)
    start = time.perf_counter() + 0.005
    for t_s, data in events:
        due = start + t_s
        while due - time.perf_counter() > 0.002:
            time.sleep(due - time.perf_counter() - 0.0015)
        while time.perf_counter() < due:
            pass
        port.send(mido.Message.from_bytes(data))
    print("done", flush=True)
port.close()
"""


class Source:
    """A mido JACK virtual output in another process that sends raw MIDI messages at their times."""

    def __init__(self, server, client: str = "band") -> None:
        self.client = f"{client}-{next(_names)}"
        self.proc = spawn([sys.executable, "-c", SOURCE_SCRIPT, self.client, "out"], env=server.env, cwd=REPO,
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.reader = _LineReader(self.proc.stdout)
        self.reader.wait_line("^ready$", 10.0)
        self.port = server.wait_port(f"{self.client}:out")
        self._sent = 0

    def send(self, events: list[tuple[float, list[int]]], *, wait: bool = True, timeout: float = 60.0) -> None:
        """Send [(t_s, [bytes])] (sorted by time); with `wait`, return once the last one is sent."""
        self.proc.stdin.write(json.dumps(sorted(events, key=lambda e: e[0])) + "\n")
        self.proc.stdin.flush()
        self._sent += 1
        if wait:
            self.wait_done(timeout)

    def wait_done(self, timeout: float = 60.0) -> None:
        n = self._sent
        assert self.reader.wait_for(lambda: sum(ln == "done" for ln in self.reader.lines) >= n, timeout), \
            "the source did not finish"

    def stop(self) -> None:
        finish(self.proc)


def notes(pitches, start_s, step_s, duration_s, channel=PLAYER_CH, velocity=90):
    out = []
    for i, p in enumerate(pitches):
        t = start_s + i * step_s
        out += [(t, [0x90 | channel, p, velocity]), (t + duration_s, [0x80 | channel, p, 0])]
    return out


def clock(start_s, bpm, beats, *, transport: bool = False):
    """Ticks (24 per beat) from start_s, and when the next tick would be; with `transport`, a Start 1 ms before
    the first tick."""
    tick_s = 60.0 / (bpm * 24)
    n = int(round(beats * 24))
    events = [(start_s + i * tick_s, [TICK]) for i in range(n)]
    if transport:
        events.insert(0, (max(0.0, start_s - 0.001), [START]))
    return events, start_s + n * tick_s


def tick_timeline(seen, n_first: int, tick_first_s: float, tick_then_s: float) -> np.ndarray:
    """The time of every tick position from the ticks a receiver saw (a dropped one is interpolated): positions
    from the intervals, in nominal tick lengths (`tick_first_s` for the first `n_first` positions, then
    `tick_then_s`)."""
    positions = [0]
    for interval in np.diff(seen):
        nominal = tick_first_s if positions[-1] < n_first else tick_then_s
        positions.append(positions[-1] + max(1, int(round(interval / nominal))))
    return np.interp(np.arange(positions[-1] + 1), positions, seen)


class Band:
    """improvd, a source and a receiver on the module's JACK server; the source reaches improvd's input (and its
    clock port, when there is one) and the receiver; so does improvd's output."""

    def __init__(self, server, tmp_path, model_path, *, improvise=None, timing=None, control=None, midi=None):
        self.server = server
        self.server_log_start = server.log_size()  # the driver's late wake-ups after this mark are this band's
        self.client = f"improvd-band-{next(_names)}"
        sections = {
            "model": {"path": str(model_path)},
            "midi": {"api": "jack", "client_name": self.client, **(midi or {})},
            "improvise": {"temperature": 0.0, "silence": 0.4, "max_notes": 12, "answer_length": "max",
                          "velocity": "fixed",
                          **(improvise or {})},
            "timing": timing or {},
            "control": control or {},
        }
        config = toml_config(tmp_path / f"{self.client}.toml", sections)
        self.receiver = Receiver(server)
        self.source = Source(server)
        self.daemon = Daemon(server, config, "--verbose")
        try:
            self.daemon.wait_ready()
            ports = [p for p in server.ports() if p.startswith(self.client)]
            self.in_port = next(p for p in ports if p.endswith(":improvd in"))
            self.out_port = next(p for p in ports if p.endswith(":improvd out"))
            server.connect(self.source.port, self.in_port)
            clock_port = [p for p in ports if p.endswith(":improvd clock")]
            if clock_port:
                server.connect(self.source.port, clock_port[0])
            server.connect(self.source.port, self.receiver.port)
            server.connect(self.out_port, self.receiver.port)
        except BaseException:
            self.close()
            raise

    def improvd_ons(self, after=-np.inf):
        return [e for e in list(self.receiver.events)
                if e.kind == "on" and e.channel == IMPROVD_CH and e.t_s >= after]

    def close(self):
        self.daemon.stop()
        self.source.stop()
        self.receiver.stop()
        # whatever the test checked, improvd's clients must not have cost the graph its cycles
        assert_graph_clean(self.server, self.server_log_start)


@pytest.fixture
def band(jack_server, tmp_path):
    made = []

    def make(model_path, **kwargs):
        b = Band(jack_server, tmp_path, model_path, **kwargs)
        made.append(b)
        return b
    yield make
    for b in made:
        b.close()


@pytest.fixture(scope="module")
def grid_model(tmp_path_factory):
    """Steps of about 0.3..0.45 s: two or three sixteenths at 100 bpm."""
    return make_step_model(tmp_path_factory.mktemp("m") / "grid.onnx", seed=7, context=64, step_scale=0.6,
                           duration_scale=0.3)


@pytest.fixture(scope="module")
def long_model(tmp_path_factory):
    """Notes that last longer than their steps: something always sounds."""
    return make_step_model(tmp_path_factory.mktemp("m") / "long.onnx", seed=4, context=64, step_scale=0.6,
                           duration_scale=2.0)


@pytest.fixture(scope="module")
def spread_model(tmp_path_factory):
    """Fast notes from flat pitch distributions: sampling visits pitches in and out of any scale."""
    return make_step_model(tmp_path_factory.mktemp("m") / "spread.onnx", seed=6, context=64, step_scale=0.12,
                           duration_scale=0.08, logit_scale=0.3)


def test_quantized_onsets_follow_the_clock_and_its_tempo_change(band, grid_model):
    b = band(grid_model.path, improvise={"mode": "continuous", "max_notes": 16, "temperature": 0.6, "seed": 3},
             timing={"quantize": "1/16"})
    before, t_change = clock(0.2, 100, 8, transport=True)
    tick_140 = 60.0 / (140 * 24)
    after = [(t_change + i * tick_140, [TICK]) for i in range(24 * 10)]
    t_stop = t_change + 24 * 10 * tick_140
    phrase = notes([60, 62, 64, 65, 67], 0.613, 0.23, 0.12)
    b.source.send(before + after + [(t_stop, [STOP])] + phrase)
    b.receiver.wait_quiet(0.3, timeout=10)

    events = list(b.receiver.events)
    i_start = next(i for i, e in enumerate(events) if e.data[0] == START)
    t_start = events[i_start].t_s
    seen = np.array([e.t_s for e in events[i_start:] if e.data[0] == TICK])  # the first is position 0
    assert len(seen) >= 24 * 18 - 3, len(seen)  # jack_midi_dump may drop an event on a loaded machine
    ticks = tick_timeline(seen, 24 * 8, 60.0 / (100 * 24), tick_140)
    assert len(ticks) == 24 * 18, len(ticks)
    stop_at = next(e.t_s for e in events if e.data[0] == STOP)
    change_at = ticks[24 * 8]
    # the grid goes on after the last tick (the Stop comes where the next tick would be)
    sixteenths = np.concatenate([ticks, ticks[-1] + tick_140 * np.arange(1, 13)])[::6]
    ons = np.array([e.t_s for e in b.improvd_ons()])
    assert len(ons) >= 15, b.daemon.log()
    dist_ms = np.array([np.min(np.abs(sixteenths - t)) for t in ons]) * 1000
    at_100 = dist_ms[ons < change_at]
    at_140 = dist_ms[ons > change_at + 2 * 60 / 140]  # two beats after the change
    assert len(at_100) >= 5 and len(at_140) >= 5, (ons - t_start, change_at - t_start)
    check_timing(b.server, at_100.max() <= 3.0 and at_140.max() <= 3.0,
                 f"distance to the clock's 1/16 grid: at 100 bpm {np.round(at_100, 2)} ms, after the change to 140 "
                 f"bpm {np.round(at_140, 2)} ms; onsets {np.round(ons - t_start, 4)} s; change at "
                 f"{change_at - t_start:.4f} s, last tick at {ticks[-1] - t_start:.4f} s, stop at "
                 f"{stop_at - t_start:.4f} s\n" + "\n".join(ln for ln in b.daemon.lines if "clock:" in ln),
                 since=b.server_log_start)
    # the grid really changed: the answer's inter-onset intervals after the change are 140-bpm sixteenths
    gaps = np.diff(ons[ons > change_at + 2 * 60 / 140]) / (6 * tick_140)
    check_timing(b.server, np.allclose(gaps, np.round(gaps), atol=0.15), f"gaps in 140-bpm sixteenths {gaps}",
                 since=b.server_log_start)
    # Stop silences improvd and releases its notes
    late = [e for e in events if e.channel == IMPROVD_CH and e.kind == "on" and e.t_s > stop_at + 0.010]
    check_timing(b.server, not late, f"improvd's note-ons {[round(e.t_s - stop_at, 4) for e in late]} s after Stop",
                 since=b.server_log_start)
    assert balance(events, IMPROVD_CH) == {}
    assert any("interrupted" in ln and re.search(r"grid 1(39|40|41)\.\d bpm", ln) for ln in b.daemon.lines), \
        b.daemon.log()


def test_panic_by_cc_silences_within_10_ms(band, long_model):
    b = band(long_model.path, improvise={"max_notes": 64, "max_seconds": 30.0}, control={"panic": 82})
    b.source.send(notes([60, 62, 64, 65], 0.0, 0.15, 0.1))
    assert b.receiver.wait_events(lambda evs: sum(e.kind == "on" and e.channel == IMPROVD_CH for e in evs) >= 3, 10)
    b.source.send([(0.0, [0xB0 | PLAYER_CH, 82, 127]), (0.1, [0xB0 | PLAYER_CH, 82, 0])])
    time.sleep(0.5)
    events = list(b.receiver.events)
    t_panic = next(e.t_s for e in events if e.data[:2] == (0xB0 | PLAYER_CH, 82) and e.data[2] == 127)
    after = [e for e in events if e.channel == IMPROVD_CH and e.t_s >= t_panic and e.data[0] & 0xF0 in (0x80, 0x90)]
    assert after and all(e.kind == "off" for e in after), after
    assert balance(events, IMPROVD_CH) == {}
    check_timing(b.server, all(e.t_s - t_panic <= 0.010 for e in after),
                 f"improvd's note-offs {[round((e.t_s - t_panic) * 1000, 2) for e in after]} ms after the panic CC",
                 since=b.server_log_start)
    b.daemon.reader.wait_line("panic: [1-9]", 2.0)


def test_key_strength_1_keeps_every_answered_note_in_c_major(band, spread_model):
    b = band(spread_model.path, improvise={"mode": "continuous", "max_notes": 4, "temperature": 1.0, "top_p": 1.0,
                                           "key": "C major", "key_strength": 1.0, "seed": 5})
    b.source.send(notes([61, 63, 66, 68, 70], 0.0, 0.1, 0.08), wait=False)  # only black keys
    ok = b.receiver.wait_events(lambda evs: sum(e.kind == "on" and e.channel == IMPROVD_CH for e in evs) >= 200, 40)
    pitches = [e.note for e in b.improvd_ons()]
    answers = sum(1 for ln in b.daemon.lines if "answer:" in ln)
    if not (ok and answers >= 50):  # notes answered: correctness, never excused by timing evidence
        midi_lost(b.server, b.server_log_start, f"{len(pitches)} notes, {answers} answers in 40 s")
    assert all(p % 12 in C_MAJOR for p in pitches), sorted({p % 12 for p in pitches})
    assert len({p % 12 for p in pitches}) >= 5
    assert any("key C major" in ln for ln in b.daemon.lines)


def test_follow_tempo_answers_double_speed_at_double_speed(band, grid_model):
    phrase = [60, 62, 64, 65, 67, 65, 64, 62]
    medians = []
    for speed in (1.0, 2.0):
        b = band(grid_model.path, improvise={"max_notes": 16}, timing={"follow_tempo": True, "reference_ioi": 0.4})
        b.source.send(notes(phrase, 0.0, 0.4 / speed, 0.3 / speed))
        ok = b.receiver.wait_events(
            lambda evs: sum(e.kind == "on" and e.channel == IMPROVD_CH for e in evs) >= 16, 20)
        assert ok, b.daemon.log()
        ons = np.array([e.t_s for e in b.improvd_ons()])
        medians.append(float(np.median(np.diff(ons))))
        scale = re.search(r"time scale ([0-9.]+)", "\n".join(b.daemon.lines))
        assert scale and float(scale.group(1)) == pytest.approx(1.0 / speed, rel=0.02), b.daemon.log()
        b.close()
    ratio = medians[0] / medians[1]
    assert abs(ratio / 2 - 1) <= 0.15, (medians, ratio)
