"""Turn-taking (daemon/music/turns.py): the phrase end measured in the player's pulse, the sustain pedal, the answer's
entry on the clock's beat and its length; pure functions, then the engine on a fake clock (tests/daemon/test_band.py's
`Sim`: every message at exactly its deadline)."""

from __future__ import annotations

import mido
import pytest

from improvd.daemon.music import turns
from improvd.daemon.music.turns import AnswerLength, Budget, Sustain, answer_budget, parse_answer_length, phrase_end_s
from harness.fakes import balanced
from harness.engines import T0, Sim
from harness.session import PLAYER_CH


# ---- pure ----------------------------------------------------------------------------------------------------

def test_auto_phrase_end_is_one_and_a_half_iois_after_the_last_onset():
    onsets = [0.0, 0.5, 1.0, 1.5]
    assert phrase_end_s("auto", onsets, 1.9) == pytest.approx(1.5 + 0.75)
    # a legato last note released late: at least half an IOI of real silence after the release
    assert phrase_end_s("auto", onsets, 2.2) == pytest.approx(2.2 + 0.25)
    # a fixed silence counts from the release; nothing ends while something is held
    assert phrase_end_s(0.6, onsets, 1.9) == pytest.approx(2.5)
    assert phrase_end_s("auto", onsets, None) is None


def test_auto_reference_ioi_counts_a_dotted_rhythms_long_notes_but_not_one_fermata():
    assert turns.reference_ioi_s([0, 0.6, 0.9, 1.2, 1.8, 2.1, 2.4]) == pytest.approx(0.6)
    assert turns.reference_ioi_s([0, 0.3, 0.6, 0.9, 1.2, 3.0]) == pytest.approx(0.6)  # 1.8 capped at 2 medians
    assert turns.reference_ioi_s([0, 0.0, 0.01]) is None  # chords only: no pulse
    assert turns.auto_wait_s([1.0], 1.3) == turns.AUTO_NO_PULSE_S


def test_auto_wait_is_bounded():
    assert turns.auto_wait_s([0, 0.05, 0.1], 0.13) == pytest.approx(turns.AUTO_BOUNDS_S[0])
    assert turns.auto_wait_s([0, 1.9, 3.8], 3.9) == pytest.approx(turns.AUTO_BOUNDS_S[1])


def test_sustain_pedal_holds_the_turn_until_it_is_released_or_expires():
    s = Sustain(max_hold_s=5.0)
    down = mido.Message("control_change", control=64, value=127, channel=1)
    up = mido.Message("control_change", control=64, value=0, channel=1)
    assert s.handle(1.0, down) and s.down()
    assert s.quiet_since_s(1.2) is None
    assert not s.handle(1.1, mido.Message("control_change", control=64, value=127, channel=2), frozenset({1}))
    s.handle(2.0, up)
    assert not s.down() and s.quiet_since_s(1.2) == 2.0 and s.quiet_since_s(2.5) == 2.5
    s.handle(3.0, down)
    assert s.next_expiry_s() == 8.0
    s.expire(8.0)
    assert not s.down() and s.last_up_s == 8.0


@pytest.mark.parametrize("text,expected", [
    ("match", AnswerLength("match")), ("max", AnswerLength("max")), ("12 notes", AnswerLength("notes", 12)),
    ("1 note", AnswerLength("notes", 1)), ("4 beats", AnswerLength("beats", 4)),
    ("2.5 Beats", AnswerLength("beats", 2.5))])
def test_answer_length_forms(text, expected):
    assert parse_answer_length(text) == expected


@pytest.mark.parametrize("text", ["", "0 notes", "2.5 notes", "4 bars", "-1 beats", "lots", 3])
def test_bad_answer_lengths_name_the_value(text):
    with pytest.raises(ValueError, match="answer_length = .* is not valid: expected 'match'"):
        parse_answer_length(text)


def test_match_counts_the_call_in_half_beats_with_a_pulse_else_in_notes():
    match = AnswerLength("match")
    assert answer_budget(match, call_notes=8, first_onset_s=0.0, last_release_s=7.9, beat_s=1.0) == Budget(beats=8)
    assert answer_budget(match, call_notes=8, first_onset_s=0.0, last_release_s=3.3, beat_s=1.0) == \
        Budget(beats=3.5)
    assert answer_budget(match, call_notes=1, first_onset_s=0.0, last_release_s=0.1, beat_s=0.5) == Budget(beats=1)
    assert answer_budget(match, call_notes=5, first_onset_s=0.0, last_release_s=2.0, beat_s=None) == Budget(notes=5)
    assert answer_budget(AnswerLength("max"), call_notes=5, first_onset_s=0, last_release_s=2, beat_s=1) == Budget()
    assert Budget(beats=4).span_s(0.6) == pytest.approx(2.4)


def test_entry_is_a_beat_or_a_coarser_quantize_step():
    assert turns.entry_ticks(None) == 24
    assert turns.entry_ticks(6) == 24
    assert turns.entry_ticks(96) == 96


# ---- the engine ------------------------------------------------------------------------------------------------

def quarters(sim, pitches, start_s, ioi_s, hold_s):
    return sim.play(pitches, start_s, spacing_s=ioi_s, hold_s=hold_s)


def answer_ons(sim):
    return [t for t, _ in sim.note_ons()]


