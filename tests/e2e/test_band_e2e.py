"""`improvd run` with a band, end to end over real JACK MIDI ports (dummy driver, 48 kHz, 64-frame periods).

A source process (its own mido JACK client) sends MIDI clock (Start, 0xF8 ticks at 100 then 140 bpm, Stop), the
player's notes and CCs, each at its time; `jack_midi_dump -a`, an independent client, timestamps everything the
source and improvd send in frames of the server's clock, so the clock's grid and improvd's notes are measured on
one clock.
"""

from __future__ import annotations

import re
import time

import numpy as np
import pytest

from harness.band import C_MAJOR, START, STOP, TICK, clock, notes, tick_timeline
from harness.clients import balance
from harness.graph import midi_lost
from harness.session import IMPROVD_CH, PLAYER_CH
from tests.e2e.expect import check_timing

pytestmark = pytest.mark.jack


def test_quantized_onsets_follow_the_clock_and_its_tempo_change(band, grid_model):
    b = band(grid_model.path, improvise={"mode": "continuous", "max_notes": 16, "temperature": 0.6, "seed": 3},
             timing={"quantize": "1/16"})
    before, t_change = clock(0.2, 100, 8, transport=True)
    tick_140 = 60.0 / (140 * 24)
    after = [(t_change + i * tick_140, [TICK]) for i in range(24 * 10)]
    t_stop = t_change + 24 * 10 * tick_140
    phrase = notes([60, 62, 64, 65, 67], 0.613, 0.23, 0.12)
    b.source.send(before + after + [(t_stop, [STOP])] + phrase)
    b.receiver.wait_quiet(0.3, timeout=10)

    events = list(b.receiver.events)
    i_start = next(i for i, e in enumerate(events) if e.data[0] == START)
    t_start = events[i_start].t_s
    seen = np.array([e.t_s for e in events[i_start:] if e.data[0] == TICK])  # the first is position 0
    assert len(seen) >= 24 * 18 - 3, len(seen)  # jack_midi_dump may drop an event on a loaded machine
    ticks = tick_timeline(seen, 24 * 8, 60.0 / (100 * 24), tick_140)
    assert len(ticks) == 24 * 18, len(ticks)
    stop_at = next(e.t_s for e in events if e.data[0] == STOP)
    change_at = ticks[24 * 8]
    # the grid goes on after the last tick (the Stop comes where the next tick would be)
    sixteenths = np.concatenate([ticks, ticks[-1] + tick_140 * np.arange(1, 13)])[::6]
    ons = np.array([e.t_s for e in b.improvd_ons()])
    assert len(ons) >= 15, b.daemon.log()
    dist_ms = np.array([np.min(np.abs(sixteenths - t)) for t in ons]) * 1000
    at_100 = dist_ms[ons < change_at]
    at_140 = dist_ms[ons > change_at + 2 * 60 / 140]  # two beats after the change
    assert len(at_100) >= 5 and len(at_140) >= 5, (ons - t_start, change_at - t_start)
    check_timing(b.server, at_100.max() <= 3.0 and at_140.max() <= 3.0,
                 f"distance to the clock's 1/16 grid: at 100 bpm {np.round(at_100, 2)} ms, after the change to 140 "
                 f"bpm {np.round(at_140, 2)} ms; onsets {np.round(ons - t_start, 4)} s; change at "
                 f"{change_at - t_start:.4f} s, last tick at {ticks[-1] - t_start:.4f} s, stop at "
                 f"{stop_at - t_start:.4f} s\n" + "\n".join(ln for ln in b.daemon.lines if "clock:" in ln),
                 since=b.server_log_start)
    # the grid really changed: the answer's inter-onset intervals after the change are 140-bpm sixteenths
    gaps = np.diff(ons[ons > change_at + 2 * 60 / 140]) / (6 * tick_140)
    check_timing(b.server, np.allclose(gaps, np.round(gaps), atol=0.15), f"gaps in 140-bpm sixteenths {gaps}",
                 since=b.server_log_start)
    # Stop silences improvd and releases its notes
    late = [e for e in events if e.channel == IMPROVD_CH and e.kind == "on" and e.t_s > stop_at + 0.010]
    check_timing(b.server, not late, f"improvd's note-ons {[round(e.t_s - stop_at, 4) for e in late]} s after Stop",
                 since=b.server_log_start)
    assert balance(events, IMPROVD_CH) == {}
    assert any("interrupted" in ln and re.search(r"grid 1(39|40|41)\.\d bpm", ln) for ln in b.daemon.lines), \
        b.daemon.log()


