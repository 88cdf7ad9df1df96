"""Tests for `improvd generate` (daemon/generate.py) through the command line, with harness.modelfactory models."""

from pathlib import Path

import mido
import numpy as np
import onnxruntime as ort
import pytest

import improvd.daemon.generate as generate_module
from improvd.core import notes as nt
from improvd.daemon.cli import main
from improvd.core.midifile import Track, notes_from_midi, read_notes, write_notes
from improvd.daemon.predict.sampling import log_softmax
from harness.modelfactory import make_step_model

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "config.toml")  # pitch_range [21, 108], step_range [0, 2], duration_range [0.03, 4]
PITCH_RANGE, STEP_RANGE, DURATION_RANGE = (21, 108), (0.0, 2.0), (0.03, 4.0)
CONTEXT = 8  # small, so that re-priming happens in the prime and several times in the continuation


def make_prime(n=13, seed=0):
    rng = np.random.default_rng(seed)
    onset = np.cumsum(rng.choice([0.0, 0.125, 0.25, 0.5], n))
    return nt.from_onsets(rng.integers(55, 80, n), onset, rng.uniform(0.1, 0.6, n), rng.integers(50, 110, n))


@pytest.fixture(scope="module")
def model3(tmp_path_factory):
    return make_step_model(tmp_path_factory.mktemp("m3") / "m3.onnx", num_features=3, hidden=16, context=CONTEXT,
                           seed=7, step_scale=0.5, duration_scale=0.6)


@pytest.fixture(scope="module")
def model4(tmp_path_factory):
    return make_step_model(tmp_path_factory.mktemp("m4") / "m4.onnx", num_features=4, hidden=16, layers=2,
                           context=CONTEXT, seed=5, logit_scale=1.0, step_scale=0.5, duration_scale=0.6)


@pytest.fixture
def prime_file(tmp_path):
    path = tmp_path / "prime.mid"
    write_notes(path, [Track("p", make_prime())])
    return path


@pytest.fixture
def captured(monkeypatch):
    """The tracks `improvd generate` hands to write_notes, exactly (before the MIDI file rounds them)."""
    calls = []
    real = generate_module.write_notes

    def spy(path, tracks):
        calls.append([Track(t.name, np.array(t.notes), t.channel, t.program, t.start_s) for t in tracks])
        return real(path, tracks)

    monkeypatch.setattr(generate_module, "write_notes", spy)
    return calls


def run_generate(*args):
    return main(["generate", "--config", CONFIG, *map(str, args)])


def hand_rolled(model_path, prime, n, seconds=None):
    """Greedy continuation over onnxruntime alone, by docs/model-format.md (velocity "follow", re-priming)."""
    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    meta = sess.get_modelmeta().custom_metadata_map
    f = len(meta["improvd.features"].split(","))
    context = int(meta["improvd.context"])
    size = sess.get_inputs()[1].shape[1]
    names = [o.name for o in sess.get_outputs()]
    fed, since = [], 0
    out = None

    def step(row, state):
        return dict(zip(names, sess.run(names, {"note": np.array([row[:f]], np.float32), "state": state})))

    def feed(row):
        nonlocal since, out
        fed.append(row)
        since += 1
        if since > context:
            out, since = {"state_out": np.zeros((1, size), np.float32)}, 0
            for past in fed[-context:]:
                out = step(past, out["state_out"])
        else:
            out = step(row, out["state_out"] if out else np.zeros((1, size), np.float32))

    for row in prime:
        feed([float(v) for v in row])
    result, logp, elapsed = [], 0.0, 0.0
    lo, hi = PITCH_RANGE
    for _ in range(n):
        logits = out["pitch_logits"][0].astype(np.float64)
        pitch = lo + int(np.argmax(logits[lo:hi + 1]))
        step_s = min(max(float(out["step"][0]), STEP_RANGE[0]), STEP_RANGE[1])
        dur_s = min(max(float(out["duration"][0]), DURATION_RANGE[0]), DURATION_RANGE[1])
        recent = [r[3] for r in fed[-context:][-8:] if r[3] > 0]
        vel = float(min(max(round(float(np.mean(recent))), 1), 127)) if recent else 90.0
        elapsed += step_s
        if seconds is not None and elapsed > seconds:
            break
        logp += float(log_softmax(logits[lo:hi + 1])[pitch - lo])
        row = [float(pitch), step_s, dur_s, vel]
        result.append(row)
        feed(row)
    return np.array(result).reshape(-1, 4), logp


