"""Two rigs for the engine without MIDI devices, shared by the daemon's unit tests.

- `Sim`: an engine and a scheduler on a fake clock and no threads (`Engine.run_once`, `Scheduler.run_pending`);
  inputs are (t_s, message) delivered at their time, so grids and intervals are checked exactly.
- `Rig`: an engine and a scheduler on their real threads, in real time, playing on a queue-backed `FakePort`.

Both record every note the model is fed (`on_note_heard` / `on_note_played`), so a test can replay them through the
model's numpy twin (harness/modelfactory.py). Called from the test's thread; `Rig`'s hooks run on the engine thread.
"""

from __future__ import annotations

import heapq
import itertools
import queue
import threading
import time

import mido
import numpy as np

from harness.session import PLAYER_CH
from improvd.core.config import Config, ControlConfig, ImproviseConfig, MidiConfig, TimingConfig
from improvd.daemon.live.engine import Engine
from improvd.daemon.live.scheduler import Scheduler
from improvd.daemon.predict.model import StepModel

T0 = 1000.0  # the fake clock's start (seconds)


def band_improvise(**kw) -> ImproviseConfig:
    """[improvise] for `Sim`: greedy, answers of max_notes notes, fixed velocity 80."""
    base = dict(temperature=0.0, silence=0.3, max_notes=8, max_seconds=30.0, pitch_range=(21, 108),
                step_range=(0.0, 2.0), duration_range=(0.03, 4.0), velocity="fixed", fixed_velocity=80, seed=1,
                answer_length="max")  # answers of max_notes notes
    base.update(kw)
    return ImproviseConfig(**base)


class Sim:
    """An engine and a scheduler on a fake clock; inputs are (t_s, message) delivered at their time."""

    def __init__(self, ref, *, improvise_kw=None, timing=None, control=None, midi=None, **engine_kw):
        self.t = T0
        self.ref = ref
        self.sent: list[tuple[float, mido.Message]] = []
        self.summaries: list[dict] = []
        self.events: list[tuple[str, np.ndarray, float]] = []
        self.reloads = 0
        self._inputs: list = []
        self._seq = itertools.count()
        self.scheduler = Scheduler(lambda m: self.sent.append((self.t, m)), now=self.now)
        self.config = Config(improvise=band_improvise(**(improvise_kw or {})), timing=TimingConfig(**(timing or {})),
                             control=ControlConfig(**(control or {})), midi=MidiConfig(**(midi or {})))
        self.engine = Engine(self.config, StepModel(ref.path), self.scheduler, now=self.now,
                             on_answer=self.summaries.append,
                             on_note_heard=lambda r, t: self.events.append(("heard", r.copy(), t)),
                             on_note_played=lambda r, t: self.events.append(("played", r.copy(), t)),
                             on_reload_request=self._reload, **engine_kw)
        self.engine.begin()
        self.scheduler.run_pending()

    def now(self) -> float:
        return self.t

    def _reload(self):
        self.reloads += 1

    # ---- input -------------------------------------------------------------------------------------------
    def at(self, t_s: float, msg: mido.Message) -> None:
        heapq.heappush(self._inputs, (t_s, next(self._seq), msg))

    def play(self, pitches, start_s, spacing_s=0.2, hold_s=0.1, velocity=100, channel=PLAYER_CH):
        for i, p in enumerate(pitches):
            t = start_s + i * spacing_s
            self.at(t, mido.Message("note_on", note=p, velocity=velocity, channel=channel))
            self.at(t + hold_s, mido.Message("note_off", note=p, channel=channel))
        return start_s + (len(pitches) - 1) * spacing_s + hold_s

    def cc(self, t_s, control, value, channel=0):
        self.at(t_s, mido.Message("control_change", control=control, value=value, channel=channel))

    def clock(self, start_s, bpm, n, *, first_index=0, jitter_s=0.0, rng=None):
        """n ticks from start_s at bpm; returns their (true) times."""
        tick_s = 60.0 / (bpm * 24)
        times = start_s + tick_s * np.arange(n)
        for i, t in enumerate(times):
            j = rng.uniform(-jitter_s, jitter_s) if jitter_s else 0.0
            self.at(float(t + j), mido.Message("clock"))
        return times

    # ---- time --------------------------------------------------------------------------------------------
    def run_until(self, t_end: float) -> None:
        same, last = 0, None
        while True:
            candidates = [w for w in (self.engine.next_wake_s(), self.scheduler.next_due_s()) if w is not None]
            if self._inputs:
                candidates.append(self._inputs[0][0])
            nxt = min(candidates) if candidates else None
            if nxt is None or nxt > t_end:
                self.t = max(self.t, t_end)
                return
            self.t = max(self.t, nxt)
            same = same + 1 if self.t == last else 0
            assert same < 10000, "the engine does not make progress"
            last = self.t
            while self._inputs and self._inputs[0][0] <= self.t:
                t_s, _, msg = heapq.heappop(self._inputs)
                self.engine.input_queue.put((t_s, msg))
            self.engine.run_once()
            self.scheduler.run_pending()

    # ---- what was sent -----------------------------------------------------------------------------------
    def note_ons(self, channel=0, after=-np.inf):
        return [(t, m) for t, m in self.sent
                if m.type == "note_on" and m.velocity > 0 and m.channel == channel and t >= after]

    def of_type(self, kind):
        return [(t, m) for t, m in self.sent if m.type == kind]