def test_panic_by_cc_silences_within_10_ms(band, long_model):
    b = band(long_model.path, improvise={"max_notes": 64, "max_seconds": 30.0}, control={"panic": 82})
    b.source.send(notes([60, 62, 64, 65], 0.0, 0.15, 0.1))
    assert b.receiver.wait_events(lambda evs: sum(e.kind == "on" and e.channel == IMPROVD_CH for e in evs) >= 3, 10)
    b.source.send([(0.0, [0xB0 | PLAYER_CH, 82, 127]), (0.1, [0xB0 | PLAYER_CH, 82, 0])])
    time.sleep(0.5)
    events = list(b.receiver.events)
    t_panic = next(e.t_s for e in events if e.data[:2] == (0xB0 | PLAYER_CH, 82) and e.data[2] == 127)
    after = [e for e in events if e.channel == IMPROVD_CH and e.t_s >= t_panic and e.data[0] & 0xF0 in (0x80, 0x90)]
    assert after and all(e.kind == "off" for e in after), after
    assert balance(events, IMPROVD_CH) == {}
    check_timing(b.server, all(e.t_s - t_panic <= 0.010 for e in after),
                 f"improvd's note-offs {[round((e.t_s - t_panic) * 1000, 2) for e in after]} ms after the panic CC",
                 since=b.server_log_start)
    b.daemon.reader.wait_line("panic: [1-9]", 2.0)


def test_key_strength_1_keeps_every_answered_note_in_c_major(band, spread_model):
    b = band(spread_model.path, improvise={"mode": "continuous", "max_notes": 4, "temperature": 1.0, "top_p": 1.0,
                                           "key": "C major", "key_strength": 1.0, "seed": 5})
    b.source.send(notes([61, 63, 66, 68, 70], 0.0, 0.1, 0.08), wait=False)  # only black keys
    ok = b.receiver.wait_events(lambda evs: sum(e.kind == "on" and e.channel == IMPROVD_CH for e in evs) >= 200, 40)
    pitches = [e.note for e in b.improvd_ons()]
    answers = sum(1 for ln in b.daemon.lines if "answer:" in ln)
    if not (ok and answers >= 50):  # notes answered: correctness, never excused by timing evidence
        midi_lost(b.server, b.server_log_start, f"{len(pitches)} notes, {answers} answers in 40 s")
    assert all(p % 12 in C_MAJOR for p in pitches), sorted({p % 12 for p in pitches})
    assert len({p % 12 for p in pitches}) >= 5
    assert any("key C major" in ln for ln in b.daemon.lines)


def test_follow_tempo_answers_double_speed_at_double_speed(band, grid_model):
    phrase = [60, 62, 64, 65, 67, 65, 64, 62]
    medians = []
    for speed in (1.0, 2.0):
        b = band(grid_model.path, improvise={"max_notes": 16}, timing={"follow_tempo": True, "reference_ioi": 0.4})
        b.source.send(notes(phrase, 0.0, 0.4 / speed, 0.3 / speed))
        ok = b.receiver.wait_events(
            lambda evs: sum(e.kind == "on" and e.channel == IMPROVD_CH for e in evs) >= 16, 20)
        assert ok, b.daemon.log()
        ons = np.array([e.t_s for e in b.improvd_ons()])
        medians.append(float(np.median(np.diff(ons))))
        scale = re.search(r"time scale ([0-9.]+)", "\n".join(b.daemon.lines))
        assert scale and float(scale.group(1)) == pytest.approx(1.0 / speed, rel=0.02), b.daemon.log()
        b.close()
    ratio = medians[0] / medians[1]
    assert abs(ratio / 2 - 1) <= 0.15, (medians, ratio)
