"""Turn-taking of `improvd run` over JACK (dummy driver, 48 kHz, 64-frame periods): when answers start and how long
they last, for fixed and pulse-measured phrase ends; prints JSON.

    .venv/bin/python bench/turns.py [--settings fixed,auto] [--articulations legato,detached,staccato]
                                    [--model M.onnx]

A player process plays scripted calls (harness/turns.py: 8 notes at 60, 100 and 160 bpm, quarters and
eighths, legato, detached and staccato, with and without a held last note); `jack_midi_dump -a`, an independent client,
timestamps the calls and improvd's answers on the server's clock. Each call is played once improvd's answer to the
previous one is over. Per setting of `[improvise]` and per tempo it reports:

- `latency_ms_median` / `latency_ms_max`: the player's last release -> improvd's first answered note-on;
- `premature`: calls during which improvd started a note while the player was still inside the call (must be 0);
- `ratio_median`: answer length (first note-on to last note-off) / call length (first onset to last release).

Settings: `fixed` = silence 0.6 s, answer_length "max", max_notes 32 (the defaults before turn-taking), `auto` =
silence "auto", answer_length "match", max_notes 128 (a cap only: the shipped model plays about 7 notes a second);
both max_seconds 8. The model is the shipped models/bach.onnx
(temperature 0.9, seed 3) unless --model is given. Needs jackd2 and its example clients.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from harness.clients import Player, Receiver  # noqa: E402
from harness.daemon import Daemon, write_config  # noqa: E402
from harness.jack import JackServer, wire  # noqa: E402
from harness.session import IMPROVD_CH, PLAYER_CH  # noqa: E402
from harness.turns import calls, measure, summarize  # noqa: E402
from improvd.daemon.live.statslog import is_answer  # noqa: E402

SETTINGS = {
    "fixed": {"silence": 0.6, "answer_length": "max", "max_notes": 32, "max_seconds": 8.0},
    "auto": {"silence": "auto", "answer_length": "match", "max_notes": 128, "max_seconds": 8.0},
}


def answers(daemon: Daemon) -> int:
    return sum(1 for ln in daemon.lines if is_answer(ln))


def run_setting(server: JackServer, tmp: Path, model: Path, name: str, improvise: dict, articulations) -> dict:
    receiver, player = Receiver(server), Player(server)
    client = f"improvd-turns-{name}"
    config = write_config(tmp / f"{name}.toml", model=model, midi={"client_name": client},
                          improvise={"temperature": 0.9, "seed": 3, **improvise})
    daemon = Daemon(server, config)
    rows = []
    try:
        daemon.wait_ready()
        wire(server, [player], [receiver], client=client, monitor=True)
        for call in calls(articulations):
            mark = len(receiver.events)
            player.play(call.events(PLAYER_CH), wait=True, timeout=60)
            done = answers(daemon)
            answered = daemon.reader.wait_for(lambda: answers(daemon) > done, 20.0)
            receiver.wait_quiet(0.3, timeout=20)
            row = {"call": call.name, "bpm": call.bpm, "value": call.value, "articulation": call.articulation,
                   "held": call.held, **measure(receiver.events[mark:], PLAYER_CH, IMPROVD_CH, -1e18, 1e18)}
            row["answer_logged"] = answered
            rows.append(row)
            print(f"{name}: {json.dumps(row)}", file=sys.stderr, flush=True)
    finally:
        daemon.stop()
        player.stop()
        receiver.stop()
    quarters60 = [r for r in rows if r["bpm"] == 60 and r["value"] == "quarter" and r["articulation"] == "legato"]
    eighths160 = [r for r in rows if r["bpm"] == 160 and r["value"] == "eighth"]
    summary = summarize(rows)
    ratio = summary["all"]["ratio_median"]
    lat160 = [r["latency_ms"] for r in eighths160 if r["latency_ms"] is not None]
    targets = {
        "160 bpm eighths: first note <= 400 ms after the last release (max)": bool(lat160) and max(lat160) <= 400,
        "60 bpm legato quarters: no premature answer": not any(r["premature"] for r in quarters60),
        "answer/call length median within 0.75..1.33": ratio is not None and 0.75 <= ratio <= 1.33,
        "no premature answer at all": not any(r["premature"] for r in rows),
    }
    return {"improvise": improvise, "summary": summary, "targets": targets, "calls": rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--settings", default="fixed,auto", help="comma-separated: " + ", ".join(SETTINGS))
    parser.add_argument("--articulations", default="legato,detached,staccato")
    parser.add_argument("--model", default=str(REPO / "models" / "bach.onnx"))
    args = parser.parse_args()
    result = {"command": " ".join([Path(sys.executable).name, *sys.argv]),
              "loadavg_before": Path("/proc/loadavg").read_text().split()[:3], "cpus": os.cpu_count(),
              "model": args.model, "settings": {}}
    with tempfile.TemporaryDirectory(prefix="improvd-turns-") as tmp:
        server = JackServer().start(Path(tmp))
        try:
            for name in args.settings.split(","):
                started = time.monotonic()
                result["settings"][name] = run_setting(server, Path(tmp), Path(args.model), name, SETTINGS[name],
                                                       tuple(args.articulations.split(",")))
                result["settings"][name]["wall_s"] = round(time.monotonic() - started, 1)
            result["xruns"] = len(server.xruns())
        finally:
            server.stop()
    result["loadavg_after"] = Path("/proc/loadavg").read_text().split()[:3]
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
