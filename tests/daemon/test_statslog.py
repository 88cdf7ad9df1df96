"""The log lines benchmarks and e2e tests read (daemon/live/statslog.py): each formatter's line is read back by its
parser, with the very text the daemon logs, and a parser takes no other kind of line."""

from __future__ import annotations

import os

import mido
import pytest

from improvd.daemon.live import statslog

FINAL = {"sent": 120, "late": 2, "failed": 1, "median_ms": 0.0421, "p99_ms": 0.9, "max_ms": 3.25, "note_ons": 60,
         "note_offs": 60, "window_sent": 7, "window_late": 0}


def test_the_final_stats_line_is_read_back():
    line = statslog.format_stats(FINAL)
    assert line == ("stats: sent 120 events (late 2, failed 1), lateness median 0.042 ms, p99 0.900 ms, "
                    "max 3.250 ms, note-ons 60, note-offs 60")
    assert statslog.parse_stats("2026-12-03 INFO improvd: " + line) == {
        "sent": 120, "late": 2, "failed": 1, "median_ms": 0.042, "p99_ms": 0.9, "max_ms": 3.25, "note_ons": 60,
        "note_offs": 60}
    without = statslog.format_stats({k: v for k, v in FINAL.items() if not k.startswith("note_")})
    assert statslog.parse_stats(without)["note_ons"] is None and statslog.parse_stats(without)["sent"] == 120


def test_the_window_line_is_read_back_with_and_without_memory():
    line = statslog.format_window_stats(FINAL, 5000, 12, (80.25, 91.5))
    assert line == ("window stats: sent 7 events (late 0, failed 1), lateness median 0.042 ms, p99 0.900 ms, "
                    "max 3.250 ms, input 5000 received, 12 dropped, rss 80.2 MB (peak 91.5 MB)")
    assert statslog.parse_window_stats(line) == {
        "sent": 7, "late": 0, "failed": 1, "median_ms": 0.042, "p99_ms": 0.9, "max_ms": 3.25, "received": 5000,
        "dropped": 12, "rss_mb": 80.2, "rss_peak_mb": 91.5}
    bare = statslog.parse_window_stats(statslog.format_window_stats({}, 0, 0, None))
    assert bare["sent"] == 0 and bare["rss_mb"] is None and bare["rss_peak_mb"] is None
    # neither parser takes the other's line
    assert statslog.parse_stats(line) is None
    assert statslog.parse_window_stats(statslog.format_stats(FINAL)) is None


def test_the_input_totals_and_answer_lines():
    line = statslog.format_input_totals(100, 3, 2, 1)
    assert line == ("input: 100 messages received, 3 dropped in overloads, 2 invalid, 1 recovered from unterminated "
                    "SysEx")
    assert statslog.parse_input_totals(line) == {"received": 100, "dropped": 3, "invalid": 2, "recovered": 1}
    assert statslog.parse_input_totals("input: 6 messages received") is None  # another program's line
    answer = statslog.format_answer({"notes_heard": 8, "notes_played": 12, "inference_ms": 0.41, "bpm": 140.0,
                                     "interrupted": True})
    assert answer == "answer: heard 8 notes, played 12, inference 0.41 ms, grid 140.0 bpm, interrupted"
    assert statslog.is_answer(answer) and not statslog.is_answer(line)


@pytest.mark.parametrize("msg, kind", [(mido.Message("note_on", channel=1, note=60, velocity=90), "note-on"),
                                       (mido.Message("note_on", channel=15, note=127, velocity=0), "note-off"),
                                       (mido.Message("note_off", channel=0, note=0, velocity=64), "note-off")])
def test_verbose_note_lines_are_read_back(msg, kind):
    for what in ("heard", "sent"):
        line = statslog.format_event(what, 12.3456789, msg)
        assert line.startswith(f"{what:<5} t=12.345679 s {kind}")
        assert statslog.parse_event("DEBUG improvd: " + line) == (what, 12.345679, kind, msg.channel + 1, msg.note,
                                                                 msg.velocity)
    assert statslog.parse_event(statslog.format_event("sent", 1.0, mido.Message("control_change"))) is None


def test_rss_is_read_for_this_process_and_none_for_a_process_that_is_not_there():
    rss = statslog.rss_mb() if os.path.exists("/proc/self/status") else pytest.skip("no /proc")
    assert 0 < rss[0] <= rss[1]
    assert statslog.rss_mb(os.getpid()) is not None
    assert statslog.rss_mb(2**22 + 1) is None  # above Linux's largest pid
