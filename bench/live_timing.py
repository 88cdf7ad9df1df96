"""Live timing of `improvd run` over JACK (dummy driver, 48 kHz, 64-frame periods); prints JSON.

    .venv/bin/python bench/live_timing.py [--phrases 4] [--cpu-seconds 10] [--model M.onnx]

What it measures, each from a real process on real JACK MIDI ports:

- `lateness_ms`: sent time minus deadline of every event improvd sent (median, p99, max), from the daemon's own
  scheduler stats (the `stats:` line it logs at exit), for the respond run and the continuous run.
- `ioi_error_ms` / `duration_error_ms`: inter-onset intervals and durations of the answered notes as timestamped by
  an independent receiver (`jack_midi_dump -a`), against the model's greedy prediction for the first answer (fresh
  state, temperature 0) and against what improvd itself sent for every answer (p50, p95, max of |error|).
- `first_note_after_silence_ms`: from the end of the silence (the player's last note-off at the receiver plus
  `improvise.silence`) to improvd's first note-on at the receiver, per answer.
- `cpu_percent`: CPU time of the daemon (user + system, all threads, from /proc) as % of one core, idle and while
  playing in continuous mode, against a bare client holding the same two JACK ports, measured over the same
  seconds.

Without `--model` a small random model from harness/modelfactory.py is used (the timing does not depend on the
weights, and its numpy twin gives the reference prediction). Needs jackd2 and its example clients.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from harness.clients import Player, Receiver, phrase  # noqa: E402
from harness.daemon import Daemon, greedy_answer, write_config  # noqa: E402
from harness.jack import JackServer, wire  # noqa: E402
from harness.procs import spawn, terminate  # noqa: E402
from harness.session import IMPROVD_CH, PLAYER_CH  # noqa: E402
from improvd.daemon.live.statslog import parse_event, parse_stats  # noqa: E402

PHRASES = [[60, 62, 64, 65, 67, 65, 64, 62], [67, 69, 71, 72, 71, 69, 67, 65], [55, 59, 62, 65, 64, 62, 60, 59],
           [72, 71, 69, 67, 65, 64, 62, 60]]
SILENCE_S = 0.4
PLAYED_DURATION_S = 0.1  # the player's note length in the respond run
BARE_CLIENT = r"""
import sys, time, rtmidi
mi = rtmidi.MidiIn(rtmidi.API_UNIX_JACK, sys.argv[1]); mi.open_virtual_port("improvd in")
mo = rtmidi.MidiOut(rtmidi.API_UNIX_JACK, sys.argv[1]); mo.open_virtual_port("improvd out")
mi.set_callback(lambda event, data: None)
print("ready", flush=True)
sys.stdin.read()
"""


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads), seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_percent(pids: dict[str, int], seconds: float) -> dict[str, float]:
    """% of one core each process used over the same `seconds`."""
    before = {k: cpu_seconds(p) for k, p in pids.items()}
    t0 = time.monotonic()
    time.sleep(seconds)
    wall = time.monotonic() - t0
    return {k: round(100.0 * (cpu_seconds(p) - before[k]) / wall, 2) for k, p in pids.items()}


def summary(values_ms) -> dict:
    v = np.abs(np.asarray(values_ms, dtype=np.float64))
    if not len(v):
        return {"n": 0}
    return {"n": int(len(v)), "p50": round(float(np.median(v)), 3), "p95": round(float(np.percentile(v, 95)), 3),
            "max": round(float(v.max()), 3)}


def pair(events, channel):
    """[(onset_s, pitch, off_s)] of one channel's notes, in onset order."""
    held, out = {}, []
    for e in events:
        if e.channel != channel or e.kind == "other":
            continue
        if e.kind == "on":
            held.setdefault(e.note, []).append(len(out))
            out.append([e.t_s, e.note, None])
        elif held.get(e.note):
            out[held[e.note].pop(0)][2] = e.t_s
    return out


def daemon_stats(lines: list[str]) -> dict | None:
    """The lateness improvd says it had (its `stats:` line at exit), or None before it exits."""
    for line in lines:
        stats = parse_stats(line)
        if stats is not None:
            return {"sent": stats["sent"], "median": stats["median_ms"], "p99": stats["p99_ms"],
                    "max": stats["max_ms"]}
    return None


