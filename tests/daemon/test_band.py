"""The engine with a band: MIDI clock and transport, quantize, follow tempo, live CC control, state out, thru,
program change and key, driven with a fake clock and no threads (`Engine.run_once`, `Scheduler.run_pending`).

Every message is sent at exactly its deadline on the fake clock, so grids and intervals are checked exactly.
"""

from __future__ import annotations

import logging

import mido
import numpy as np
import pytest

from harness.band import C_MAJOR
from harness.engines import T0, Sim
from harness.fakes import balanced
from harness.session import PLAYER_CH


# ---- MIDI clock and quantize -----------------------------------------------------------------------------------

def on_grid(times, grid_times, tol_s):
    """For each time, the distance to the nearest grid time."""
    grid_times = np.asarray(grid_times)
    return [float(np.min(np.abs(grid_times - t))) for t in times], tol_s


@pytest.mark.parametrize("jitter_s", [0.0, 0.001])
def test_quantized_onsets_fall_on_the_clocks_sixteenths(model, jitter_s):
    sim = Sim(model, improvise_kw=dict(max_notes=16, temperature=0.8), timing=dict(quantize="1/16"))
    rng = np.random.default_rng(3)
    sim.at(T0 + 0.2, mido.Message("start"))
    ticks = sim.clock(T0 + 0.201, 100, 24 * 30, jitter_s=jitter_s, rng=rng)  # 30 beats
    end = sim.play([60, 62, 64, 65, 67], T0 + 1.013, spacing_s=0.23, hold_s=0.1)  # off the grid on purpose
    sim.run_until(end + 10.0)
    ons = sim.note_ons()
    assert len(ons) == 16 and sim.summaries and sim.summaries[0]["notes_played"] == 16
    sixteenths = ticks[::6]
    dist, _ = on_grid([t for t, _ in ons], sixteenths, 0)
    assert max(dist) < (1e-9 if not jitter_s else 0.0008), dist
    # The model decides which sixteenth: the gaps vary, and each note is at the sixteenth nearest to its
    # predicted onset (within half a sixteenth), the model being fed the real gaps.
    grid_s = 6 * 60.0 / (100 * 24)
    steps = np.round(np.diff([t for t, _ in ons]) / grid_s).astype(int)
    assert len(set(steps.tolist())) >= 2, steps
    played = [(row, t) for kind, row, t in sim.events if kind == "played"]
    assert np.allclose(np.diff([t for _, t in played]), [row[1] for row, _ in played[1:]], atol=1e-9)
    assert sim.summaries[0]["bpm"] == pytest.approx(100, rel=0.01)
    assert balanced(sim.sent)


def test_predicted_onsets_round_to_the_nearest_grid_point(model):
    """Greedy: replay the fed notes through the model's numpy twin; each note's grid point is the one nearest to
    its predicted onset (or the next one, for a non-chord step that would round onto the previous note)."""
    sim = Sim(model, improvise_kw=dict(max_notes=12), timing=dict(quantize="1/16"))
    sim.at(T0, mido.Message("start"))
    ticks = sim.clock(T0 + 0.001, 100, 24 * 20)
    end = sim.play([60, 64, 67], T0 + 0.5, spacing_s=0.31)
    sim.run_until(end + 8)
    grid_s = ticks[6] - ticks[0]
    state, out = model.zero_state(), None
    prev_onset, prev_kind, checked = None, None, 0
    for kind, row, onset in sim.events:
        if kind == "played" and prev_kind == "played":  # the first note of an answer comes after the silence
            predicted = prev_onset + float(np.clip(out["step"][0], 0.0, 2.0))
            nearest = ticks[0] + round((predicted - ticks[0]) / grid_s) * grid_s
            if float(out["step"][0]) > 0.03 and nearest <= prev_onset + 1e-9:
                nearest += grid_s
            if nearest >= prev_onset:  # not moved by the "never earlier than now" rule
                assert onset == pytest.approx(nearest, abs=1e-9)
                checked += 1
        out = model.step(row[None, :3], state)
        state = out["state_out"]
        prev_onset, prev_kind = onset, kind
    assert checked >= 10