class FakePort:
    """A queue-backed output port: what the scheduler sends, with the time it was sent."""

    def __init__(self):
        self.queue = queue.SimpleQueue()

    def send(self, msg):
        self.queue.put((time.perf_counter(), msg))

    def drain(self):
        out = []
        while True:
            try:
                out.append(self.queue.get_nowait())
            except queue.Empty:
                return out


def engine_improvise(**kw) -> ImproviseConfig:
    """[improvise] for `Rig`: greedy, short silences, answers of max_notes notes, fixed velocity 77."""
    base = dict(temperature=0.0, silence=0.05, max_notes=6, max_seconds=8.0, pitch_range=(0, 127),
                step_range=(0.0, 2.0), duration_range=(0.001, 4.0), velocity="fixed", fixed_velocity=77,
                answer_length="max")  # answers of max_notes notes
    base.update(kw)
    return ImproviseConfig(**base)


class Rig:
    """An engine and a scheduler on real threads and real time, playing on a `FakePort`; every note fed to the
    model is recorded in `events` ("heard" | "played", row, onset_s, model path)."""

    def __init__(self, ref, imp: ImproviseConfig, output_channel=1, control=None, **engine_kwargs):
        self.ref = ref
        self.model = StepModel(ref.path)
        self.port = FakePort()
        self.sent = []
        self.events = []  # ("heard" | "played", row, onset_s, model path) in feeding order
        self.on_played = None  # a test's own hook, called after each "played" event is recorded
        self.summaries = []
        self.answered = threading.Condition()
        self.scheduler = Scheduler(self.port.send)
        self.config = Config(improvise=imp, midi=MidiConfig(output_channel=output_channel),
                             control=control if control is not None else ControlConfig())
        self.engine = Engine(self.config, self.model, self.scheduler, on_answer=self._on_answer,
                             on_note_heard=lambda r, t: self.events.append(("heard", r, t, self.engine.model.path)),
                             on_note_played=self._on_played,
                             **engine_kwargs)
        self.scheduler.start()
        self.engine.start()

    def _on_played(self, row, onset):
        self.events.append(("played", row, onset, self.engine.model.path))
        if self.on_played is not None:
            self.on_played(row, onset)

    def _on_answer(self, summary):
        with self.answered:
            self.summaries.append(summary)
            self.answered.notify_all()

    def wait_answers(self, n, timeout=3.0):
        with self.answered:
            assert self.answered.wait_for(lambda: len(self.summaries) >= n, timeout), self.summaries
        return self.summaries[n - 1]

    def wait_sent(self, predicate, timeout=3.0):
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            self.sent += self.port.drain()
            if predicate(self.sent):
                return
            time.sleep(0.002)
        raise AssertionError(f"timed out; sent: {[(m.type, m.note) for _, m in self.sent]}")

    def play(self, pitches, start_s, spacing_s=0.1, hold_s=0.05, velocity=100):
        for i, p in enumerate(pitches):
            t = start_s + i * spacing_s
            self.engine.input_queue.put((t, mido.Message("note_on", note=p, velocity=velocity)))
            self.engine.input_queue.put((t + hold_s, mido.Message("note_off", note=p)))

    def close(self):
        self.engine.stop(1.0)
        self.scheduler.stop(1.0)
        self.sent += self.port.drain()
