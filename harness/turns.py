"""Scripted calls and what a receiver heard of them: the turn-taking measures shared by bench/turns.py and
tests/e2e/test_turns_e2e.py (daemon/music/turns.py).

A call is 8 notes at a tempo (60, 100, 160 bpm), in quarter or eighth notes, legato (each note held 95% of its
inter-onset interval), detached (50%) or staccato (30%), with or without a held last note (two beats). For each
call, from the receiver's timestamps (`jack_midi_dump`, the server's clock): the player's last release, improvd's
note-ons and note-offs after the call's first onset and before the next call, and from them

- `latency_ms`: last release -> improvd's first note-on after it;
- `premature`: improvd started a note while the player was still inside the call (between its first onset and
  its last release);
- `ratio`: the answer's length (first note-on to last note-off) over the call's (first onset to last release).

Pure; called from the test's or bench's thread.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PITCHES = [60, 62, 64, 65, 67, 65, 64, 62]
TEMPOS = (60, 100, 160)
VALUES = {"quarter": 1.0, "eighth": 0.5}
ARTICULATIONS = {"legato": 0.95, "detached": 0.5, "staccato": 0.3}
HELD_BEATS = 2.0


@dataclass(frozen=True)
class Call:
    bpm: int
    value: str
    articulation: str
    held: bool

    @property
    def ioi_s(self) -> float:
        return 60.0 / self.bpm * VALUES[self.value]

    @property
    def name(self) -> str:
        return f"{self.bpm} bpm {self.value}s {self.articulation}{' held' if self.held else ''}"

    def events(self, channel: int, start_s: float = 0.0) -> list[tuple[float, str, int, int, int]]:
        """(t_s, kind, pitch, velocity, channel) events of the call (harness/clients.py `Player` format)."""
        out = []
        ioi = self.ioi_s
        for i, p in enumerate(PITCHES):
            t = start_s + i * ioi
            dur = ARTICULATIONS[self.articulation] * ioi
            if self.held and i == len(PITCHES) - 1:
                dur = HELD_BEATS * 60.0 / self.bpm
            out.append((t, "note_on", p, 90, channel))
            out.append((t + dur, "note_off", p, 0, channel))
        return sorted(out, key=lambda e: (e[0], e[1] == "note_on"))


def calls(articulations=("legato", "detached")) -> list[Call]:
    return [Call(bpm, value, art, held) for art in articulations for bpm in TEMPOS for value in VALUES
            for held in (False, True)]


def measure(events, player_ch: int, improvd_ch: int, start_s: float, until_s: float) -> dict:
    """The measures of one call whose first onset (at the receiver) is at or after `start_s`, from the receiver's
    events up to `until_s` (the next call's start)."""
    mine = [e for e in events if start_s <= e.t_s < until_s]
    player = [e for e in mine if e.channel == player_ch and e.kind in ("on", "off")]
    ons = [e.t_s for e in player if e.kind == "on"]
    offs = [e.t_s for e in player if e.kind == "off"]
    first_on, last_release = min(ons), max(offs)
    answer_on = sorted(e.t_s for e in mine if e.channel == improvd_ch and e.kind == "on")
    answer_off = sorted(e.t_s for e in mine if e.channel == improvd_ch and e.kind == "off")
    inside = [t for t in answer_on if first_on <= t < last_release]
    after = [t for t in answer_on if t >= last_release]
    out = {"premature": len(inside) > 0, "latency_ms": None, "ratio": None, "answer_notes": len(after)}
    if after:
        out["latency_ms"] = round(1000.0 * (after[0] - last_release), 2)
        end = max([t for t in answer_off if t >= after[0]] or [after[-1]])
        out["ratio"] = round((end - after[0]) / (last_release - first_on), 3)
    return out


def summarize(rows: list[dict]) -> dict:
    """Per tempo: latency median and max, premature answers, median answer/call ratio; and over all calls."""
    def block(rs):
        lat = [r["latency_ms"] for r in rs if r["latency_ms"] is not None]
        ratios = [r["ratio"] for r in rs if r["ratio"] is not None]
        return {"calls": len(rs), "answered": len(lat), "premature": sum(r["premature"] for r in rs),
                "latency_ms_median": round(float(np.median(lat)), 1) if lat else None,
                "latency_ms_max": round(float(np.max(lat)), 1) if lat else None,
                "ratio_median": round(float(np.median(ratios)), 3) if ratios else None}
    out = {f"{bpm} bpm": block([r for r in rows if r["bpm"] == bpm]) for bpm in sorted({r["bpm"] for r in rows})}
    out["all"] = block(rows)
    return out
