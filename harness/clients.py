"""The independent JACK clients of an end-to-end run, each a real process talking JACK MIDI, so that timing is
measured the way a musician would hear it, and what a receiver heard.

- `Receiver`: `jack_midi_dump -a`, an independent third-party client; each event is timestamped in frames of the
  server's clock (`t_s = frame / 48000`).
- `Source`: a small script in another process with a mido JACK virtual output that sends the events the caller
  gives it at their times, one JSON line per batch: raw MIDI bytes, and OSC messages or raw datagrams over UDP.
- `Player`: a `Source` that plays note phrases (`phrase`).
- What a receiver heard: `balance` (notes left sounding), `notes_of` (notes with their releases), `note_counts`,
  `tally_heard` (which messages of a phrase were missed, repeated or unexpected),
  `prime_from_receiver` (heard notes as the rows improvd's model is fed).

Called from the test's or bench's thread; each client's output is read on its own thread (`LineReader`).
"""

from __future__ import annotations

import collections
import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np

from harness.jack import SAMPLE_RATE, JackServer
from harness.procs import LineReader, finish, spawn, terminate, unique_id

@dataclass(frozen=True)
class MidiEvent:
    """One event seen by the receiver: server time (s, from the receiver's start) and the raw bytes."""

    t_s: float
    data: tuple[int, ...]

    @property
    def kind(self) -> str:
        """'on' (note-on with velocity > 0), 'off' (note-off or note-on with velocity 0), else 'other'."""
        status = self.data[0] & 0xF0
        if status == 0x90 and len(self.data) == 3 and self.data[2] > 0:
            return "on"
        if status == 0x80 or status == 0x90:
            return "off"
        return "other"

    @property
    def channel(self) -> int:
        """0-based channel."""
        return self.data[0] & 0x0F

    @property
    def note(self) -> int:
        return self.data[1]


_DUMP_LINE = re.compile(r"^\s*(\d+):((?: [0-9a-fA-F]{2})+)")


def parse_dump_line(line: str, rate: int = SAMPLE_RATE) -> MidiEvent | None:
    """One line of `jack_midi_dump -a` (`  46208: 90 3c 64 note on ...`) as an event, else None."""
    m = _DUMP_LINE.match(line)
    if not m:
        return None
    return MidiEvent(int(m.group(1)) / rate, tuple(int(b, 16) for b in m.group(2).split()))


class Receiver:
    """`jack_midi_dump -a` on its own JACK client; `events` fill in as they arrive."""

    def __init__(self, server: JackServer, client: str = "receiver", *, exact_name: bool = False) -> None:
        """`exact_name`: the JACK client is named `client` as it is (a synth that leaves and comes back), else
        `client-N`."""
        self.server = server
        self.client = client if exact_name else f"{client}-{unique_id()}"
        self.events: list[MidiEvent] = []
        self.proc = spawn(["stdbuf", "-oL", "jack_midi_dump", "-a", self.client], env=server.env,
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, text=True)
        self.reader = LineReader(self.proc.stdout, self._on_line)
        self.port = server.wait_port(f"{self.client}:input")

    def _on_line(self, line: str) -> None:
        ev = parse_dump_line(line, self.server.rate)
        if ev is not None:
            self.events.append(ev)

    def wait_events(self, predicate: Callable[[list[MidiEvent]], bool], timeout: float) -> bool:
        return self.reader.wait_for(lambda: predicate(self.events), timeout)

    def wait_quiet(self, quiet_s: float, timeout: float) -> None:
        """Wait until no event has arrived for `quiet_s` seconds (wall clock)."""
        deadline = time.monotonic() + timeout
        count, since = len(self.events), time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.02)
            if len(self.events) != count:
                count, since = len(self.events), time.monotonic()
            elif time.monotonic() - since >= quiet_s:
                return
        raise AssertionError(f"the receiver never went quiet for {quiet_s} s within {timeout} s")

    def stop(self) -> None:
        terminate(self.proc)


