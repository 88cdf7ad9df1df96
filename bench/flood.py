"""Input flood over JACK: improvd under 10,000 MIDI messages a second of everything; prints JSON.

    .venv/bin/python bench/flood.py [--seconds 10] [--rate 10000] [--mode both|continuous|respond]
                                    [--realtime auto|0|1] [--jack-sync]

A flooder process (its own JACK client, python-rtmidi) sends `--rate` messages a second for `--seconds` to
improvd's input: note-ons and note-offs on all 16 channels (some as note-on velocity 0), MIDI clock, active
sensing, pitch bend, channel and polyphonic aftertouch, control changes, program changes, SysEx of 4 to 200 bytes,
system common and real-time messages (song position, MTC, song select, tune request, system reset), and malformed
data that JACK carries as it is: a lone status byte, a truncated note-on, stray data bytes, undefined status bytes
(F4, F5, F9, FD), an unterminated SysEx, a lone EOX and data bytes over 127. Transport commands (Start, Continue,
Stop) are left out: they are not noise but commands improvd obeys (Stop silences it until Start or Continue). At
the end of the flood every note it pressed is released, except `--hang` notes left held on purpose (improvd must
treat them as released after `improvise.max_hold`).

- `continuous` run: improvd listens to channel 2 and plays continuously while the flood hits its input with
  everything, notes on the 15 other channels included (on its own channel a dense stream of notes is the player
  playing, and continuous mode follows the player: each note heard moves improvd's next note, so it would wait).
  SIGUSR1 before and after the flood gives the lateness of the events improvd sent during the flood (its
  scheduler's own figures: median, p99, max); the daemon's memory (VmRSS) is sampled every 0.25 s and its peak
  (VmHWM) read at the end; improvd must go on playing after the flood.
- `respond` run: improvd listens to every channel; the flood (notes on all 16 channels) hits it while idle; after
  the flood (and `max_hold`), a phrase must be answered.
- Both: an independent receiver (`jack_midi_dump -a`) on improvd's output counts note-ons and note-offs after
  SIGTERM: they must be equal, and equal to what improvd says it sent (its final `stats:` line); the daemon's own
  `input:` line says what it received and dropped. JACK's xrun reports during the flood are counted from the
  server's log; none may name one of improvd's clients (`naming_improvd`; `improvd_overran` counts those still
  running at the cycle's deadline: what a Python MIDI callback in JACK's process thread did, waiting for the GIL),
  and no run of process errors may show a client that stopped running its cycle.

Acceptance (issue 6): lateness p99 < 2 ms during the flood, memory bounded, no hanging note, answers afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from harness.clients import Player, Receiver, note_counts, phrase  # noqa: E402
from harness.daemon import Daemon, input_counts, sent_counts, window_stats, write_config  # noqa: E402
from harness.flood import Flooder  # noqa: E402
from harness.graph import PROCESS_ERROR_RUN, jack_mark, jack_trouble  # noqa: E402
from harness.jack import JackServer, wire  # noqa: E402
from improvd.daemon.live.statslog import rss_mb  # noqa: E402
from harness.session import IMPROVD_CH, PHRASE, PLAYER_CH  # noqa: E402
from improvd.daemon.live.statslog import is_answer  # noqa: E402


def note_balance(events, channel: int = IMPROVD_CH) -> dict:
    """The note-ons and note-offs a receiver saw on one channel, for the JSON."""
    ons, offs = note_counts(events, channel)
    return {"note_ons": ons, "note_offs": offs}


class Rig:
    """improvd, a player, a flooder and a receiver on one JACK server."""

    def __init__(self, server: JackServer, tmp: Path, model: Path, name: str, improvise: dict,
                 midi: dict | None = None) -> None:
        self.server = server
        self.receiver = Receiver(server)
        self.player = Player(server)
        self.flooder = Flooder(server, client=f"flooder-{name}")
        config = write_config(tmp / f"{name}.toml", model=model, midi={"client_name": name, **(midi or {})},
                              improvise={"temperature": 0.9, "seed": 5, "silence": 0.4, "answer_length": "max",
                                         "velocity": "fixed",
                                         **improvise})
        self.daemon = Daemon(server, config)
        try:
            self.daemon.wait_ready()
            wire(server, [self.player, self.flooder], [self.receiver], client=name)
        except BaseException:
            self.close()
            raise

    def improvd_ons(self) -> int:
        return sum(e.kind == "on" and e.channel == IMPROVD_CH for e in self.receiver.events)

    def finish(self) -> dict:
        """SIGTERM, wait, and the note balance at the receiver (and as improvd counted what it sent)."""
        self.daemon.send_signal(signal.SIGTERM)
        rc = self.daemon.wait(5.0)
        self.receiver.wait_quiet(0.3, 5.0)
        return {"exit_status": rc, **note_balance(self.receiver.events),
                "sent_by_improvd": sent_counts(self.daemon.lines), "input": input_counts(self.daemon.lines)}

    def close(self) -> None:
        self.daemon.stop()
        self.flooder.stop()
        self.player.stop()
        self.receiver.stop()


class _RssSampler:
    """Samples a process's VmRSS every `interval_s` on a thread."""

    def __init__(self, pid: int, interval_s: float = 0.25) -> None:
        self.pid, self.interval_s = pid, interval_s
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        t0 = time.monotonic()
        while not self._stop.wait(self.interval_s):
            rss = rss_mb(self.pid)
            if rss is None:  # the process is gone
                return
            self.samples.append((time.monotonic() - t0, rss[0]))

    def stop(self) -> list[tuple[float, float]]:
        self._stop.set()
        self._thread.join(2.0)
        return self.samples