def test_grid_follows_a_tempo_change_within_two_beats(model):
    sim = Sim(model, improvise_kw=dict(mode="continuous", max_notes=200, temperature=0.5),
              timing=dict(quantize="1/16"))
    sim.at(T0, mido.Message("start"))
    before = sim.clock(T0 + 0.001, 100, 24 * 8)  # 8 beats at 100 bpm
    t_change = before[-1] + 60.0 / (100 * 24)
    after = sim.clock(t_change, 140, 24 * 12)  # then 12 at 140; song positions go on
    ticks = np.concatenate([before, after])
    end = sim.play([60, 62, 64], T0 + 0.7, spacing_s=0.2)
    sim.run_until(after[-1])
    ons = [t for t, _ in sim.note_ons()]
    two_beats = 2 * 60.0 / 140
    late = [t for t in ons if t > t_change + two_beats]
    early = [t for t in ons if end < t < t_change]
    assert len(late) >= 10 and len(early) >= 5
    dist, _ = on_grid(late, ticks[::6], 0)
    assert max(dist) < 1e-6, dist
    dist, _ = on_grid(early, ticks[::6], 0)
    assert max(dist) < 1e-6, dist
    # grid steps after the change are 140 bpm sixteenths
    gaps = np.diff(late) / (6 * 60.0 / (140 * 24))
    assert np.allclose(gaps, np.round(gaps), atol=1e-5)


def test_quantize_without_clock_uses_bpm_from_the_phrase(model):
    sim = Sim(model, improvise_kw=dict(max_notes=10), timing=dict(quantize="1/8", bpm=120))
    start = T0 + 0.5
    end = sim.play([60, 62, 64, 65], start, spacing_s=0.27)
    sim.run_until(end + 6)
    ons = [t for t, _ in sim.note_ons()]
    assert len(ons) == 10
    positions = (np.array(ons) - start) / 0.25  # eighths at 120 bpm from the phrase's first onset
    assert np.allclose(positions, np.round(positions), atol=1e-6), positions
    assert sim.summaries[0]["bpm"] == pytest.approx(120)


def test_quantize_with_the_players_pulse(model):
    sim = Sim(model, improvise_kw=dict(max_notes=10), timing=dict(quantize="1/4", bpm=0))
    start = T0 + 0.5
    end = sim.play([60, 62, 64, 65, 67], start, spacing_s=0.3)  # pulse 0.3 s -> a beat of 0.6 s (100 bpm)
    sim.run_until(end + 10)
    ons = [t for t, _ in sim.note_ons()]
    positions = (np.array(ons) - start) / 0.6
    assert len(ons) == 10 and np.allclose(positions, np.round(positions), atol=1e-6), positions
    assert sim.summaries[0]["bpm"] == pytest.approx(100)


def test_transport_stop_cancels_and_silences_until_continue(model):
    sim = Sim(model, improvise_kw=dict(max_notes=40), timing=dict(quantize="1/16"))
    sim.at(T0, mido.Message("start"))
    sim.clock(T0 + 0.001, 100, 24 * 40)
    end = sim.play([60, 62, 64], T0 + 0.5)
    sim.run_until(end + 1.5)
    assert len(sim.note_ons()) >= 2 and sim.engine.playing
    t_stop = sim.t + 0.0123
    sim.at(t_stop, mido.Message("stop"))
    sim.run_until(t_stop + 3.0)
    assert sim.summaries[-1]["interrupted"]
    after = [(t, m) for t, m in sim.sent if t >= t_stop]
    assert all(m.type == "note_off" and t == t_stop for t, m in after), after
    assert balanced(sim.sent) and sim.scheduler.sounding() == frozenset()
    n = len(sim.note_ons())
    end = sim.play([65, 67], sim.t + 0.1)  # stopped: heard, not answered
    sim.run_until(end + 2.0)
    assert len(sim.note_ons()) == n and len(sim.summaries) == 1
    sim.at(sim.t + 0.01, mido.Message("continue"))
    end = sim.play([69, 71], sim.t + 0.1)
    sim.run_until(end + 3.0)
    assert len(sim.note_ons()) > n and sim.engine.playing
    sim.at(sim.t, mido.Message("stop"))
    sim.run_until(sim.t + 1.0)
    assert balanced(sim.sent) and len(sim.summaries) == 2


