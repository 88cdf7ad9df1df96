"""Texture bounds (daemon/music/texture.py): polyphony and register, pure; in the engine on a fake clock (respond and
continuous); in `improvd generate`, also with the shipped model on the 8-note C-major melody and two chorale-like
calls."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from improvd.core import notes as nt
from improvd.core.config import ImproviseConfig
from improvd.daemon.generate import continue_notes, parse_polyphony, prime_texture
from improvd.daemon.predict.improviser import Improviser
from improvd.daemon.predict.model import StepModel
from improvd.daemon.predict.sampling import Decoding
from improvd.daemon.music.texture import (REGISTER_WIDEN, Texture, TextureCounts, Voices, call_register,
                                    max_simultaneous, texture_for_call)
from harness.chorales import CHORALE_1, CHORALE_2, MELODY, chorale, sounding_max
from harness.fakes import balanced
from harness.modelfactory import make_step_model
from harness.engines import T0, Sim

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "models" / "bach.onnx"


# ---- pure ----------------------------------------------------------------------------------------------------

def test_max_simultaneous_counts_overlaps_not_touching_notes():
    assert max_simultaneous([], []) == 0
    assert max_simultaneous([0, 1, 2], [1, 2, 3]) == 1  # end == next onset: no overlap
    assert max_simultaneous([0, 0, 0, 1], [2, 2, 0.5, 1.5]) == 3
    assert sounding_max(chorale(CHORALE_1)) == 4


def test_register_is_the_calls_span_widened_by_a_fourth_within_pitch_range():
    assert REGISTER_WIDEN == 5
    assert call_register([60, 67]) == (55, 72)
    assert call_register([22, 30], pitch_range=(21, 108)) == (21, 35)
    assert call_register([]) is None
    assert call_register([10], pitch_range=(21, 108)) is None  # they do not meet: pitch_range alone


def test_a_legato_melody_is_one_voice_a_held_bass_under_it_two():
    pitches = [60, 62, 64, 65]
    onsets = [0.0, 0.3, 0.6, 0.9]
    legato = [0.36, 0.66, 0.96, 1.2]  # each released 60 ms after the next began
    assert texture_for_call("match", "free", pitches=pitches, onsets_s=onsets, ends_s=legato,
                            pitch_range=(21, 108)).polyphony == 1
    assert texture_for_call("match", "free", pitches=pitches + [48], onsets_s=onsets + [0.0],
                            ends_s=legato + [1.2], pitch_range=(21, 108)).polyphony == 2


def test_texture_for_call_settings():
    kw = dict(pitches=[60, 64], onsets_s=[0, 0], ends_s=[1, 1], pitch_range=(21, 108))
    assert texture_for_call(0, "free", **kw) == Texture()
    assert texture_for_call("match", "match", **kw) == Texture(2, (55, 69))
    assert texture_for_call(3, "free", **kw) == Texture(3, None)
    for bad in (17, -1, "two", 1.5, True):
        with pytest.raises(ValueError, match="polyphony = .* is not valid"):
            texture_for_call(bad, "free", **kw)
    with pytest.raises(ValueError, match="register = 'wide' is not valid"):
        texture_for_call(0, "wide", **kw)
    assert parse_polyphony("match") == "match" and parse_polyphony("2") == 2


def test_voices_wait_for_the_release_that_makes_room():
    v = Voices()
    v.add(0.0, 1.0)
    v.add(0.0, 2.0)
    v.add(0.5, 1.5)
    assert v.earliest_onset(0.6, 4) == 0.6
    assert v.earliest_onset(0.6, 3) == 1.0
    assert v.earliest_onset(0.6, 2) == 1.5
    assert v.earliest_onset(0.6, 1) == 2.0
    v.cut(1.2)
    assert v.earliest_onset(0.6, 1) == 1.2


# ---- generate ---------------------------------------------------------------------------------------------------

def generate(model_path, prime, polyphony, register, *, seed=3, temperature=0.9, n=48):
    decoding = Decoding.from_config(ImproviseConfig(), temperature=temperature)
    improviser = Improviser(StepModel(model_path), decoding, rng=np.random.default_rng(seed))
    texture = prime_texture(prime, polyphony, register, decoding.pitch_range)
    counts = TextureCounts()
    out = continue_notes(improviser, prime, n, texture=texture, counts=counts)
    return out, texture, counts


@pytest.mark.skipif(not SHIPPED.is_file(), reason="the shipped model models/bach.onnx is not in this checkout")
@pytest.mark.parametrize("name,prime", [("melody", MELODY), ("chorale 1", chorale(CHORALE_1)),
                                        ("chorale 2", chorale(CHORALE_2, 0.8))])
def test_shipped_model_answers_within_the_calls_texture(name, prime):
    free, _, _ = generate(SHIPPED, prime, 0, "free")
    out, texture, counts = generate(SHIPPED, prime, "match", "match")
    call_max = sounding_max(prime)
    assert texture.polyphony == call_max
    assert sounding_max(out) <= call_max, name
    lo, hi = texture.register
    assert lo == max(21, int(prime[:, 0].min()) - 5) and hi == min(108, int(prime[:, 0].max()) + 5)
    assert lo <= out[:, nt.PITCH].min() and out[:, nt.PITCH].max() <= hi
    assert counts.notes == len(out) == 48
    if name == "melody":  # the unbounded model answers a melody with chords and leaves its register
        assert sounding_max(free) > 1 and counts.delayed > 0
        assert free[:, nt.PITCH].min() < lo or free[:, nt.PITCH].max() > hi


def test_delayed_notes_are_fed_with_their_real_gap(tmp_path):
    ref = make_step_model(tmp_path / "long.onnx", seed=4, context=64, step_scale=0.3, duration_scale=2.0)
    prime = MELODY
    out, texture, counts = generate(ref.path, prime, 1, "free", temperature=0.0, n=12)
    assert texture == Texture(1, None) and counts.delayed > 0
    # replay through the numpy twin: each note is the greedy prediction after the notes before it, as played
    state, res = ref.zero_state(), None
    for row in prime:
        res = ref.step(np.asarray(row, np.float32)[None, :3], state)
        state = res["state_out"]
    onsets = nt.onsets(out)
    for i, row in enumerate(out):
        assert row[nt.PITCH] == int(np.argmax(res["pitch_logits"][0, 21:109])) + 21
        if i:
            assert onsets[i] >= onsets[i - 1] + out[i - 1, nt.DURATION] - 1e-9  # it waited for the release
        res = ref.step(np.asarray([row[0], min(row[1], 2.0), row[2]], np.float32)[None], state)
        state = res["state_out"]


def test_generate_cli_reports_the_bounds(tmp_path, capsys):
    from improvd.daemon.cli import main
    from improvd.core.midifile import Track, read_notes, write_notes
    ref = make_step_model(tmp_path / "long.onnx", seed=4, context=64, step_scale=0.3, duration_scale=2.0)
    write_notes(tmp_path / "prime.mid", [Track("prime", MELODY, channel=0)])
    out = tmp_path / "out.mid"
    assert main(["generate", "--model", str(ref.path), "--prime", str(tmp_path / "prime.mid"), "--out", str(out),
                 "--notes", "16", "--seed", "3", "--polyphony", "match", "--register", "match"]) == 0
    line = capsys.readouterr().out
    assert "at most 1 at once, pitches 55..72" in line and "onsets delayed" in line, line
    notes = read_notes(out)
    assert len(notes) == 24
    assert main(["generate", "--model", str(ref.path), "--out", str(out), "--polyphony", "many"]) == 2
    assert "polyphony = 'many' is not valid" in capsys.readouterr().err
    assert main(["generate", "--model", str(ref.path), "--out", str(out), "--polyphony", "1", "--beam", "2"]) == 2


# ---- the engine ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def long_model(tmp_path_factory):
    """Notes that last longer than their steps: the unbounded answer overlaps itself."""
    return make_step_model(tmp_path_factory.mktemp("m") / "long.onnx", seed=4, context=64, step_scale=0.4,
                           duration_scale=2.0, logit_scale=0.5)


def improvd_sounding_max(sent, channel=0):
    now, best = set(), 0
    for _, m in sent:
        if m.channel != channel or m.type not in ("note_on", "note_off"):
            continue
        if m.type == "note_on" and m.velocity > 0:
            now.add(m.note)
        else:
            now.discard(m.note)
        best = max(best, len(now))
    return best


@pytest.mark.parametrize("mode", ["respond", "continuous"])
def test_engine_answers_a_melody_with_a_melody_in_its_register(long_model, mode):
    kw = dict(silence="auto", max_notes=12, temperature=1.0, top_p=1.0, seed=2, mode=mode)
    free = Sim(long_model, improvise_kw=kw)
    end = free.play([60, 62, 64, 65, 67, 65], T0, spacing_s=0.4, hold_s=0.35)
    free.run_until(end + 20)
    assert improvd_sounding_max(free.sent) > 1  # the model overlaps its notes when let

    sim = Sim(long_model, improvise_kw=dict(kw, polyphony="match", register="match"))
    sim.play([60, 62, 64, 65, 67, 65], T0, spacing_s=0.4, hold_s=0.35)
    sim.run_until(end + 20)
    pitches = [m.note for _, m in sim.note_ons(after=end)]
    assert len(pitches) >= 12
    assert improvd_sounding_max(sim.sent) == 1
    assert min(pitches) >= 55 and max(pitches) <= 72, sorted(set(pitches))
    assert sum(s["delayed"] for s in sim.summaries) > 0 and sum(s["rechosen"] for s in sim.summaries) > 0
    if mode == "respond":  # (the stream still plays at the end)
        assert balanced(sim.sent)


def test_engine_chords_match_a_chordal_call(long_model):
    sim = Sim(long_model, improvise_kw=dict(silence="auto", max_notes=24, temperature=1.0, seed=2,
                                            polyphony="match"))
    for i, chord in enumerate([(48, 52, 55), (50, 53, 57), (48, 52, 55)]):
        for p in chord:
            sim.play([p], T0 + 0.8 * i, hold_s=0.7)
    sim.run_until(T0 + 20)
    assert 1 < improvd_sounding_max(sim.sent) <= 3
    assert balanced(sim.sent)