SOURCE_SCRIPT = r"""
import json, socket, sys, time
import mido
try:
    from pythonosc.osc_message_builder import OscMessageBuilder
except ImportError:  # only OSC events need it
    OscMessageBuilder = None
mido.set_backend("mido.backends.rtmidi/UNIX_JACK")
port = mido.open_output(sys.argv[2], virtual=True, client_name=sys.argv[1])
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
print("ready", flush=True)
for line in sys.stdin:
    events = json.loads(line)
    start = time.perf_counter() + 0.005
    for ev in events:
        due = start + ev[0]
        while due - time.perf_counter() > 0.002:  # sleep to 1.5 ms before, then spin
            time.sleep(max(0.0, due - time.perf_counter() - 0.0015))  # >= 0 even when preempted between the two
        while time.perf_counter() < due:
            pass
        kind = ev[1]
        if kind in ("note_on", "note_off"):
            port.send(mido.Message(kind, note=ev[2], velocity=ev[3], channel=ev[4]))
        elif kind == "midi":
            port.send(mido.Message.from_bytes(ev[2]))
        elif kind == "osc":
            b = OscMessageBuilder(address=ev[3])
            for a in ev[4]:
                b.add_arg(a)
            sock.sendto(b.build().dgram, ("127.0.0.1", ev[2]))
        else:
            sock.sendto(bytes.fromhex(ev[3]), ("127.0.0.1", ev[2]))
    print("done", flush=True)
port.close()
"""


