"""Soak: `improvd run` in continuous mode for a long time with an automated player, over JACK; prints JSON.

    .venv/bin/python bench/soak.py [--minutes 30] [--window-seconds 60] [--no-record] [--rotate-minutes 60]
                                   [--period-frames 64] [--jack-async] [--realtime auto|0|1]

improvd plays continuously (temperature 0.9) while an automated player in another process plays phrases of 3 to 8
notes (some of them chords, random velocities, on two channels) with pauses of 0.5 to 3 s, for `--minutes`. The
session is recorded (`record.dir`, flushed every 10 s, a new file every `--rotate-minutes`) unless `--no-record`.
Every `--window-seconds`, SIGUSR1 makes improvd log the lateness of the events it sent in that window and its
memory; the bench also samples the daemon's resident memory and CPU time from /proc every 5 s. At the end,
SIGTERM, and an independent receiver (`jack_midi_dump -a`) on improvd's output must have seen exactly as many
note-ons as note-offs, and exactly the counts improvd says it sent (its final `stats:` line). JACK's xrun reports
during the run are counted from the server's log (a missed cycle loses its MIDI for every client, so they explain
a receiver that saw less). The JACK server runs in synchronous mode (`jackd -S`) unless `--jack-async`: in the
default asynchronous mode a client the host stalled past the driver's wake-up misses that cycle and its MIDI, so on
a VM with CPU steal the receiver's counts measure the host; in sync mode a stalled cycle is late, not lost, and the
receiver's counts measure improvd.

Output: per window (lateness median/p99/max in ms, events, RSS MB, JACK's xrun reports, the host's CPU steal %),
memory growth (first window after warm-up to the end, MB, and a least-squares slope in MB/hour over the samples
after warm-up), peak RSS (VmHWM), mean CPU % of a core, JACK's xruns by client with the host's steal over the run, the
receiver's note-on and note-off counts beside improvd's own, and `ok`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.flood import note_balance  # noqa: E402
from harness.clients import Player, Receiver  # noqa: E402
from harness.daemon import Daemon, input_counts, sent_counts, window_stats, write_config  # noqa: E402
from harness.graph import PROCESS_ERROR_RUN, jack_mark, jack_trouble  # noqa: E402
from harness.jack import PERIOD_FRAMES, JackServer, wire  # noqa: E402
from improvd.daemon.live.statslog import rss_mb  # noqa: E402
from harness.session import IMPROVD_CH  # noqa: E402

WARM_UP_S = 60.0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def random_phrase(rng: random.Random) -> list:
    """3..8 notes (sometimes a chord), on channel 2 or 3: (t_s, kind, pitch, velocity, channel) events."""
    events, t = [], 0.0
    channel = rng.choice((1, 2))
    for _ in range(rng.randint(3, 8)):
        pitches = rng.sample(range(48, 84), rng.choice((1, 1, 1, 2, 3)))
        duration = rng.uniform(0.05, 0.6)
        velocity = rng.randint(40, 120)
        for p in pitches:
            events.append((t, "note_on", p, velocity, channel))
            events.append((t + duration, "note_off", p, 0, channel))
        t += rng.uniform(0.08, 0.4)
    return sorted(events, key=lambda e: (e[0], e[1] == "note_on"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="length of the run")
    parser.add_argument("--window-seconds", type=float, default=60.0, help="lateness and memory window")
    parser.add_argument("--no-record", action="store_true", help="do not record the session")
    parser.add_argument("--rotate-minutes", type=float, default=60.0, help="record.rotate_minutes (default 60)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--model", type=Path, help="step-format ONNX (default: a random test model)")
    parser.add_argument("--period-frames", type=int, default=PERIOD_FRAMES,
                        help=f"JACK's period at 48 kHz (default {PERIOD_FRAMES}: 1.3 ms; where a VM loses its CPU "
                             "for longer, the driver wakes late)")
    parser.add_argument("--realtime", choices=("auto", "0", "1"), default="auto",
                        help="the JACK server's real-time scheduling (auto: where permitted)")
    parser.add_argument("--jack-async", action="store_true",
                        help="run jackd in its default asynchronous mode (stalled clients miss cycles and their MIDI) "
                             "instead of synchronous mode (-S)")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="improvd-soak-"))
    model = args.model.resolve() if args.model is not None else None  # (the daemon runs in a temporary folder)
    if model is None:
        from harness.modelfactory import make_step_model
        model = tmp / "model.onnx"
        make_step_model(model, seed=3, context=64)
    rng = random.Random(args.seed)
    realtime = None if args.realtime == "auto" else args.realtime == "1"
    server = JackServer(period=args.period_frames, sync=not args.jack_async, realtime=realtime).start(tmp)
    receiver = player = daemon = None
    windows, samples = [], []
    try:
        receiver, player = Receiver(server), Player(server)
        config = write_config(tmp / "soak.toml", model=model, midi={"client_name": "improvd-soak"},
                              improvise={"mode": "continuous", "temperature": 0.9, "seed": 2, "silence": 0.4,
                                         "max_notes": 64},
                              record={} if args.no_record else {"dir": str(tmp / "rec"),
                                                                "rotate_minutes": args.rotate_minutes})
        daemon = Daemon(server, config)
        daemon.wait_ready()
        wire(server, [player], [receiver], client="improvd-soak")
        pid = daemon.proc.pid
        run_start = window_start = jack_mark(server)
        t0 = time.monotonic()
        cpu0 = cpu_seconds(pid)
        end = t0 + args.minutes * 60.0
        next_window = t0 + args.window_seconds
        next_sample = t0
        window_stats(daemon, len(daemon.lines))  # start the first window now

        def window(now: float) -> dict:
            """End the current window: improvd's lateness and memory in it, JACK's xruns and the host's steal."""
            nonlocal window_start
            w = window_stats(daemon, len(daemon.lines))
            jack = jack_trouble(server, window_start)
            window_start = jack_mark(server)
            return {"t_min": round((now - t0) / 60, 2), "events": w["sent"], "median_ms": w["median_ms"],
                   "p99_ms": w["p99_ms"], "max_ms": w["max_ms"], "rss_mb": w["rss_mb"],
                   "xrun_reports": jack["reports"], "naming_improvd": jack["naming_improvd"],
                   "process_errors": jack["process_errors"],
                   "steal_percent": jack["host_steal_percent"]}
        while time.monotonic() < end:
            player.play(random_phrase(rng), wait=True, timeout=30)
            pause_until = time.monotonic() + rng.uniform(0.5, 3.0)
            while time.monotonic() < min(pause_until, end):
                now = time.monotonic()
                if now >= next_sample:
                    samples.append((now - t0, rss_mb(pid)[0]))
                    next_sample += 5.0
                if now >= next_window:
                    windows.append(window(now))
                    next_window += args.window_seconds
                time.sleep(0.05)
            if daemon.proc.poll() is not None:
                raise RuntimeError("improvd exited during the soak:\n" + daemon.log())
        elapsed = time.monotonic() - t0
        cpu_pct = 100.0 * (cpu_seconds(pid) - cpu0) / elapsed
        windows.append(window(t0 + elapsed))
        _, peak = rss_mb(pid)
        xruns = jack_trouble(server, run_start)
        daemon.send_signal(signal.SIGTERM)
        rc = daemon.wait(5.0)
        receiver.wait_quiet(0.5, 10.0)
        balance = note_balance(receiver.events, IMPROVD_CH)
        lines = daemon.lines
    finally:
        for part in (daemon, player, receiver):
            if part is not None:
                part.stop()
        server.stop()

    after = [(t, r) for t, r in samples if t >= min(WARM_UP_S, args.minutes * 30.0)]
    slope = float(np.polyfit([t for t, _ in after], [r for _, r in after], 1)[0] * 3600) if len(after) >= 3 else None
    p99s = [w["p99_ms"] for w in windows if w["events"]]
    result = {
        "bench": "soak", "minutes": round(elapsed / 60, 2), "cpus": os.cpu_count(),
        "recording": None if args.no_record else {"rotate_minutes": args.rotate_minutes,
                                                  "files": len(list((tmp / "rec").glob("*.mid")))},
        "jack": server.settings(),
        "windows": windows,
        "lateness_ms": {"worst_window_p99": max(p99s) if p99s else None,
                        "median_window_p99": float(np.median(p99s)) if p99s else None,
                        "max": max((w["max_ms"] for w in windows), default=None),
                        "events": sum(w["events"] for w in windows)},
        "memory_mb": {"first_after_warm_up": round(after[0][1], 1) if after else None,
                      "end": round(samples[-1][1], 1) if samples else None,
                      "growth": round(after[-1][1] - after[0][1], 1) if after else None,
                      "slope_mb_per_hour": round(slope, 2) if slope is not None else None,
                      "peak_vmhwm": round(peak, 1), "samples": len(samples)},
        "cpu_percent": round(cpu_pct, 2),
        "input": input_counts(lines),
        "jack_xruns": xruns,
        "exit_status": rc, **balance, "sent_by_improvd": sent_counts(lines),
    }
    result["ok"] = bool(rc == 0 and balance["note_ons"] == balance["note_offs"] and balance["note_ons"] > 0
                        and result["sent_by_improvd"] == balance and xruns["naming_improvd"] == 0
                        and xruns["longest_process_error_run"] < PROCESS_ERROR_RUN)
    print(json.dumps(result, indent=2))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