# ---- follow tempo ----------------------------------------------------------------------------------------------

PHRASE = [60, 62, 64, 65, 67, 65, 64, 62]


def _answer_iois(model, speed, **timing):
    sim = Sim(model, improvise_kw=dict(max_notes=24, silence=0.4),
              timing=dict(follow_tempo=True, reference_ioi=0.4, **timing))
    end = sim.play(PHRASE, T0 + 0.5, spacing_s=0.4 / speed, hold_s=0.3 / speed)
    sim.run_until(end + 20)
    ons = np.array([t for t, _ in sim.note_ons()])
    return np.diff(ons), sim


def test_follow_tempo_answers_a_phrase_twice_as_fast_twice_as_fast(model):
    ioi_1, sim_1 = _answer_iois(model, 1.0)
    ioi_2, sim_2 = _answer_iois(model, 2.0)
    assert sim_1.summaries[0]["time_scale"] == pytest.approx(1.0)
    assert sim_2.summaries[0]["time_scale"] == pytest.approx(0.5)
    ratio = np.median(ioi_1) / np.median(ioi_2)
    assert abs(ratio / 2 - 1) < 0.15, ratio
    # The model saw the same phrase: the answers are the same notes at half the intervals (nearly: the first
    # answered note comes after the silence, which is not scaled, so the model is fed a different first gap).
    p1 = [m.note for _, m in sim_1.note_ons()]
    p2 = [m.note for _, m in sim_2.note_ons()]
    assert p1 == p2
    np.testing.assert_allclose(ioi_1[1:], 2 * ioi_2[1:], rtol=0.02)


def test_without_follow_tempo_the_answer_keeps_the_models_time(model):
    sims = [Sim(model, improvise_kw=dict(max_notes=12)) for _ in range(2)]
    for sim, speed in zip(sims, (1.0, 2.0)):
        end = sim.play(PHRASE, T0 + 0.5, spacing_s=0.4 / speed, hold_s=0.3 / speed)
        sim.run_until(end + 10)
        assert sim.summaries[0]["time_scale"] == 1.0
    ratio = np.median(np.diff([t for t, _ in sims[0].note_ons()])) / \
        np.median(np.diff([t for t, _ in sims[1].note_ons()]))
    assert abs(ratio - 2) > 0.3  # not following: nowhere near twice as fast


# ---- live control -------------------------------------------------------------------------------------------

def greedy_pitches(sim):
    """What the greedy choice would have been for each played note, replaying the fed notes in the twin."""
    state, out, expected, actual = sim.ref.zero_state(), None, [], []
    for kind, row, _ in sim.events:
        if kind == "played":
            logits = np.full(128, -np.inf)
            logits[21:109] = out["pitch_logits"][0, 21:109]
            expected.append(int(np.argmax(logits)))
            actual.append(int(row[0]))
        out = sim.ref.step(row[None, :3], state)
        state = out["state_out"]
    return actual, expected