def continuous_flood(server, tmp: Path, model: Path, seconds: float, rate: int, hang: int,
                     max_hold: float) -> dict:
    """improvd plays continuously through a flood; lateness during it, memory, notes after, balance."""
    rig = Rig(server, tmp, model, "improvd-flood-c", {"mode": "continuous", "max_hold": max_hold},
              midi={"input_channels": [PLAYER_CH + 1]})
    try:
        rig.player.play(phrase(PHRASE, step_s=0.12, duration_s=0.08, channel=PLAYER_CH))
        if not rig.receiver.wait_events(lambda evs: sum(e.kind == "on" for e in evs) >= 4, 10.0):
            raise AssertionError("improvd did not start playing:\n" + rig.daemon.log())
        rss_before = rss_mb(rig.daemon.proc.pid)
        before = window_stats(rig.daemon, len(rig.daemon.lines))
        sampler = _RssSampler(rig.daemon.proc.pid)
        ons_before = rig.improvd_ons()
        mark = len(rig.daemon.lines)
        jack_start = jack_mark(server)
        rig.flooder.flood(seconds, rate, hang=hang, quiet_channel=PLAYER_CH)
        during = window_stats(rig.daemon, mark)
        xruns_during = jack_trouble(server, jack_start)
        ons_during = rig.improvd_ons() - ons_before
        after_s = max_hold + 2.0
        time.sleep(after_s)
        ons_after = rig.improvd_ons() - ons_before - ons_during
        samples = sampler.stop()
        rss_end, rss_peak = rss_mb(rig.daemon.proc.pid)
        overload = [ln.split(": ", 2)[-1] for ln in rig.daemon.lines if "input overload" in ln]
        end = rig.finish()
    finally:
        rig.close()
    return {
        "flood": rig.flooder.result(),
        "lateness_during_flood_ms": {k: during[k] for k in ("sent", "late", "median_ms", "p99_ms", "max_ms")},
        "lateness_before_flood_ms": {k: before[k] for k in ("sent", "median_ms", "p99_ms", "max_ms")},
        "improvd_notes": {"during_flood": ons_during, f"in_{after_s:g}_s_after": ons_after},
        "memory_mb": {"rss_before": round(rss_before[0], 1), "rss_max_sampled": round(max(r for _, r in samples), 1)
                      if samples else None, "rss_end": round(rss_end, 1), "peak_vmhwm": round(rss_peak, 1),
                      "samples": len(samples)},
        "input_overload_log": overload,
        "jack_xruns_during_flood": xruns_during,
        **end,
    }


