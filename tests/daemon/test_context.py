"""The musical context (daemon/music/context.py) on its own: the grid in use, the beat, transport, key."""

import mido
import numpy as np
import pytest

from improvd.core.config import TimingConfig
from improvd.daemon.music.context import MusicContext
from improvd.daemon.music.keys import parse_key


def ticks(ctx, start_s, bpm, n):
    tick_s = 60.0 / (bpm * 24)
    for i in range(n):
        ctx.on_clock(start_s + i * tick_s, mido.Message("clock"))
    return start_s + (n - 1) * tick_s


def test_without_quantize_there_is_no_grid():
    ctx = MusicContext(TimingConfig(), None)
    assert ctx.grid(10.0, answering=True) == (None, 0)


def test_the_bpm_grid_is_anchored_at_the_phrase_being_answered():
    ctx = MusicContext(TimingConfig(quantize="1/16", bpm=120.0), None)
    ctx.hear_phrase([3.0, 3.25, 3.5])
    grid, step = ctx.grid(10.0, answering=False)
    assert step == 6 and grid.origin_s == 3.0 and grid.bpm == pytest.approx(120.0)
    assert ctx.beat_s(10.0, answering=False) == pytest.approx(0.5)


def test_with_bpm_0_the_grid_is_the_players_pulse():
    ctx = MusicContext(TimingConfig(quantize="1/8", bpm=0.0), None)
    ctx.hear_phrase([1.0, 1.6, 2.2, 2.8])  # a 0.6 s pulse: 100 bpm
    grid, step = ctx.grid(5.0, answering=False)
    assert step == 12 and grid.bpm == pytest.approx(100.0) and grid.origin_s == 1.0


def test_the_clocks_grid_while_ticks_arrive_and_kept_by_an_answer_when_they_stop():
    ctx = MusicContext(TimingConfig(quantize="1/16", bpm=120.0), None)
    last = ticks(ctx, 0.0, 100.0, 48)
    clock_grid, _ = ctx.grid(last, answering=True)
    assert clock_grid.bpm == pytest.approx(100.0)
    assert ctx.beat_s(last, answering=True) == pytest.approx(0.6)
    later = last + 2.0  # the ticks stopped without a Stop
    assert ctx.grid(later, answering=True)[0] == clock_grid  # the answer goes on on the clock's last grid
    assert ctx.grid(later, answering=False)[0].bpm == pytest.approx(120.0)  # a new answer takes timing.bpm
    ctx.hear_phrase([later])
    assert ctx.grid(later, answering=True)[0].bpm == pytest.approx(120.0)  # ...and a new phrase forgets the clock


def test_stop_silences_until_start_or_continue():
    ctx = MusicContext(TimingConfig(), None)
    assert ctx.on_clock(0.0, mido.Message("start")) == "start" and not ctx.stopped
    assert ctx.on_clock(1.0, mido.Message("stop")) == "stop" and ctx.stopped
    assert ctx.on_clock(2.0, mido.Message("continue")) == "continue" and not ctx.stopped


def test_follow_tempo_measures_the_time_scale_and_configure_resets_it_when_off():
    ctx = MusicContext(TimingConfig(follow_tempo=True, reference_ioi=0.5), None)
    ctx.hear_phrase([0.0, 0.25, 0.5, 0.75])
    assert ctx.time_scale == pytest.approx(0.5)
    ctx.configure(TimingConfig(), None)
    assert ctx.time_scale == 1.0


def test_the_key_in_use():
    ctx = MusicContext(TimingConfig(), None)
    assert ctx.key_in_use("none") is None
    assert ctx.key_in_use("A minor") == parse_key("A minor")
    c_major = np.array([[p, 0.5, 0.5, 80] for p in (60, 62, 64, 65, 67, 69, 71, 72, 67, 64, 60)], np.float64)
    assert not ctx.estimate_key("C major", c_major) and ctx.auto_key is None  # a fixed key estimates nothing
    assert ctx.estimate_key("auto", c_major) and str(ctx.key_in_use("auto")) == "C major"
    assert not ctx.estimate_key("auto", c_major)  # the same estimate: no change
    ctx.keep_auto_key("D major")
    assert ctx.auto_key is None and ctx.scale_pcs() is None