def test_cc_temperature_and_top_p(spread_model):
    sim = Sim(spread_model, improvise_kw=dict(temperature=1.5, max_notes=16), control=dict(temperature=74))
    end = sim.play([60, 62, 64], T0 + 0.1)
    sim.run_until(end + 5)
    actual, expected = greedy_pitches(sim)
    assert actual != expected  # hot sampling: not the greedy notes
    sim.cc(sim.t + 0.01, 74, 0)  # temperature 0: greedy
    end = sim.play([60, 62, 64], sim.t + 0.1)
    sim.run_until(end + 5)
    assert sim.engine.improvise.temperature == 0.0
    actual, expected = greedy_pitches(sim)
    assert actual[16:] == expected[16:] and len(actual) == 32
    sim.cc(sim.t + 0.01, 74, 127)
    sim.run_until(sim.t + 0.1)
    assert sim.engine.improvise.temperature == 2.0

    sim = Sim(spread_model, improvise_kw=dict(temperature=1.5, max_notes=16),
              control=dict(top_p=71, top_p_range=(0.01, 1.0)))
    sim.cc(T0 + 0.01, 71, 0)  # top_p 0.01: only the most likely pitch is left
    end = sim.play([60, 62, 64], T0 + 0.1)
    sim.run_until(end + 5)
    assert sim.engine.improvise.top_p == pytest.approx(0.01)
    actual, expected = greedy_pitches(sim)
    assert actual == expected


def test_cc_max_notes(model):
    sim = Sim(model, improvise_kw=dict(max_notes=8), control=dict(max_notes=72, max_notes_range=(1, 16)))
    sim.cc(T0 + 0.01, 72, 0)
    end = sim.play([60, 62], T0 + 0.1)
    sim.run_until(end + 5)
    assert sim.summaries[-1]["notes_played"] == 1
    sim.cc(sim.t, 72, 127)
    end = sim.play([60, 62], sim.t + 0.1)
    sim.run_until(end + 10)
    assert sim.summaries[-1]["notes_played"] == 16


def test_cc_mode_switches_respond_and_continuous(model):
    sim = Sim(model, improvise_kw=dict(max_notes=4), control=dict(mode=80))
    sim.cc(T0 + 0.01, 80, 127)
    end = sim.play([60, 62], T0 + 0.1)
    sim.run_until(end + 6)
    assert sim.engine.playing and sim.summaries and sim.summaries[0]["mode"] == "continuous"
    n = len(sim.note_ons())
    assert n > 8  # beyond max_notes: the stream goes on (a summary every 4 notes)
    t_switch = sim.t
    sim.cc(t_switch, 80, 0)
    sim.run_until(t_switch + 5)
    assert not sim.engine.playing
    assert len(sim.note_ons(after=t_switch + 0.06)) == 0  # at most what was handed (look-ahead) still plays
    assert balanced(sim.sent)
    end = sim.play([64, 65], sim.t + 0.1)
    sim.run_until(end + 6)
    assert sim.summaries[-1]["mode"] == "respond" and sim.summaries[-1]["notes_played"] == 4


def test_cc_mute(model):
    sim = Sim(model, improvise_kw=dict(max_notes=30), control=dict(mute=81))
    end = sim.play([60, 62], T0 + 0.1)
    sim.run_until(end + 1.5)
    assert sim.note_ons()
    t_mute = sim.t
    sim.cc(t_mute, 81, 127)  # muting ends the answer at once
    sim.run_until(t_mute + 5)
    assert sim.engine.muted and sim.summaries[-1]["interrupted"]
    assert all(m.type == "note_off" for t, m in sim.sent if t >= t_mute) and balanced(sim.sent)
    n = len(sim.note_ons())
    end = sim.play([64, 65], sim.t + 0.1)
    sim.run_until(end + 3)
    assert len(sim.note_ons()) == n  # muted: heard, not answered
    assert [e[1][0] for e in sim.events if e[0] == "heard"][-2:] == [64, 65]  # but fed to the model
    sim.cc(sim.t, 81, 0)
    end = sim.play([67], sim.t + 0.1)
    sim.run_until(end + 3)
    assert len(sim.note_ons()) > n