def pitch_logp(model_path, prime, cont):
    """Summed log-probability (within the pitch range) of the continuation's pitches, with re-priming."""
    from improvd.daemon.predict.improviser import Decoding, Improviser
    from improvd.daemon.predict.model import StepModel
    imp = Improviser(StepModel(model_path), Decoding(pitch_range=PITCH_RANGE))
    imp.prime(prime)
    lo, hi = PITCH_RANGE
    total = 0.0
    for row in cont:
        total += float(log_softmax(imp.prediction.pitch_logits[0, lo:hi + 1])[int(row[0]) - lo])
        imp.feed(row)
    return total


def read_tracks(path):
    """{track name: (notes, absolute onsets)} of a file written by `improvd generate`."""
    midi = mido.MidiFile(str(path))
    out = {}
    for track in midi.tracks[1:]:
        name = next(m.name for m in track if m.type == "track_name")
        one = mido.MidiFile(type=1, ticks_per_beat=midi.ticks_per_beat)
        one.tracks += [midi.tracks[0], track]
        notes = notes_from_midi(one)
        out[name] = (notes, nt.onsets(notes, _first_onset(one)))
    return out


def _first_onset(midi):
    tick = 0
    for msg in mido.merge_tracks(midi.tracks):
        tick += msg.time
        if msg.type == "note_on" and msg.velocity:
            return mido.tick2second(tick, midi.ticks_per_beat, 500_000)
    return 0.0


def file_durations(onsets, notes):
    """Durations as the file holds them: a note is cut where the same pitch starts again while it sounds."""
    dur = notes[:, nt.DURATION].copy()
    for i in range(len(notes)):
        later = [onsets[j] for j in range(i + 1, len(notes))
                 if notes[j, nt.PITCH] == notes[i, nt.PITCH] and onsets[j] > onsets[i]]
        if later:
            dur[i] = min(dur[i], later[0] - onsets[i])
    return dur


@pytest.mark.parametrize("which", ["model3", "model4"])
def test_greedy_is_deterministic_and_equals_the_hand_rolled_loop(request, tmp_path, prime_file, captured, which):
    model = request.getfixturevalue(which)
    out1, out2 = tmp_path / "a.mid", tmp_path / "b.mid"
    assert run_generate("--model", model.path, "--prime", prime_file, "--out", out1, "--temperature", 0,
                        "--notes", 30, "--seed", 1) == 0
    assert run_generate("--model", model.path, "--prime", prime_file, "--out", out2, "--temperature", 0,
                        "--notes", 30, "--seed", 2) == 0
    assert out1.read_bytes() == out2.read_bytes()  # greedy ignores the seed

    prime = captured[0][0].notes
    cont = captured[0][1].notes
    expected, _ = hand_rolled(model.path, prime, 30)
    assert len(cont) == 30
    np.testing.assert_array_equal(cont[:, nt.PITCH], expected[:, nt.PITCH])
    np.testing.assert_array_equal(cont[:, nt.STEP:nt.DURATION + 1], expected[:, nt.STEP:nt.DURATION + 1])
    np.testing.assert_array_equal(cont[:, nt.VELOCITY], expected[:, nt.VELOCITY])
    assert len(set(cont[:, nt.PITCH])) > 1  # the model does not just repeat one note

    # The file: prime and continuation on separate tracks, times to the millisecond.
    tracks = read_tracks(out1)
    assert set(tracks) == {"prime", "improvd"}
    channels = {m.channel for t in mido.MidiFile(str(out1)).tracks for m in t if m.type == "note_on"}
    assert channels == {0, 1}
    prime_notes, prime_onsets = tracks["prime"]
    np.testing.assert_array_equal(prime_notes[:, nt.PITCH], prime[:, nt.PITCH])
    cont_notes, cont_onsets = tracks["improvd"]
    want_onsets = nt.onsets(prime)[-1] + np.cumsum(expected[:, nt.STEP])
    np.testing.assert_array_equal(cont_notes[:, nt.PITCH], expected[:, nt.PITCH])
    np.testing.assert_allclose(cont_onsets, want_onsets, atol=1e-3)
    np.testing.assert_allclose(cont_notes[:, nt.DURATION], file_durations(want_onsets, expected), atol=1e-3)


def test_seconds_bounds_the_continuation(tmp_path, prime_file, model3, captured):
    full, _ = hand_rolled(model3.path, read_notes(prime_file), 40)
    limit = float(np.cumsum(full[:, nt.STEP])[9]) + 1e-4  # room for exactly 10 notes
    out = tmp_path / "s.mid"
    assert run_generate("--model", model3.path, "--prime", prime_file, "--out", out, "--temperature", 0,
                        "--notes", 40, "--seconds", limit) == 0
    cont = captured[-1][1].notes
    assert len(cont) == 10
    assert cont[:, nt.STEP].sum() <= limit
    np.testing.assert_array_equal(cont, full[:10])


