"""The flood sender of bench/flood.py and tests/e2e/test_reliability_e2e.py: a JACK client (python-rtmidi) in
its own process that sends a given rate of every kind of MIDI message, malformed data included, for a given time
(see bench/flood.py for what it sends and why).

Called from the test's or bench's thread; the flooder's output is read on its own thread (`LineReader`).
"""

from __future__ import annotations

import json
import subprocess
import sys

from harness.jack import JackServer
from harness.procs import LineReader, finish, spawn

FLOOD_SCRIPT = r"""
import heapq, json, random, sys, time
import rtmidi
out = rtmidi.MidiOut(rtmidi.API_UNIX_JACK, sys.argv[1])
out.open_virtual_port("out")
print("ready", flush=True)

def sysex(rng):
    return [0xF0] + [rng.randrange(128) for _ in range(rng.choice((4, 8, 16, 48, 200)))] + [0xF7]

MALFORMED = [[0x90], [0x90, 60], [0x3C, 0x40], [0xF4], [0xF5], [0xF9], [0xFD], [0xF0, 1, 2, 3], [0xF7],
             [0x90, 200, 64], [0xB0, 7, 255], [0xE0, 0x80, 0x80]]

for line in sys.stdin:
    cfg = json.loads(line)
    rng = random.Random(cfg["seed"])
    rate, seconds, hang = cfg["rate"], cfg["seconds"], cfg["hang"]
    note_channels = [c for c in range(16) if c != cfg.get("quiet_channel")]
    counts = {}
    held = set()
    offs = []  # heap of (due, channel, pitch)

    def send(kind, data):
        try:
            out.send_message(data)
        except Exception:
            counts["refused"] = counts.get("refused", 0) + 1
            return
        counts[kind] = counts.get(kind, 0) + 1

    def release(ch, p):
        held.discard((ch, p))
        if rng.random() < 0.5:
            send("note_off", [0x80 | ch, p, rng.randrange(128)])
        else:
            send("note_off", [0x90 | ch, p, 0])

    def one(now):
        if offs and offs[0][0] <= now:
            _, ch, p = heapq.heappop(offs)
            if (ch, p) in held:
                release(ch, p)
                return
        r = rng.random()
        ch = rng.randrange(16)
        if r < 0.30:
            ch = rng.choice(note_channels)
            p = rng.randrange(128)
            if (ch, p) in held:
                release(ch, p)
                return
            held.add((ch, p))
            send("note_on", [0x90 | ch, p, rng.randrange(1, 128)])
            heapq.heappush(offs, (now + rng.uniform(0.002, 0.08), ch, p))
        elif r < 0.42:
            send("clock", [0xF8])
        elif r < 0.47:
            send("active_sensing", [0xFE])
        elif r < 0.57:
            send("pitchwheel", [0xE0 | ch, rng.randrange(128), rng.randrange(128)])
        elif r < 0.62:
            send("aftertouch", [0xD0 | ch, rng.randrange(128)])
        elif r < 0.67:
            send("polytouch", [0xA0 | ch, rng.randrange(128), rng.randrange(128)])
        elif r < 0.74:
            send("control_change", [0xB0 | ch, rng.randrange(120), rng.randrange(128)])
        elif r < 0.76:
            send("program_change", [0xC0 | ch, rng.randrange(128)])
        elif r < 0.79:
            send("sysex", sysex(rng))
        elif r < 0.82:
            send("system", rng.choice([[0xF1, rng.randrange(128)], [0xF2, rng.randrange(128), rng.randrange(128)],
                                       [0xF3, rng.randrange(128)], [0xF6], [0xFF]]))
        elif r < 0.88:
            send("malformed", list(rng.choice(MALFORMED)))
        else:
            ch = rng.choice(note_channels)
            p = rng.randrange(128)
            if (ch, p) in held:
                release(ch, p)
            else:
                send("note_off", [0x80 | ch, p, 64])  # a release of a key that is not held

    start = time.perf_counter()
    end = start + seconds
    n = 0
    late_ticks = 0
    while True:
        now = time.perf_counter()
        if now >= end:
            break
        target = int((now - start) * rate)
        if target - n > rate * 0.01:
            late_ticks += 1
        while n < target:
            one(now)
            n += 1
        time.sleep(0.0005)
    elapsed = time.perf_counter() - start
    # Release what is held, but leave `hang` notes pressed: improvd must count them released after max_hold.
    keep = sorted(held)[:hang]
    for ch, p in sorted(held):
        if (ch, p) not in keep:
            release(ch, p)
            time.sleep(0.0002)
    # One complete SysEx last (0x7D: the non-commercial ID). A flood cycle JACK missed can lose the F7 that ended
    # one of the flood's unterminated SysEx starts; rtmidi's JACK input then takes every later message as part of
    # that SysEx until an event ends with F7. improvd's EOX guard ends it within 0.25 s (tests/e2e/test_input_e2e.py);
    # the complete SysEx ends it at once, so that the releases above come with their own times.
    time.sleep(0.005)
    send("sysex", [0xF0, 0x7D, 0xF7])
    print("done " + json.dumps({"sent": n, "seconds": round(elapsed, 3), "rate": round(n / elapsed, 1),
                                "by_kind": counts, "left_held": len(keep), "behind_10ms_ticks": late_ticks}),
          flush=True)
"""


class Flooder:
    """The flood sender: a JACK client with one output port (`port`), in its own process."""

    def __init__(self, server: JackServer, client: str = "flooder") -> None:
        self.client = client
        self.proc = spawn([sys.executable, "-c", FLOOD_SCRIPT, client], env=server.env,
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.reader = LineReader(self.proc.stdout)
        self.reader.wait_line("^ready$", 10.0)
        self.port = server.wait_port(f"{client}:out")
        self._runs = 0

    def flood(self, seconds: float, rate: int = 10000, *, hang: int = 0, seed: int = 1, wait: bool = True,
              quiet_channel: int | None = None) -> None:
        """Start a flood (no notes on the 0-based `quiet_channel`, when given); with `wait`, return when it is over
        (see `result`)."""
        self.proc.stdin.write(json.dumps({"seconds": seconds, "rate": rate, "hang": hang, "seed": seed,
                                          "quiet_channel": quiet_channel}) + "\n")
        self.proc.stdin.flush()
        self._runs += 1
        if wait:
            self.wait(seconds + 30.0)

    def wait(self, timeout: float) -> dict:
        n = self._runs
        if not self.reader.wait_for(lambda: sum(ln.startswith("done ") for ln in self.reader.lines) >= n, timeout):
            raise AssertionError("the flooder did not finish")
        return self.result()

    def result(self) -> dict:
        done = [ln for ln in self.reader.lines if ln.startswith("done ")]
        return json.loads(done[-1][5:])

    def stop(self) -> None:
        finish(self.proc)