def test_cc_panic_releases_everything_at_once(model):
    sim = Sim(model, improvise_kw=dict(max_notes=40, mode="continuous"), midi=dict(thru=True),
              control=dict(panic=82))
    end = sim.play([60, 62], T0 + 0.1)
    sim.run_until(end + 1.0)
    sim.at(sim.t, mido.Message("note_on", note=48, velocity=90, channel=PLAYER_CH))  # held: a thru note sounds
    sim.run_until(sim.t + 0.3)
    while not any(ch == 0 for ch, _ in sim.scheduler.sounding()):  # until one of improvd's notes sounds too
        sim.run_until(sim.t + 0.005)
    sounding = sim.scheduler.sounding()
    assert (PLAYER_CH, 48) in sounding and any(ch == 0 for ch, _ in sounding)
    t_panic = sim.t + 0.0007
    sim.cc(t_panic, 82, 127)
    sim.run_until(t_panic + 3)
    assert sim.scheduler.sounding() == frozenset() and not sim.engine.playing
    after = [(t, m) for t, m in sim.sent if t >= t_panic]
    offs = {(m.channel, m.note) for t, m in after if m.type == "note_off"}
    assert offs == set(sounding)
    assert all(t == t_panic for t, _ in after), after  # everything at once, nothing after
    assert any(m.type == "control_change" and m.control == 123 for _, m in after)
    assert balanced(sim.sent) and sim.summaries[-1]["interrupted"]
    n = len(sim.sent)
    sim.at(sim.t, mido.Message("note_off", note=48, channel=PLAYER_CH))  # the late release sends nothing more
    sim.run_until(sim.t + 0.1)
    assert len(sim.sent) == n


def test_cc_reload_key_strength_channel_and_log(spread_model, caplog):
    sim = Sim(spread_model, improvise_kw=dict(temperature=1.0, top_p=1.0, max_notes=30, key="C major",
                                              key_strength=0.0),
              control=dict(channel=3, reload=83, key_strength=84))
    with caplog.at_level(logging.DEBUG, logger="improvd.engine"):
        sim.cc(T0 + 0.01, 83, 127, channel=2)
        sim.cc(T0 + 0.02, 83, 127, channel=2)  # held: once
        sim.cc(T0 + 0.03, 83, 0, channel=2)
        sim.cc(T0 + 0.04, 83, 127, channel=0)  # another channel: ignored
        sim.run_until(T0 + 0.1)
    assert sim.reloads == 1
    assert "CC 83 = 127 on channel 3 (reload)" in caplog.text
    assert "CC 83 = 127 on channel 1 (not mapped)" in caplog.text
    end = sim.play([60, 62, 64], sim.t + 0.1)
    sim.run_until(end + 10)
    assert any(m.note % 12 not in C_MAJOR for _, m in sim.note_ons())  # strength 0: the model as it is
    n = len(sim.note_ons())
    sim.cc(sim.t, 84, 127, channel=2)
    end = sim.play([60, 62, 64], sim.t + 0.1)
    sim.run_until(end + 10)
    assert sim.engine.improvise.key_strength == 1.0
    later = [m.note for _, m in sim.note_ons()[n:]]
    assert len(later) == 30 and all(p % 12 in C_MAJOR for p in later)


# ---- state out, thru, program change ----------------------------------------------------------------------------

def test_state_cc_idle_listening_answering(model):
    sim = Sim(model, improvise_kw=dict(max_notes=3), control=dict(state_cc=20, state_values=(1, 2, 3)),
              midi=dict(output_channel=5))
    end = sim.play([60, 62], T0 + 0.1)
    sim.run_until(end + 5)
    states = [(t, m.value) for t, m in sim.of_type("control_change") if m.control == 20]
    assert [v for _, v in states] == [1, 2, 3, 1]
    assert all(m.channel == 4 for _, m in sim.of_type("control_change"))
    assert states[1][0] == T0 + 0.1  # listening from the first note-on
    first_on = sim.note_ons(channel=4)[0][0]
    assert states[2][0] <= first_on < states[3][0]
    assert states[3][0] >= max(t for t, m in sim.sent if m.type == "note_off")


