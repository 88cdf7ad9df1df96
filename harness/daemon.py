"""`improvd run` under test: the daemon as a subprocess (`Daemon`), its config files, the models it is given
(`make_model`, `greedy_answer`), and the log lines benches and tests read from it (`window_stats`, `input_counts`,
`sent_counts`, on top of daemon/live/statslog.py's parsers).

Called from the test's or bench's thread; the daemon's stderr is read on its own thread (`LineReader`).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from harness.jack import JackServer
from improvd.daemon.live import statslog
from harness.procs import LineReader, spawn, terminate

REPO = Path(__file__).resolve().parents[1]  # the checkout: `python -m improvd.daemon.cli` runs from here


def write_config(path: Path, *, model: Path, midi: dict | None = None, improvise: dict | None = None,
                 record: dict | None = None, log: dict | None = None) -> Path:
    """A TOML config for `improvd run`; values are Python str, int, float, bool or lists of them."""
    return toml_config(path, {"model": {"path": str(model)}, "midi": {"api": "jack", **(midi or {})},
                              "improvise": improvise or {}, "record": record or {}, "log": log or {}})


def toml_config(path: Path, sections: dict) -> Path:
    """Write `{section: {key: value}}` as TOML to `path` (values: str, int, float, bool or lists of them), each
    value as `improvd config` writes it."""
    from improvd.daemon.config_cmd import toml_value
    lines = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


class Daemon:
    """`improvd run --config CONFIG` as a subprocess; its stderr lines are kept in `lines`.

    `config=None` gives no --config (improvd looks for its own); `command` replaces `python -m improvd.daemon.cli`
    (e.g. an installed `improvd`), `cwd` and `env` (added to the server's) say where and how it runs."""

    def __init__(self, server: JackServer, config: Path | None, *extra: str, command: list[str] | None = None,
                 cwd: Path = REPO, env: dict[str, str] | None = None) -> None:
        self.server = server
        argv = [*(command or [sys.executable, "-m", "improvd.daemon.cli"]), "run"]
        argv += ["--config", str(config)] if config is not None else []
        self.proc = spawn([*argv, *extra], env={**server.env, **(env or {})}, cwd=cwd, stdin=subprocess.DEVNULL,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.reader = LineReader(self.proc.stderr)

    @property
    def lines(self) -> list[str]:
        return self.reader.lines

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Wait for the 'ready' log line (ports open, model loaded)."""
        def ready() -> bool:
            return self.proc.poll() is not None or any(" ready: " in ln for ln in self.lines)
        self.reader.wait_for(ready, timeout)
        if self.proc.poll() is not None or not any(" ready: " in ln for ln in self.lines):
            terminate(self.proc)
            self.reader.wait_for(lambda: False, 0.2)
            raise AssertionError(f"improvd did not become ready (rc={self.proc.returncode}):\n" + self.log())

    def log(self) -> str:
        return "\n".join(self.lines)

    def send_signal(self, sig: int) -> float:
        """Send a signal; returns the perf_counter time it was sent."""
        t = time.perf_counter()
        self.proc.send_signal(sig)
        return t

    def wait(self, timeout: float) -> int:
        self.proc.wait(timeout)
        self.reader.join(2.0)
        return self.proc.returncode

    def stop(self) -> int | None:
        rc = terminate(self.proc)
        self.reader.join(2.0)
        return rc


def make_model(directory: Path, seed: int = 3, context: int = 64):
    """A small valid step-format ONNX model built by harness.modelfactory (no TensorFlow); returns its
    `FactoryModel` (`.path`, and `.step` for the numpy reference)."""
    from harness.modelfactory import make_step_model  # onnx: imported only where a model is made
    return make_step_model(Path(directory) / "model.onnx", seed=seed, context=context)


def greedy_answer(model, prime, n: int, first_gap_s: float, *, pitch_range=(21, 108), step_range=(0.0, 2.0),
                  duration_range=(0.03, 4.0), velocity: float = 90.0):
    """The greedy answer (docs/model-format.md) of a harness.modelfactory model, as the engine plays it: after the prime
    (float [K, 4] notes), every note is fed as predicted except the first, which comes after the silence and is
    fed with its real gap from the last heard onset (`first_gap_s`). Returns float [n, 4]."""
    state = model.zero_state()
    for row in prime:
        out = model.step(np.asarray(row, dtype=np.float32)[None, :4], state)
        state = out["state_out"]
    rows = []
    for i in range(n):
        logits = np.full(128, -np.inf)
        lo, hi = pitch_range
        logits[lo:hi + 1] = out["pitch_logits"][0, lo:hi + 1]
        row = [float(np.argmax(logits)), float(np.clip(out["step"][0], *step_range)),
               float(np.clip(out["duration"][0], *duration_range)), velocity]
        rows.append(row)
        fed = list(row)
        if i == 0:
            fed[1] = float(np.clip(first_gap_s, *step_range))
        out = model.step(np.array([fed], dtype=np.float32), state)
        state = out["state_out"]
    return np.array(rows)


def window_stats(daemon: Daemon, start: int, timeout: float = 5.0) -> dict:
    """Send SIGUSR1 and parse the `window stats:` line it makes (the first one at index >= start)."""
    daemon.send_signal(signal.SIGUSR1)
    return statslog.parse_window_stats(daemon.reader.wait_line(statslog.WINDOW_STATS_PREFIX, timeout, start=start))


def input_counts(lines: list[str]) -> dict | None:
    """What improvd says it received, dropped and found invalid (its `input:` line), or None before it says."""
    for line in lines:
        counts = statslog.parse_input_totals(line)
        if counts is not None:
            return {k: counts[k] for k in ("received", "dropped", "invalid")}
    return None


def heard_notes(lines: list[str]) -> list[tuple[float, tuple[int, int, int]]]:
    """The note messages improvd says it heard (`--verbose`'s `heard` lines), in order: (t_s after its start, MIDI
    bytes). A note-on with velocity 0 reads back as a note-off (0x80), as the log writes it."""
    notes = []
    for line in lines:
        event = statslog.parse_event(line)
        if event is not None and event[0] == "heard":
            _, t_s, kind, channel, pitch, velocity = event
            notes.append((t_s, ((0x90 if kind == "note-on" else 0x80) | (channel - 1), pitch, velocity)))
    return notes


def sent_counts(lines: list[str]) -> dict | None:
    """The note-ons and note-offs improvd says it sent (its final `stats:` line), or None before it exits."""
    for line in lines:
        stats = statslog.parse_stats(line)
        if stats is not None and stats["note_ons"] is not None:
            return {"note_ons": stats["note_ons"], "note_offs": stats["note_offs"]}
    return None