def sent_notes(lines: list[str]) -> list[list[float]]:
    """[(onset_s, pitch, off_s)] of what improvd sent, from its --verbose log (its own clock)."""
    held, out = {}, []
    for line in lines:
        event = parse_event(line)
        if event is None or event[0] != "sent":
            continue
        _, t, kind, _, pitch, _ = event
        if kind == "note-on":
            held.setdefault(pitch, []).append(len(out))
            out.append([t, pitch, None])
        elif held.get(pitch):
            out[held[pitch].pop(0)][2] = t
    return out


def respond_run(server, tmp: Path, model_path: Path, twin, n_phrases: int, cpu_s: float) -> dict:
    receiver, player = Receiver(server), Player(server)
    config = write_config(tmp / "respond.toml", model=model_path,
                          midi={"client_name": "improvd-bench"},
                          improvise={"temperature": 0.0, "silence": SILENCE_S, "max_notes": 16,
                                     "answer_length": "max", "max_seconds": 8.0, "velocity": "fixed"},
                          record={"dir": str(tmp / "rec")})
    daemon = Daemon(server, config, "--verbose")
    bare = spawn([sys.executable, "-c", BARE_CLIENT, "bare-client"], env=server.env, stdin=subprocess.PIPE,
                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        daemon.wait_ready()
        assert bare.stdout.readline().strip() == "ready"
        wire(server, [player], [receiver], client="improvd-bench", monitor=True)
        bare_in = server.wait_port("bare-client:improvd in")
        server.connect(player.port, bare_in)
        time.sleep(1.0)
        idle = cpu_percent({"improvd": daemon.proc.pid, "bare_client": bare.pid}, cpu_s)
        first_delays, answers, receiver_lost = [], [], 0
        for k in range(n_phrases):
            start = len(receiver.events)
            player.play(phrase(PHRASES[k % len(PHRASES)], step_s=0.15, duration_s=PLAYED_DURATION_S, channel=PLAYER_CH))
            receiver.wait_events(lambda evs: any(e.channel == IMPROVD_CH for e in evs[start:]), 10)
            receiver.wait_quiet(0.6, 20)
            evs = receiver.events[start:]
            heard, answer = pair(evs, PLAYER_CH), pair(evs, IMPROVD_CH)
            for n in heard:  # a player's note-off the receiver missed (an asynchronous server can lose one)
                if n[2] is None:
                    receiver_lost += 1
                    n[2] = n[0] + PLAYED_DURATION_S  # as played
            first_delays.append((answer[0][0] - (max(n[2] for n in heard) + SILENCE_S)) * 1000)
            answers.append((heard, answer))
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(5)
        lines = daemon.lines
    finally:
        daemon.stop()
        terminate(bare)
        player.stop()
        receiver.stop()

    # Against what improvd sent (its own clock): every answer.
    sent = sent_notes(lines)
    received = [n for _, answer in answers for n in answer]
    ioi_vs_sent, dur_vs_sent = [], []
    offset = 0
    for _, answer in answers:
        mine = sent[offset:offset + len(answer)]
        offset += len(answer)
        if len(mine) != len(answer) or [m[1] for m in mine] != [a[1] for a in answer]:
            continue
        ioi_vs_sent += list((np.diff([a[0] for a in answer]) - np.diff([m[0] for m in mine])) * 1000)
        dur_vs_sent += [((a[2] - a[0]) - (m[2] - m[0])) * 1000 for a, m in zip(answer, mine)
                        if a[2] is not None and m[2] is not None]

    # Against the model's greedy prediction: the first answer (fresh state).
    ioi_vs_model = dur_vs_model = []
    pitches_match = None
    if twin is not None and answers:
        heard, answer = answers[0]
        onsets = np.array([n[0] for n in heard])
        prime = np.array([[n[1], s, n[2] - n[0], 90] for n, s in zip(heard, np.diff(onsets, prepend=onsets[0]))])
        expected = greedy_answer(twin, prime, len(answer), answer[0][0] - heard[-1][0])
        pitches_match = [a[1] for a in answer] == expected[:, 0].astype(int).tolist()
        on = np.array([a[0] for a in answer])
        ioi_vs_model = list((np.diff(on) - expected[1:, 1]) * 1000)
        pred_on = on[0] + np.concatenate([[0.0], np.cumsum(expected[1:, 1])])
        pred_off = pred_on + expected[:, 2]
        for i in range(len(answer)):
            later = [j for j in range(i + 1, len(answer)) if expected[j, 0] == expected[i, 0]]
            if later and pred_on[later[0]] < pred_off[i]:
                pred_off[i] = pred_on[later[0]]
        dur_vs_model = [((a[2] - a[0]) - (pf - pn)) * 1000 for a, pn, pf in zip(answer, pred_on, pred_off)
                        if a[2] is not None]
    return {
        "answers": len(answers), "notes_received": len(received),
        "receiver_lost_player_note_offs": receiver_lost,
        "lateness_ms": daemon_stats(lines),
        "first_note_after_silence_ms": summary(first_delays) | {"values": [round(v, 3) for v in first_delays]},
        "ioi_error_ms": {"vs_model_first_answer": summary(ioi_vs_model), "vs_sent": summary(ioi_vs_sent)},
        "duration_error_ms": {"vs_model_first_answer": summary(dur_vs_model), "vs_sent": summary(dur_vs_sent)},
        "greedy_pitches_match": pitches_match,
        "cpu_percent_idle": idle,
    }


def continuous_run(server, tmp: Path, model_path: Path, cpu_s: float) -> dict:
    receiver, player = Receiver(server), Player(server)
    config = write_config(tmp / "continuous.toml", model=model_path, midi={"client_name": "improvd-cont"},
                          improvise={"mode": "continuous", "temperature": 0.9, "seed": 1, "silence": SILENCE_S,
                                     "velocity": "fixed"})
    daemon = Daemon(server, config)
    bare = spawn([sys.executable, "-c", BARE_CLIENT, "bare-client2"], env=server.env, stdin=subprocess.PIPE,
                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        daemon.wait_ready()
        assert bare.stdout.readline().strip() == "ready"
        wire(server, [player], [receiver], client="improvd-cont", monitor=True)
        server.connect(player.port, server.wait_port("bare-client2:improvd in"))
        player.play(phrase(PHRASES[0], step_s=0.15, duration_s=0.1, channel=PLAYER_CH))
        receiver.wait_events(lambda evs: any(e.channel == IMPROVD_CH for e in evs), 10)
        before = sum(e.kind == "on" and e.channel == IMPROVD_CH for e in receiver.events)
        playing = cpu_percent({"improvd": daemon.proc.pid, "bare_client": bare.pid}, cpu_s)
        after = sum(e.kind == "on" and e.channel == IMPROVD_CH for e in receiver.events)
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(5)
        lines = daemon.lines
        receiver.wait_quiet(0.3, 5)
        ons = sum(e.kind == "on" and e.channel == IMPROVD_CH for e in receiver.events)
        offs = sum(e.kind == "off" and e.channel == IMPROVD_CH for e in receiver.events)
    finally:
        daemon.stop()
        terminate(bare)
        player.stop()
        receiver.stop()
    return {"notes_per_second": round((after - before) / cpu_s, 2), "cpu_percent_playing": playing,
            "lateness_ms": daemon_stats(lines), "note_ons": ons, "note_offs": offs}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--phrases", type=int, default=4, help="phrases the player plays in respond mode")
    parser.add_argument("--cpu-seconds", type=float, default=10.0, help="seconds of each CPU measurement")
    parser.add_argument("--model", type=Path, help="step-format ONNX (default: a random test model)")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="improvd-bench-"))
    twin = None
    model_path = Path(args.model).resolve() if args.model else None  # the temporary config lives elsewhere
    if model_path is None:
        from harness.modelfactory import make_step_model
        model_path = tmp / "model.onnx"
        twin = make_step_model(model_path, seed=3, context=256)  # the most a model may declare: no re-priming here
    server = JackServer().start(tmp)
    try:
        respond = respond_run(server, tmp, model_path, twin, args.phrases, args.cpu_seconds)
        continuous = continuous_run(server, tmp, model_path, args.cpu_seconds)
    finally:
        server.stop()
    result = {
        "bench": "live_timing", "jack": server.settings(),
        "cpus": os.cpu_count(), "model": str(args.model or "harness.modelfactory(seed=3)"),
        "respond": respond, "continuous": continuous,
        "cpu_idle_excess_pp": round(respond["cpu_percent_idle"]["improvd"]
                                    - respond["cpu_percent_idle"]["bare_client"], 2),
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