def test_beam_search_is_at_least_as_likely_as_greedy(tmp_path, prime_file, model3, captured):
    greedy_out, beam_out = tmp_path / "g.mid", tmp_path / "b.mid"
    assert run_generate("--model", model3.path, "--prime", prime_file, "--out", greedy_out, "--temperature", 0,
                        "--notes", 16) == 0
    assert run_generate("--model", model3.path, "--prime", prime_file, "--out", beam_out, "--beam", 3,
                        "--notes", 16) == 0
    prime = captured[0][0].notes
    greedy, beam = captured[0][1].notes, captured[1][1].notes
    assert len(greedy) == len(beam) == 16
    g, b = pitch_logp(model3.path, prime, greedy), pitch_logp(model3.path, prime, beam)
    assert b >= g - 1e-9, (b, g)
    _, g_hand = hand_rolled(model3.path, prime, 16)
    assert abs(g - g_hand) < 1e-6
    assert set(read_tracks(beam_out)) == {"prime", "improvd"}


def test_prime_that_is_not_midi_is_an_error_and_writes_nothing(tmp_path, model3, capsys):
    bad = tmp_path / "bad.mid"
    bad.write_text("not a MIDI file at all")
    out = tmp_path / "out.mid"
    assert run_generate("--model", model3.path, "--prime", bad, "--out", out, "--temperature", 0) == 2
    err = capsys.readouterr().err
    assert "--prime" in err and "bad.mid" in err
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.mid"]


def test_prime_without_notes_is_an_error_and_writes_nothing(tmp_path, model3, capsys):
    empty = tmp_path / "empty.mid"
    midi = mido.MidiFile()
    midi.tracks.append(mido.MidiTrack([mido.MetaMessage("set_tempo", tempo=500_000)]))
    midi.save(str(empty))
    out = tmp_path / "out.mid"
    assert run_generate("--model", model3.path, "--prime", empty, "--out", out, "--temperature", 0) == 2
    assert "no notes" in capsys.readouterr().err
    assert not out.exists()


def test_missing_prime_file_is_an_error(tmp_path, model3, capsys):
    out = tmp_path / "out.mid"
    assert run_generate("--model", model3.path, "--prime", tmp_path / "nope.mid", "--out", out) == 2
    assert "no such file" in capsys.readouterr().err
    assert not out.exists()


def test_without_prime_it_says_so(tmp_path, model3, capsys):
    out = tmp_path / "out.mid"
    assert run_generate("--model", model3.path, "--out", out, "--temperature", 0, "--notes", 5) == 0
    err = capsys.readouterr().err
    assert "no --prime" in err and "built-in" in err
    tracks = read_tracks(out)
    assert len(tracks["prime"][0]) == len(generate_module.BUILTIN_PRIME)
    assert len(tracks["improvd"][0]) == 5


def test_plot_writes_a_png(tmp_path, prime_file, model3):
    out, png = tmp_path / "out.mid", tmp_path / "roll.png"
    assert run_generate("--model", model3.path, "--prime", prime_file, "--out", out, "--temperature", 0,
                        "--notes", 8, "--plot", png) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 1000


def test_sampling_is_reproducible_with_a_seed(tmp_path, prime_file, model3):
    outs = []
    for seed in (5, 5, 6):
        out = tmp_path / f"s{len(outs)}.mid"
        assert run_generate("--model", model3.path, "--prime", prime_file, "--out", out, "--temperature", 1.5,
                            "--top-p", 1.0, "--notes", 20, "--seed", seed) == 0
        outs.append(out.read_bytes())
    assert outs[0] == outs[1] != outs[2]


@pytest.mark.parametrize("args, message", [
    (["--notes", "0"], "--notes"), (["--beam", "-1"], "--beam"), (["--temperature", "-1"], "temperature"),
    (["--top-p", "0"], "top_p"),
])
def test_bad_arguments_are_errors(tmp_path, model3, capsys, args, message):
    out = tmp_path / "out.mid"
    assert run_generate("--model", model3.path, "--out", out, *args) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_missing_model_is_an_error(tmp_path, capsys):
    assert run_generate("--model", tmp_path / "none.onnx", "--out", tmp_path / "o.mid") == 2
    assert "does not exist" in capsys.readouterr().err