class Source:
    """A mido JACK virtual output in another process that sends events at their times (seconds from the batch's
    start). `send` takes (t_s, [MIDI bytes]) pairs; `send_events` the script's own forms: (t_s, "midi", [bytes]),
    (t_s, "note_on"|"note_off", pitch, velocity, 0-based channel), (t_s, "osc", udp_port, address, [args]) and
    (t_s, "raw", udp_port, hex datagram) (UDP to 127.0.0.1)."""

    def __init__(self, server: JackServer, client: str = "source", port: str = "out", *,
                 exact_name: bool = False) -> None:
        self.client = client if exact_name else f"{client}-{unique_id()}"
        self.proc = spawn([sys.executable, "-c", SOURCE_SCRIPT, self.client, port], env=server.env,
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.reader = LineReader(self.proc.stdout)
        self.reader.wait_line("^ready$", 10.0)
        self.port = server.wait_port(f"{self.client}:{port}")
        self._sent = 0

    def send(self, events: list[tuple[float, list[int]]], *, wait: bool = True, timeout: float = 60.0) -> None:
        """Send [(t_s, [MIDI bytes])]; with `wait`, return once the last one is sent."""
        self.send_events([(t, "midi", list(data)) for t, data in events], wait=wait, timeout=timeout)

    def send_events(self, events: list, *, wait: bool = True, timeout: float = 60.0) -> None:
        """Send events in the script's forms (see the class), in time order; with `wait`, return once the last one
        is sent."""
        self.proc.stdin.write(json.dumps(sorted(events, key=lambda e: e[0])) + "\n")
        self.proc.stdin.flush()
        self._sent += 1
        if wait:
            self.wait_done(timeout)

    def wait_done(self, timeout: float = 60.0) -> None:
        """Wait until every batch sent so far is played; AssertionError after `timeout` seconds."""
        n = self._sent
        if not self.reader.wait_for(lambda: sum(ln == "done" for ln in self.reader.lines) >= n, timeout):
            raise AssertionError(f"the source {self.client} did not finish within {timeout} s")

    def stop(self) -> None:
        finish(self.proc)


def phrase(pitches: Iterable[int], *, step_s: float = 0.12, duration_s: float = 0.08, velocity: int = 90,
           channel: int = 1, start_s: float = 0.0) -> list[tuple[float, str, int, int, int]]:
    """Events of a monophonic phrase: (t_s, 'note_on'|'note_off', pitch, velocity, 0-based channel)."""
    events = []
    for i, p in enumerate(pitches):
        t = start_s + i * step_s
        events.append((t, "note_on", int(p), velocity, channel))
        events.append((t + duration_s, "note_off", int(p), 0, channel))
    return sorted(events, key=lambda e: (e[0], e[1] == "note_on"))


class Player(Source):
    """A `Source` that plays note phrases; `play(events)` sends them with their timing."""

    def __init__(self, server: JackServer, client: str = "player", port: str = "out", *,
                 exact_name: bool = False) -> None:
        super().__init__(server, client, port, exact_name=exact_name)

    def play(self, events: list, *, wait: bool = True, timeout: float = 30.0) -> None:
        """Send a phrase (see `phrase`); with `wait`, return once its last event is sent."""
        self.send_events(events, wait=wait, timeout=timeout)


def balance(events, channel: int) -> dict[int, int]:
    """Receiver events' note-ons minus note-offs per pitch on a channel (a note-off without a sounding note does not
    count); {} when every note-on got its note-off."""
    sounding: dict[int, int] = collections.defaultdict(int)
    for ev in events:
        if ev.channel == channel and ev.kind == "on":
            sounding[ev.note] += 1
        elif ev.channel == channel and ev.kind == "off" and sounding[ev.note] > 0:
            sounding[ev.note] -= 1
    return {p: n for p, n in sounding.items() if n}


def notes_of(events, channel: int) -> list[list]:
    """Pair note-ons with note-offs on one channel: [(onset_s, pitch, off_s or None, velocity)], by onset."""
    held = collections.defaultdict(list)
    out = []
    for ev in events:
        if ev.channel != channel or ev.kind == "other":
            continue
        if ev.kind == "on":
            held[ev.note].append(len(out))
            out.append([ev.t_s, ev.note, None, ev.data[2]])
        elif held[ev.note]:
            out[held[ev.note].pop(0)][2] = ev.t_s
    return out


def note_counts(events, channel: int) -> tuple[int, int]:
    """(note-ons, note-offs) among a receiver's events on one channel."""
    return (sum(e.kind == "on" and e.channel == channel for e in events),
            sum(e.kind == "off" and e.channel == channel for e in events))


def tally_heard(played: Iterable[tuple[int, ...]], heard: Iterable[tuple[float, tuple[int, ...]]]) -> dict:
    """What a receiver heard of a phrase whose messages are all different, message by message (MIDI bytes as hex,
    e.g. '90 3c 5a'): `missing`, played and never heard; `repeated`, played and heard more than once, each with the
    gaps between its copies in ms (rtmidi's copies of a message that an asynchronous JACK server's late client read
    twice from its source's unrefreshed buffer come microseconds to milliseconds apart, see bench/starts.py);
    `unexpected`, heard and never played. `heard` is [(t_s, bytes)] in arrival order."""
    played = [tuple(p) for p in played]
    known = set(played)
    if len(known) != len(played):
        raise ValueError(f"the played messages must all differ to be told apart, got {played}")
    times: dict[tuple[int, ...], list[float]] = collections.defaultdict(list)
    for t_s, data in heard:
        times[tuple(data)].append(t_s)
    return {"missing": [hex_bytes(p) for p in played if p not in times],
            "repeated": [{"message": hex_bytes(p), "copies": len(times[p]),
                          "gaps_ms": [round(1000 * (b - a), 3) for a, b in zip(times[p], times[p][1:])]}
                         for p in played if len(times.get(p, ())) > 1],
            "unexpected": [hex_bytes(d) for d, copies in times.items() if d not in known for _ in copies]}


def hex_bytes(data: Iterable[int]) -> str:
    """MIDI bytes as `tally_heard` and bench/starts.py write them: '90 3c 5a'."""
    return " ".join(f"{b:02x}" for b in data)


def prime_from_receiver(player_notes) -> np.ndarray:
    """Heard notes (`notes_of`, each with its release) as the float [K, 4] rows improvd's model is fed: pitch, step
    from the previous onset (0 for the first), duration, velocity."""
    onsets = np.array([n[0] for n in player_notes])
    return np.array([[n[1], s, n[2] - n[0], n[3]] for n, s in
                     zip(player_notes, np.diff(onsets, prepend=onsets[0]))])
