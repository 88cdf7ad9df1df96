"""The log lines that report what improvd did, and their parsers: one home for a format that benchmarks read.

`improvd run` logs these lines (the formats are a contract: bench/flood.py, bench/soak.py, bench/live_timing.py,
bench/turns.py and the e2e tests read them back, with the parsers below):

- `answer: heard 8 notes, played 12, inference 0.41 ms, ...`: one per answer (`format_answer`);
- `stats: sent N events (late L, failed F), lateness median X ms, p99 Y ms, max Z ms, note-ons A, note-offs B`: the
  scheduler's figures at exit (`format_stats`, `parse_stats`);
- `window stats: sent N events (...), ..., input R received, D dropped, rss X MB (peak Y MB)`: on SIGUSR1, the
  events sent since the previous SIGUSR1, the input counts and the memory in use (`format_window_stats`,
  `parse_window_stats`);
- `input: R messages received, D dropped in overloads, I invalid, S recovered from unterminated SysEx`: at exit
  (`format_input_totals`, `parse_input_totals`);
- with `--verbose`, `heard t=1.234567 s note-on  ch  1 pitch  60 vel  90` and `sent  t=...` for every event
  (`format_event`, `parse_event`).

`rss_mb` reads a process's memory from /proc (the daemon's window line and the benchmarks use it).

Threads: the formatters run on the main thread (stats, window, input and event lines) and the engine thread (the
answer line, through the service's hook); they only build strings. The parsers run in benchmarks and tests.
"""

from __future__ import annotations

import re

from improvd.core.midifile import NOTE_TYPES

STATS_PREFIX = "stats: "
WINDOW_STATS_PREFIX = "window stats: "
INPUT_TOTALS_PREFIX = "input: "
ANSWER_PREFIX = "answer: "

_LATENESS = (r"sent (\d+) events \(late (\d+), failed (\d+)\), lateness median ([\d.]+) ms, p99 ([\d.]+) ms, "
             r"max ([\d.]+) ms")
_STATS_RE = re.compile(r"(?<!window )stats: " + _LATENESS + r"(?:, note-ons (\d+), note-offs (\d+))?")
_WINDOW_RE = re.compile(r"window stats: " + _LATENESS + r", input (\d+) received, (\d+) dropped"
                        r"(?:, rss ([\d.]+) MB \(peak ([\d.]+) MB\))?")
_INPUT_RE = re.compile(r"input: (\d+) messages received, (\d+) dropped in overloads, (\d+) invalid, (\d+) recovered "
                       r"from unterminated SysEx")
_EVENT_RE = re.compile(r"\b(heard|sent)\s+t=(-?[\d.]+) s (note-on |note-off) ch\s+(\d+) pitch\s+(\d+) vel\s+(\d+)")
_LATENESS_KEYS = ("sent", "late", "failed", "median_ms", "p99_ms", "max_ms")


def _number(text: str | None) -> int | float | None:
    if text is None:
        return None
    return float(text) if "." in text else int(text)


# ---- formatters (the daemon) ---------------------------------------------------------------------------------------

def format_answer(summary: dict) -> str:
    """One line per answer, from the engine's summary dict."""
    parts = [f"heard {summary.get('notes_heard', '?')} notes", f"played {summary.get('notes_played', '?')}"]
    if summary.get("inference_ms") is not None:
        parts.append(f"inference {summary['inference_ms']:.2f} ms")
    if summary.get("lateness_ms") is not None:
        parts.append(f"lateness {summary['lateness_ms']:.3f} ms")
    if summary.get("time_scale") is not None:
        parts.append(f"time scale {summary['time_scale']:.3f}")
    if summary.get("bpm") is not None:
        parts.append(f"grid {summary['bpm']:.1f} bpm")
    if summary.get("key") is not None:
        parts.append(f"key {summary['key']}")
    if summary.get("length") is not None:
        parts.append(f"length {summary['length']}")
    if summary.get("delayed") or summary.get("rechosen"):
        parts.append(f"texture bounds: {summary.get('delayed', 0)} onsets delayed, "
                     f"{summary.get('rechosen', 0)} pitches re-chosen")
    if summary.get("interrupted"):
        parts.append("interrupted")
    return ANSWER_PREFIX + ", ".join(parts)


def _lateness(stats: dict, prefix: str, window: bool) -> str:
    sent = stats.get("window_sent", 0) if window else stats.get("sent", 0)
    late = stats.get("window_late", 0) if window else stats.get("late", 0)
    return (f"{prefix}sent {sent} events (late {late}, failed "
            f"{stats.get('failed', 0)}), lateness median {stats.get('median_ms', 0.0):.3f} ms, "
            f"p99 {stats.get('p99_ms', 0.0):.3f} ms, max {stats.get('max_ms', 0.0):.3f} ms")