def respond_flood(server, tmp: Path, model: Path, seconds: float, rate: int, hang: int, max_hold: float) -> dict:
    """A flood at an idle improvd in respond mode, then a phrase: it must be answered."""
    rig = Rig(server, tmp, model, "improvd-flood-r", {"max_hold": max_hold, "max_notes": 8})
    try:
        jack_start = jack_mark(server)
        rig.flooder.flood(seconds, rate, hang=hang)
        xruns_during = jack_trouble(server, jack_start)
        # The flood's last notes are a phrase too (its stuck keys count as released after max_hold): improvd may
        # answer it. Let that end before the player plays.
        time.sleep(max_hold + 0.5)
        rig.receiver.wait_quiet(1.0, 30.0)
        flood_answer = rig.improvd_ons()
        before = flood_answer
        rig.player.play(phrase(PHRASE, step_s=0.12, duration_s=0.08, channel=PLAYER_CH))
        t0 = time.monotonic()
        answered = rig.receiver.wait_events(
            lambda evs: sum(e.kind == "on" and e.channel == IMPROVD_CH for e in evs) > before, 10.0)
        answer_wait_s = time.monotonic() - t0 if answered else None
        rig.receiver.wait_quiet(0.8, 15.0)
        end = rig.finish()
        answers = [ln.split(": ", 2)[-1] for ln in rig.daemon.lines if is_answer(ln)]
    finally:
        rig.close()
    return {"flood": rig.flooder.result(), "notes_answering_the_flood": flood_answer, "answered_after_flood": answered,
            "first_answer_note_after_phrase_end_s": round(answer_wait_s, 3) if answer_wait_s else None,
            "answers_logged": answers[-3:], "jack_xruns_during_flood": xruns_during, **end}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="length of the flood")
    parser.add_argument("--rate", type=int, default=10000, help="messages a second")
    parser.add_argument("--hang", type=int, default=3, help="notes the flooder leaves held at the end")
    parser.add_argument("--max-hold", type=float, default=1.0, help="improvise.max_hold for the run")
    parser.add_argument("--mode", choices=["both", "continuous", "respond"], default="both")
    parser.add_argument("--model", type=Path, help="step-format ONNX (default: a random test model)")
    parser.add_argument("--realtime", choices=("auto", "0", "1"), default="auto",
                        help="the JACK server's real-time scheduling (auto: where permitted)")
    parser.add_argument("--jack-sync", action="store_true", help="JACK's synchronous mode (default: asynchronous)")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="improvd-flood-"))
    model = args.model.resolve() if args.model is not None else None  # (the config lives in a temporary folder)
    if model is None:
        from harness.modelfactory import make_step_model
        model = tmp / "model.onnx"
        make_step_model(model, seed=3, context=64)
    realtime = None if args.realtime == "auto" else args.realtime == "1"
    server = JackServer(realtime=realtime, sync=args.jack_sync).start(tmp)
    result: dict = {"bench": "flood", "seconds": args.seconds, "rate": args.rate, "cpus": os.cpu_count(),
                    "jack": server.settings()}
    try:
        if args.mode in ("both", "continuous"):
            result["continuous"] = continuous_flood(server, tmp, model, args.seconds, args.rate, args.hang,
                                                    args.max_hold)
        if args.mode in ("both", "respond"):
            result["respond"] = respond_flood(server, tmp, model, args.seconds, args.rate, args.hang, args.max_hold)
    finally:
        server.stop()
    checks = {}
    if "continuous" in result:
        c = result["continuous"]
        checks["lateness_p99_under_2ms"] = c["lateness_during_flood_ms"]["p99_ms"] < 2.0
        checks["keeps_playing_after"] = list(c["improvd_notes"].values())[1] > 0
        checks["continuous_balanced"] = c["note_ons"] == c["note_offs"] and c["exit_status"] == 0
    if "respond" in result:
        r = result["respond"]
        checks["answers_after"] = bool(r["answered_after_flood"])
        checks["respond_balanced"] = r["note_ons"] == r["note_offs"] and r["exit_status"] == 0
    runs = [result[k] for k in ("continuous", "respond") if k in result]
    # what the receiver saw is what improvd sent, and improvd never made JACK's cycle late
    checks["receiver_saw_what_was_sent"] = all(
        r["sent_by_improvd"] == {"note_ons": r["note_ons"], "note_offs": r["note_offs"]} for r in runs)
    checks["no_xrun_names_improvd"] = all(r["jack_xruns_during_flood"]["naming_improvd"] == 0 for r in runs)
    checks["no_run_of_process_errors"] = all(
        r["jack_xruns_during_flood"]["longest_process_error_run"] < PROCESS_ERROR_RUN for r in runs)
    result["checks"] = checks
    result["ok"] = all(checks.values())
    print(json.dumps(result, indent=2))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
