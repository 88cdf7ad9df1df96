"""The unit tests' shared fakes: one fake clock (`FakeClock`), the note builders (`on`, `off`), python-rtmidi for
the ports (`FakeRt`, `FakeMidi`), and the `balanced` family that checks a list of sent messages for hanging or
doubled notes. Also what the benches use of them
(bench/record_flush.py's clock). Pure; called from the test's thread (and, for `FakeClock`, from the threads of the
code under test that it is injected into).
"""

from __future__ import annotations

import queue

import mido
import rtmidi


class FakeClock:
    """Time the test sets by hand (`clock.t = ...`) or that moves only when the code under test waits.

    Call it (or `now()`) for the time in seconds: it fits an injected `now`. `sleep(s)` and `wait(cond, timeout_s)`
    fit an injected sleep and condition wait (the scheduler's): they move the time on instead of waiting, so a
    thread-driven run takes no real time."""

    def __init__(self, t: float = 100.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def now(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.t += max(seconds, 1e-5)

    def wait(self, cond, timeout_s):
        if timeout_s is None:
            cond.wait(0.005)  # idle: nothing to fast-forward to
        else:
            self.t += max(timeout_s, 1e-6)  # a real wait always takes some time
            cond.wait(0)


def on(note: int, velocity: int = 90, channel: int = 0, *, time: float = 0) -> mido.Message:
    """A note-on (`time`: a MIDI file's delta time in ticks, where the message goes into a track)."""
    return mido.Message("note_on", note=note, velocity=velocity, channel=channel, time=time)


def off(note: int, channel: int = 0, velocity: int = 0, *, time: float = 0,
        zero_velocity_on: bool = False) -> mido.Message:
    """A note-off, or with `zero_velocity_on` the note-on with velocity 0 that many devices send instead."""
    if zero_velocity_on:
        return mido.Message("note_on", note=note, velocity=0, channel=channel, time=time)
    return mido.Message("note_off", note=note, velocity=velocity, channel=channel, time=time)


def _key_counts(sent) -> tuple[dict[tuple[int, int], int], bool]:
    """Note-ons minus note-offs per (channel, pitch) at the end of sent (time, message) pairs, and whether any key
    ever left 0..1 on the way (a note-off of a silent key, a second note-on of a sounding one). Messages other than
    notes are ignored."""
    count: dict[tuple[int, int], int] = {}
    stepped_out = False
    for _, m in sent:
        if m.type not in ("note_on", "note_off"):
            continue
        key = (m.channel, m.note)
        count[key] = count.get(key, 0) + (1 if m.type == "note_on" and m.velocity > 0 else -1)
        stepped_out |= not 0 <= count[key] <= 1
    return count, stepped_out


def balanced(sent) -> bool:
    """Whether sent (time, message) pairs sound each key once at a time and release every one: no note-off of a
    silent key, no second note-on of a sounding key, nothing left sounding (per channel and pitch)."""
    count, stepped_out = _key_counts(sent)
    return not stepped_out and all(v == 0 for v in count.values())


def balanced_in_total(sent) -> bool:
    """Whether sent (time, message) pairs hold as many note-offs as note-ons per channel and pitch: a key may sound
    twice at once (two overlapping notes of one pitch), and only the totals count. Weaker than `balanced`."""
    count, _ = _key_counts(sent)
    return all(v == 0 for v in count.values())


def drain(q) -> list:
    """Everything a queue holds now, in order, without waiting."""
    out = []
    while True:
        try:
            out.append(q.get_nowait())
        except queue.Empty:
            return out


class FakeRt:
    """python-rtmidi's MidiIn/MidiOut, the surface the ports use: a port list the test changes (`names`), a queue of
    input (`messages` of (bytes, delta_s), popped by `get_message`), and every open, close, send and delete in
    `calls`. With `fail_open`, opening a port raises as rtmidi does for a port it cannot open."""

    def __init__(self, names=(), messages=()):
        self.names = list(names)
        self.messages = list(messages)
        self.calls = []
        self.fail_open = False
        self.ignored_types = None

    @property
    def sent(self):
        """The bytes of every message sent, in order."""
        return [call[1] for call in self.calls if call[0] == "send"]

    @property
    def deleted(self):
        return ("delete",) in self.calls

    def get_ports(self):
        return list(self.names)

    def open_port(self, index, name):
        if self.fail_open:
            raise rtmidi.SystemError("busy")
        self.calls.append(("open", self.names[index]))

    def open_virtual_port(self, name):
        self.calls.append(("virtual", name))

    def close_port(self):
        self.calls.append(("close",))

    def send_message(self, data):
        self.calls.append(("send", tuple(data)))

    def get_message(self):
        return self.messages.pop(0) if self.messages else None

    def ignore_types(self, **kwargs):
        self.ignored_types = kwargs

    def delete(self):
        self.calls.append(("delete",))


class FakeMidi:
    """Stands for `open_rt_client` (daemon/io/port.py) when a test builds a port: the clients opened are `rts` in
    order (the port's own first, then e.g. an input's EOX guard on JACK), and any further one a new FakeRt without
    ports (an EOX guard then finds nothing to connect to). `opened` lists what was asked: (direction, api,
    client_name, keyword arguments)."""

    def __init__(self, *rts):
        self.rts = list(rts)
        self.opened = []

    def __call__(self, direction, api, client_name, **kwargs):
        self.opened.append((direction, api, client_name, kwargs))
        return (self.rts.pop(0) if self.rts else FakeRt()), frozenset()