def format_stats(stats: dict) -> str:
    """The scheduler's `stats()` at exit, with the note-ons and note-offs sent (when it counts them), so that a
    receiver's counts can be checked against what improvd sent."""
    line = _lateness(stats, STATS_PREFIX, window=False)
    if "note_ons" in stats:
        line += f", note-ons {stats['note_ons']}, note-offs {stats['note_offs']}"
    return line


def format_window_stats(stats: dict, received: int, dropped: int, rss: tuple[float, float] | None) -> str:
    """SIGUSR1: the scheduler's `stats(since=...)` (the events of the window), the input's counts so far and the
    memory (`rss_mb()`, None where it cannot be read)."""
    memory = f", rss {rss[0]:.1f} MB (peak {rss[1]:.1f} MB)" if rss else ""
    return f"{_lateness(stats, WINDOW_STATS_PREFIX, window=True)}, input {received} received, {dropped} dropped{memory}"


def format_input_totals(received: int, dropped: int, invalid: int, recovered: int) -> str:
    """At exit: the input messages received, dropped in overloads, invalid, and recovered from unterminated SysEx."""
    return (f"{INPUT_TOTALS_PREFIX}{received} messages received, {dropped} dropped in overloads, {invalid} invalid, "
            f"{recovered} recovered from unterminated SysEx")


def describe_message(msg) -> str:
    """A MIDI message for the verbose log: notes in fixed columns, anything else as mido writes it."""
    if msg.type in NOTE_TYPES:
        kind = "note-on " if msg.type == "note_on" and msg.velocity > 0 else "note-off"
        return f"{kind} ch {msg.channel + 1:2d} pitch {msg.note:3d} vel {msg.velocity:3d}"
    return str(msg)


def format_event(what: str, t_s: float, msg) -> str:
    """`--verbose`: one event heard or sent (`what`), `t_s` seconds after start."""
    return f"{what:<5} t={t_s:.6f} s {describe_message(msg)}"


# ---- parsers (benchmarks and tests) ------------------------------------------------------------------------------

def parse_stats(line: str) -> dict | None:
    """The figures of a `stats:` line (not a `window stats:` one): sent, late, failed, median_ms, p99_ms, max_ms,
    note_ons, note_offs (None when the line has no note counts); None when the line is not one."""
    m = _STATS_RE.search(line)
    if m is None:
        return None
    return dict(zip(_LATENESS_KEYS + ("note_ons", "note_offs"), map(_number, m.groups())))


def parse_window_stats(line: str) -> dict | None:
    """The figures of a `window stats:` line: the lateness keys of `parse_stats`, received, dropped, rss_mb and
    rss_peak_mb (None where memory could not be read); None when the line is not one."""
    m = _WINDOW_RE.search(line)
    if m is None:
        return None
    keys = _LATENESS_KEYS + ("received", "dropped", "rss_mb", "rss_peak_mb")
    return dict(zip(keys, map(_number, m.groups())))


def parse_input_totals(line: str) -> dict | None:
    """The counts of an `input:` line: received, dropped, invalid, recovered; None when the line is not one."""
    m = _INPUT_RE.search(line)
    if m is None:
        return None
    return dict(zip(("received", "dropped", "invalid", "recovered"), map(int, m.groups())))


def parse_event(line: str) -> tuple[str, float, str, int, int, int] | None:
    """A `--verbose` note line: (heard or sent, t_s, "note-on" or "note-off", channel 1-16, pitch, velocity); None
    for any other line (other messages, which mido writes its own way, included)."""
    m = _EVENT_RE.search(line)
    if m is None:
        return None
    return m.group(1), float(m.group(2)), m.group(3).strip(), int(m.group(4)), int(m.group(5)), int(m.group(6))


def is_answer(line: str) -> bool:
    """Whether a log line is an `answer:` line."""
    return ANSWER_PREFIX in line


# ---- memory ------------------------------------------------------------------------------------------------------

def rss_mb(pid: int | str = "self") -> tuple[float, float] | None:
    """(resident memory now, its peak) of a process (this one by default) in MB, from /proc/PID/status (Linux);
    None where it cannot be read (another system, or the process is gone)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            fields = dict(line.split(":", 1) for line in fh if ":" in line)
        return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024
    except (OSError, KeyError, ValueError):
        return None