def test_thru_passes_the_players_notes_and_releases_them(model):
    sim = Sim(model, improvise_kw=dict(max_notes=2, max_hold=1.0), midi=dict(thru=True, input_channels=(2,)))
    sim.play([60, 64], T0 + 0.1, spacing_s=0.2, hold_s=0.15)
    sim.at(T0 + 0.05, mido.Message("note_on", note=70, velocity=50, channel=5))  # not a listened channel
    sim.run_until(T0 + 0.5)
    thru = [(round(t - T0, 9), m.type, m.note) for t, m in sim.sent if m.channel == PLAYER_CH]
    assert thru == [(0.1, "note_on", 60), (0.25, "note_off", 60), (0.3, "note_on", 64), (0.45, "note_off", 64)]
    assert not [m for _, m in sim.sent if m.channel == 5]
    sim.at(sim.t + 0.01, mido.Message("note_on", note=67, velocity=70, channel=PLAYER_CH))  # never released
    t_on = sim.t + 0.01
    sim.run_until(sim.t + 3)
    offs = [t for t, m in sim.sent if m.channel == PLAYER_CH and m.note == 67 and m.type == "note_off"]
    assert offs == [pytest.approx(t_on + 1.0)]  # released after max_hold
    assert balanced(sim.sent)


def test_program_change_at_start(model):
    sim = Sim(model, midi=dict(program=19, output_channel=3))
    assert [(m.program, m.channel) for _, m in sim.of_type("program_change")] == [(19, 2)]
    assert not Sim(model).of_type("program_change")


# ---- key --------------------------------------------------------------------------------------------------------

def test_key_c_major_strength_1_keeps_50_sampled_answers_in_c_major(spread_model):
    sim = Sim(spread_model, improvise_kw=dict(temperature=1.0, top_p=1.0, max_notes=8, key="C major",
                                              key_strength=1.0, seed=11))
    rng = np.random.default_rng(0)
    for _ in range(50):
        end = sim.play(rng.integers(48, 84, 3).tolist(), sim.t + 0.1, spacing_s=0.15, hold_s=0.1)
        sim.run_until(end + 3)
    pitches = [m.note for _, m in sim.note_ons()]
    assert len(sim.summaries) == 50 and len(pitches) == 400
    assert all(p % 12 in C_MAJOR for p in pitches)
    assert len({p % 12 for p in pitches}) == 7
    assert sim.summaries[0]["key"] == "C major"
    # the same without a key leaves the scale (so the test means something)
    free = Sim(spread_model, improvise_kw=dict(temperature=1.0, top_p=1.0, max_notes=8, seed=11))
    end = free.play([60, 62, 64], T0 + 0.1)
    free.run_until(end + 3)
    assert any(m.note % 12 not in C_MAJOR for _, m in free.note_ons())


def test_key_auto_estimates_from_the_window(spread_model):
    sim = Sim(spread_model, improvise_kw=dict(temperature=1.0, top_p=1.0, max_notes=20, key="auto"))
    d_major = [62, 66, 69, 74, 73, 71, 69, 66, 64, 62]
    end = sim.play(d_major, T0 + 0.1, spacing_s=0.15)
    sim.run_until(end + 6)
    assert sim.summaries[0]["key"] == "D major"
    assert all(m.note % 12 in {2, 4, 6, 7, 9, 11, 1} for _, m in sim.note_ons())


def test_a_held_up_engine_moves_the_note_to_the_next_grid_point(model):
    """When the engine wakes too late for a note's grid point, the note goes to the next grid point, on the grid,
    instead of being sent late."""
    sim = Sim(model, improvise_kw=dict(max_notes=12), timing=dict(quantize="1/16", bpm=100))
    start = T0 + 0.5
    end = sim.play([60, 62, 64], start, spacing_s=0.3)
    sim.run_until(end + 1.0)
    assert sim.engine.playing
    due = sim.engine.next_wake_s() + sim.engine.lookahead_s  # the next note's onset: it is handed this early
    sim.t = due + 0.02  # the engine was held up past the note's onset (nothing ran meanwhile)
    sim.run_until(sim.t + 5)
    ons = np.array([t for t, _ in sim.note_ons()])
    positions = (ons - start) / 0.15
    assert np.allclose(positions, np.round(positions), atol=1e-6), positions
    assert not np.any(np.isclose(ons, due))  # the held-up note did not go out at its old time, late