@pytest.mark.parametrize("silence,premature", [(0.6, True), ("auto", False)])
def test_slow_detached_quarters_are_not_interrupted_with_auto_silence(model, silence, premature):
    """60 bpm quarters released after 0.3 s: a fixed 0.6 s silence answers inside the phrase, "auto" never."""
    sim = Sim(model, improvise_kw=dict(silence=silence, max_notes=4))
    end = quarters(sim, [60, 62, 64, 65, 67, 65, 64, 62], T0, 1.0, 0.3)
    sim.run_until(end + 5)
    last_onset = T0 + 7.0
    inside = [t for t in answer_ons(sim) if t < last_onset]
    assert bool(inside) == premature, inside
    assert any(t > end for t in answer_ons(sim))
    assert balanced(sim.sent)


def test_fast_eighths_are_answered_within_400_ms_of_the_last_release(model):
    ioi = 60.0 / 160 / 2
    sim = Sim(model, improvise_kw=dict(silence="auto", max_notes=4))
    end = quarters(sim, [60, 62, 64, 65, 67, 65, 64, 62], T0, ioi, 0.8 * ioi)
    sim.run_until(end + 3)
    first = answer_ons(sim)[0]
    # the phrase is over 1.5 IOIs after its last onset; the first note comes then, or at the model's predicted
    # step from that onset if it is later (this model's steps are 0.3..0.6 s)
    phrase_end = T0 + 7 * ioi + 1.5 * ioi
    assert first >= phrase_end - 1e-9
    assert first - end <= 0.4
    assert sim.summaries[0]["notes_played"] == 4


def test_a_held_last_note_and_the_pedal_keep_the_turn(model):
    sim = Sim(model, improvise_kw=dict(silence="auto", max_notes=3))
    sim.cc(T0 - 0.1, 64, 127, channel=PLAYER_CH)
    end = quarters(sim, [60, 64, 67], T0, 0.25, 0.2)
    sim.cc(end + 2.0, 64, 0, channel=PLAYER_CH)  # the pedal holds the chord two more seconds
    sim.run_until(end + 4)
    first = answer_ons(sim)[0]
    assert first >= end + 2.0
    # the pedal-up is the release: half an IOI (0.25 s) of silence after it
    assert first - (end + 2.0) == pytest.approx(turns.AUTO_RELEASE_IOIS * 0.25, abs=0.003)


@pytest.mark.parametrize("ioi", [60 / 100, 60 / 160 / 2, 1.0])
def test_match_answers_about_as_long_as_the_call(model, ioi):
    sim = Sim(model, improvise_kw=dict(silence="auto", answer_length="match", max_notes=64))
    end = quarters(sim, [60, 62, 64, 65, 67, 65, 64, 62], T0, ioi, 0.9 * ioi)
    sim.run_until(end + 30)
    ons = [t for t, _ in sim.note_ons() if t > end]
    offs = [t for t, m in sim.sent if m.type in ("note_off", "note_on") and m.velocity == 0 and m.channel == 0
            and t > end]
    answer = max(offs) - ons[0]
    ratio = answer / (end - T0)
    assert 0.75 <= ratio <= 1.05, (ratio, len(ons))
    assert sim.summaries[0]["length"].endswith("beats")
    assert balanced(sim.sent)


def test_fixed_lengths_in_notes_and_beats(model):
    sim = Sim(model, improvise_kw=dict(silence=0.3, answer_length="5 notes", max_notes=64))
    end = quarters(sim, [60, 62, 64], T0, 0.3, 0.2)
    sim.run_until(end + 10)
    assert len(sim.note_ons()) == 5 and sim.summaries[0]["length"] == "5 notes"
    # 2 beats of the player's pulse (0.6 s IOI: a beat of 0.6 s)
    sim = Sim(model, improvise_kw=dict(silence="auto", answer_length="2 beats", max_notes=64))
    end = quarters(sim, [60, 62, 64], T0, 0.6, 0.2)
    sim.run_until(end + 10)
    ons = answer_ons(sim)
    assert ons[-1] - ons[0] < 1.2 and sim.summaries[0]["length"] == "2 beats"
    last_off = max(t for t, m in sim.sent if m.type == "note_off" and m.channel == 0)
    assert last_off - ons[0] <= 1.2 + 1e-9


def test_max_notes_still_caps_match(model):
    sim = Sim(model, improvise_kw=dict(silence="auto", answer_length="match", max_notes=3))
    end = quarters(sim, [60, 62, 64, 65, 67, 65, 64, 62], T0, 0.5, 0.45)
    sim.run_until(end + 10)
    assert len(answer_ons(sim)) == 3


@pytest.mark.parametrize("quantize,step_ticks", [("off", 24), ("1/16", 24), ("1/1", 96)])
def test_with_a_clock_the_answer_enters_on_the_next_beat_or_bar(model, quantize, step_ticks):
    sim = Sim(model, improvise_kw=dict(silence="auto", max_notes=4), timing=dict(quantize=quantize))
    sim.at(T0 + 0.1, mido.Message("start"))
    ticks = sim.clock(T0 + 0.101, 100, 24 * 24)
    end = quarters(sim, [60, 62, 64, 65], T0 + 0.713, 0.3, 0.2)  # off the beat on purpose
    sim.run_until(end + 6)
    first = answer_ons(sim)[0]
    phrase_end = end + max(T0 + 0.713 + 3 * 0.3 + 1.5 * 0.3 - end, 0.5 * 0.3)
    points = ticks[::step_ticks]
    nxt = points[points >= phrase_end][0]
    assert first == pytest.approx(nxt, abs=1e-9), (first - T0, nxt - T0)
